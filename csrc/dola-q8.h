// A CPU kernel for the early-exit projection when the output matrix is Q8_0 in host memory:
// K hidden rows against every vocabulary row, sharing each weight block's load and sign work
// across the K rows (ggml's kernels redo it per row/column pair; measured 3-4x slower for K=8).
#pragma once

#include <cstddef>
#include <cstdint>

namespace dola {

// Whether this build has the kernel (AVX-VNNI / AVX512-VNNI int8 dot products, or AVX2's
// maddubs where the build targets no VNNI).
bool q8_0_kernel_available();

// y[r * n_out + o] = sum_i W[o, i] * x[r * n_in + i] for a Q8_0 matrix W of n_out rows of n_in
// values (n_in a multiple of 32, rows row_stride bytes apart). x is quantized per 32-value block
// to int8 exactly as ggml quantizes activations for Q8_0 matmuls.
void q8_0_matmul(const void * w, int64_t n_out, int64_t n_in, size_t row_stride,
                 const float * x, int32_t n_rows, float * y, int32_t n_threads);

}  // namespace dola
