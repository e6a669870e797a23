// bf16 instantiation of the CUDA block-sparse linear (compiled in parallel with fp16).
#include "bsr_linear_kernel.cuh"
#include "bsr_linear_launch.h"

namespace spamkern {
namespace cuda {

cudaError_t launch_bsr_linear_bf16(const void* x, const int32_t* row_ptr, const int32_t* col_idx,
                                   const void* blocks, const int32_t* row_order, const void* bias,
                                   void* y, int64_t M, int64_t N, int64_t K, int n_block_rows,
                                   int bn, int bk, cudaStream_t stream) {
  return detail::launch_dtype<__nv_bfloat16>(
      static_cast<const __nv_bfloat16*>(x), row_ptr, col_idx,
      static_cast<const __nv_bfloat16*>(blocks), row_order,
      static_cast<const __nv_bfloat16*>(bias), static_cast<__nv_bfloat16*>(y), M, N, K,
      n_block_rows, bn, bk, stream);
}

}  // namespace cuda
}  // namespace spamkern
