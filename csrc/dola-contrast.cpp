#include "dola-contrast.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

namespace dola {

namespace {

// Branch-free expf/logf written so the compiler can vectorise the loops that call them (libm calls
// are not vectorised without -ffast-math, and scalar libm made SmolLM2's 8 JSDs cost 5-7 ms, as
// much as a whole plain token). Max relative error ~2e-7 over the ranges used here.
inline float fast_exp(float x) {
    const float lo = -87.33654f;  // below this expf underflows to a denormal; we return 0
    const float xc = std::min(std::max(x, lo), 88.37626f);
    const float n = std::nearbyint(xc * 1.44269504088896341f);
    float r = xc - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof scale);
    return x < lo ? 0.0f : p * scale;
}

// For x > 0 and finite (callers guard zero). Written without conditionals so loops vectorise.
inline float fast_log(float x) {
    int32_t bits;
    std::memcpy(&bits, &x, sizeof bits);
    int32_t e = ((bits >> 23) & 0xff) - 126;
    bits = (bits & 0x007fffff) | 0x3f000000;  // mantissa in [0.5, 1)
    float m;
    std::memcpy(&m, &bits, sizeof m);
    const int32_t small = m < 0.707106781186547524f;  // 0 or 1
    e -= small;
    m = m + m * static_cast<float>(small) - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    const float fe = static_cast<float>(e);
    y += fe * -2.12194440e-4f;
    y += -0.5f * z;
    return m + y + fe * 0.693359375f;
}

// Sum of f(i) over [0, n): 16 float lanes (so the loop vectorises without reassociating float
// math), flushed into a double every 1024 elements.
template <typename F>
inline double lane_sum(int64_t n, F f) {
    constexpr int64_t L = 16;
    double acc = 0.0;
    int64_t i = 0;
    for (; i + L <= n;) {
        float part[L] = {};
        const int64_t end = std::min(n - (n - i) % L, i + 1024);
        for (; i < end; i += L) {
            for (int64_t j = 0; j < L; ++j) part[j] += f(i + j);
        }
        for (int64_t j = 0; j < L; ++j) acc += part[j];
    }
    for (; i < n; ++i) acc += f(i);
    return acc;
}

inline float max_of(const float * z, int64_t n) {
    float mx = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) mx = std::max(mx, z[i]);
    return mx;
}

}  // namespace

bool all_finite(const float * z, int64_t n) {
    // 0 * x is NaN exactly when x is inf or NaN; the lane sum vectorises
    return std::isfinite(lane_sum(n, [=](int64_t i) { return 0.0f * z[i]; }));
}

float log_softmax(const float * z, float * out, int64_t n) {
    const float mx = max_of(z, n);
    if (!std::isfinite(mx)) {  // all -inf (or +inf/NaN): let the caller see non-finite values
        for (int64_t i = 0; i < n; ++i) out[i] = z[i] - mx;
        return mx;
    }
    const double sum = lane_sum(n, [=](int64_t i) { return fast_exp(z[i] - mx); });
    const float lse = mx + static_cast<float>(std::log(sum));
    for (int64_t i = 0; i < n; ++i) out[i] = z[i] - lse;
    return lse;
}

double jsd(const float * lp, const float * lq, int64_t n) {
    const double acc = lane_sum(n, [=](int64_t i) {
        const float p = fast_exp(lp[i]);
        const float q = fast_exp(lq[i]);
        const float m = 0.5f * (p + q);
        // M(log M - lp) + M(log M - lq) = M (2 log M - lp - lq). Where M underflows to 0 the clamps
        // keep the bracket finite so the term is 0 (torch's xlogy), without a branch.
        const float lm = fast_log(std::max(m, 1e-30f));
        return m * (2.0f * lm - std::max(lp[i], -1e30f) - std::max(lq[i], -1e30f));
    });
    return 0.5 * acc / static_cast<double>(n);
}

double entropy(const float * lp, int64_t n) {
    return lane_sum(n, [=](int64_t i) { return -fast_exp(lp[i]) * std::max(lp[i], -1e30f); });
}

float relative_top_threshold(const float * lp, int64_t n, double relative_top) {
    return max_of(lp, n) + static_cast<float>(std::log(relative_top));
}

void contrast_scores(const float * lp, const float * lq, int64_t n, double relative_top, float * scores) {
    if (relative_top <= 0.0) {
        for (int64_t i = 0; i < n; ++i) scores[i] = lp[i] - lq[i];
        return;
    }
    const float thr = relative_top_threshold(lp, n, relative_top);
    const float ninf = -std::numeric_limits<float>::infinity();
    for (int64_t i = 0; i < n; ++i) scores[i] = lp[i] < thr ? ninf : lp[i] - lq[i];
}

void repetition_penalty(float * scores, int64_t n, const int32_t * ids, int64_t n_ids, float penalty) {
    if (penalty == 1.0f || n_ids == 0) return;
    std::vector<bool> seen(static_cast<size_t>(n), false);
    for (int64_t k = 0; k < n_ids; ++k) {
        const int32_t id = ids[k];
        if (id < 0 || id >= n || seen[id]) continue;
        seen[id] = true;
        float & s = scores[id];
        s = s < 0.0f ? s * penalty : s / penalty;
    }
}

contrast_result dola_step(const float * z_mature, float * z_cand, int32_t K, int64_t n,
                          double relative_top, float * lp_out, float * scores, int32_t n_threads) {
    contrast_result res;
    res.mature_lse = log_softmax(z_mature, lp_out, n);
    res.entropy = entropy(lp_out, n);
    std::vector<double> d(K, 0.0);
    // Each candidate is independent: its log-softmax and its JSD against the mature distribution
    // (a large vocabulary makes these passes as long as a small model's whole token).
#if defined(_OPENMP)
#pragma omp parallel for schedule(static, 1) num_threads(std::max(1, std::min<int32_t>(n_threads, K))) if (K > 1 && n_threads > 1)
#endif
    for (int32_t k = 0; k < K; ++k) {
        log_softmax(z_cand + k * n, z_cand + k * n, n);
        if (K > 1) d[k] = jsd(lp_out, z_cand + k * n, n);
    }
    if (K > 1) {
        res.jsd.resize(K);
        double best = -std::numeric_limits<double>::infinity();
        for (int32_t k = 0; k < K; ++k) {
            res.jsd[k] = static_cast<float>(d[k]);
            // Compare in float like torch's argmax over a float tensor (first on ties).
            if (static_cast<float>(d[k]) > best || k == 0) {
                best = static_cast<float>(d[k]);
                res.premature_index = k;
            }
        }
    }
    if (scores) contrast_scores(lp_out, z_cand + res.premature_index * n, n, relative_top, scores);
    return res;
}

void lm_score_diff(const float * lp, const float * lq, int64_t n, bool post_softmax,
                   double relative_top, float mask_value, float * diff) {
    for (int64_t i = 0; i < n; ++i) diff[i] = lp[i] - lq[i];
    if (post_softmax) log_softmax(diff, diff, n);
    if (relative_top > 0.0) {
        const float thr = relative_top_threshold(lp, n, relative_top);
        for (int64_t i = 0; i < n; ++i) diff[i] = lp[i] < thr ? mask_value : diff[i];
    }
}

void position_entropy::reset(int64_t n_vocab) {
    n_vocab_ = n_vocab;
    n_pos_ = 0;
    max_.assign((size_t) n_vocab, -std::numeric_limits<float>::infinity());
    sum_.assign((size_t) n_vocab, 0.0);
    wsum_.assign((size_t) n_vocab, 0.0);
}

void position_entropy::add_range(const float * z, int32_t n_rows, int64_t v0, int64_t v1) {
    const int64_t V = n_vocab_;
    const int64_t n = v1 - v0;
    std::vector<float> mx(max_.begin() + v0, max_.begin() + v1);
    for (int32_t r = 0; r < n_rows; ++r) {
        const float * row = z + (size_t) r * V + v0;
        for (int64_t i = 0; i < n; ++i) mx[i] = std::max(mx[i], row[i]);
    }
    // Move the running sums to the new maxima: e^(z-m) = f e^(z-m_old), (z-m) = (z-m_old) + (m_old-m).
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = v0 + i;
        if (mx[i] == max_[v] || sum_[v] == 0.0) continue;
        const double d = (double) max_[v] - (double) mx[i];
        const double f = std::exp(d);
        wsum_[v] = f * (wsum_[v] + d * sum_[v]);
        sum_[v] *= f;
    }
    // This chunk's terms, summed in float over the chunk's rows (the loop vectorises), then added
    // to the double totals.
    std::vector<float> s(n, 0.0f), w(n, 0.0f);
    for (int32_t r = 0; r < n_rows; ++r) {
        const float * row = z + (size_t) r * V + v0;
        for (int64_t i = 0; i < n; ++i) {
            const float d = row[i] - mx[i];
            const float e = fast_exp(d);
            s[i] += e;
            w[i] += e * d;
        }
    }
    for (int64_t i = 0; i < n; ++i) {
        const int64_t v = v0 + i;
        max_[v] = mx[i];
        sum_[v] += s[i];
        wsum_[v] += w[i];
    }
}

void position_entropy::add(const float * z, int32_t n_rows, int32_t n_threads) {
    if (n_rows <= 0) return;
    const int64_t V = n_vocab_;
    // blocks of 4096 entries: the chunk's rows of a block stay in cache between the passes
    const int64_t block = 4096;
    const int64_t n_blocks = (V + block - 1) / block;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(std::max(1, n_threads)) if (n_threads > 1)
#endif
    for (int64_t b = 0; b < n_blocks; ++b) add_range(z, n_rows, b * block, std::min(V, (b + 1) * block));
    n_pos_ += n_rows;
}

void position_entropy::entropy(float * out) const {
    for (int64_t v = 0; v < n_vocab_; ++v) {
        out[v] = sum_[v] > 0.0 ? (float) (std::log(sum_[v]) - wsum_[v] / sum_[v]) : 0.0f;
    }
}

void entropy_of_rows(const float * hidden, int64_t P, const float * w, int32_t m, int32_t E, float * H,
                     int32_t n_threads) {
    std::vector<float> z((size_t) m * P);  // [k][p]
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(std::max(1, n_threads)) if (n_threads > 1 && P * m * E > (1 << 20))
#endif
    for (int64_t p = 0; p < P; ++p) {
        const float * h = hidden + (size_t) p * E;
        for (int32_t k = 0; k < m; ++k) {
            const float * wk = w + (size_t) k * E;
            z[(size_t) k * P + p] = (float) lane_sum(E, [=](int64_t i) { return h[i] * wk[i]; });
        }
    }
    for (int32_t k = 0; k < m; ++k) {
        const float * zk = z.data() + (size_t) k * P;
        const float mx = max_of(zk, P);
        const double S = lane_sum(P, [=](int64_t p) { return fast_exp(zk[p] - mx); });
        const double W = lane_sum(P, [=](int64_t p) { return fast_exp(zk[p] - mx) * (zk[p] - mx); });
        H[k] = (float) (std::log(S) - W / S);
    }
}

}  // namespace dola
