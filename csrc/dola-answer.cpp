#include "dola-answer.h"

#include "dola-error.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace dola {

namespace {

// whether the last `span` tokens repeat with period p
bool periodic(const std::vector<llama_token> & t, int32_t p, int32_t span) {
    const int64_t n = (int64_t) t.size();
    if (span > n) return false;
    for (int64_t i = 0; i < span - p; ++i) {
        if (t[n - 1 - i] != t[n - 1 - i - p]) return false;
    }
    return true;
}

const char replacement[] = "\xEF\xBF\xBD";  // U+FFFD

}  // namespace

int32_t loop_cycle(const std::vector<llama_token> & tokens, int32_t repeats, bool runs) {
    const int64_t n = (int64_t) tokens.size();
    if (runs) {
        for (int32_t p = 1; p < loop_min_cycle; ++p) {
            if (periodic(tokens, p, loop_run_span)) return p;
        }
    }
    if (repeats < 1) return 0;
    const int64_t last = std::min<int64_t>(loop_max_cycle, n / repeats);
    for (int32_t p = loop_min_cycle; p <= last; ++p) {
        const int32_t span = p * repeats;
        if (tokens[n - 1] != tokens[n - 1 - p] || !periodic(tokens, p, span)) continue;
        bool shorter = false;  // a run of a shorter period, not a cycle of p
        for (int32_t q = 1; q < loop_min_cycle && !shorter; ++q) shorter = periodic(tokens, q, span);
        if (!shorter) return p;
    }
    return 0;
}

double token_risk(float top_logprob) {
    return std::min(1.0, std::max(0.0, 1.0 - std::exp((double) top_logprob)));
}

answer_text::answer_text(const model & mdl, answer_rules rules, size_t n_prompt, size_t n_ctx)
    : model_(mdl), rules_(std::move(rules)) {
    if (rules_.max_tokens < 1) throw error("max_tokens must be at least 1, got " + std::to_string(rules_.max_tokens));
    if (n_prompt < 1 || n_prompt > n_ctx) throw error("internal: a prompt of " + std::to_string(n_prompt) + " tokens in a context of " + std::to_string(n_ctx));
    // the last token the context holds still has outputs: one more can be chosen
    budget_ = (int32_t) std::min<size_t>((size_t) rules_.max_tokens, n_ctx - n_prompt + 1);
    rules_.stop.erase(std::remove(rules_.stop.begin(), rules_.stop.end(), std::string()), rules_.stop.end());
}

double answer_text::risk() const {
    if (loop_) return loop_risk;
    return tokens_.empty() ? std::numeric_limits<double>::quiet_NaN() : risk_sum_ / (double) tokens_.size();
}

bool answer_text::abstains(bool final) const {
    if (rules_.abstain_above <= 0.0 || tokens_.empty()) return false;
    if ((int32_t) tokens_.size() < abstain_min_tokens && !final) return false;
    return risk() > rules_.abstain_above;
}

size_t answer_text::held_back() const {
    // the tail of the text not yet shown that is a proper prefix of a stop string (a tail that
    // matches starts at a character: no stop string starts with a continuation byte)
    const size_t avail = text_.size() - shown_;
    size_t keep = 0;
    for (const std::string & s : rules_.stop) {
        for (size_t k = std::min(s.size() - 1, avail); k > keep; --k) {
            if (text_.compare(text_.size() - k, k, s, 0, k) == 0) {
                keep = k;
                break;
            }
        }
    }
    return keep;
}

void answer_text::decode(const std::string & bytes, bool final) {
    const std::string buf = pending_ + bytes;
    pending_.clear();
    const size_t n = buf.size();
    size_t i = 0;
    while (i < n) {
        const auto b = (unsigned char) buf[i];
        if (b < 0x80) {
            text_ += (char) b;
            ++i;
            continue;
        }
        // the sequence's length, and the range of its second byte (the rest are 80..BF)
        int32_t need;
        unsigned char lo = 0x80, hi = 0xBF;
        if (b >= 0xC2 && b <= 0xDF) {
            need = 1;
        } else if (b >= 0xE0 && b <= 0xEF) {
            need = 2;
            if (b == 0xE0) lo = 0xA0;
            if (b == 0xED) hi = 0x9F;
        } else if (b >= 0xF0 && b <= 0xF4) {
            need = 3;
            if (b == 0xF0) lo = 0x90;
            if (b == 0xF4) hi = 0x8F;
        } else {  // not a lead byte
            text_ += replacement;
            ++i;
            continue;
        }
        int32_t k = 1;
        bool bad = false;
        for (; k <= need; ++k) {
            if (i + k >= n) break;
            const auto c = (unsigned char) buf[i + k];
            if (c < (k == 1 ? lo : 0x80) || c > (k == 1 ? hi : 0xBF)) {
                bad = true;
                break;
            }
        }
        if (bad) {  // the valid start is one replaced part; the byte that broke it is read again
            text_ += replacement;
            i += k;
        } else if (k <= need) {  // unfinished at the end of what came so far
            if (final) {
                text_ += replacement;
            } else {
                pending_ = buf.substr(i);
            }
            i = n;
        } else {
            text_.append(buf, i, need + 1);
            i += need + 1;
        }
    }
}

void answer_text::end(step_result & st, const std::string & why, bool flush) {
    if (flush) decode(std::string(), true);
    if (text_.size() > shown_) st.piece += text_.substr(shown_);
    shown_ = text_.size();
    finish_ = why;
    st.finish = why;
    st.loop = loop_;
    st.held.clear();
}

void answer_text::add(step_result & st) {
    if (ended()) throw error("the answer has ended");
    st.piece.clear();
    st.finish.clear();
    st.held.clear();
    st.loop = 0;
    if (!rules_.ignore_eos && model_.is_eog(st.token)) {
        st.counted = false;
        end(st, abstains(true) ? "abstained" : "stop", true);
        return;
    }
    st.counted = true;
    st.risk = token_risk(st.top_logprob);
    risk_sum_ += st.risk;
    tokens_.push_back(st.token);
    decode(model_.token_to_piece(st.token, false), false);
    if (!rules_.stop.empty()) {
        size_t longest = 0;
        for (const std::string & s : rules_.stop) longest = std::max(longest, s.size());
        const size_t from = shown_ > longest ? shown_ - longest : 0;
        size_t cut = std::string::npos;
        for (const std::string & s : rules_.stop) cut = std::min(cut, text_.find(s, from));
        if (cut != std::string::npos) {
            text_.resize(std::max(cut, shown_));
            pending_.clear();
            end(st, abstains(true) ? "abstained" : "stop", false);
            return;
        }
    }
    if (rules_.stop_loops) {
        loop_ = loop_cycle(tokens_);
        if (loop_) {
            end(st, "loop", true);
            return;
        }
    }
    if (abstains(false)) {
        end(st, "abstained", true);
        return;
    }
    const size_t safe = text_.size() - held_back();
    if (safe > shown_) {
        st.piece = text_.substr(shown_, safe - shown_);
        shown_ = safe;
    }
    if ((int32_t) tokens_.size() >= budget_) {
        end(st, abstains(true) ? "abstained" : "length", true);
        return;
    }
    // what an end now (a cancellation) would still show: the held tail, an unfinished character
    if (text_.size() > shown_ || !pending_.empty()) {
        st.held = text_.substr(shown_);
        if (!pending_.empty()) st.held += replacement;
    }
}

}  // namespace dola
