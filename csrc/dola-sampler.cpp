#include "dola-sampler.h"

#include "dola-contrast.h"
#include "dola-error.h"
#include "dola-log.h"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <mutex>
#include <string>
#include <utility>

namespace dola {

sampler::sampler(const llama_vocab * vocab, int64_t n_vocab, std::vector<llama_token> eog)
    : vocab_(vocab), n_vocab_(n_vocab), eog_(std::move(eog)) {}

void sampler::check(const decode_params & p) {
    if (!(p.repetition_penalty > 0.0f) || !std::isfinite(p.repetition_penalty)) throw error("repetition_penalty must be > 0");
    if (!(p.temperature >= 0.0f) || !std::isfinite(p.temperature)) throw error("temperature must be >= 0");
    if (p.top_k < 0) throw error("top_k must be >= 0");
    if (!(p.top_p > 0.0f && p.top_p <= 1.0f)) throw error("top_p must be in (0, 1]");
    if (!(p.min_p >= 0.0f && p.min_p <= 1.0f)) throw error("min_p must be in [0, 1]");
    if (!(p.dry_multiplier >= 0.0f) || !std::isfinite(p.dry_multiplier)) throw error("dry_multiplier must be >= 0");
    if (!(p.dry_base >= 1.0f) || !std::isfinite(p.dry_base)) throw error("dry_base must be >= 1");
    if (p.dry_allowed_length < 0) throw error("dry_allowed_length must be >= 0");
    if (p.dry_penalty_last_n < -1) throw error("dry_penalty_last_n must be >= -1 (-1 = the whole context)");
    if (!(p.frequency_penalty >= -2.0f && p.frequency_penalty <= 2.0f)) throw error("frequency_penalty must be in [-2, 2]");
    if (!(p.presence_penalty >= -2.0f && p.presence_penalty <= 2.0f)) throw error("presence_penalty must be in [-2, 2]");
    for (const auto & kv : p.logit_bias) {
        if (!(kv.second >= -100.0f && kv.second <= 100.0f)) throw error("logit_bias values must be in [-100, 100]");
    }
    if (p.n_probs < 0 || p.n_probs > 20) throw error("n_probs (top_logprobs) must be in 0..20");
    if (p.grammar.find('\0') != std::string::npos) throw error("the grammar holds a NUL character");
    for (const std::string & b : p.dry_sequence_breakers) {
        // llama.cpp skips empty ones and truncates long ones; a NUL would cut the C string it reads
        if (b.empty() || b.size() > 40 || b.find('\0') != std::string::npos) {
            throw error("each DRY sequence breaker must be 1 to 40 bytes of text without NUL");
        }
    }
}

namespace {

// llama.cpp's grammar parser prints why it fails on C's stderr (and returns no rules), the reason
// on the line "parse: error parsing grammar: <reason>". Where stderr is a variable the program may
// set (glibc's, Apple's libc), it points at a memory stream while the grammar is made, so that the
// reason becomes the error's message instead of output; one grammar at a time.
#if defined(__GLIBC__) || defined(__APPLE__)
class stderr_capture {
public:
    stderr_capture() : lock_(mutex()) {
        std::fflush(stderr);
        mem_ = open_memstream(&buf_, &len_);
        if (mem_) {
            saved_ = stderr;
            stderr = mem_;
        }
    }
    ~stderr_capture() { text(); std::free(buf_); }
    // what was written, once: stderr is back
    std::string text() {
        if (mem_) {
            stderr = saved_;
            std::fclose(mem_);
            mem_ = nullptr;
            said_.assign(buf_ ? buf_ : "", len_);
        }
        return said_;
    }

private:
    static std::mutex & mutex() {
        static std::mutex m;
        return m;
    }
    std::lock_guard<std::mutex> lock_;
    FILE * mem_ = nullptr;
    FILE * saved_ = nullptr;
    char * buf_ = nullptr;
    size_t len_ = 0;
    std::string said_;
};
#else
class stderr_capture {
public:
    std::string text() { return ""; }
};
#endif

std::string parse_reason(const std::string & said) {
    const std::string mark = "error parsing grammar: ";
    const size_t at = said.find(mark);
    if (at == std::string::npos) return "";
    const size_t from = at + mark.size();
    return said.substr(from, said.find('\n', from) - from);
}

}  // namespace

llama_sampler_ptr sampler::make_grammar(const llama_vocab * vocab, const std::string & grammar) {
    if (grammar.find('\0') != std::string::npos) throw error("the grammar holds a NUL character");
    // llama.cpp logs why it cannot use a grammar (no root rule, left recursion) and returns null
    clear_last_error();
    llama_sampler_ptr g;
    std::string reason;
    {
        stderr_capture capture;
        g.reset(llama_sampler_init_grammar(vocab, grammar.c_str(), "root"));
        if (!g) reason = parse_reason(capture.text());
    }
    if (!g) {
        if (!reason.empty()) throw error("llama.cpp cannot parse this grammar: " + reason);
        const std::string why = last_error();
        throw error("llama.cpp cannot use this grammar" + (why.empty() ? std::string(" (GBNF text with a 'root' rule)") : ": " + why));
    }
    return g;
}

void sampler::configure(const decode_params & p, uint32_t n_ctx) {
    repetition_penalty_ = p.repetition_penalty;
    frequency_penalty_ = p.frequency_penalty;
    presence_penalty_ = p.presence_penalty;
    bias_.assign(p.logit_bias.begin(), p.logit_bias.end());  // the ids: the session checks them
    dry_.reset();
    dry_last_n_ = p.dry_penalty_last_n < 0 ? n_ctx : (size_t) p.dry_penalty_last_n;
    if (p.dry_multiplier > 0.0f && dry_last_n_ > 0) {
        std::vector<const char *> breakers;
        for (const std::string & b : p.dry_sequence_breakers) breakers.push_back(b.c_str());
        dry_.reset(llama_sampler_init_dry(vocab_, p.dry_multiplier, p.dry_base, p.dry_allowed_length,
                                          (int32_t) dry_last_n_, breakers.data(), breakers.size()));
    }
    grammar_.reset();
    grammar_moved_ = false;
    if (!p.grammar.empty()) {
        grammar_ = make_grammar(vocab_, p.grammar);
    }
    chain_.reset();
    draw_only_ = p.top_k == 0 && p.top_p >= 1.0f && p.min_p <= 0.0f;
    if (p.temperature > 0.0f) {
        // transformers' order: temperature, then top-k, top-p, min-p on the tempered scores.
        chain_.reset(llama_sampler_chain_init(llama_sampler_chain_default_params()));
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_temp(p.temperature));
        if (p.top_k > 0) llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_k(p.top_k));
        if (p.top_p < 1.0f) llama_sampler_chain_add(chain_.get(), llama_sampler_init_top_p(p.top_p, 1));
        if (p.min_p > 0.0f) llama_sampler_chain_add(chain_.get(), llama_sampler_init_min_p(p.min_p, 1));
        llama_sampler_chain_add(chain_.get(), llama_sampler_init_dist(p.seed));
    }
}

void sampler::process(float * scores, const float * lp, float top_logprob, const std::vector<llama_token> & history,
                      size_t n_prompt, float eos_bonus) {
    repetition_penalty(scores, n_vocab_, history.data(), (int64_t) history.size(), repetition_penalty_);
    if (frequency_penalty_ != 0.0f || presence_penalty_ != 0.0f) apply_penalties(scores, history, n_prompt);
    if (dry_) apply_dry(scores, history);
    if (eos_bonus != 0.0f) boost_eog(scores, lp, eos_bonus, top_logprob);
    if (!bias_.empty()) apply_bias(scores, lp, top_logprob);  // last: a ban holds against the bonus
}

// OpenAI's definition: score -= count * frequency_penalty + (count > 0) * presence_penalty, the
// count over the answer so far. Touches only the tokens the answer holds; counts_ goes back to 0.
void sampler::apply_penalties(float * scores, const std::vector<llama_token> & history, size_t n_prompt) {
    if (counts_.size() != (size_t) n_vocab_) counts_.assign((size_t) n_vocab_, 0);
    const size_t from = std::min(n_prompt, history.size());
    for (size_t i = from; i < history.size(); ++i) ++counts_[history[i]];
    for (size_t i = from; i < history.size(); ++i) {
        int32_t & c = counts_[history[i]];
        if (c == 0) continue;  // done: a repeat of a token already penalised
        scores[history[i]] -= (float) c * frequency_penalty_ + presence_penalty_;
        c = 0;
    }
}

// -100 bans a token (OpenAI's "effectively"; here exactly). When the bans leave no token (the
// relative-top filter kept only banned ones), the others re-enter at their mature log-probability.
void sampler::apply_bias(float * scores, const float * lp, float top_logprob) const {
    const float ninf = -std::numeric_limits<float>::infinity();
    const float best = *std::max_element(scores, scores + n_vocab_);
    for (const auto & [t, b] : bias_) {
        float & s = scores[t];
        if (b <= -100.0f) s = ninf;
        if (s == ninf && b > 0.0f && best != ninf) s = best + (lp[t] - top_logprob);
        if (s != ninf) s += b;
    }
    if (*std::max_element(scores, scores + n_vocab_) != ninf) return;
    for (int64_t i = 0; i < n_vocab_; ++i) scores[i] = lp[i];
    for (const auto & [t, b] : bias_) scores[t] = b <= -100.0f ? ninf : scores[t] + b;
}

bool sampler::grammar_allows(llama_token token) {
    llama_token_data one = {token, 0.0f, 0.0f};
    llama_token_data_array arr = {&one, 1, -1, false};
    llama_sampler_apply(grammar_.get(), &arr);
    return arr.data[0].logit != -std::numeric_limits<float>::infinity();
}

// The grammar runs on the tokens the scores still allow (the others are out either way); when it
// rejects all of them, on the whole vocabulary at the mature log-probabilities.
void sampler::apply_grammar(float * scores, const float * lp) {
    const float ninf = -std::numeric_limits<float>::infinity();
    cur_.clear();
    for (int64_t i = 0; i < n_vocab_; ++i) {
        if (scores[i] != ninf) cur_.push_back({(llama_token) i, scores[i], 0.0f});
    }
    llama_token_data_array arr = {cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(grammar_.get(), &arr);
    bool any = false;
    for (size_t i = 0; i < arr.size; ++i) {
        if (arr.data[i].logit == ninf) scores[arr.data[i].id] = ninf;
        else any = true;
    }
    if (any) return;
    cur_.resize(n_vocab_);
    for (int64_t i = 0; i < n_vocab_; ++i) cur_[i] = {(llama_token) i, lp[i], 0.0f};
    for (const auto & [t, b] : bias_) cur_[t].logit = b <= -100.0f ? ninf : lp[t] + b;
    arr = {cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(grammar_.get(), &arr);
    for (size_t i = 0; i < arr.size; ++i) {
        scores[arr.data[i].id] = arr.data[i].logit;
        any = any || arr.data[i].logit != ninf;
    }
    if (!any) throw error("the grammar allows no token of the vocabulary here");
}

void sampler::accept(llama_token token) {
    if (!grammar_) return;
    if (!grammar_allows(token)) {
        throw error("token " + std::to_string(token) + " is not allowed by the grammar here");
    }
    llama_sampler_accept(grammar_.get(), token);
    grammar_moved_ = true;
}

void sampler::restart() {
    if (grammar_ && grammar_moved_) llama_sampler_reset(grammar_.get());
    grammar_moved_ = false;
}

llama_token sampler::choose(float * scores, const float * lp, bool full) {
    if (grammar_ && !full) {
        // Without the whole constrained distribution asked for, one grammar check of the token the
        // unconstrained scores choose often settles it (the pass over the vocabulary costs ~9 ms a
        // token for 49k tokens, ~120 ms for 262k). Greedy: an allowed argmax is the constrained
        // argmax. Temperature alone: a draw that the grammar allows, kept, and otherwise a draw
        // from the constrained scores, gives each allowed token p(t) + (1 - Z) p(t) / Z = p(t) / Z
        // (Z: the allowed tokens' mass), the constrained distribution. Top-k, top-p and min-p cut
        // after the grammar, so they need the pass.
        const float ninf = -std::numeric_limits<float>::infinity();
        if (!chain_) {
            const llama_token best = (llama_token) (std::max_element(scores, scores + n_vocab_) - scores);
            if (scores[best] != ninf && grammar_allows(best)) return best;
        } else if (draw_only_) {
            const llama_token t = draw(scores);
            if (grammar_allows(t)) return t;
        }
    }
    if (grammar_) apply_grammar(scores, lp);
    if (!chain_) return (llama_token) (std::max_element(scores, scores + n_vocab_) - scores);  // the first best
    return draw(scores);
}

llama_token sampler::draw(const float * scores) {
    cur_.resize(n_vocab_);
    for (int64_t i = 0; i < n_vocab_; ++i) cur_[i] = {(llama_token) i, scores[i], 0.0f};
    llama_token_data_array arr = {cur_.data(), (size_t) n_vocab_, -1, false};
    llama_sampler_apply(chain_.get(), &arr);
    if (arr.selected < 0 || arr.selected >= (int64_t) arr.size) throw error("the sampler selected no token");
    return arr.data[arr.selected].id;
}

// DRY only lowers tokens of the scanned window (those that would extend one of its repeats), so
// it runs on those tokens alone instead of the whole vocabulary, with the window as its history.
void sampler::apply_dry(float * scores, const std::vector<llama_token> & history) {
    const size_t n = history.size();
    const size_t from = n > dry_last_n_ ? n - dry_last_n_ : 0;
    llama_sampler_reset(dry_.get());
    dry_ids_.assign(history.begin() + (std::ptrdiff_t) from, history.end());
    for (llama_token t : dry_ids_) llama_sampler_accept(dry_.get(), t);
    std::sort(dry_ids_.begin(), dry_ids_.end());
    dry_ids_.erase(std::unique(dry_ids_.begin(), dry_ids_.end()), dry_ids_.end());
    if (dry_ids_.empty()) return;
    cur_.resize(dry_ids_.size());
    for (size_t i = 0; i < dry_ids_.size(); ++i) cur_[i] = {dry_ids_[i], scores[dry_ids_[i]], 0.0f};
    llama_token_data_array arr = {cur_.data(), cur_.size(), -1, false};
    llama_sampler_apply(dry_.get(), &arr);
    for (size_t i = 0; i < arr.size; ++i) scores[arr.data[i].id] = arr.data[i].logit;
}

void sampler::boost_eog(float * scores, const float * lp, float bonus, float top_logprob) const {
    const float ninf = -std::numeric_limits<float>::infinity();
    const float best = *std::max_element(scores, scores + n_vocab_);
    for (llama_token e : eog_) {
        float & s = scores[e];
        if (s == ninf) s = best + (lp[e] - top_logprob);
        if (s != ninf) s += bonus;
    }
}

void top_n(const float * v, int64_t size, int32_t n, std::vector<int32_t> & ids, std::vector<float> & vals) {
    ids.clear();
    vals.clear();
    if (n <= 0) return;
    const float ninf = -std::numeric_limits<float>::infinity();
    // insertion into the best n so far: one comparison per entry once n are in
    for (int64_t i = 0; i < size; ++i) {
        const float x = v[i];
        if (x == ninf || x != x) continue;
        if ((int32_t) vals.size() == n && !(x > vals.back())) continue;
        size_t at = vals.size();
        while (at > 0 && vals[at - 1] < x) --at;
        ids.insert(ids.begin() + (std::ptrdiff_t) at, (int32_t) i);
        vals.insert(vals.begin() + (std::ptrdiff_t) at, x);
        if ((int32_t) vals.size() > n) {
            ids.pop_back();
            vals.pop_back();
        }
    }
}

}  // namespace dola
