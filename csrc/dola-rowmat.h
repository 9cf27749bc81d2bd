// CPU kernels for the early-exit projection: a few hidden rows (DoLa's K candidates and the mature
// row) against every row of the output matrix, in ggml's plain layout in host memory. Each weight
// block is read once and unpacked once (bits, signs, sub-block scales) for all the rows; ggml's
// matmul redoes that work for every row/column pair (measured 3-4x slower for 8 rows of Q8_0).
//
// The activations are rounded as ggml rounds them for that weight type (Q8_0 blocks for Q8_0, Q8_K
// for Q6_K and Q4_K, F16 / BF16 for F16 / BF16), so the integer block products are ggml's and only
// the float sums' order differs.
#pragma once

#include "ggml.h"

#include <cstddef>
#include <cstdint>

namespace dola {

// Whether this build has a kernel for this weight type and row width (x86 with AVX2 or AVX-512:
// Q8_0, Q6_K, Q4_K, F16 and BF16; elsewhere ggml's kernels do the projection).
bool rowmat_available(ggml_type type, int64_t n_in);

// The instruction set the kernels were built for, e.g. "AVX-512 VNNI", or "" where there are none.
const char * rowmat_isa();

// y[r * n_out + o] = sum_i W[o, i] * x[r * n_in + i] for a matrix W of n_out rows of n_in values
// (rows row_stride bytes apart; n_in a multiple of the type's block size). The vocabulary is split
// over n_threads.
void rowmat(ggml_type type, const void * w, int64_t n_out, int64_t n_in, size_t row_stride,
            const float * x, int32_t n_rows, float * y, int32_t n_threads);

}  // namespace dola
