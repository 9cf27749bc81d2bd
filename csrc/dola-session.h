// A decoding session: one llama.cpp context on a loaded model. It owns the context's lifecycle
// and KV-prefix reuse and orchestrates the rest: the layer capture (dola-capture), the early-exit
// projection (dola-project), the decoder (decoders/), Activation Decoding's context entropy
// (dola-context-entropy) and the sampler (dola-sampler). Knows no Python.
#pragma once

#include "decoders/decoder.h"
#include "dola-answer.h"
#include "dola-capture.h"
#include "dola-context-entropy.h"
#include "dola-model.h"
#include "dola-project.h"
#include "dola-sampler.h"
#include "dola-threads.h"
#include "dola-types.h"

#include "llama-cpp.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace dola {

class session {
public:
    session(std::shared_ptr<model> mdl, const context_params & params);
    ~session();

    const model & get_model() const { return *model_; }
    uint32_t n_ctx() const { return n_ctx_; }
    int32_t n_threads() const { return n_threads_; }
    // Threads the last decode used (fewer than n_threads while other processes load the CPU).
    int32_t threads_in_use() const { return threads_now_; }
    bool adaptive_threads() const { return governor_.adaptive(); }
    const std::vector<llama_token> & tokens() const { return tokens_; }

    // Throws dola::error on invalid layers or sampling values.
    void configure(const decode_params & params);
    const decode_params & params() const { return params_; }

    // Makes the context hold `prompt` and the outputs of its last token, reusing the longest
    // cached prefix. Throws aborted when interrupted (the cache then holds what was decoded).
    void prefill(const std::vector<llama_token> & prompt);
    // Chooses the next token from the current outputs (does not decode it). eos_bonus (nats) is
    // added to every end-of-generation token's score after the contrast and the repetition
    // penalty; one the relative-top filter removed first re-enters as far below the best score
    // as the mature distribution has it below its top token.
    step_result sample(float eos_bonus = 0.0f);
    // Appends a token and decodes it.
    void accept(llama_token token);
    // The token loop, up to max_steps times: sample (with eos_bonus[first + k], 0 past its end),
    // the answer's verdict on the step, and accept unless the answer ended there. Its steps, in
    // order: the last one ends the answer or is the max_steps-th (already decoded).
    std::vector<step_result> run(answer_text & answer, const std::vector<float> & eos_bonus, size_t first,
                                 int32_t max_steps);
    void clear();

    // Logits of `layers` (n_layer = final logits) at the last position of `prompt`:
    // [len(layers)][n_vocab]. project_final projects the captured last block instead of
    // returning llama.cpp's logits for n_layer (a self-check of the projection). The layers are
    // 64-bit as callers give them: this is where their range is checked.
    std::vector<float> layer_logits(const std::vector<llama_token> & prompt, const std::vector<int64_t> & layers,
                                    bool premature_norm, bool project_final);

    // Teacher-forced DoLa score of tokens[n_prefix:] given tokens[:n_prefix] (DoLa repo lm_score)
    // with the current candidates / mature layer. mode: plain when no candidates.
    score_result score(const std::vector<llama_token> & tokens, size_t n_prefix, bool post_softmax,
                       double relative_top, float mask_value);
    // score() of several texts (the answers of one question) in the same llama_decode calls: the
    // prefix they share is decoded once, as sequence 0 (and stays cached, as score() leaves its
    // prefix), and each text's own tokens decode as a sequence of their own on that prefix's
    // cells (shared, not recomputed), in the same calls as the prefix's uncached part; texts that
    // go on alike share those tokens' rows and cells too, up to where they part. Up to
    // max_score_texts texts per call; more, or more tokens than the context holds beside the
    // prefix, go in several calls.
    std::vector<score_result> score_batch(const std::vector<scored_text> & texts, bool post_softmax,
                                          double relative_top, float mask_value);
    static constexpr int32_t max_score_texts = 15;

    // Throws dola::error when prompt is empty or holds an id outside the vocabulary, and
    // prompt_too_long when it has more tokens than the context: what prefill and score check
    // first, for callers that want the answer before they decode.
    void check_prompt(const std::vector<llama_token> & prompt) const;

    // Interruption: cancel() from any thread; the check function is polled every ~20 ms while
    // llama.cpp computes (the bindings use it for Ctrl-C).
    void cancel() { cancel_.store(true); }
    void reset_cancel() { cancel_.store(false); }
    void set_interrupt_check(std::function<bool()> fn) { interrupt_check_ = std::move(fn); }

    timings & stats() { return timings_; }
    // Where the early-exit projection runs ("" until DoLa is first configured).
    std::string projection_backend() const { return projector_ ? projector_->backend_name() : ""; }

private:
    static bool abort_cb(void * data);
    // Decodes toks as the next tokens of sequence 0 (the cache tokens_ describes). context: keep
    // the context layer's rows of these tokens (Activation Decoding)
    void decode_chunk(const llama_token * toks, int32_t n, int32_t row_begin, int32_t row_end, bool context = false);
    // toks, just decoded as the first n rows of a call into sequence 0, become the session's tokens,
    // with their context layer's rows (captured) when context
    void append_decoded(const llama_token * toks, int32_t n, bool context);
    // One llama_decode of bt, capturing the layers' rows [row_begin, row_end) of it (and every row
    // of the context layer with context); throws on failure, with the cache of sequence 0 synced.
    void decode_batch(llama_batch & bt, int32_t row_begin, int32_t row_end, bool context);
    // Throw when the last decode did not capture the context layer / every layer.
    void check_context_captured();
    void check_layers_captured();
    void sync_cache_after_failure();
    // Keeps the longest cached prefix shared with toks (at most max_keep tokens), drops the
    // rest of the KV cache, and returns its length.
    size_t keep_cached_prefix(const std::vector<llama_token> & toks, size_t max_keep);
    void update_threads();
    // The projector, made when a decoder first needs one (its errors say why a model cannot).
    projector & need_projector();
    // Keeps p (null: nothing) as the projector, shared with the context entropy; there is none yet.
    void adopt_projector(std::unique_ptr<projector> p);
    int32_t context_layer() const { return decoder_ ? decoder_->context_layer() : -1; }
    // Installs or removes the capture callback. With it, ggml's scheduler computes the graph in
    // pieces, up to each node the callback asks for, and waits after each; ubatches that need
    // none (layer_capture::needs_callback) run without it.
    void set_capture_callback(bool on);
    // Gathers the mature logits and the decoder's projected rows of output row `row` of the last
    // decode (row_proj: that row's projected layers, in capture order), for step and score.
    decoder_rows rows_for(const float * row_proj, int32_t row);

    // For calls that capture other rows than decoding does (layer_logits, score): on return or
    // throw, puts the capture back to the configured layers and fused-final state; the outputs
    // they leave are not sampleable.
    struct capture_override {
        session & s;
        ~capture_override() {
            s.capture_.set_layers(s.capture_layers_);
            s.capture_.set_final(s.fuse_final_);
            s.have_outputs_ = false;
        }
    };

    std::shared_ptr<model> model_;
    switches env_;
    llama_context_ptr ctx_;
    uint32_t n_ctx_ = 0, n_batch_ = 0;
    int32_t n_threads_ = 0;
    int32_t threads_now_ = 0;
    thread_governor governor_;
    bool capture_enabled_ = true;
    bool callback_on_ = false;  // the capture callback is installed in llama.cpp's scheduler
    layer_capture capture_;
    std::unique_ptr<projector> projector_;
    std::unique_ptr<decoder> decoder_;
    decode_params params_;
    std::vector<int32_t> capture_layers_;  // hidden layers captured for the current params
    bool fuse_final_ = false;              // final logits computed with the premature rows
    sampler sampler_;
    context_entropy context_;

    std::vector<llama_token> tokens_;  // what the KV cache holds
    size_t n_prompt_ = 0;              // where the answer begins in tokens_ (the last prefill's prompt)
    bool have_outputs_ = false;        // the last decode's last row is available
    std::vector<float> device_jsd_;
    std::vector<float> mature_hidden_logits_;  // scratch
    std::vector<float> cand_logits_, lp_, scores_, hidden_;
    std::vector<float> chosen_lp_;  // scratch: the log-softmax of the processed scores (n_probs > 0)

    std::atomic<bool> cancel_{false};
    std::function<bool()> interrupt_check_;
    std::chrono::steady_clock::time_point last_check_;
    timings timings_;
};

}  // namespace dola
