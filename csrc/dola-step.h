// The end of a generation step, shared by the session and the batch engine: a decoder's scores for
// one position through the sampler to a token, with the step's diagnostics.
#pragma once

#include "decoders/decoder.h"
#include "dola-capture.h"
#include "dola-model.h"
#include "dola-project.h"
#include "dola-sampler.h"
#include "dola-types.h"

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace dola {

// dola::error when logits[0..n) holds NaN or inf.
void check_finite(const float * logits, int64_t n);

// Throws dola::error on layers out of range for the model, sampling values or logit-bias ids it
// cannot use, and Activation Decoding's values; returns the mature layer (-1 resolved to n_layer).
int32_t check_decode_params(const model & m, const decode_params & p);

// Whether a step's final logits come from dola-cpp's projection of the captured final normed row
// instead of llama.cpp's LM head (the graph stops before it), where the projector can and
// DOLA_CPP_NO_FUSE is not set, with the final layer as mature: a decoder with projected layers
// (the final row joins them: one pass over the output matrix instead of the LM head and a second;
// normed premature rows are normed on the host first, as the projection would norm them), and
// plain decoding where the projector's own kernel reads the matrix on the host (faster there than
// the LM head; elsewhere, a GPU or a repacked layout, llama.cpp's head stays).
bool fuses_final(const decoder & dec, int32_t mature, const model & m, const switches & env, const projector * proj);

// Whether a step's rows can go to projector::project_dola as one group [candidates..., mature]:
// the final row fused, the premature rows raw, a decoder that takes device rows (DoLa with two
// candidates or more) and whose candidates are exactly the n_layers rows projected before it.
bool contrast_on_device(const decoder & dec, bool fused, bool premature_norm, size_t n_layers);

// A group's rows left by projector::project_dola on its backend, from row `first` on (its local
// row K is its mature one): a decoder fetches only those it needs.
class projected_rows : public device_rows {
public:
    projected_rows(projector & p, int32_t first) : p_(p), first_(first) {}
    void log_softmax(int32_t n, const int32_t * rows, float * const * out) override;

private:
    projector & p_;
    int32_t first_;
};

// For a decoder that projects no layers, where it would fuse its final row (plain decoding, the
// final layer mature, capture on, DOLA_CPP_NO_FUSE unset, dola-cpp's kernel reading the output
// matrix) and no projector was made yet: one for the model's output matrix, or null (plain
// decoding then keeps llama.cpp's LM head, as it does without a projector).
std::unique_ptr<projector> plain_final_projector(const decoder & dec, int32_t mature, const model & m,
                                                 const switches & env, bool capture_enabled);

// scores and lp ([n_vocab]) as the decoder's step left them (lp: the mature log-softmax); history:
// the tokens the sequence holds, the first n_prompt of them its prompt. Fills res's token, score,
// mature and top log-probs (n_probs of them), and the token's context entropy when context is set.
// chosen_lp: scratch.
void finish_step(sampler & smp, float * scores, float * lp, int64_t n_vocab, const std::vector<llama_token> & history,
                 size_t n_prompt, float eos_bonus, int32_t n_probs, context_entropy_source * context,
                 std::vector<float> & chosen_lp, step_result & res);

// Keeps the longest prefix that `cached` (what the cache holds for sequence seq) shares with toks,
// at most max_keep tokens: drops the rest of the sequence from the context's memory (all of it
// where that memory cannot drop a suffix) and from `cached`. Returns the length kept.
size_t keep_common_prefix(llama_context * ctx, llama_seq_id seq, std::vector<llama_token> & cached,
                          const std::vector<llama_token> & toks, size_t max_keep);
// The error for a capture of the last ubatch that is not complete (a layer not F32 rows, or layers
// the architecture's graph does not expose), and for a context layer it does not expose at every
// position.
std::string capture_failure(const layer_capture & capture, const std::string & architecture);
std::string context_capture_failure(int32_t layer, const std::string & architecture);

// llama.cpp context plumbing the session and the batch engine share (some of it reaches into
// llama.cpp's internal context: its scheduler and parameters).

// The threads a context computes with: n, or every core for 0; dola::error beyond ggml's limit.
int32_t checked_threads(int32_t n);
// llama.cpp's parameters for a context of n_ctx cells that decodes at most n_batch tokens a call,
// in one ubatch (captured rows map to the call's rows), with n_threads, the KV cache type
// (f16, q8_0, or f32: the exact mode, without flash attention) and an abort callback. Throws
// dola::error on another KV type.
llama_context_params context_params_for(uint32_t n_ctx, uint32_t n_batch, int32_t n_threads, const std::string & kv_type,
                                        ggml_abort_callback abort, void * abort_data);

// llama_batch_init's arrays, freed however the decode ends (llama.cpp ships no deleter for it).
class owned_batch {
public:
    // n tokens, each in up to n_seq sequences
    explicit owned_batch(int32_t n, int32_t n_seq = 1) : b_(llama_batch_init(n, 0, n_seq)) {}
    ~owned_batch() { llama_batch_free(b_); }
    owned_batch(const owned_batch &) = delete;
    owned_batch & operator=(const owned_batch &) = delete;
    llama_batch & get() { return b_; }

private:
    llama_batch b_;
};

// Installs (capture) or removes (null) the capture's eval callback in the context's scheduler.
void set_eval_callback(llama_context * ctx, layer_capture * capture);
// Has llama.cpp reserve and rebuild its graphs before the next decode (new layers to keep as
// graph outputs).
void rebuild_graphs(llama_context * ctx);

}  // namespace dola
