// From a decoder's scores to a token: the repetition penalty over the tokens in the context,
// llama.cpp's DRY sampler, the end-of-generation bonus, then greedy argmax or llama.cpp's
// sampler chain (temperature, top-k, top-p, min-p, a seeded draw). Knows no layers or decoders.
#pragma once

#include "dola-types.h"

#include "llama-cpp.h"

#include <cstdint>
#include <utility>
#include <vector>

namespace dola {

class sampler {
public:
    // eog: the vocabulary's end-of-generation tokens (for the bonus)
    sampler(const llama_vocab * vocab, int64_t n_vocab, std::vector<llama_token> eog);

    // Throws dola::error on sampling values llama.cpp's samplers or the penalty cannot use. The
    // Python DecodeConfig checks the same ranges first; these stay for what reaches the core after
    // its float32 narrowing (1e-50 is 0 there) and for C++ callers.
    static void check(const decode_params & p);
    // Builds the DRY sampler and the chain for p (check it first); n_ctx: what DRY's -1 scans.
    void configure(const decode_params & p, uint32_t n_ctx);

    // scores [n_vocab], in place: the repetition penalty over history, the frequency and presence
    // penalties over history[n_prompt:] (the answer so far), DRY over its window, eos_bonus (nats)
    // on every end-of-generation token, then the logit bias (-100 bans). An end token (or one with
    // a positive bias) the relative-top filter removed (-inf) re-enters as far below the best score
    // as lp (the mature log-softmax, whose largest value is top_logprob) has it below its top token.
    void process(float * scores, const float * lp, float top_logprob, const std::vector<llama_token> & history,
                 size_t n_prompt, float eos_bonus);
    // The token the scores choose: their argmax when greedy, else the chain's draw.
    llama_token choose(const float * scores);

private:
    void apply_dry(float * scores, const std::vector<llama_token> & history);
    void boost_eog(float * scores, const float * lp, float bonus, float top_logprob) const;
    void apply_penalties(float * scores, const std::vector<llama_token> & history, size_t n_prompt);
    void apply_bias(float * scores, const float * lp, float top_logprob) const;

    const llama_vocab * vocab_;
    int64_t n_vocab_;
    std::vector<llama_token> eog_;
    float repetition_penalty_ = 1.0f;
    float frequency_penalty_ = 0.0f, presence_penalty_ = 0.0f;
    std::vector<std::pair<llama_token, float>> bias_;
    std::vector<int32_t> counts_;  // scratch: [n_vocab] occurrences in the answer, zero between steps
    llama_sampler_ptr chain_;  // null when greedy
    llama_sampler_ptr dry_;    // null when DRY is off
    size_t dry_last_n_ = 0;
    std::vector<llama_token> dry_ids_;    // scratch: the distinct tokens DRY may penalise
    std::vector<llama_token_data> cur_;   // scratch: llama.cpp's candidate array
};

}  // namespace dola
