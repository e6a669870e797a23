// Tensor-core block-sparse linear: y = x W^T + b, W in BSR form (blocks pre-transposed).
//
// One CTA per (tile of BM rows of x, block-row of W), block-rows heaviest first (row_order).
// The CTA walks the stored blocks of its block-row in k-chunks of KC: each step copies an
// x tile (BM x KC) and a weight tile (KC x BN) into shared memory with cp.async, STAGES
// steps in flight, while 4 warps multiply the previous step's tiles with WMMA (16x16x16,
// fp16/bf16 operands, fp32 accumulators). The epilogue goes through shared memory, adds the
// bias and stores y with bounds checks. No torch headers: this file compiles with nvcc alone.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>

namespace spamkern {
namespace cuda {
namespace detail {

constexpr int kBM = 64;       // rows of x per CTA
constexpr int kWarps = 4;     // 2 x 2 warps, each (kBM / 2) x (BN / 2)
constexpr int kThreads = kWarps * 32;
constexpr int kStages = 3;
constexpr int kPad = 8;       // shared-memory row padding (16 bytes) against bank conflicts

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int src_size = valid ? 16 : 0;  // 0: fill the 16 bytes with zeros
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem),
               "r"(src_size));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T, int BN, int KC>
struct Smem {
  static constexpr int kXs = kStages * kBM * (KC + kPad);  // elements of T
  static constexpr int kWs = kStages * KC * (BN + kPad);
  static constexpr int kLoadBytes = (kXs + kWs) * static_cast<int>(sizeof(T));
  static constexpr int kOutBytes = kBM * (BN + 4) * static_cast<int>(sizeof(float));
  static constexpr int kBytes = kLoadBytes > kOutBytes ? kLoadBytes : kOutBytes;
  static_assert(kBytes <= 48 * 1024, "static shared memory above 48 KiB");
};

template <typename T, int BN, int KC>
__global__ void __launch_bounds__(kThreads)
    bsr_linear_kernel(const T* __restrict__ x, const int32_t* __restrict__ row_ptr,
                      const int32_t* __restrict__ col_idx, const T* __restrict__ blocks,
                      const int32_t* __restrict__ row_order, const T* __restrict__ bias,
                      T* __restrict__ y, int64_t M, int64_t N, int64_t K, int bk) {
  using namespace nvcuda;
  constexpr int FM = kBM / 2 / 16;  // fragments per warp along m
  constexpr int FN = BN / 2 / 16;   // fragments per warp along n
  constexpr int XLD = KC + kPad;
  constexpr int WLD = BN + kPad;
  using S = Smem<T, BN, KC>;
  __shared__ __align__(128) unsigned char smem_raw[S::kBytes];
  T* xs = reinterpret_cast<T*>(smem_raw);
  T* ws = xs + S::kXs;
  float* cs = reinterpret_cast<float*>(smem_raw);

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int wm = warp / 2, wn = warp % 2;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int brow = row_order[blockIdx.y];
  const int p0 = row_ptr[brow];
  const int nblk = row_ptr[brow + 1] - p0;
  const int chunks_per_block = bk / KC;
  const int steps = nblk * chunks_per_block;

  // Copy step s (block p0 + s / chunks, k-chunk s % chunks) into stage `st`.
  auto load_step = [&](int s, int st) {
    const int p = p0 + s / chunks_per_block;
    const int kc = (s % chunks_per_block) * KC;
    const int64_t k0 = static_cast<int64_t>(col_idx[p]) * bk + kc;
    T* xdst = xs + st * kBM * XLD;
    constexpr int kXChunks = kBM * KC / 8;
    for (int c = tid; c < kXChunks; c += kThreads) {
      const int r = c / (KC / 8), cc = (c % (KC / 8)) * 8;
      const int64_t m = m0 + r, k = k0 + cc;
      const bool ok = m < M && k < K;
      const T* src = ok ? x + m * K + k : x;
      cp_async_16(xdst + r * XLD + cc, src, ok);
    }
    T* wdst = ws + st * KC * WLD;
    const T* wsrc = blocks + static_cast<int64_t>(p) * bk * BN + static_cast<int64_t>(kc) * BN;
    constexpr int kWChunks = KC * BN / 8;
    for (int c = tid; c < kWChunks; c += kThreads) {
      const int r = c / (BN / 8), cc = (c % (BN / 8)) * 8;
      cp_async_16(wdst + r * WLD + cc, wsrc + r * BN + cc, true);
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[FM][FN];
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j) wmma::fill_fragment(acc[i][j], 0.0f);

#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load_step(s, s);
    cp_async_commit();
  }
  for (int s = 0; s < steps; ++s) {
    cp_async_wait<kStages - 2>();
    __syncthreads();  // step s landed; every warp finished computing step s - 1
    const int next = s + kStages - 1;
    if (next < steps) load_step(next, next % kStages);
    cp_async_commit();
    const T* xt = xs + (s % kStages) * kBM * XLD;
    const T* wt = ws + (s % kStages) * KC * WLD;
#pragma unroll
    for (int kk = 0; kk < KC; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a[FM];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> b[FN];
#pragma unroll
      for (int i = 0; i < FM; ++i)
        wmma::load_matrix_sync(a[i], xt + (wm * FM * 16 + i * 16) * XLD + kk, XLD);
#pragma unroll
      for (int j = 0; j < FN; ++j)
        wmma::load_matrix_sync(b[j], wt + kk * WLD + wn * FN * 16 + j * 16, WLD);
#pragma unroll
      for (int i = 0; i < FM; ++i)
#pragma unroll
        for (int j = 0; j < FN; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
    }
  }
  cp_async_wait<0>();
  __syncthreads();  // shared memory is reused for the output tile

  constexpr int CLD = BN + 4;
#pragma unroll
  for (int i = 0; i < FM; ++i)
#pragma unroll
    for (int j = 0; j < FN; ++j)
      wmma::store_matrix_sync(cs + (wm * FM * 16 + i * 16) * CLD + wn * FN * 16 + j * 16,
                              acc[i][j], CLD, wmma::mem_row_major);
  __syncthreads();
  const int64_t n0 = static_cast<int64_t>(brow) * BN;
  for (int idx = tid; idx < kBM * BN; idx += kThreads) {
    const int r = idx / BN, c = idx % BN;
    const int64_t m = m0 + r, n = n0 + c;
    if (m < M && n < N) {
      float v = cs[r * CLD + c];
      if (bias != nullptr) v += to_float(bias[n]);
      y[m * N + n] = from_float<T>(v);
    }
  }
}

template <typename T, int BN, int KC>
cudaError_t launch_typed(const T* x, const int32_t* row_ptr, const int32_t* col_idx,
                         const T* blocks, const int32_t* row_order, const T* bias, T* y,
                         int64_t M, int64_t N, int64_t K, int n_block_rows, int bk,
                         cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((M + kBM - 1) / kBM), static_cast<unsigned>(n_block_rows));
  bsr_linear_kernel<T, BN, KC>
      <<<grid, kThreads, 0, stream>>>(x, row_ptr, col_idx, blocks, row_order, bias, y, M, N, K, bk);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dtype(const T* x, const int32_t* row_ptr, const int32_t* col_idx,
                         const T* blocks, const int32_t* row_order, const T* bias, T* y,
                         int64_t M, int64_t N, int64_t K, int n_block_rows, int bn, int bk,
                         cudaStream_t stream) {
  if (K % 8 != 0 || bk % 16 != 0 || bk < 16 || bk > 128 ||
      (reinterpret_cast<uintptr_t>(x) % 16) != 0 || (reinterpret_cast<uintptr_t>(blocks) % 16) != 0)
    return cudaErrorInvalidValue;
  if (M == 0 || n_block_rows == 0) return cudaSuccess;
  const bool kc32 = bk % 32 == 0;
#define SPAMKERN_LAUNCH(BN_)                                                                  \
  return kc32 ? launch_typed<T, BN_, 32>(x, row_ptr, col_idx, blocks, row_order, bias, y, M, \
                                         N, K, n_block_rows, bk, stream)                     \
              : launch_typed<T, BN_, 16>(x, row_ptr, col_idx, blocks, row_order, bias, y, M, \
                                         N, K, n_block_rows, bk, stream)
  switch (bn) {
    case 32: SPAMKERN_LAUNCH(32);
    case 64: SPAMKERN_LAUNCH(64);
    case 128: SPAMKERN_LAUNCH(128);
    default: return cudaErrorInvalidValue;
  }
#undef SPAMKERN_LAUNCH
}

}  // namespace detail
}  // namespace cuda
}  // namespace spamkern
