// DoLa contrast kernels: pure functions over float vectors, no llama.cpp.
// Semantics follow transformers' _dola_decoding / _relative_top_filter (4.43-4.55) and the DoLa
// repository's lm_score (dola.py). Vectors are length n_vocab; K candidate rows are stored contiguously.
#pragma once

#include <cstdint>
#include <vector>

namespace dola {

// True when no element is inf or NaN.
bool all_finite(const float * z, int64_t n);

// out[i] = z[i] - logsumexp(z). Returns logsumexp(z). out may alias z.
float log_softmax(const float * z, float * out, int64_t n);

// Jensen-Shannon divergence as transformers computes it:
//   0.5 * (mean_v M (log M - lp) + mean_v M (log M - lq)),  M = (exp(lp) + exp(lq)) / 2,
// where lp, lq are log-probabilities; terms with M == 0 contribute 0 (torch's xlogy).
double jsd(const float * lp, const float * lq, int64_t n);

// Entropy of a distribution given by its log-probabilities.
double entropy(const float * lp, int64_t n);

// Relative-top threshold: max(lp) + log(relative_top), in float as torch computes it.
float relative_top_threshold(const float * lp, int64_t n, double relative_top);

// scores = lp - lq, where lp < threshold: score = -inf (transformers fills lp with -inf and lq with
// -1e-3). relative_top <= 0 disables the filter.
void contrast_scores(const float * lp, const float * lq, int64_t n, double relative_top, float * scores);

// transformers' RepetitionPenaltyLogitsProcessor: every id once, s < 0 ? s * p : s / p.
void repetition_penalty(float * scores, int64_t n, const int32_t * ids, int64_t n_ids, float penalty);

struct contrast_result {
    int32_t premature_index = 0;  // index into the candidate rows
    std::vector<float> jsd;       // one per candidate (empty for a single candidate)
    float mature_lse = 0.0f;      // logsumexp of the mature logits
    double entropy = 0.0;         // entropy of the mature distribution
};

// One DoLa step. z_mature: n logits; z_cand: K*n candidate logits, of which the chosen one's row
// (premature_index) is overwritten with its log-softmax (the others may be left as they were);
// lp_out: n (log-softmax of z_mature); scores: n (the contrast, before any logits processor), or
// null to only choose the premature layer. K == 1 is static DoLa (no JSD). The passes run on up
// to n_threads threads; results do not depend on the thread count.
contrast_result dola_step(const float * z_mature, float * z_cand, int32_t K, int64_t n,
                          double relative_top, float * lp_out, float * scores, int32_t n_threads = 1);

// lm_score's per-position diff (DoLa repo): diff = lp - lq; post_softmax → log_softmax(diff);
// relative_top > 0 → entries with lp < threshold set to mask_value.
void lm_score_diff(const float * lp, const float * lq, int64_t n, bool post_softmax,
                   double relative_top, float mask_value, float * diff);

// Activation Decoding's sharpness (hkust-nlp/Activation_Decoding): for every vocabulary entry v,
// the entropy over context positions p of softmax_p(z[p][v]). Positions stream through in chunks
// and only per-entry running statistics are kept (max m, S = sum e^(z-m), W = sum e^(z-m)(z-m)),
// so memory is O(n_vocab) whatever the context length; H_v = log S_v - W_v / S_v.
class position_entropy {
public:
    void reset(int64_t n_vocab);
    // z: [n_rows][n_vocab] logits of n_rows more positions. Split over up to n_threads threads;
    // the result does not depend on the thread count.
    void add(const float * z, int32_t n_rows, int32_t n_threads = 1);
    // out: n_vocab entropies (nats); 0 when no position was added.
    void entropy(float * out) const;
    int64_t n_positions() const { return n_pos_; }
    int64_t n_vocab() const { return n_vocab_; }

private:
    void add_range(const float * z, int32_t n_rows, int64_t v0, int64_t v1);

    int64_t n_vocab_ = 0, n_pos_ = 0;
    std::vector<float> max_;
    std::vector<double> sum_, wsum_;
};

// The same entropy for a few entries only, from the hidden rows and those entries' output rows:
// z[p][k] = hidden[p] . w[k], H[k] over p. hidden: [P][E]; w: [m][E]. Costs P*m*E multiply-adds
// instead of the whole vocabulary's P*V*E.
void entropy_of_rows(const float * hidden, int64_t P, const float * w, int32_t m, int32_t E, float * H,
                     int32_t n_threads = 1);

}  // namespace dola
