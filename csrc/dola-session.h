// A decoding session: one llama.cpp context on a loaded model, with the layer capture, the
// early-exit projection and a decoder. Knows no Python.
#pragma once

#include "decoders/decoder.h"
#include "dola-capture.h"
#include "dola-contrast.h"
#include "dola-model.h"
#include "dola-project.h"
#include "dola-threads.h"

#include "llama-cpp.h"

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <string>
#include <vector>

namespace dola {

struct context_params {
    uint32_t n_ctx = 2048;
    int32_t n_threads = 0;  // 0 = hardware concurrency
    uint32_t n_batch = 512;
    std::string kv_type = "f16";  // KV cache type: f16, f32, q8_0
    bool capture = true;          // register the layer-capture eval callback (needed for DoLa)
    bool adaptive_threads = true; // use fewer threads while other processes keep cores busy
};

// Mirrors dola_cpp.DecodeConfig.
struct decode_params {
    std::vector<int32_t> candidates;  // premature candidate layers; empty = plain decoding
    int32_t mature = -1;              // mature layer; -1 or n_layer = the model's final logits
    double relative_top = 0.1;
    float repetition_penalty = 1.0f;
    bool premature_norm = false;
    // Activation Decoding: scores lowered by alpha times the entropy over the context positions
    // of info_layer's early-exit distribution (0 <= info_layer < n_layer)
    bool activation = false;
    float alpha = 0.5f;
    int32_t info_layer = -1;
    // sampling; temperature <= 0 = greedy
    float temperature = 0.0f;
    int32_t top_k = 0;
    float top_p = 1.0f;
    float min_p = 0.0f;
    uint32_t seed = 0xFFFFFFFF;
    // llama.cpp's DRY ("don't repeat yourself") sampler, as llama-server names its settings:
    // a token that would extend a sequence already in the context by more than
    // dry_allowed_length tokens loses dry_multiplier * dry_base^(length - dry_allowed_length).
    // dry_multiplier 0 = off; dry_penalty_last_n: tokens scanned, -1 = the whole context.
    float dry_multiplier = 0.0f;
    float dry_base = 1.75f;
    int32_t dry_allowed_length = 2;
    int32_t dry_penalty_last_n = -1;
    std::vector<std::string> dry_sequence_breakers = {"\n", ":", "\"", "*"};  // llama-server's default
};

struct step_result {
    llama_token token = -1;
    int32_t premature_layer = -1;  // -1 for plain decoding
    std::vector<float> jsd;        // per candidate (dynamic DoLa)
    float mature_logprob = 0.0f;   // log p_mature(token)
    float score = 0.0f;            // processed score of the token (after repetition penalty)
    float entropy = 0.0f;          // entropy of the mature distribution (nats)
    float top_logprob = 0.0f;      // log of the mature distribution's largest probability
    float activation_entropy = std::numeric_limits<float>::quiet_NaN();  // H of the token (Activation Decoding)
};

struct score_result {
    double total = 0.0;
    std::vector<float> token_scores;     // per continuation token
    std::vector<int32_t> premature_layers;  // per continuation token (-1 for plain)
    // per continuation token, as a generation step would report it: log p_mature(token), the
    // mature distribution's largest log-probability and entropy, the JSD of the premature layer
    std::vector<float> mature_logprobs, top_logprobs, entropies, jsd;
};

struct timings {
    double prefill_ms = 0.0, decode_ms = 0.0, contrast_ms = 0.0;
    int64_t n_prefill = 0, n_decode = 0;
    // llama_decode calls (ubatches) in which layer rows were captured
    int64_t n_captured_ubatches = 0;
    int64_t n_capture_splits = 0;  // times the capture callback had ggml stop the graph and wait
};

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
    void clear();

    // Logits of `layers` (n_layer = final logits) at the last position of `prompt`:
    // [len(layers)][n_vocab]. project_final projects the captured last block instead of
    // returning llama.cpp's logits for n_layer (a self-check of the projection).
    std::vector<float> layer_logits(const std::vector<llama_token> & prompt, const std::vector<int32_t> & layers,
                                    bool premature_norm, bool project_final);

    // Teacher-forced DoLa score of tokens[n_prefix:] given tokens[:n_prefix] (DoLa repo lm_score)
    // with the current candidates / mature layer. mode: plain when no candidates.
    score_result score(const std::vector<llama_token> & tokens, size_t n_prefix, bool post_softmax,
                       double relative_top, float mask_value);

    // Interruption: cancel() from any thread; the check function is polled every ~20 ms while
    // llama.cpp computes (the bindings use it for Ctrl-C).
    void cancel() { cancel_.store(true); }
    void reset_cancel() { cancel_.store(false); }
    bool cancelled() const { return cancel_.load(); }
    void set_interrupt_check(std::function<bool()> fn) { interrupt_check_ = std::move(fn); }

    timings & stats() { return timings_; }
    // Where the early-exit projection runs ("" until DoLa is first configured).
    std::string projection_backend() const { return projector_ ? projector_->backend_name() : ""; }

private:
    static bool abort_cb(void * data);
    // context: keep the context layer's rows of these tokens (Activation Decoding)
    void decode_chunk(const llama_token * toks, int32_t n, int32_t row_begin, int32_t row_end, bool context = false);
    void sync_cache_after_failure();
    // Keeps the longest cached prefix shared with toks (at most max_keep tokens), drops the
    // rest of the KV cache, and returns its length.
    size_t keep_cached_prefix(const std::vector<llama_token> & toks, size_t max_keep);
    void validate_tokens(const std::vector<llama_token> & toks) const;
    void update_threads();
    void boost_eog(float bonus, float top_logprob);  // see sample()
    // Activation Decoding's context: the info layer's hidden rows of the cached tokens
    // [0, context_len_). H covers positions [0, context_end_) and is computed on demand: a few
    // entries from their output rows (entropy_of), or every entry by streaming all positions
    // through the projection (entropy_all), starting from the longest valid checkpoint of the
    // statistics and keeping checkpoints at context_boundary_ (what the next call can reuse of
    // this one) and at the prefix this call shared with the last one (e.g. a few-shot primer).
    int32_t context_layer() const { return decoder_ ? decoder_->context_layer() : -1; }
    void append_context_rows(int32_t n);
    void add_context_rows(position_entropy & acc, size_t from, size_t to);
    void context_begin(size_t boundary, size_t end);
    void context_entropy_of(const int32_t * ids, int32_t n, float * out);
    const float * context_entropy_all();
    class context_source : public context_entropy_source {
    public:
        explicit context_source(session & s) : s_(s) {}
        void entropy_of(const int32_t * ids, int32_t n, float * out) override { s_.context_entropy_of(ids, n, out); }
        const float * entropy_all() override { return s_.context_entropy_all(); }

    private:
        session & s_;
    };
    // The rows of the last projection, left on its backend with DoLa's JSD computed there.
    class projected_rows : public device_rows {
    public:
        explicit projected_rows(session & s) : s_(s) {}
        void log_softmax(int32_t n, const int32_t * rows, float * const * out) override {
            s_.projector_->fetch_log_softmax(n, rows, out);
        }

    private:
        session & s_;
    };
    projected_rows device_rows_{*this};
    std::vector<float> device_jsd_;
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
    llama_context_ptr ctx_;
    uint32_t n_ctx_ = 0, n_batch_ = 0;
    int32_t n_threads_ = 0;
    int32_t threads_now_ = 0;
    thread_governor governor_;
    bool capture_enabled_ = true;
    bool callback_on_ = false;  // the capture callback is installed in llama.cpp's scheduler
    // Installs or removes the capture callback. With it, ggml's scheduler computes the graph in
    // pieces, up to each node the callback asks for, and waits after each; ubatches that need
    // none (layer_capture::needs_callback) run without it.
    void set_capture_callback(bool on);
    layer_capture capture_;
    std::unique_ptr<projector> projector_;
    std::unique_ptr<decoder> decoder_;
    decode_params params_;
    std::vector<int32_t> capture_layers_;  // hidden layers captured for the current params
    bool fuse_final_ = false;              // final logits computed with the premature rows
    llama_sampler_ptr chain_;
    llama_sampler_ptr dry_;  // null when DRY is off
    size_t dry_last_n_ = 0;
    std::vector<llama_token> dry_ids_;  // scratch: the distinct tokens DRY may penalise
    void apply_dry();

    std::vector<llama_token> tokens_;  // what the KV cache holds
    bool have_outputs_ = false;        // the last decode's last row is available
    std::vector<float> mature_hidden_logits_;  // scratch
    std::vector<float> cand_logits_, lp_, scores_, hidden_;
    // Gathers the mature logits and the decoder's projected rows of output row `row` of the last
    // decode (row_proj: that row's projected layers, in capture order), for step and score.
    decoder_rows rows_for(const float * row_proj, int32_t row);
    std::vector<llama_token_data> cur_;

    std::vector<float> context_hidden_;  // [context_len_][n_embd]
    size_t context_len_ = 0;
    int32_t context_rows_layer_ = -1;    // the layer context_hidden_ holds
    struct checkpoint {
        size_t len;
        position_entropy stats;
    };
    std::vector<checkpoint> ckpts_;    // at most 3, least recently used first
    size_t context_common_ = 0;        // tokens the last keep_cached_prefix kept
    bool ckpt_norm_ = false;
    std::vector<float> context_H_;       // [n_vocab], NaN = not computed yet; valid when context_H_valid_
    bool context_H_valid_ = false;       // H is defined (a prompt or a scored sequence is in place)
    bool context_H_all_ = false;         // every entry computed
    size_t context_boundary_ = 0, context_end_ = 0;
    context_source context_source_{*this};
    std::vector<float> context_proj_, context_w_, context_normed_;  // scratch
    std::vector<int32_t> context_missing_;

    std::atomic<bool> cancel_{false};
    std::function<bool()> interrupt_check_;
    std::chrono::steady_clock::time_point last_check_;
    timings timings_;
};

}  // namespace dola
