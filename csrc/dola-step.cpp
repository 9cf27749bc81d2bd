#include "dola-step.h"

#include "dola-contrast.h"
#include "dola-error.h"

#include "llama-context.h"  // internal: the context's parameters and scheduler

#include <algorithm>
#include <cmath>
#include <string>

namespace dola {

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
