// From a decoder's scores to a token: the repetition penalty over the tokens in the context,
// llama.cpp's DRY sampler, the end-of-generation bonus, the logit bias, llama.cpp's grammar
// constraint, then greedy argmax or llama.cpp's sampler chain (temperature, top-k, top-p, min-p,
// a seeded draw). Knows no layers or decoders.
#pragma once

#include "dola-types.h"

#include "llama-cpp.h"

#include <cstdint>
#include <string>
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
    // llama.cpp's grammar sampler for GBNF text (start rule "root"); dola::error with llama.cpp's
    // reason when it cannot parse it or use it (an undefined rule, left recursion, no root)
    static llama_sampler_ptr make_grammar(const llama_vocab * vocab, const std::string & grammar);
    // Builds the DRY sampler, the grammar and the chain for p (check it first); n_ctx: what DRY's
    // -1 scans. Throws dola::error when llama.cpp cannot parse p.grammar.
    void configure(const decode_params & p, uint32_t n_ctx);
    bool has_grammar() const { return (bool) grammar_; }

    // scores [n_vocab], in place: the repetition penalty over history, the frequency and presence
    // penalties over history[n_prompt:] (the answer so far), DRY over its window, eos_bonus (nats)
    // on every end-of-generation token, then the logit bias (-100 bans). An end token (or one with
    // a positive bias) the relative-top filter removed (-inf) re-enters as far below the best score
    // as lp (the mature log-softmax, whose largest value is top_logprob) has it below its top token.
    void process(float * scores, const float * lp, float top_logprob, const std::vector<llama_token> & history,
                 size_t n_prompt, float eos_bonus);
    // The token the scores choose: their argmax when greedy, else the chain's draw. With a
    // grammar, the choice is among the tokens it allows: the ones it rejects are set to -inf in
    // scores, over the whole vocabulary (always with `full`), unless one check of the
    // unconstrained choice settles it (greedy: the argmax; temperature-only sampling: the draw,
    // kept when allowed, which leaves the distribution the constrained one). When the grammar
    // rejects every token the scores allow (the relative-top filter kept none of its tokens), its
    // tokens re-enter at their mature log-probability lp (plus their bias). Throws dola::error
    // when it allows no token at all.
    llama_token choose(float * scores, const float * lp, bool full = false);
    // Checks token against the grammar (dola::error if it rejects it) and advances the grammar
    // past it; nothing without a grammar. The session calls it for each token it appends.
    void accept(llama_token token);
    // The grammar back to its start (a new prompt), when a token advanced it.
    void restart();

private:
    void apply_dry(float * scores, const std::vector<llama_token> & history);
    void boost_eog(float * scores, const float * lp, float bonus, float top_logprob) const;
    void apply_penalties(float * scores, const std::vector<llama_token> & history, size_t n_prompt);
    void apply_bias(float * scores, const float * lp, float top_logprob) const;
    bool grammar_allows(llama_token token);
    llama_token draw(const float * scores);  // the chain's draw
    void apply_grammar(float * scores, const float * lp);

    const llama_vocab * vocab_;
    int64_t n_vocab_;
    std::vector<llama_token> eog_;
    float repetition_penalty_ = 1.0f;
    float frequency_penalty_ = 0.0f, presence_penalty_ = 0.0f;
    std::vector<std::pair<llama_token, float>> bias_;
    std::vector<int32_t> counts_;  // scratch: [n_vocab] occurrences in the answer, zero between steps
    llama_sampler_ptr chain_;  // null when greedy
    bool draw_only_ = false;   // the chain is temperature and the draw alone (no top-k, top-p, min-p)
    llama_sampler_ptr dry_;    // null when DRY is off
    llama_sampler_ptr grammar_;  // null without a grammar
    bool grammar_moved_ = false;   // a token advanced the grammar since it was built or restarted
    size_t dry_last_n_ = 0;
    std::vector<llama_token> dry_ids_;    // scratch: the distinct tokens DRY may penalise
    std::vector<llama_token_data> cur_;   // scratch: llama.cpp's candidate array
};

// The n largest of v[0..size) (n small: the log-probs a step reports), best first, into ids and
// vals; entries that are -inf (tokens a distribution excludes) are left out.
void top_n(const float * v, int64_t size, int32_t n, std::vector<int32_t> & ids, std::vector<float> & vals);

}  // namespace dola
