// One answer as its tokens are chosen: what ends it and what text it shows. The end: an
// end-of-generation token (unless ignored), the token budget, a stop string (found across
// tokens), the running risk above a bound (abstaining), a loop. The text: the tokens' bytes decoded
// as UTF-8 as they come (an invalid sequence becomes U+FFFD, one per maximal invalid part, as
// Python's "replace" decoder does), shown in pieces that never end inside what could be the start
// of a stop string. The batch engine runs one per sequence on its own thread; a session's
// generation feeds it each step. Knows no Python.
#pragma once

#include "dola-model.h"
#include "dola-types.h"

#include <cstdint>
#include <string>
#include <vector>

namespace dola {

// A loop: the answer's last repeats * p tokens are one cycle of p >= loop_min_cycle tokens
// repeated, p its shortest period (cycles up to loop_max_cycle tokens are looked for). Shorter
// periods (a token or two again and again: "!!!", "|---|---") are common in good text; they count
// only once they run for loop_run_span tokens.
constexpr int32_t loop_min_cycle = 3, loop_max_cycle = 64, stop_loop_repeats = 3, loop_run_span = 32;
// The period of the loop `tokens` ends with (0 = none): a cycle of at least loop_min_cycle tokens
// repeated `repeats` times in a row, or (runs) a period of 1 or 2 tokens over the last
// loop_run_span tokens.
int32_t loop_cycle(const std::vector<llama_token> & tokens, int32_t repeats = stop_loop_repeats, bool runs = true);

// The risk of one emitted token in [0, 1]: 1 - the mature distribution's largest probability.
double token_risk(float top_logprob);
// An answer stopped for looping is unreliable however confident each token was: its risk is this.
constexpr double loop_risk = 1.0;
// abstain_above judges the running risk once the answer has this many tokens (or when it ends)
constexpr int32_t abstain_min_tokens = 4;

struct answer_rules {
    int32_t max_tokens = 0;  // tokens at most (>= 1); fewer when the context fills first
    bool ignore_eos = false;            // an end-of-generation token is an ordinary token
    std::vector<std::string> stop;      // stop strings (UTF-8, non-empty): the text ends before one
    double abstain_above = 0.0;         // > 0: end ("abstained") when the running risk exceeds it
    bool stop_loops = false;            // end ("loop") at a cycle's third time in a row
};

class answer_text {
public:
    // an answer to a prompt of n_prompt tokens in a context of n_ctx positions: it ends
    // ("length") at max_tokens tokens or when the context is full
    answer_text(const model & mdl, answer_rules rules, size_t n_prompt, size_t n_ctx);

    // The chosen token of the next step: sets st.piece (the text it lets through), st.risk, and
    // st.finish when the answer ends there ("stop", "length", "abstained", "loop"; st.counted is
    // false for an end-of-generation token, which is not part of the answer).
    void add(step_result & st);
    bool ended() const { return !finish_.empty(); }
    const std::string & finish_reason() const { return finish_; }
    int32_t loop() const { return loop_; }
    // The mean token risk so far (loop_risk after a loop; NaN before the first token)
    double risk() const;

private:
    // whether the running risk crossed abstain_above (judged once abstain_min_tokens are in, or
    // at the end of a shorter answer)
    bool abstains(bool final) const;
    // bytes of the text's tail that could begin a stop string
    size_t held_back() const;
    // the UTF-8 decoder: bytes in, text out; final: an unfinished sequence at the end is U+FFFD
    void decode(const std::string & bytes, bool final);
    // ends the answer: the pending bytes decoded (unless a stop string cut it) and the rest shown
    void end(step_result & st, const std::string & why, bool flush);

    const model & model_;
    answer_rules rules_;
    int32_t budget_;  // max_tokens, or fewer when the context fills first
    std::vector<llama_token> tokens_;
    std::string text_;     // decoded so far
    std::string pending_;  // bytes of an unfinished UTF-8 sequence
    size_t shown_ = 0;     // bytes of text_ already let through
    double risk_sum_ = 0.0;
    int32_t loop_ = 0;
    std::string finish_;
};

}  // namespace dola
