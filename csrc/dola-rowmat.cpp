#include "dola-rowmat.h"

// GCC 12's AVX-512 headers leave the unused lanes of some intrinsics undefined on purpose, and its
// -Wmaybe-uninitialized reports them from every inlined call.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

// Three builds of the same kernels: 512-bit with AVX-512 VNNI (int16 and int8 dot products that
// accumulate in one instruction), else 256-bit AVX2 (with AVX-VNNI's 256-bit forms where the
// build targets them, else AVX2's multiply-add pairs), and ARM NEON with the dotprod extension.
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__) && \
    defined(__AVX512VNNI__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DOLA_ROWMAT 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define DOLA_ROWMAT 256
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
#define DOLA_ROWMAT_VNNI256 1
#endif
#elif defined(__aarch64__) && defined(__ARM_NEON) && defined(__ARM_FEATURE_DOTPROD)
// ARMv8.2 dot products (sdot): Apple M1 and later, Graviton 2 and later, Cortex-A76 and later
#include <arm_neon.h>
#define DOLA_ROWMAT_NEON 1
#endif

#if defined(_MSC_VER)
#define DOLA_NOINLINE __declspec(noinline)
#else
#define DOLA_NOINLINE __attribute__((noinline))
#endif

namespace dola {

#if defined(DOLA_ROWMAT) || defined(DOLA_ROWMAT_NEON)

namespace {

// ggml's block layouts (ggml-common.h), restated: this file does not include ggml's internals.
constexpr int QK8_0 = 32;
struct block_q8_0 {
    uint16_t d;
    int8_t qs[QK8_0];
};
constexpr int QK_K = 256;
struct block_q6_K {
    uint8_t ql[QK_K / 2];      // low 4 bits
    uint8_t qh[QK_K / 4];      // high 2 bits
    int8_t scales[QK_K / 16];  // one per 16 values
    uint16_t d;
};
struct block_q4_K {
    uint16_t d, dmin;
    uint8_t scales[12];  // 6-bit scales and mins of the 8 sub-blocks of 32
    uint8_t qs[QK_K / 2];
};
static_assert(sizeof(block_q8_0) == 34 && sizeof(block_q6_K) == 210 && sizeof(block_q4_K) == 144, "ggml block layouts");

#if defined(DOLA_ROWMAT)
inline float fp16_to_fp32(uint16_t h) { return _cvtsh_ss(h); }
inline float fp16_round(float f) { return _cvtsh_ss(_cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT)); }
#else
inline float fp16_to_fp32(uint16_t h) {
    __fp16 v;
    std::memcpy(&v, &h, sizeof v);
    return (float) v;
}
inline float fp16_round(float f) { return (float) (__fp16) f; }
#endif

// ---- the driver ------------------------------------------------------------------------------
//
// The weight rows are split over the threads in chunks; each chunk is read from memory once and
// multiplied with every activation row, max_rows at a time (a further group reads it again from
// L2), each kernel keeping its sums in registers. Walking a chunk of weight rows one slice of the row width at a time, to keep the
// activations of a 4096-wide model in L1, measured slower here: the short strided runs defeat the
// hardware prefetcher that streams the matrix.
// One function per row count (not inlined into each other: the compiler then keeps each loop's
// pointers in registers).
template <class Kernel, int R = Kernel::max_rows>
DOLA_NOINLINE void rows(const Kernel & k, int32_t n, int64_t o0, int64_t o1, int32_t r0, float * y, int64_t n_out) {
    if constexpr (R > 1) {
        if (n < R) return rows<Kernel, R - 1>(k, n, o0, o1, r0, y, n_out);
    }
    for (int64_t o = o0; o < o1; ++o) {
        float out[R];
        k.template row<R>(o, r0, out);
        for (int r = 0; r < R; ++r) y[(size_t) (r0 + r) * n_out + o] = out[r];
    }
}

template <class Kernel>
void run(const Kernel & k, int64_t n_out, int32_t n_rows, float * y, int32_t n_threads) {
    constexpr int G = Kernel::max_rows;
    const int64_t chunk = 64;  // weight rows: a chunk of 4096-wide Q6_K rows stays in L2 for the next group
    const int64_t n_chunks = (n_out + chunk - 1) / chunk;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(std::max(1, n_threads))
#endif
    for (int64_t c = 0; c < n_chunks; ++c) {
        const int64_t o0 = c * chunk, o1 = std::min(n_out, o0 + chunk);
        for (int32_t r0 = 0; r0 < n_rows; r0 += G) rows(k, std::min<int32_t>(G, n_rows - r0), o0, o1, r0, y, n_out);
    }
}

// A Q8_0 matrix and the activation rows as ggml quantizes them for it: per 32 values, d = amax /
// 127 (stored as fp16), q = round-half-even(x / d), plus offset (for u8 x s8 dot products).
struct q8_0_rows {
    const uint8_t * w;
    size_t stride;
    int64_t nb;
    std::vector<uint8_t> q;  // [rows][nb][32]
    std::vector<float> d;    // [rows][nb]

    q8_0_rows(const void * w_, size_t stride_, int64_t n_in, const float * x, int32_t n_rows, int offset)
        : w(static_cast<const uint8_t *>(w_)), stride(stride_), nb(n_in / QK8_0), q((size_t) n_rows * nb * QK8_0),
          d((size_t) n_rows * nb) {
        for (int64_t i = 0; i < n_rows * nb; ++i) {
            const float * xb = x + i * QK8_0;
            float amax = 0.0f;
            for (int j = 0; j < QK8_0; ++j) amax = std::max(amax, std::fabs(xb[j]));
            const float di = amax / 127.0f;
            const float id = di != 0.0f ? 1.0f / di : 0.0f;
            d[i] = fp16_round(di);
            for (int j = 0; j < QK8_0; ++j) q[i * QK8_0 + j] = (uint8_t) ((int) std::nearbyint(xb[j] * id) + offset);
        }
    }
};

// ---- Q8_K activations (Q6_K, Q4_K): per 256 values, scale -max/127 of the largest magnitude ------

// T: int16_t for x86's int16 dot products, int8_t for NEON's int8 ones
template <class T>
struct q8_k_rows {
    int64_t nb = 0;
    std::vector<T> q;           // [rows][nb][256]
    std::vector<float> d;       // [rows][nb]
    std::vector<int16_t> bs16;  // [rows][nb][16]: sums of each 16 values (Q6_K's offset; ggml's bsums)
    std::vector<int16_t> bs32;  // [rows][nb][8]: sums of each 32 values (Q4_K's mins)

    q8_k_rows(const float * x, int32_t n_rows, int64_t n_in) : nb(n_in / QK_K) {
        q.resize((size_t) n_rows * nb * QK_K);
        d.resize((size_t) n_rows * nb);
        bs16.resize((size_t) n_rows * nb * 16);
        bs32.resize((size_t) n_rows * nb * 8);
        for (int64_t i = 0; i < n_rows * nb; ++i) {  // quantize_row_q8_K_ref
            const float * xb = x + i * QK_K;
            float max = 0.0f, amax = 0.0f;
            for (int j = 0; j < QK_K; ++j) {
                const float ax = std::fabs(xb[j]);
                if (ax > amax) {
                    amax = ax;
                    max = xb[j];
                }
            }
            T * qb = q.data() + i * QK_K;
            if (amax == 0.0f) {
                d[i] = 0.0f;
                std::fill_n(qb, QK_K, (T) 0);
            } else {
                const float iscale = -127.0f / max;
                for (int j = 0; j < QK_K; ++j) qb[j] = (T) std::min(127, (int) std::nearbyint(iscale * xb[j]));
                d[i] = 1.0f / iscale;
            }
            for (int g = 0; g < 16; ++g) {
                int sum = 0;
                for (int j = 0; j < 16; ++j) sum += qb[16 * g + j];
                bs16[i * 16 + g] = (int16_t) sum;
            }
            for (int s = 0; s < 8; ++s) bs32[i * 8 + s] = (int16_t) (bs16[i * 16 + 2 * s] + bs16[i * 16 + 2 * s + 1]);
        }
    }
};

// A K-quant matrix and its activation rows as Q8_K (T: the activations' storage type)
template <class T>
struct k_quant_rows {
    const uint8_t * w;
    size_t stride;
    q8_k_rows<T> a;

    k_quant_rows(const uint8_t * w_, size_t stride_, const float * x, int32_t n_rows, int64_t n_in)
        : w(w_), stride(stride_), a(x, n_rows, n_in) {}
};

// ggml's get_scale_min_k4: the 6-bit scale and min of sub-block j
inline void scale_min_k4(int j, const uint8_t * q, int16_t & d, int16_t & m) {
    if (j < 4) {
        d = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        d = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j - 0] >> 6) << 4);
    }
}

inline float round_to_bf16(float f) {  // ggml_compute_fp32_to_bf16, back to float
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffff) > 0x7f800000) {
        u = (u | 0x00400000) & 0xffff0000u;  // NaN stays NaN
    } else {
        u = (u + (0x7fff + ((u >> 16) & 1))) & 0xffff0000u;
    }
    std::memcpy(&f, &u, sizeof f);
    return f;
}


#if defined(DOLA_ROWMAT)

// ---- the vector width's primitives -------------------------------------------------------------

#if DOLA_ROWMAT == 512
using vi = __m512i;
using vf = __m512;
constexpr int kLanes = 16;  // floats per vector
inline vi load_i(const void * p) { return _mm512_loadu_si512(p); }
inline vf load_f(const float * p) { return _mm512_loadu_ps(p); }
inline vi zero_i() { return _mm512_setzero_si512(); }
inline vf zero_f() { return _mm512_setzero_ps(); }
inline vf set1_f(float x) { return _mm512_set1_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf to_f(vi v) { return _mm512_cvtepi32_ps(v); }
inline float hsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
inline vi dot_i16(vi acc, vi w, vi a) { return _mm512_dpwssd_epi32(acc, w, a); }
inline vi add_i(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vi zext_i(__m128i v) { return _mm512_zextsi128_si512(v); }
inline vf f16_to_f(const uint16_t * p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))); }
inline vf bf16_to_f(const uint16_t * p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i *>(p))), 16));
}
#else
using vi = __m256i;
using vf = __m256;
constexpr int kLanes = 8;
inline vi load_i(const void * p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i *>(p)); }
inline vf load_f(const float * p) { return _mm256_loadu_ps(p); }
inline vi zero_i() { return _mm256_setzero_si256(); }
inline vf zero_f() { return _mm256_setzero_ps(); }
inline vf set1_f(float x) { return _mm256_set1_ps(x); }
inline vf fmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf to_f(vi v) { return _mm256_cvtepi32_ps(v); }
inline vi add_i(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vi zext_i(__m128i v) { return _mm256_zextsi128_si256(v); }
inline float hsum(vf v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#if defined(DOLA_ROWMAT_VNNI256)
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
inline vi dot_i16(vi acc, vi w, vi a) { return _mm256_dpwssd_epi32(acc, w, a); }
#else
inline vi dot_i16(vi acc, vi w, vi a) { return _mm256_dpwssd_avx_epi32(acc, w, a); }
#endif
#else
inline vi dot_i16(vi acc, vi w, vi a) { return _mm256_add_epi32(acc, _mm256_madd_epi16(w, a)); }
#endif
inline vf f16_to_f(const uint16_t * p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))); }
inline vf bf16_to_f(const uint16_t * p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i *>(p))), 16));
}
#endif
constexpr int kI16 = kLanes * 2;    // int16 values per vector
constexpr int kW16 = QK_K / kI16;   // vectors per 256-value block of int16

// ---- Q8_0: activations as ggml quantizes them for Q8_0 (per 32 values, scale amax/127 in fp16) --
//
// 256-bit in every build: a Q8_0 block is 32 bytes, and pairing blocks in 512-bit vectors (with
// their scales spread over 8 lanes each) measured slower on an AVX-512 EPYC than this.

#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DOLA_DPBUSD256 _mm256_dpbusd_epi32
#elif defined(__AVXVNNI__)
#define DOLA_DPBUSD256 _mm256_dpbusd_avx_epi32
#endif

#if defined(DOLA_DPBUSD256)
// u8 x s8 dot products: activations stored as q + 128, corrected by 128 * sum(w) per weight block
constexpr int kQ8Offset = 128;
#else
constexpr int kQ8Offset = 0;
#endif

struct q8_0_kernel : q8_0_rows {
    static constexpr int max_rows = 12;
    // Per row and block: one load, one dot product (VNNI: started from minus the offset's
    // correction, so nothing is subtracted after), one conversion and one multiply-add with the
    // weight block's scale times the row's; for kTable rows or more, those products come from two
    // vector multiplies per block for up to 16 rows (the same float products, so the same sums to
    // the bit; 1.02-1.2x faster for 8-32 rows on a 2-core AVX-512 EPYC, none below 6 rows).
    static constexpr int kTable = 6;
    int64_t n_pad;          // rows of dt, with room to load 16 from any group's first
    std::vector<float> dt;  // the activation scales by block: [nb][n_pad]; empty below kTable rows

    q8_0_kernel(const void * w_, size_t stride_, int64_t n_in, const float * x, int32_t n_rows)
        : q8_0_rows(w_, stride_, n_in, x, n_rows, kQ8Offset), n_pad(n_rows + 16),
          dt(n_rows >= kTable ? (size_t) nb * n_pad : 0, 0.0f) {
        if (dt.empty()) return;
        for (int32_t r = 0; r < n_rows; ++r) {
            for (int64_t b = 0; b < nb; ++b) dt[(size_t) b * n_pad + r] = d[(size_t) r * nb + b];
        }
    }

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q8_0 * wb = reinterpret_cast<const block_q8_0 *>(w + o * stride);
        __m256 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
        alignas(32) float scale[16];
        for (int64_t b = 0; b < nb; ++b) {
            const __m256i wq = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(wb[b].qs));
            const __m256 dw = _mm256_set1_ps(fp16_to_fp32(wb[b].d));
            if constexpr (R >= kTable) {
                const float * db = dt.data() + (size_t) b * n_pad + r0;
                _mm256_store_ps(scale, _mm256_mul_ps(dw, _mm256_loadu_ps(db)));
                if constexpr (R > 8) _mm256_store_ps(scale + 8, _mm256_mul_ps(dw, _mm256_loadu_ps(db + 8)));
            }
#if defined(DOLA_DPBUSD256)
            const __m256i ncorr = _mm256_sub_epi32(_mm256_setzero_si256(),
                                                   DOLA_DPBUSD256(_mm256_setzero_si256(), _mm256_set1_epi8((char) 0x80), wq));
#else
            // AVX2: |w| times a with w's sign (ggml's way); Q8_0 values are in [-127, 127], so a
            // pair sums to at most 2 * 127 * 127 and never saturates
            const __m256i abs_w = _mm256_sign_epi8(wq, wq);
#endif
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const __m256i qa = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(q.data() + i * QK8_0));
#if defined(DOLA_DPBUSD256)
                const __m256i dot = DOLA_DPBUSD256(ncorr, qa, wq);
#else
                const __m256i dot = _mm256_madd_epi16(_mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(qa, wq)), _mm256_set1_epi16(1));
#endif
                const __m256 sr = R >= kTable ? _mm256_set1_ps(scale[r]) : _mm256_mul_ps(dw, _mm256_set1_ps(d[i]));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), sr, acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
    }
};

// The six-bit values (0..63) of half h of a Q6_K block: v[k] holds values 128 h + 32 k .. + 31.
inline void q6_K_values(const block_q6_K & blk, int h, __m256i * v) {
    const __m256i m4 = _mm256_set1_epi8(0x0F), m3 = _mm256_set1_epi8(3);
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.ql + 64 * h));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.ql + 64 * h + 32));
    const __m256i hb = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.qh + 32 * h));
    v[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(hb, m3), 4));
    v[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), m3), 4));
    v[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), m3), 4));
    v[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), m3), 4));
}

#if DOLA_ROWMAT == 512
// index vectors that spread scales 4j .. 4j + 3 over 8 int16 lanes each (a lane of maddubs' output
// is two values of one 16-value sub-block)
const struct q6_K_pair_index {
    __m512i v[4];
    q6_K_pair_index() {
        alignas(64) int16_t t[32];
        for (int j = 0; j < 4; ++j) {
            for (int l = 0; l < 32; ++l) t[l] = (int16_t) (4 * j + l / 8);
            v[j] = _mm512_load_si512(t);
        }
    }
} q6_K_pair_idx;

// 512-bit: the weights stay unsigned (q in 0..63, 64 per vector) against int8 activations:
// maddubs gives the products of value pairs as int16, vpdpwssd multiplies them by their sub-block's
// scale and accumulates, and -32 * scale * (the sub-block's activation sum) takes the offset out.
// Half the activation bytes of the int16 form, and no widening of the weights.
struct q6_K_kernel : k_quant_rows<int8_t> {
    static constexpr int max_rows = 12;
    using k_quant_rows::k_quant_rows;

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q6_K * wb = reinterpret_cast<const block_q6_K *>(w + o * stride);
        const int64_t nb = a.nb;
        vf acc[R];
        for (int r = 0; r < R; ++r) acc[r] = zero_f();
        for (int64_t b = 0; b < nb; ++b) {
            const block_q6_K & blk = wb[b];
            const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i *>(blk.scales)));
            const __m512i sc = _mm512_castsi256_si512(sc16);
            const __m512i off = _mm512_zextsi256_si512(_mm256_mullo_epi16(sc16, _mm256_set1_epi16(-32)));
            __m512i wq[4], sv[4];  // values 64j .. 64j + 63, and the scales of their pairs
            for (int h = 0; h < 2; ++h) {
                __m256i v[4];
                q6_K_values(blk, h, v);
                wq[2 * h] = _mm512_inserti64x4(_mm512_castsi256_si512(v[0]), v[1], 1);
                wq[2 * h + 1] = _mm512_inserti64x4(_mm512_castsi256_si512(v[2]), v[3], 1);
            }
            for (int j = 0; j < 4; ++j) sv[j] = _mm512_permutexvar_epi16(q6_K_pair_idx.v[j], sc);
            const float dw = fp16_to_fp32(blk.d);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int8_t * ar = a.q.data() + i * QK_K;
                __m512i s = _mm512_dpwssd_epi32(zero_i(), off, _mm512_zextsi256_si512(_mm256_loadu_si256(
                                                                    reinterpret_cast<const __m256i *>(a.bs16.data() + i * 16))));
                for (int j = 0; j < 4; ++j) s = _mm512_dpwssd_epi32(s, _mm512_maddubs_epi16(wq[j], load_i(ar + 64 * j)), sv[j]);
                acc[r] = fmadd(to_f(s), set1_f(dw * a.d[i]), acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
    }
};
#else
// The Q6_K block's 256 values (q - 32) times their 16-value sub-block's scale, as int16: within
// [-4096, 4096], so a pair of products with an int8 activation fits the int32 accumulator easily.
inline void unpack_q6_K(const block_q6_K & blk, vi * w16) {
    const __m256i off = _mm256_set1_epi8(32);
    for (int h = 0; h < 2; ++h) {
        __m256i v[4];
        q6_K_values(blk, h, v);
        for (int k = 0; k < 4; ++k) {
            const __m256i s8 = _mm256_sub_epi8(v[k], off);
            const int s = 8 * h + 2 * k;  // the scales of values 16 s .. 16 s + 31 of the block
            w16[8 * h + 2 * k] = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_castsi256_si128(s8)), _mm256_set1_epi16(blk.scales[s]));
            w16[8 * h + 2 * k + 1] = _mm256_mullo_epi16(_mm256_cvtepi8_epi16(_mm256_extracti128_si256(s8, 1)),
                                                        _mm256_set1_epi16(blk.scales[s + 1]));
        }
    }
}

struct q6_K_kernel : k_quant_rows<int16_t> {
    static constexpr int max_rows = 12;
    using k_quant_rows::k_quant_rows;

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q6_K * wb = reinterpret_cast<const block_q6_K *>(w + o * stride);
        const int64_t nb = a.nb;
        vf acc[R];
        for (int r = 0; r < R; ++r) acc[r] = zero_f();
        for (int64_t b = 0; b < nb; ++b) {
            vi w16[kW16];
            unpack_q6_K(wb[b], w16);
            const float dw = fp16_to_fp32(wb[b].d);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int16_t * ar = a.q.data() + i * QK_K;
                vi s0 = zero_i(), s1 = zero_i();  // two chains of dependent dot products
                for (int j = 0; j < kW16; j += 2) {
                    s0 = dot_i16(s0, w16[j], load_i(ar + j * kI16));
                    s1 = dot_i16(s1, w16[j + 1], load_i(ar + (j + 1) * kI16));
                }
                acc[r] = fmadd(to_f(add_i(s0, s1)), set1_f(dw * a.d[i]), acc[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
    }
};
#endif

struct q4_K_kernel : k_quant_rows<int16_t> {
    static constexpr int max_rows = 8;  // an accumulator for the mins too
    using k_quant_rows::k_quant_rows;

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q4_K * wb = reinterpret_cast<const block_q4_K *>(w + o * stride);
        const int64_t nb = a.nb;
        const __m256i m4 = _mm256_set1_epi8(0x0F);
        vf acc[R], accm[R];  // the mins' sums in the low four lanes
        for (int r = 0; r < R; ++r) acc[r] = zero_f(), accm[r] = zero_f();
        for (int64_t b = 0; b < nb; ++b) {
            const block_q4_K & blk = wb[b];
            int16_t sc[8], mn[8];
            for (int j = 0; j < 8; ++j) scale_min_k4(j, blk.scales, sc[j], mn[j]);
            vi w16[kW16];  // q * scale, q in 0..15, scale in 0..63
            for (int j = 0; j < 4; ++j) {  // 64 values: the low nibbles are sub-block 2j, the high 2j + 1
                const __m256i qv = _mm256_loadu_si256(reinterpret_cast<const __m256i *>(blk.qs + 32 * j));
                const __m256i lo = _mm256_and_si256(qv, m4), hi = _mm256_and_si256(_mm256_srli_epi16(qv, 4), m4);
#if DOLA_ROWMAT == 512
                w16[2 * j] = _mm512_mullo_epi16(_mm512_cvtepu8_epi16(lo), _mm512_set1_epi16(sc[2 * j]));
                w16[2 * j + 1] = _mm512_mullo_epi16(_mm512_cvtepu8_epi16(hi), _mm512_set1_epi16(sc[2 * j + 1]));
#else
                const __m256i s0 = _mm256_set1_epi16(sc[2 * j]), s1 = _mm256_set1_epi16(sc[2 * j + 1]);
                w16[4 * j + 0] = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(lo)), s0);
                w16[4 * j + 1] = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(lo, 1)), s0);
                w16[4 * j + 2] = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_castsi256_si128(hi)), s1);
                w16[4 * j + 3] = _mm256_mullo_epi16(_mm256_cvtepu8_epi16(_mm256_extracti128_si256(hi, 1)), s1);
#endif
            }
            const __m128i mins = _mm_loadu_si128(reinterpret_cast<const __m128i *>(mn));
            const float dw = fp16_to_fp32(blk.d), dmin = fp16_to_fp32(blk.dmin);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int16_t * ar = a.q.data() + i * QK_K;
                vi s = zero_i();
                for (int j = 0; j < kW16; ++j) s = dot_i16(s, w16[j], load_i(ar + j * kI16));
                acc[r] = fmadd(to_f(s), set1_f(dw * a.d[i]), acc[r]);
                const __m128i m = _mm_madd_epi16(mins, _mm_loadu_si128(reinterpret_cast<const __m128i *>(a.bs32.data() + i * 8)));
                accm[r] = fmadd(to_f(zext_i(m)), set1_f(dmin * a.d[i]), accm[r]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]) - hsum(accm[r]);
    }
};

#else  // DOLA_ROWMAT_NEON

using vf = float32x4_t;
constexpr int kLanes = 4;
inline vf load_f(const float * p) { return vld1q_f32(p); }
inline vf zero_f() { return vdupq_n_f32(0.0f); }
inline vf fmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline float hsum(vf v) { return vaddvq_f32(v); }
inline vf f16_to_f(const uint16_t * p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline vf bf16_to_f(const uint16_t * p) { return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(p), 16)); }

// 128-bit: sdot (four int8 products summed into each int32 lane) on int8 weights and activations.
// Each 16 values of a K-quant block share one sub-block scale, so a block's integer sum is the
// sub-blocks' dot products times their scales, exact in int32.

struct q8_0_kernel : q8_0_rows {
    static constexpr int max_rows = 12;

    q8_0_kernel(const void * w_, size_t stride_, int64_t n_in, const float * x, int32_t n_rows)
        : q8_0_rows(w_, stride_, n_in, x, n_rows, 0) {}

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q8_0 * wb = reinterpret_cast<const block_q8_0 *>(w + o * stride);
        float32x4_t acc[R];
        for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.0f);
        for (int64_t b = 0; b < nb; ++b) {
            const int8x16_t w0 = vld1q_s8(wb[b].qs), w1 = vld1q_s8(wb[b].qs + 16);
            const float dw = fp16_to_fp32(wb[b].d);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int8_t * a = reinterpret_cast<const int8_t *>(q.data() + i * QK8_0);
                const int32x4_t s = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, vld1q_s8(a)), w1, vld1q_s8(a + 16));
                acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), dw * d[i]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]);
    }
};

// The Q6_K block's 256 values q - 32 as int8, 16 per vector: vector g holds values 16g .. 16g + 15,
// whose scale is scales[g].
inline void unpack_q6_K(const block_q6_K & blk, int8x16_t * w) {
    const uint8x16_t m4 = vdupq_n_u8(0x0F), m3 = vdupq_n_u8(3);
    const int8x16_t off = vdupq_n_s8(32);
    for (int h = 0; h < 2; ++h) {      // 128 values: ql 64 bytes, qh 32 bytes
        for (int c = 0; c < 2; ++c) {  // 16 of each 32
            const uint8x16_t l0 = vld1q_u8(blk.ql + 64 * h + 16 * c), l1 = vld1q_u8(blk.ql + 64 * h + 32 + 16 * c);
            const uint8x16_t hb = vld1q_u8(blk.qh + 32 * h + 16 * c);
            const uint8x16_t v[4] = {
                vorrq_u8(vandq_u8(l0, m4), vshlq_n_u8(vandq_u8(hb, m3), 4)),
                vorrq_u8(vandq_u8(l1, m4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 2), m3), 4)),
                vorrq_u8(vshrq_n_u8(l0, 4), vshlq_n_u8(vandq_u8(vshrq_n_u8(hb, 4), m3), 4)),
                vorrq_u8(vshrq_n_u8(l1, 4), vshlq_n_u8(vshrq_n_u8(hb, 6), 4)),
            };
            for (int k = 0; k < 4; ++k) w[8 * h + 2 * k + c] = vsubq_s8(vreinterpretq_s8_u8(v[k]), off);
        }
    }
}

struct q6_K_kernel : k_quant_rows<int8_t> {
    static constexpr int max_rows = 8;  // 16 weight registers
    using k_quant_rows::k_quant_rows;

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q6_K * wb = reinterpret_cast<const block_q6_K *>(w + o * stride);
        const int64_t nb = a.nb;
        float32x4_t acc[R];
        for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.0f);
        for (int64_t b = 0; b < nb; ++b) {
            int8x16_t wv[16];
            unpack_q6_K(wb[b], wv);
            const float dw = fp16_to_fp32(wb[b].d);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int8_t * ar = a.q.data() + i * QK_K;
                int32x4_t s = vdupq_n_s32(0);
                for (int g = 0; g < 16; ++g) {
                    s = vmlaq_n_s32(s, vdotq_s32(vdupq_n_s32(0), wv[g], vld1q_s8(ar + 16 * g)), wb[b].scales[g]);
                }
                acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), dw * a.d[i]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]);
    }
};

struct q4_K_kernel : k_quant_rows<int8_t> {
    static constexpr int max_rows = 8;
    using k_quant_rows::k_quant_rows;

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const block_q4_K * wb = reinterpret_cast<const block_q4_K *>(w + o * stride);
        const int64_t nb = a.nb;
        const uint8x16_t m4 = vdupq_n_u8(0x0F);
        float32x4_t acc[R];
        float accm[R];
        for (int r = 0; r < R; ++r) acc[r] = vdupq_n_f32(0.0f), accm[r] = 0.0f;
        for (int64_t b = 0; b < nb; ++b) {
            const block_q4_K & blk = wb[b];
            int16_t sc[8], mn[8];
            for (int j = 0; j < 8; ++j) scale_min_k4(j, blk.scales, sc[j], mn[j]);
            int8x16_t wv[16];  // vectors 2s, 2s + 1: sub-block s (32 values, q in 0..15)
            for (int j = 0; j < 4; ++j) {
                const uint8x16_t q0 = vld1q_u8(blk.qs + 32 * j), q1 = vld1q_u8(blk.qs + 32 * j + 16);
                wv[4 * j + 0] = vreinterpretq_s8_u8(vandq_u8(q0, m4));
                wv[4 * j + 1] = vreinterpretq_s8_u8(vandq_u8(q1, m4));
                wv[4 * j + 2] = vreinterpretq_s8_u8(vshrq_n_u8(q0, 4));
                wv[4 * j + 3] = vreinterpretq_s8_u8(vshrq_n_u8(q1, 4));
            }
            const int16x8_t mins = vld1q_s16(mn);
            const float dw = fp16_to_fp32(blk.d), dmin = fp16_to_fp32(blk.dmin);
            for (int r = 0; r < R; ++r) {
                const size_t i = (size_t) (r0 + r) * nb + b;
                const int8_t * ar = a.q.data() + i * QK_K;
                int32x4_t s = vdupq_n_s32(0);
                for (int sb = 0; sb < 8; ++sb) {
                    const int32x4_t dot = vdotq_s32(vdotq_s32(vdupq_n_s32(0), wv[2 * sb], vld1q_s8(ar + 32 * sb)), wv[2 * sb + 1],
                                                    vld1q_s8(ar + 32 * sb + 16));
                    s = vmlaq_n_s32(s, dot, sc[sb]);
                }
                acc[r] = vfmaq_n_f32(acc[r], vcvtq_f32_s32(s), dw * a.d[i]);
                const int16x8_t bs = vld1q_s16(a.bs32.data() + i * 8);
                const int32_t m = vaddvq_s32(vmlal_high_s16(vmull_s16(vget_low_s16(mins), vget_low_s16(bs)), mins, bs));
                accm[r] += (float) m * (dmin * a.d[i]);
            }
        }
        for (int r = 0; r < R; ++r) out[r] = vaddvq_f32(acc[r]) - accm[r];
    }
};

#endif

// ---- F16 / BF16: activations rounded to the weight's type, as ggml's vec_dot_type, then f32 FMAs --

template <bool BF16>
struct half_kernel {
    static constexpr int max_rows = 12;
    const uint8_t * w;
    size_t stride;
    int64_t n_in;
    std::vector<float> a;  // [rows][n_in]

    half_kernel(const void * w_, size_t stride_, int64_t n_in_, const float * x, int32_t n_rows)
        : w(static_cast<const uint8_t *>(w_)), stride(stride_), n_in(n_in_), a(x, x + (size_t) n_rows * n_in_) {
        for (float & v : a) v = BF16 ? round_to_bf16(v) : fp16_round(v);
    }

    template <int R>
    void row(int64_t o, int32_t r0, float * out) const {
        const uint16_t * wr = reinterpret_cast<const uint16_t *>(w + o * stride);
        vf acc[R];
        for (int r = 0; r < R; ++r) acc[r] = zero_f();
        for (int64_t i = 0; i < n_in; i += kLanes) {
            const vf wv = BF16 ? bf16_to_f(wr + i) : f16_to_f(wr + i);
            for (int r = 0; r < R; ++r) acc[r] = fmadd(wv, load_f(a.data() + (size_t) (r0 + r) * n_in + i), acc[r]);
        }
        for (int r = 0; r < R; ++r) out[r] = hsum(acc[r]);
    }
};

}  // namespace

bool rowmat_available(ggml_type type, int64_t n_in) {
    switch (type) {
        case GGML_TYPE_Q8_0:
            return n_in % QK8_0 == 0;
        case GGML_TYPE_Q6_K:
        case GGML_TYPE_Q4_K:
            return n_in % QK_K == 0;
        case GGML_TYPE_F16:
        case GGML_TYPE_BF16:
            return n_in % 16 == 0;  // whole vectors of the widest build
        default:
            return false;
    }
}

const char * rowmat_isa() {
#if defined(DOLA_ROWMAT_NEON)
    return "NEON dotprod";
#elif DOLA_ROWMAT == 512
    return "AVX-512 VNNI";
#elif defined(DOLA_ROWMAT_VNNI256)
    return "AVX2 + VNNI";
#else
    return "AVX2";
#endif
}

void rowmat(ggml_type type, const void * w, int64_t n_out, int64_t n_in, size_t row_stride, const float * x, int32_t n_rows,
            float * y, int32_t n_threads) {
    if (n_rows <= 0 || n_out <= 0) return;
    const auto * wb = static_cast<const uint8_t *>(w);
    switch (type) {
        case GGML_TYPE_Q8_0:
            run(q8_0_kernel(w, row_stride, n_in, x, n_rows), n_out, n_rows, y, n_threads);
            break;
        case GGML_TYPE_Q6_K:
            run(q6_K_kernel(wb, row_stride, x, n_rows, n_in), n_out, n_rows, y, n_threads);
            break;
        case GGML_TYPE_Q4_K:
            run(q4_K_kernel(wb, row_stride, x, n_rows, n_in), n_out, n_rows, y, n_threads);
            break;
        case GGML_TYPE_F16:
            run(half_kernel<false>(w, row_stride, n_in, x, n_rows), n_out, n_rows, y, n_threads);
            break;
        case GGML_TYPE_BF16:
            run(half_kernel<true>(w, row_stride, n_in, x, n_rows), n_out, n_rows, y, n_threads);
            break;
        default:
            break;
    }
}

#else  // no AVX2, AVX-512 or NEON dotprod in this build: ggml's kernels do the projection

bool rowmat_available(ggml_type, int64_t) { return false; }
const char * rowmat_isa() { return ""; }
void rowmat(ggml_type, const void *, int64_t, int64_t, size_t, const float *, int32_t, float *, int32_t) {}

#endif

}  // namespace dola
