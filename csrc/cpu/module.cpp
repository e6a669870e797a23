// spamkern._C: the pybind11 module and the schemas of spamkern's custom torch ops.
//
// Kernels register their implementations per device with TORCH_LIBRARY_IMPL next to their
// code (csrc/cpu/*.cpp, csrc/cuda/*.cpp); the Python side adds fake (meta) implementations
// so the ops trace under torch.compile (spamkern/_ext.py).

#include <pybind11/pybind11.h>
#include <torch/library.h>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace spamkern {
namespace cpu {
const char* cpu_kernel_isa();
}
}  // namespace spamkern

TORCH_LIBRARY_FRAGMENT(spamkern, m) {
  // y = x W^T + bias for W in BSR form with pre-transposed blocks (nnzb, bk, bn).
  m.def(
      "bsr_linear(Tensor x, Tensor row_ptr, Tensor col_idx, Tensor blocks, Tensor row_order, "
      "Tensor? bias, int out_features) -> Tensor");
  // parameterwise evidence terms (csrc/cpu/parameterwise_terms.cpp)
  m.def(
      "projected_precision(Tensor projected, Tensor products, float scale, float factor, "
      "int side) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "parameterwise_gradient(Tensor inverse, Tensor squares, Tensor delta, Tensor log_delta, "
      "float factor, int rows) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("shift_sums(Tensor projected, Tensor products, float scale, float factor) -> Tensor");
  // the lower Cholesky factor of one small matrix and LAPACK's info (csrc/cpu/cholesky.cpp)
  m.def("cholesky_lower(Tensor matrix) -> (Tensor, Tensor)");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "spamkern compiled kernels (ops live under torch.ops.spamkern)";
  m.def("cpu_isa", [] { return std::string(spamkern::cpu::cpu_kernel_isa()); },
        "Vector instruction set the CPU block-sparse kernel runs with on this host.");
  m.def("openmp_threads", [] {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
  });
  m.def("has_cuda", [] {
#ifdef SPAMKERN_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
}
