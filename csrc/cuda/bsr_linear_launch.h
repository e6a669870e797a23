// Host entry of the CUDA block-sparse linear kernel. Plain C++ types only, so both the
// torch glue (bsr_linear_cuda.cpp) and torch-free C++ code can call it.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace spamkern {
namespace cuda {

enum class DType : int { kFloat16 = 0, kBFloat16 = 1 };

// y (M, N) = x (M, K) W^T + bias, W in BSR form with pre-transposed blocks (nnzb, bk, bn).
// Requirements (checked, cudaErrorInvalidValue otherwise): bn in {32, 64, 128}, bk a
// multiple of 16 up to 128, K % 8 == 0, x 16-byte aligned with row stride K, y row stride N.
// bias may be null.
cudaError_t launch_bsr_linear(DType dtype, const void* x, const int32_t* row_ptr,
                              const int32_t* col_idx, const void* blocks,
                              const int32_t* row_order, const void* bias, void* y, int64_t M,
                              int64_t N, int64_t K, int n_block_rows, int bn, int bk,
                              cudaStream_t stream);

}  // namespace cuda
}  // namespace spamkern
