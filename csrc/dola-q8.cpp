#include "dola-q8.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#include <immintrin.h>
#define DOLA_Q8_VNNI 1
#define DOLA_DPBUSD(acc, a, b) _mm256_dpbusd_epi32((acc), (a), (b))
#elif defined(__AVXVNNI__)
#include <immintrin.h>
#define DOLA_Q8_VNNI 1
#define DOLA_DPBUSD(acc, a, b) _mm256_dpbusd_avx_epi32((acc), (a), (b))
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DOLA_Q8_AVX2 1
#endif

namespace dola {

#if defined(DOLA_Q8_VNNI) || defined(DOLA_Q8_AVX2)

namespace {

constexpr int QK = 32;

struct block_q8_0 {
    uint16_t d;  // fp16 scale
    int8_t qs[QK];
};
static_assert(sizeof(block_q8_0) == 34, "Q8_0 block layout");

inline float fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }

inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

// The int8 dot product of one 32-value block, per 32-bit lane (summed later). A weight block is
// prepared once and shared by every activation row.
#if defined(DOLA_Q8_VNNI)
// u8 x s8 instruction: activations are stored as q + 128, corrected by 128 * sum(w).
constexpr int k_act_offset = 128;
struct weight_block {
    __m256i w, corr;
};
inline weight_block prepare(__m256i w) {
    return {w, DOLA_DPBUSD(_mm256_setzero_si256(), _mm256_set1_epi8((char) 0x80), w)};
}
inline __m256i block_dot(const weight_block & b, __m256i qa) {
    return _mm256_sub_epi32(DOLA_DPBUSD(_mm256_setzero_si256(), qa, b.w), b.corr);
}
#else
// AVX2 has only u8 x s8 -> s16 pairs (maddubs): |w| times a with w's sign, as ggml does; Q8_0
// values are in [-127, 127], so a pair sums to at most 2 * 127 * 127 and never saturates.
constexpr int k_act_offset = 0;
struct weight_block {
    __m256i w, abs_w;
};
inline weight_block prepare(__m256i w) { return {w, _mm256_sign_epi8(w, w)}; }
inline __m256i block_dot(const weight_block & b, __m256i qa) {
    const __m256i pairs = _mm256_maddubs_epi16(b.abs_w, _mm256_sign_epi8(qa, b.w));
    return _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
}
#endif

// Activations as ggml quantizes them for Q8_0 (scale amax/127, stored as fp16), offset by
// k_act_offset for the dot instruction.
struct quantized_rows {
    std::vector<uint8_t> q;   // [n_rows][n_blocks][32]
    std::vector<float> d;     // [n_rows][n_blocks]
};

quantized_rows quantize(const float * x, int32_t n_rows, int64_t n_in) {
    const int64_t nb = n_in / QK;
    quantized_rows out;
    out.q.resize((size_t) n_rows * nb * QK);
    out.d.resize((size_t) n_rows * nb);
    for (int32_t r = 0; r < n_rows; ++r) {
        for (int64_t b = 0; b < nb; ++b) {
            const float * xb = x + (size_t) r * n_in + b * QK;
            float amax = 0.0f;
            for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
            const float d = amax / 127.0f;
            const float id = d != 0.0f ? 1.0f / d : 0.0f;
            out.d[(size_t) r * nb + b] = _cvtsh_ss(_cvtss_sh(d, _MM_FROUND_TO_NEAREST_INT));
            uint8_t * qb = out.q.data() + ((size_t) r * nb + b) * QK;
            for (int i = 0; i < QK; ++i) qb[i] = (uint8_t) ((int) std::nearbyint(xb[i] * id) + k_act_offset);
        }
    }
    return out;
}

template <int R>
void rows_kernel(const uint8_t * wbase, int64_t o0, int64_t o1, size_t row_stride, int64_t nb,
                 const quantized_rows & a, int32_t r0, int64_t n_out, float * y) {
    for (int64_t o = o0; o < o1; ++o) {
        const block_q8_0 * wr = reinterpret_cast<const block_q8_0 *>(wbase + o * row_stride);
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t b = 0; b < nb; ++b) {
            const weight_block wb = prepare(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(wr[b].qs)));
            const __m256 dw = _mm256_set1_ps(fp16_to_fp32(wr[b].d));
            for (int r = 0; r < R; ++r) {
                const size_t idx = (size_t) (r0 + r) * nb + b;
                const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(a.q.data() + idx * QK));
                const __m256i dot = block_dot(wb, qa);
                const __m256 s = _mm256_mul_ps(dw, _mm256_set1_ps(a.d[idx]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), s, acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) y[(size_t) (r0 + r) * n_out + o] = hsum(acc[r]);
    }
}

}  // namespace

bool q8_0_kernel_available() { return true; }

void q8_0_matmul(const void * w, int64_t n_out, int64_t n_in, size_t row_stride,
                 const float * x, int32_t n_rows, float * y, int32_t n_threads) {
    const int64_t nb = n_in / QK;
    const quantized_rows a = quantize(x, n_rows, n_in);
    const uint8_t * wbase = static_cast<const uint8_t *>(w);
    // Weight rows are split across threads; up to 8 activation rows share each weight block.
    const int64_t chunk = 256;
    const int64_t n_chunks = (n_out + chunk - 1) / chunk;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(std::max(1, n_threads))
#endif
    for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t o0 = c * chunk, o1 = std::min(n_out, o0 + chunk);
        for (int32_t r0 = 0; r0 < n_rows;) {
            const int32_t left = n_rows - r0;
            switch (std::min(left, 8)) {
                case 8: rows_kernel<8>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 8; break;
                case 7: rows_kernel<7>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 7; break;
                case 6: rows_kernel<6>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 6; break;
                case 5: rows_kernel<5>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 5; break;
                case 4: rows_kernel<4>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 4; break;
                case 3: rows_kernel<3>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 3; break;
                case 2: rows_kernel<2>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 2; break;
                default: rows_kernel<1>(wbase, o0, o1, row_stride, nb, a, r0, n_out, y); r0 += 1; break;
            }
        }
    }
}

#else

bool q8_0_kernel_available() { return false; }

void q8_0_matmul(const void *, int64_t, int64_t, size_t, const float *, int32_t, float *, int32_t) {}

#endif

}  // namespace dola
