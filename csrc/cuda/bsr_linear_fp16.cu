// fp16 and the dtype switch of the CUDA block-sparse linear (bf16: bsr_linear_bf16.cu).
#include "bsr_linear_kernel.cuh"
#include "bsr_linear_launch.h"

namespace spamkern {
namespace cuda {

cudaError_t launch_bsr_linear_bf16(const void* x, const int32_t* row_ptr, const int32_t* col_idx,
                                   const void* blocks, const int32_t* row_order, const void* bias,
                                   void* y, int64_t M, int64_t N, int64_t K, int n_block_rows,
                                   int bn, int bk, cudaStream_t stream);

cudaError_t launch_bsr_linear(DType dtype, const void* x, const int32_t* row_ptr,
                              const int32_t* col_idx, const void* blocks,
                              const int32_t* row_order, const void* bias, void* y, int64_t M,
                              int64_t N, int64_t K, int n_block_rows, int bn, int bk,
                              cudaStream_t stream) {
  if (dtype == DType::kBFloat16)
    return launch_bsr_linear_bf16(x, row_ptr, col_idx, blocks, row_order, bias, y, M, N, K,
                                  n_block_rows, bn, bk, stream);
  return detail::launch_dtype<__half>(
      static_cast<const __half*>(x), row_ptr, col_idx, static_cast<const __half*>(blocks),
      row_order, static_cast<const __half*>(bias), static_cast<__half*>(y), M, N, K,
      n_block_rows, bn, bk, stream);
}

}  // namespace cuda
}  // namespace spamkern
