#include "dola-step.h"

#include "dola-contrast.h"
#include "dola-error.h"

#include "llama-context.h"  // internal: the context's parameters and scheduler

#include <algorithm>
#include <cmath>
#include <string>
#include <thread>

namespace dola {

void check_finite(const float * logits, int64_t n) {
    if (!all_finite(logits, n)) {
        throw error("the model produced non-finite logits (NaN or inf): its weights are corrupt or its activations overflow");
    }
}

bool fuses_final(const decoder & dec, int32_t mature, const model & m, const switches & env, const projector * proj) {
    if (mature != m.n_layer() || env.no_fuse || proj == nullptr || !proj->can_fuse_final()) return false;
    return !dec.layers().empty() || (dec.context_layer() < 0 && proj->host_kernel());
}

bool contrast_on_device(const decoder & dec, bool fused, bool premature_norm, size_t n_layers) {
    return fused && !premature_norm && dec.wants_device_rows() && dec.layers().size() == n_layers;
}

void projected_rows::log_softmax(int32_t n, const int32_t * rows, float * const * out) {
    std::vector<int32_t> all(rows, rows + n);
    for (int32_t & r : all) r += first_;
    p_.fetch_log_softmax(n, all.data(), out);
}

std::unique_ptr<projector> plain_final_projector(const decoder & dec, int32_t mature, const model & m,
                                                 const switches & env, bool capture_enabled) {
    if (!dec.layers().empty() || dec.context_layer() >= 0 || mature != m.n_layer() || env.no_fuse || !capture_enabled ||
        !projector::kernel_reads(m.get(), env)) {
        return nullptr;  // (where no kernel of ours reads the matrix, the projector would not fuse plain decoding)
    }
    try {
        return std::make_unique<projector>(m.get(), env);
    } catch (const error &) {  // an output matrix no projection reads: llama.cpp's LM head does
        return nullptr;
    }
}

int32_t check_decode_params(const model & m, const decode_params & p) {
    const int32_t N = m.n_layer();
    const int32_t mature = p.mature < 0 ? N : p.mature;
    if (mature < 1 || mature > N) {
        throw error("mature layer " + std::to_string(mature) + " is out of range: valid layers are 1.." + std::to_string(N));
    }
    for (int32_t l : p.candidates) {
        if (l < 0 || l >= N) {
            throw error("premature layer " + std::to_string(l) + " is out of range: valid layers are 0.." + std::to_string(N - 1));
        }
        if (l == mature) throw error("premature layer " + std::to_string(l) + " is the mature layer");
    }
    if (!(p.relative_top >= 0.0 && p.relative_top < 1.0)) throw error("relative_top must be in [0, 1)");
    sampler::check(p);
    for (const auto & kv : p.logit_bias) {
        try {
            m.check_token(kv.first);
        } catch (const error & e) {
            throw error(std::string("logit_bias: ") + e.what());
        }
    }
    if (p.activation) {
        if (p.info_layer < 0 || p.info_layer >= N) {
            throw error("info_layer " + std::to_string(p.info_layer) + " is out of range: valid layers are 0.." + std::to_string(N - 1));
        }
        if (!(p.alpha >= 0.0f) || !std::isfinite(p.alpha)) throw error("alpha must be a finite number >= 0");
    }
    return mature;
}

void finish_step(sampler & smp, float * scores, float * lp, int64_t n_vocab, const std::vector<llama_token> & history,
                 size_t n_prompt, float eos_bonus, int32_t n_probs, context_entropy_source * context,
                 std::vector<float> & chosen_lp, step_result & res) {
    res.top_logprob = *std::max_element(lp, lp + n_vocab);
    smp.process(scores, lp, res.top_logprob, history, n_prompt, eos_bonus);
    // with log-probs asked for, the grammar constrains the whole distribution they are taken from
    const llama_token tok = smp.choose(scores, lp, n_probs > 0);
    res.token = tok;
    res.mature_logprob = lp[tok];
    res.score = scores[tok];
    if (n_probs > 0) {
        top_n(lp, n_vocab, n_probs, res.top_tokens, res.top_logprobs_mature);
        chosen_lp.resize(n_vocab);
        log_softmax(scores, chosen_lp.data(), n_vocab);
        res.dola_logprob = chosen_lp[tok];
        top_n(chosen_lp.data(), n_vocab, n_probs, res.dola_top_tokens, res.dola_top_logprobs);
    }
    if (context) context->entropy_of(&tok, 1, &res.activation_entropy);
}

size_t keep_common_prefix(llama_context * ctx, llama_seq_id seq, std::vector<llama_token> & cached,
                          const std::vector<llama_token> & toks, size_t max_keep) {
    size_t common = 0;
    const size_t limit = std::min({cached.size(), toks.size(), max_keep});
    while (common < limit && cached[common] == toks[common]) ++common;
    if (common < cached.size()) {
        llama_memory_t mem = llama_get_memory(ctx);
        if (!llama_memory_seq_rm(mem, seq, (llama_pos) common, -1)) {  // recurrent memories start over
            llama_memory_seq_rm(mem, seq, -1, -1);
            common = 0;
        }
        cached.resize(common);
    }
    return common;
}

std::string capture_failure(const layer_capture & capture, const std::string & architecture) {
    if (capture.type_error()) return "a captured layer output is not an F32 [n_embd, n_tokens] tensor";
    return "architecture '" + architecture + "' does not expose layer outputs for layers " + capture.missing_layers() +
           " in its llama.cpp graph; DoLa cannot run on it";
}

std::string context_capture_failure(int32_t layer, const std::string & architecture) {
    return "architecture '" + architecture + "' does not expose the output of layer " + std::to_string(layer) +
           " at every position; Activation Decoding cannot use it";
}

int32_t checked_threads(int32_t n) {
    if (n > GGML_MAX_N_THREADS) {  // ggml's thread pool crashes beyond this
        throw error("n_threads must be at most " + std::to_string(GGML_MAX_N_THREADS) + ", got " + std::to_string(n));
    }
    return n > 0 ? n : (int32_t) std::max(1u, std::thread::hardware_concurrency());
}

llama_context_params context_params_for(uint32_t n_ctx, uint32_t n_batch, int32_t n_threads, const std::string & kv_type,
                                        ggml_abort_callback abort, void * abort_data) {
    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = n_ctx;
    cp.n_batch = n_batch;
    cp.n_ubatch = n_batch;  // one llama_decode call = one ubatch: captured rows map to the call's rows
    cp.n_threads = n_threads;
    cp.n_threads_batch = n_threads;
    cp.abort_callback = abort;
    cp.abort_callback_data = abort_data;
    cp.no_perf = true;
    if (kv_type == "f32") {
        // exact mode (reference parity): F32 cache and no flash attention, whose CPU kernel
        // rounds Q to F16
        cp.type_k = cp.type_v = GGML_TYPE_F32;
        cp.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    } else if (kv_type == "q8_0") {
        cp.type_k = cp.type_v = GGML_TYPE_Q8_0;
    } else if (kv_type != "f16") {
        throw error("kv cache type must be f16, f32 or q8_0, got '" + kv_type + "'");
    }
    return cp;
}

void set_eval_callback(llama_context * ctx, layer_capture * capture) {
    // llama.cpp installs cparams.cb_eval in its scheduler when it builds a graph, and keeps the
    // scheduler's callback when it reuses one: set both.
    auto & cp = const_cast<llama_cparams &>(ctx->get_cparams());
    cp.cb_eval = capture ? layer_capture::callback : nullptr;
    cp.cb_eval_user_data = capture;
    ggml_backend_sched_set_eval_callback(ctx->get_sched(), cp.cb_eval, cp.cb_eval_user_data);
}

void rebuild_graphs(llama_context * ctx) {
    // this setter, with a value that changes nothing else, is how llama.cpp asks itself for that
    ctx->set_embeddings_layer_inp(0, false);
}

}  // namespace dola
