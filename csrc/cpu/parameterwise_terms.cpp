// Entry-wise terms of a parameterwise evidence evaluation on the CPU, fused into single passes.
//
// One evaluation of a block's share (spamkern/posterior/projected.py) projects the prior
// precisions into the Kronecker eigenbasis with four matrix products and, between and after
// them, runs a chain of entry-wise operations over the block (for an MLP's 256 x 784 first
// layer: 2e5 entries, 800 kB per float32 array). Done one torch op at a time the chain
// reads and writes those arrays about eighteen times, and the products in between evict
// them from the core's cache; here it is three passes:
//
//   projected_precision: c = f*d + s*P and 1/c, with sum (f*d/c)^2 and its sums along one
//                        side (the coupling terms), from the projected precisions d;
//   parameterwise_gradient: own = f*delta*(inv + theta^2)/2, the gradient 1/2 - own and the
//                        scatter f*delta*theta^2, with the sums the evidence and the
//                        preconditioner read (own per row and column, scatter, log delta);
//   shift_sums:          sum rho and sum rho^2 for rho = f*d/(f*d + s*P), read only: the
//                        derivatives of a block's share along a shift of all its log delta.
//
// f is a common factor on every precision (e^t for a shift t of log delta; 1 otherwise).
// Sums are accumulated in double; per-row partial sums are combined in row order and the
// column sums of each OpenMP thread in thread order, so a result depends on the thread
// count only. The loops are compiled for AVX-512, AVX2 and the baseline and picked when the
// library loads.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define SPAMKERN_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define SPAMKERN_CLONES
#endif

namespace spamkern {
namespace cpu {
namespace {

int thread_count(int64_t rows, int64_t n) {
#ifdef _OPENMP
  // below ~64k entries a pass takes microseconds: threads would cost more than they save
  if (n < (int64_t{1} << 16)) return 1;
  return static_cast<int>(std::min<int64_t>(omp_get_max_threads(), rows));
#else
  (void)rows;
  (void)n;
  return 1;
#endif
}

// one row of projected_precision; COLS adds each entry's squared ratio to `col`
template <typename T, bool COLS>
inline double precision_row(const T* d, const T* P, T s, T f, int64_t q, T* c, T* r,
                            double* col) {
  double acc = 0.0;
#pragma omp simd reduction(+ : acc)
  for (int64_t j = 0; j < q; ++j) {
    const T fd = f * d[j];
    const T cj = fd + s * P[j];
    const T rj = T(1) / cj;
    const T ratio = fd * rj;
    const double sq = static_cast<double>(ratio) * static_cast<double>(ratio);
    c[j] = cj;
    r[j] = rj;
    acc += sq;
    if constexpr (COLS) col[j] += sq;
  }
  return acc;
}

// side: 0 none, 1 the sums over each row's q entries, 2 over each column's p entries (per
// slice: `slices` leading (p, q) matrices)
template <typename T>
inline void projected_precision_loop(const T* d, const T* P, T s, T f, int64_t slices, int64_t p,
                                     int64_t q, int side, T* c, T* r, double* row_total,
                                     T* side_out) {
  const int64_t rows = slices * p;
  const int threads = thread_count(rows, rows * q);
  std::vector<double> cols(side == 2 ? static_cast<size_t>(threads) * slices * q : 0, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * q;
    double acc;
    if (side == 2) {
#ifdef _OPENMP
      const int64_t t = omp_get_thread_num();
#else
      const int64_t t = 0;
#endif
      double* col = cols.data() + (t * slices + i / p) * q;
      acc = precision_row<T, true>(d + o, P + o, s, f, q, c + o, r + o, col);
    } else {
      acc = precision_row<T, false>(d + o, P + o, s, f, q, c + o, r + o, nullptr);
    }
    row_total[i] = acc;
    if (side == 1) side_out[i] = static_cast<T>(acc);
  }
  if (side == 2) {
    for (int64_t k = 0; k < slices; ++k)
      for (int64_t j = 0; j < q; ++j) {
        double total = 0.0;
        for (int t = 0; t < threads; ++t) total += cols[(t * slices + k) * q + j];
        side_out[k * q + j] = static_cast<T>(total);
      }
  }
}

template <typename T>
inline void gradient_loop(const T* inv, const T* sq, const T* delta, const T* log_delta, T f,
                          int64_t p, int64_t q, T* own, T* grad, T* scatter, T* own_rows,
                          T* own_cols, double* row_scatter, double* row_log) {
  const int threads = thread_count(p, p * q);
  std::vector<double> cols(static_cast<size_t>(threads) * q, 0.0);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < p; ++i) {
#ifdef _OPENMP
    double* col = cols.data() + static_cast<int64_t>(omp_get_thread_num()) * q;
#else
    double* col = cols.data();
#endif
    const int64_t o = i * q;
    double acc_own = 0.0, acc_scatter = 0.0, acc_log = 0.0;
#pragma omp simd reduction(+ : acc_own, acc_scatter, acc_log)
    for (int64_t j = 0; j < q; ++j) {
      const T fd = f * delta[o + j];
      const T sj = fd * sq[o + j];
      const T oj = T(0.5) * (fd * inv[o + j] + sj);
      own[o + j] = oj;
      grad[o + j] = T(0.5) - oj;
      scatter[o + j] = sj;
      acc_own += oj;
      acc_scatter += sj;
      acc_log += log_delta[o + j];
      col[j] += oj;
    }
    own_rows[i] = static_cast<T>(acc_own);
    row_scatter[i] = acc_scatter;
    row_log[i] = acc_log;
  }
  for (int64_t j = 0; j < q; ++j) {
    double total = 0.0;
    for (int t = 0; t < threads; ++t) total += cols[t * q + j];
    own_cols[j] = static_cast<T>(total);
  }
}

template <typename T>
inline void shift_sums_loop(const T* d, const T* P, T s, T f, int64_t rows, int64_t q,
                            double* row_rho, double* row_rho2) {
  const int threads = thread_count(rows, rows * q);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t o = i * q;
    double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
    for (int64_t j = 0; j < q; ++j) {
      const T fd = f * d[o + j];
      const T rho = fd / (fd + s * P[o + j]);
      a += rho;
      b += static_cast<double>(rho) * static_cast<double>(rho);
    }
    row_rho[i] = a;
    row_rho2[i] = b;
  }
}

// one clone per instruction set for each dtype (the template bodies inline into them)
SPAMKERN_CLONES void projected_precision_f32(const float* d, const float* P, float s, float f,
                                             int64_t slices, int64_t p, int64_t q, int side,
                                             float* c, float* r, double* row_total,
                                             float* side_out) {
  projected_precision_loop(d, P, s, f, slices, p, q, side, c, r, row_total, side_out);
}
SPAMKERN_CLONES void projected_precision_f64(const double* d, const double* P, double s,
                                             double f, int64_t slices, int64_t p, int64_t q,
                                             int side, double* c, double* r, double* row_total,
                                             double* side_out) {
  projected_precision_loop(d, P, s, f, slices, p, q, side, c, r, row_total, side_out);
}
SPAMKERN_CLONES void gradient_f32(const float* inv, const float* sq, const float* delta,
                                  const float* log_delta, float f, int64_t p, int64_t q,
                                  float* own, float* grad, float* scatter, float* own_rows,
                                  float* own_cols, double* row_scatter, double* row_log) {
  gradient_loop(inv, sq, delta, log_delta, f, p, q, own, grad, scatter, own_rows, own_cols,
                row_scatter, row_log);
}
SPAMKERN_CLONES void gradient_f64(const double* inv, const double* sq, const double* delta,
                                  const double* log_delta, double f, int64_t p, int64_t q,
                                  double* own, double* grad, double* scatter, double* own_rows,
                                  double* own_cols, double* row_scatter, double* row_log) {
  gradient_loop(inv, sq, delta, log_delta, f, p, q, own, grad, scatter, own_rows, own_cols,
                row_scatter, row_log);
}
SPAMKERN_CLONES void shift_sums_f32(const float* d, const float* P, float s, float f,
                                    int64_t rows, int64_t q, double* a, double* b) {
  shift_sums_loop(d, P, s, f, rows, q, a, b);
}
SPAMKERN_CLONES void shift_sums_f64(const double* d, const double* P, double s, double f,
                                    int64_t rows, int64_t q, double* a, double* b) {
  shift_sums_loop(d, P, s, f, rows, q, a, b);
}

double ordered_sum(const double* x, int64_t n) {
  double total = 0.0;
  for (int64_t i = 0; i < n; ++i) total += x[i];
  return total;
}

void check_pair(const char* op, const at::Tensor& a, const char* a_name, const at::Tensor& b,
                const char* b_name) {
  TORCH_CHECK(a.device().is_cpu() && b.device().is_cpu(), op, ": CPU tensors only");
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble, op, ": ",
              a_name, " must be float32 or float64, got ", a.scalar_type());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), op, ": ", b_name, " dtype ", b.scalar_type(),
              " differs from ", a_name, " dtype ", a.scalar_type());
  TORCH_CHECK(a.sizes() == b.sizes(), op, ": ", b_name, " shape ", b.sizes(), " differs from ",
              a_name, " shape ", a.sizes());
}

at::Tensor float64_scalars(const std::vector<double>& values) {
  at::Tensor out = at::empty({static_cast<int64_t>(values.size())}, at::kDouble);
  for (size_t i = 0; i < values.size(); ++i) out.data_ptr<double>()[i] = values[i];
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> projected_precision_cpu(
    const at::Tensor& projected, const at::Tensor& products, double scale, double factor,
    int64_t side) {
  check_pair("projected_precision", projected, "projected", products, "products");
  TORCH_CHECK(projected.dim() >= 2, "projected_precision: needs (..., p, q) matrices, got shape ",
              projected.sizes());
  TORCH_CHECK(side >= 0 && side <= 2, "projected_precision: side must be 0 (none), 1 (rows) or ",
              "2 (columns), got ", side);
  const at::Tensor d = projected.contiguous(), P = products.contiguous();
  const int64_t q = d.size(-1), p = d.size(-2), slices = d.numel() / std::max<int64_t>(p * q, 1);
  at::Tensor c = at::empty_like(d), r = at::empty_like(d);
  std::vector<int64_t> lead(d.sizes().begin(), d.sizes().end() - 2);
  at::Tensor side_out;
  if (side == 1) {
    auto shape = lead;
    shape.push_back(p);
    side_out = at::empty(shape, d.options());
  } else if (side == 2) {
    auto shape = lead;
    shape.push_back(q);
    side_out = at::empty(shape, d.options());
  } else {
    side_out = at::empty({0}, d.options());
  }
  std::vector<double> row_total(static_cast<size_t>(slices * p));
  if (d.numel() > 0) {
    if (d.scalar_type() == at::kFloat) {
      projected_precision_f32(d.data_ptr<float>(), P.data_ptr<float>(), static_cast<float>(scale),
                              static_cast<float>(factor), slices, p, q, static_cast<int>(side),
                              c.data_ptr<float>(), r.data_ptr<float>(), row_total.data(),
                              side ? side_out.data_ptr<float>() : nullptr);
    } else {
      projected_precision_f64(d.data_ptr<double>(), P.data_ptr<double>(), scale, factor, slices,
                              p, q, static_cast<int>(side), c.data_ptr<double>(),
                              r.data_ptr<double>(), row_total.data(),
                              side ? side_out.data_ptr<double>() : nullptr);
    }
  } else if (side) {
    side_out.zero_();
  }
  const double total = ordered_sum(row_total.data(), static_cast<int64_t>(row_total.size()));
  return {c, r, float64_scalars({total}).squeeze(0), side_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
parameterwise_gradient_cpu(const at::Tensor& inverse, const at::Tensor& squares,
                           const at::Tensor& delta, const at::Tensor& log_delta, double factor,
                           int64_t rows) {
  const char* op = "parameterwise_gradient";
  check_pair(op, inverse, "inverse", squares, "squares");
  check_pair(op, inverse, "inverse", delta, "delta");
  check_pair(op, inverse, "inverse", log_delta, "log_delta");
  const int64_t n = inverse.numel();
  TORCH_CHECK(rows > 0 && n % rows == 0, op, ": ", n, " entries do not split into ", rows,
              " rows");
  const int64_t q = n / rows;
  const at::Tensor inv = inverse.contiguous(), sq = squares.contiguous();
  const at::Tensor dl = delta.contiguous(), ld = log_delta.contiguous();
  at::Tensor own = at::empty_like(inv), grad = at::empty_like(inv), scatter = at::empty_like(inv);
  at::Tensor own_rows = at::empty({rows}, inv.options()), own_cols = at::empty({q}, inv.options());
  std::vector<double> row_scatter(static_cast<size_t>(rows)), row_log(static_cast<size_t>(rows));
  if (inv.scalar_type() == at::kFloat) {
    gradient_f32(inv.data_ptr<float>(), sq.data_ptr<float>(), dl.data_ptr<float>(),
                 ld.data_ptr<float>(), static_cast<float>(factor), rows, q, own.data_ptr<float>(),
                 grad.data_ptr<float>(), scatter.data_ptr<float>(), own_rows.data_ptr<float>(),
                 own_cols.data_ptr<float>(), row_scatter.data(), row_log.data());
  } else {
    gradient_f64(inv.data_ptr<double>(), sq.data_ptr<double>(), dl.data_ptr<double>(),
                 ld.data_ptr<double>(), factor, rows, q, own.data_ptr<double>(),
                 grad.data_ptr<double>(), scatter.data_ptr<double>(),
                 own_rows.data_ptr<double>(), own_cols.data_ptr<double>(), row_scatter.data(),
                 row_log.data());
  }
  const at::Tensor sums = float64_scalars(
      {ordered_sum(row_scatter.data(), rows), ordered_sum(row_log.data(), rows)});
  return {own, grad, scatter, own_rows, own_cols, sums};
}

at::Tensor shift_sums_cpu(const at::Tensor& projected, const at::Tensor& products, double scale,
                          double factor) {
  check_pair("shift_sums", projected, "projected", products, "products");
  const at::Tensor d = projected.contiguous(), P = products.contiguous();
  const int64_t q = d.dim() > 0 ? d.size(-1) : 1;
  const int64_t rows = q > 0 ? d.numel() / q : 0;
  std::vector<double> a(static_cast<size_t>(rows)), b(static_cast<size_t>(rows));
  if (d.numel() > 0) {
    if (d.scalar_type() == at::kFloat) {
      shift_sums_f32(d.data_ptr<float>(), P.data_ptr<float>(), static_cast<float>(scale),
                     static_cast<float>(factor), rows, q, a.data(), b.data());
    } else {
      shift_sums_f64(d.data_ptr<double>(), P.data_ptr<double>(), scale, factor, rows, q, a.data(),
                     b.data());
    }
  }
  return float64_scalars({ordered_sum(a.data(), rows), ordered_sum(b.data(), rows)});
}

}  // namespace cpu
}  // namespace spamkern

TORCH_LIBRARY_IMPL(spamkern, CPU, m) {
  m.impl("projected_precision", &spamkern::cpu::projected_precision_cpu);
  m.impl("parameterwise_gradient", &spamkern::cpu::parameterwise_gradient_cpu);
  m.impl("shift_sums", &spamkern::cpu::shift_sums_cpu);
}
