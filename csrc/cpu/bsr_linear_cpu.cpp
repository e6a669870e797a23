// Block-sparse linear on the CPU: y = x W^T + b with W in spamkern's BSR format
// (blocks pre-transposed, (nnzb, bk, bn), see spamkern/sparse/format.py).
//
// Work is split into tasks (block-row of W) x (tile of MT rows of x), scheduled by OpenMP
// heaviest block-row first (row_order). Inside a task, a register-blocked micro-kernel keeps an
// MR x W accumulator tile in vector registers across every stored block of the row, so y is
// written once. The micro-kernel is compiled for AVX-512 and AVX2 with target attributes and
// picked at run time, so the library also runs on x86-64 hosts without them.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define SPAMKERN_X86 1
#endif

#include "common/bsr_checks.h"

namespace spamkern {
namespace cpu {
namespace {

constexpr int kMR = 6;        // rows of x per micro-tile
constexpr int kChunk = 64;    // widest column chunk of a micro-tile (AVX-512: 4 vectors)
constexpr int64_t kMT = 48;   // rows of x per task (multiple of kMR)

// A micro-kernel computes out[r][c] = sum over stored blocks p of the block-row and kk of
// x[r, k0(p) + kk] * blocks_t[p][kk][j0 + c] for r < MR, c < width, and writes `out`
// (ld kChunk). It never reads x beyond column K.
using MicroFn = void (*)(const float* x, int64_t ldx, const int32_t* cols, int64_t nblk,
                         const float* blocks, int64_t bk, int64_t bn, int64_t j0, int64_t K,
                         float* out);

#ifdef SPAMKERN_X86
template <int MR, int NV>
__attribute__((target("avx512f,fma"))) void micro_avx512(const float* x, int64_t ldx,
                                                         const int32_t* cols, int64_t nblk,
                                                         const float* blocks, int64_t bk,
                                                         int64_t bn, int64_t j0, int64_t K,
                                                         float* out) {
  __m512 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t p = 0; p < nblk; ++p) {
    const int64_t k0 = static_cast<int64_t>(cols[p]) * bk;
    const int64_t kend = std::min(bk, K - k0);
    const float* wb = blocks + p * bk * bn + j0;
    const float* xb = x + k0;
    for (int64_t kk = 0; kk < kend; ++kk) {
      __m512 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wb + kk * bn + 16 * v);
      for (int r = 0; r < MR; ++r) {
        const __m512 xv = _mm512_set1_ps(xb[r * ldx + kk]);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm512_fmadd_ps(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm512_storeu_ps(out + r * kChunk + 16 * v, acc[r][v]);
}

// AVX2 has 16 vector registers: 6 rows x 2 vectors of 8 (width 16) + 2 + 1 fit.
template <int MR, int NV>
__attribute__((target("avx2,fma"))) void micro_avx2(const float* x, int64_t ldx,
                                                    const int32_t* cols, int64_t nblk,
                                                    const float* blocks, int64_t bk, int64_t bn,
                                                    int64_t j0, int64_t K, float* out) {
  __m256 acc[MR][NV];
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_setzero_ps();
  for (int64_t p = 0; p < nblk; ++p) {
    const int64_t k0 = static_cast<int64_t>(cols[p]) * bk;
    const int64_t kend = std::min(bk, K - k0);
    const float* wb = blocks + p * bk * bn + j0;
    const float* xb = x + k0;
    for (int64_t kk = 0; kk < kend; ++kk) {
      __m256 wv[NV];
      for (int v = 0; v < NV; ++v) wv[v] = _mm256_loadu_ps(wb + kk * bn + 8 * v);
      for (int r = 0; r < MR; ++r) {
        const __m256 xv = _mm256_set1_ps(xb[r * ldx + kk]);
        for (int v = 0; v < NV; ++v) acc[r][v] = _mm256_fmadd_ps(xv, wv[v], acc[r][v]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) _mm256_storeu_ps(out + r * kChunk + 8 * v, acc[r][v]);
}
#endif

// Portable version (width 16); the compiler vectorises the inner loop where it can.
template <int MR, int NV>
void micro_generic(const float* x, int64_t ldx, const int32_t* cols, int64_t nblk,
                   const float* blocks, int64_t bk, int64_t bn, int64_t j0, int64_t K,
                   float* out) {
  constexpr int W = 16 * NV;
  float acc[MR][W] = {};
  for (int64_t p = 0; p < nblk; ++p) {
    const int64_t k0 = static_cast<int64_t>(cols[p]) * bk;
    const int64_t kend = std::min(bk, K - k0);
    const float* wb = blocks + p * bk * bn + j0;
    const float* xb = x + k0;
    for (int64_t kk = 0; kk < kend; ++kk)
      for (int r = 0; r < MR; ++r) {
        const float xv = xb[r * ldx + kk];
        for (int c = 0; c < W; ++c) acc[r][c] += xv * wb[kk * bn + c];
      }
  }
  for (int r = 0; r < MR; ++r) std::memcpy(out + r * kChunk, acc[r], sizeof(float) * W);
}

// Table of micro-kernels indexed [rows - 1][vectors - 1] and the column width per vector.
struct MicroTable {
  MicroFn fn[kMR][4];
  int vec_width;  // columns per vector
  int max_vecs;   // widest chunk = vec_width * max_vecs
  const char* name;
};

#define SPAMKERN_ROW(F, R) {F<R, 1>, F<R, 2>, F<R, 3>, F<R, 4>}
#define SPAMKERN_TABLE(F)                                                              \
  {                                                                                    \
    SPAMKERN_ROW(F, 1), SPAMKERN_ROW(F, 2), SPAMKERN_ROW(F, 3), SPAMKERN_ROW(F, 4),    \
        SPAMKERN_ROW(F, 5), SPAMKERN_ROW(F, 6)                                         \
  }

const MicroTable& micro_table() {
#ifdef SPAMKERN_X86
  static const MicroTable avx512{SPAMKERN_TABLE(micro_avx512), 16, 4, "avx512"};
  static const MicroTable avx2{SPAMKERN_TABLE(micro_avx2), 8, 2, "avx2"};
#endif
  static const MicroTable generic{SPAMKERN_TABLE(micro_generic), 16, 1, "generic"};
#ifdef SPAMKERN_X86
  static const MicroTable* chosen = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return &avx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return &avx2;
    return &generic;
  }();
  return *chosen;
#else
  return generic;
#endif
}

void bsr_linear_f32(const float* x, int64_t M, int64_t K, const int32_t* row_ptr,
                    const int32_t* col_idx, const float* blocks, const int32_t* row_order,
                    int64_t n_block_rows, int64_t bn, int64_t bk, const float* bias, float* y,
                    int64_t N) {
  const MicroTable& table = micro_table();
  const int64_t chunk = static_cast<int64_t>(table.vec_width) * table.max_vecs;
  const int64_t m_tiles = (M + kMT - 1) / kMT;
  const int64_t tasks = n_block_rows * m_tiles;
  // Small products (decode-sized inputs) run on one thread: waking a second costs more
  // than the work (tens of microseconds, and milliseconds on a busy machine).
  const double flops = 2.0 * static_cast<double>(M) * row_ptr[n_block_rows] * bk * bn;
  const bool parallel = tasks > 1 && flops > 4.0e6;
#pragma omp parallel for schedule(dynamic, 1) if (parallel)
  for (int64_t t = 0; t < tasks; ++t) {
    alignas(64) float out[kMR * kChunk];
    const int64_t brow = row_order[t / m_tiles];
    const int64_t m_begin = (t % m_tiles) * kMT;
    const int64_t m_end = std::min(M, m_begin + kMT);
    const int64_t p0 = row_ptr[brow];
    const int64_t nblk = row_ptr[brow + 1] - p0;
    const int64_t n0 = brow * bn;
    const int64_t ncols = std::min(bn, N - n0);
    for (int64_t m0 = m_begin; m0 < m_end; m0 += kMR) {
      const int rows = static_cast<int>(std::min<int64_t>(kMR, m_end - m0));
      for (int64_t j0 = 0; j0 < ncols; j0 += chunk) {
        const int64_t width = std::min(chunk, bn - j0);  // bn is a multiple of 16
        const int nv = static_cast<int>(width / table.vec_width);
        table.fn[rows - 1][nv - 1](x + m0 * K, K, col_idx + p0, nblk, blocks + p0 * bk * bn, bk,
                                   bn, j0, K, out);
        const int64_t valid = std::min(width, ncols - j0);
        for (int r = 0; r < rows; ++r) {
          float* yr = y + (m0 + r) * N + n0 + j0;
          const float* o = out + r * kChunk;
          if (bias != nullptr) {
            const float* b = bias + n0 + j0;
            for (int64_t c = 0; c < valid; ++c) yr[c] = o[c] + b[c];
          } else {
            std::memcpy(yr, o, sizeof(float) * valid);
          }
        }
      }
    }
  }
}

}  // namespace

at::Tensor bsr_linear_cpu(const at::Tensor& x, const at::Tensor& row_ptr,
                          const at::Tensor& col_idx, const at::Tensor& blocks,
                          const at::Tensor& row_order, const std::optional<at::Tensor>& bias,
                          int64_t out_features) {
  check_bsr_args(x, row_ptr, col_idx, blocks, row_order, bias, out_features);
  const auto st = x.scalar_type();
  TORCH_CHECK(blocks.scalar_type() == st, "bsr_linear: blocks dtype ", blocks.scalar_type(),
              " differs from x dtype ", st);
  if (st == at::kHalf || st == at::kBFloat16) {
    // 16-bit operands: products and sums in float32, result rounded once at the end
    std::optional<at::Tensor> bias32;
    if (bias.has_value()) bias32 = bias->to(at::kFloat);
    return bsr_linear_cpu(x.to(at::kFloat), row_ptr, col_idx, blocks.to(at::kFloat), row_order,
                          bias32, out_features)
        .to(st);
  }
  TORCH_CHECK(st == at::kFloat,
              "spamkern::bsr_linear on the CPU takes float32, float16 or bfloat16, got ", st);
  const at::Tensor xc = x.contiguous();
  const at::Tensor bc = blocks.contiguous();
  const at::Tensor rp = row_ptr.contiguous();
  const at::Tensor ci = col_idx.contiguous();
  const at::Tensor ro = row_order.contiguous();
  at::Tensor b;
  if (bias.has_value()) b = bias->to(at::kFloat).contiguous();
  const int64_t M = xc.size(0), K = xc.size(1);
  at::Tensor y = at::empty({M, out_features}, xc.options());
  if (M == 0 || out_features == 0) return y;
  bsr_linear_f32(xc.data_ptr<float>(), M, K, rp.data_ptr<int32_t>(), ci.data_ptr<int32_t>(),
                 bc.data_ptr<float>(), ro.data_ptr<int32_t>(), rp.size(0) - 1, bc.size(2),
                 bc.size(1), b.defined() ? b.data_ptr<float>() : nullptr, y.data_ptr<float>(),
                 out_features);
  return y;
}

const char* cpu_kernel_isa() { return micro_table().name; }

}  // namespace cpu
}  // namespace spamkern

TORCH_LIBRARY_IMPL(spamkern, CPU, m) { m.impl("bsr_linear", &spamkern::cpu::bsr_linear_cpu); }
