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

// A running max is a loop-carried dependency GCC will not vectorise (a float max reduction needs
// -ffast-math, and it does not turn 16 independent lanes into vmaxps either): the scalar passes over
// a 262144-entry vocabulary cost as much as the exp passes. GCC/Clang vector extensions do it.
inline float max_of(const float * z, int64_t n) {
    const float ninf = -std::numeric_limits<float>::infinity();
    float mx = ninf;
    int64_t i = 0;
#if defined(__GNUC__)
    typedef float v8 __attribute__((vector_size(32)));
    v8 a = {ninf, ninf, ninf, ninf, ninf, ninf, ninf, ninf}, b = a;
    for (; i + 16 <= n; i += 16) {
        v8 x, y;
        std::memcpy(&x, z + i, sizeof x);
        std::memcpy(&y, z + i + 8, sizeof y);
        a = x > a ? x : a;
        b = y > b ? y : b;
    }
    a = b > a ? b : a;
    for (int j = 0; j < 8; ++j) mx = a[j] > mx ? a[j] : mx;
#endif
    for (; i < n; ++i) mx = z[i] > mx ? z[i] : mx;
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
    if (K == 1) {  // static DoLa: no JSD, two log-softmaxes
        res.mature_lse = log_softmax(z_mature, lp_out, n);
        res.entropy = entropy(lp_out, n);
        log_softmax(z_cand, z_cand, n);
        if (scores) contrast_scores(lp_out, z_cand, n, relative_top, scores);
        return res;
    }
    // The passes run over fixed 4096-entry blocks of the K + 1 rows (the mature row is row K), so
    // the work splits evenly over any number of threads and the sums, taken block by block in a
    // fixed order, do not depend on the thread count. With a large vocabulary these passes are
    // bound by memory traffic, so each row is read from memory twice: once for each block's max and
    // exponential sum (the block is still in cache for the second), once for the JSD, which
    // computes the candidate's log-probabilities on the fly and reads the mature row's
    // probabilities and log-probabilities for all candidates of a block while they are in cache.
    // Only the chosen candidate's log-probabilities are written.
    constexpr int64_t B = 4096;
    const int64_t nb = (n + B - 1) / B;
    const int64_t R = (int64_t) K + 1;
    auto row = [&](int64_t r) -> float * { return r == K ? const_cast<float *>(z_mature) : z_cand + r * n; };
    thread_local std::vector<float> p_buf;
    p_buf.resize((size_t) n);
    float * p = p_buf.data();
    std::vector<float> bmax((size_t) (R * nb)), lse((size_t) R);
    std::vector<double> bsum((size_t) (R * nb)), bent((size_t) nb), bjsd((size_t) (K * nb)), d((size_t) K);
    const int32_t T = std::max<int32_t>(1, n_threads);
    (void) T;  // unused without OpenMP
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(T) if (T > 1)
#endif
    for (int64_t t = 0; t < R * nb; ++t) {
        const int64_t r = t / nb, b0 = (t % nb) * B, len = std::min(B, n - b0);
        const float * z = row(r) + b0;
        const float m = max_of(z, len);
        bmax[t] = m;
        bsum[t] = std::isfinite(m) ? lane_sum(len, [=](int64_t i) { return fast_exp(z[i] - m); }) : 0.0;
    }
    bool finite = true;
    for (int64_t r = 0; r < R; ++r) {
        const float mx = max_of(bmax.data() + r * nb, nb);
        double sum = 0.0;
        for (int64_t b = 0; b < nb; ++b) {
            if (bsum[r * nb + b] > 0.0) sum += bsum[r * nb + b] * std::exp((double) bmax[r * nb + b] - (double) mx);
        }
        lse[r] = mx + static_cast<float>(std::log(sum));
        finite = finite && std::isfinite(mx) && std::isfinite(lse[r]);
    }
    if (!finite) {  // an all -inf (or inf/NaN) row: the plain passes, which let such values through
        res.mature_lse = log_softmax(z_mature, lp_out, n);
        res.entropy = entropy(lp_out, n);
        for (int32_t k = 0; k < K; ++k) {
            log_softmax(z_cand + k * n, z_cand + k * n, n);
            d[k] = jsd(lp_out, z_cand + k * n, n);
        }
    } else {
#if defined(_OPENMP)
#pragma omp parallel num_threads(T) if (T > 1)
#endif
        {
            // the mature row: log-probabilities, probabilities, entropy
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
            for (int64_t b = 0; b < nb; ++b) {
                const int64_t b0 = b * B, len = std::min(B, n - b0);
                const float l = lse[K];
                const float * z = z_mature + b0;
                float * lp = lp_out + b0;
                float * pb = p + b0;
                for (int64_t i = 0; i < len; ++i) lp[i] = z[i] - l;
                for (int64_t i = 0; i < len; ++i) pb[i] = fast_exp(lp[i]);
                bent[b] = lane_sum(len, [=](int64_t i) { return -pb[i] * std::max(lp[i], -1e30f); });
            }
            // the candidates' JSD terms, block by block (the K candidates of a block together)
#if defined(_OPENMP)
#pragma omp for schedule(static)
#endif
            for (int64_t t = 0; t < K * nb; ++t) {
                const int64_t b = t / K, k = t % K, b0 = b * B;
                const float l = lse[k];
                const float * z = z_cand + k * n + b0;
                const float * lp = lp_out + b0;
                const float * pb = p + b0;
                bjsd[k * nb + b] = lane_sum(std::min(B, n - b0), [=](int64_t i) {
                    const float lq = z[i] - l;
                    const float m = 0.5f * (pb[i] + fast_exp(lq));
                    const float lm = fast_log(std::max(m, 1e-30f));
                    return m * (2.0f * lm - std::max(lp[i], -1e30f) - std::max(lq, -1e30f));
                });
            }
        }
        res.mature_lse = lse[K];
        res.entropy = 0.0;
        for (int64_t b = 0; b < nb; ++b) res.entropy += bent[b];
        for (int32_t k = 0; k < K; ++k) {
            double acc = 0.0;
            for (int64_t b = 0; b < nb; ++b) acc += bjsd[k * nb + b];
            d[k] = 0.5 * acc / static_cast<double>(n);
        }
    }
    res.jsd.resize(K);
    float best = 0.0f;
    for (int32_t k = 0; k < K; ++k) {
        res.jsd[k] = static_cast<float>(d[k]);
        // Compare in float like torch's argmax over a float tensor (first on ties).
        if (k == 0 || res.jsd[k] > best) {
            best = res.jsd[k];
            res.premature_index = k;
        }
    }
    float * chosen = z_cand + (size_t) res.premature_index * n;
    if (finite) {
        const float l = lse[res.premature_index];
        for (int64_t i = 0; i < n; ++i) chosen[i] -= l;
    }
    if (scores) contrast_scores(lp_out, chosen, n, relative_top, scores);
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
