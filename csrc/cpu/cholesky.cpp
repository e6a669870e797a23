// Cholesky factor of one small dense matrix on the CPU, straight from LAPACK's potrf.
//
// torch.linalg.cholesky_ex on a 256 x 256 matrix takes ~0.45 ms on one core, of which the
// factorisation itself is ~0.15 ms: the rest is copying to column-major and zeroing the
// upper triangle of the column-major result (a strided tril_). The parameterwise update
// factorises ~30 such coupling matrices per SpaM run. A row-major symmetric matrix is its
// own column-major transpose, so potrf('U') on the row-major buffer leaves, read row-major,
// the lower factor L with A = L L^T; the strict upper triangle is then zeroed row by row.
//
// potrf is the LAPACK that torch itself links; the symbols are weak references, and where
// they are not exported this falls back to at::linalg_cholesky_ex (same result and info).

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <tuple>

extern "C" {
void dpotrf_(const char* uplo, const int* n, double* a, const int* lda, int* info)
    __attribute__((weak));
void spotrf_(const char* uplo, const int* n, float* a, const int* lda, int* info)
    __attribute__((weak));
}

namespace spamkern {
namespace cpu {
namespace {

template <typename T>
void zero_strict_upper(T* a, int64_t n) {
  for (int64_t i = 0; i + 1 < n; ++i) std::memset(a + i * n + i + 1, 0, sizeof(T) * (n - i - 1));
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> cholesky_lower_cpu(const at::Tensor& matrix) {
  TORCH_CHECK(matrix.device().is_cpu(), "cholesky_lower: a CPU tensor is needed");
  TORCH_CHECK(matrix.dim() == 2 && matrix.size(0) == matrix.size(1),
              "cholesky_lower: needs one square matrix, got shape ", matrix.sizes());
  const auto st = matrix.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kDouble,
              "cholesky_lower: float32 or float64, got ", st);
  TORCH_CHECK(matrix.size(0) < (int64_t{1} << 31), "cholesky_lower: matrix too large");
  const bool direct = st == at::kDouble ? dpotrf_ != nullptr : spotrf_ != nullptr;
  if (!direct || matrix.size(0) == 0) {
    auto [factor, info] = at::linalg_cholesky_ex(matrix);
    return {factor, info};
  }
  at::Tensor factor = matrix.contiguous().clone();
  const int n = static_cast<int>(factor.size(0));
  const char uplo = 'U';
  int info = 0;
  if (st == at::kDouble) {
    dpotrf_(&uplo, &n, factor.data_ptr<double>(), &n, &info);
    zero_strict_upper(factor.data_ptr<double>(), n);
  } else {
    spotrf_(&uplo, &n, factor.data_ptr<float>(), &n, &info);
    zero_strict_upper(factor.data_ptr<float>(), n);
  }
  return {factor, at::scalar_tensor(info, at::TensorOptions().dtype(at::kInt))};
}

}  // namespace cpu
}  // namespace spamkern

TORCH_LIBRARY_IMPL(spamkern, CPU, m) {
  m.impl("cholesky_lower", &spamkern::cpu::cholesky_lower_cpu);
}
