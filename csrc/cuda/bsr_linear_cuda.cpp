// torch glue of the CUDA block-sparse linear: checks, stream, registration as the CUDA
// implementation of spamkern::bsr_linear. Built only with a CUDA torch (setup.py, CMake).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/bsr_checks.h"
#include "cuda/bsr_linear_launch.h"

namespace spamkern {
namespace cuda {

at::Tensor bsr_linear_cuda(const at::Tensor& x, const at::Tensor& row_ptr,
                           const at::Tensor& col_idx, const at::Tensor& blocks,
                           const at::Tensor& row_order, const std::optional<at::Tensor>& bias,
                           int64_t out_features) {
  check_bsr_args(x, row_ptr, col_idx, blocks, row_order, bias, out_features);
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kHalf || st == at::kBFloat16,
              "spamkern::bsr_linear on CUDA takes float16 or bfloat16, got ", st,
              " (float32 runs through the Triton backend)");
  TORCH_CHECK(blocks.scalar_type() == st, "bsr_linear: blocks dtype ", blocks.scalar_type(),
              " differs from x dtype ", st);
  const int64_t bn = blocks.size(2), bk = blocks.size(1);
  TORCH_CHECK(bn == 32 || bn == 64 || bn == 128,
              "bsr_linear on CUDA needs block height bn in {32, 64, 128}, got ", bn);
  TORCH_CHECK(x.size(1) % 8 == 0, "bsr_linear on CUDA needs in_features % 8 == 0, got ",
              x.size(1));
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor xc = x.contiguous();
  if (reinterpret_cast<uintptr_t>(xc.data_ptr()) % 16 != 0) xc = xc.clone();
  const at::Tensor bc = blocks.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(st).contiguous();
  at::Tensor y = at::empty({xc.size(0), out_features}, xc.options());
  const cudaError_t err = launch_bsr_linear(
      st == at::kHalf ? DType::kFloat16 : DType::kBFloat16, xc.data_ptr(),
      row_ptr.contiguous().data_ptr<int32_t>(), col_idx.contiguous().data_ptr<int32_t>(),
      bc.data_ptr(), row_order.contiguous().data_ptr<int32_t>(),
      b.defined() ? b.data_ptr() : nullptr, y.data_ptr(), xc.size(0), out_features, xc.size(1),
      static_cast<int>(row_ptr.numel() - 1), static_cast<int>(bn), static_cast<int>(bk),
      c10::cuda::getCurrentCUDAStream().stream());
  C10_CUDA_CHECK(err);
  return y;
}

}  // namespace cuda
}  // namespace spamkern

TORCH_LIBRARY_IMPL(spamkern, CUDA, m) {
  m.impl("bsr_linear", &spamkern::cuda::bsr_linear_cuda);
}
