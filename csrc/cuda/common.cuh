// Shared device helpers of the ptkernels CUDA kernels: storage conversions, warp/block all-reductions, launch
// helpers. Header-only (everything inline or templated), included by each .cu file.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace ptk { namespace cuda { namespace detail {

constexpr int kWarp = 32;
constexpr int kMaxWarps = 32;  // blockDim.x <= 1024

// ------------------------------------------------------------------------------------------- storage types

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// 16 bytes of T: one 128-bit load or store.
template <typename T> struct alignas(16) Vec16 {
  static constexpr int kN = 16 / static_cast<int>(sizeof(T));
  T v[kN];
};

// Elements before the first 16-byte aligned element of a row (clamped to n). A pointer that is not even aligned
// to sizeof(T) (never for a tensor's storage) gets n: the whole row takes the scalar path.
template <typename T> __device__ __forceinline__ int aligned_head(const void* p, int n) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (a % sizeof(T) != 0) return n;
  const int head = static_cast<int>(((16 - a % 16) % 16) / sizeof(T));
  return head < n ? head : n;
}

// --------------------------------------------------------------------------------------------- reductions

__device__ __forceinline__ float shfl_xor(float v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }
__device__ __forceinline__ double shfl_xor(double v, int o) { return __shfl_xor_sync(0xffffffffu, v, o); }

struct Sum {
  template <typename T> __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};

// Every lane of the warp gets the reduction of the warp's 32 values (all lanes must take part).
template <typename T, typename Op> __device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o >>= 1) v = op(v, shfl_xor(v, o));
  return v;
}

// Every thread of the block gets the reduction of the block's values. Must be reached by all threads of the
// block (blockDim.x a multiple of 32, at most 1024); `smem` holds at least blockDim.x / 32 values. Ends with a
// barrier, so smem may be reused right after, and every global read issued before the call is complete in all
// threads before any thread returns (the cross-entropy kernel relies on this to write its gradient in place).
template <typename T, typename Op> __device__ __forceinline__ T block_allreduce(T v, Op op, T* smem) {
  v = warp_allreduce(v, op);
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  const int n_warps = blockDim.x / kWarp;
  if (lane == 0) smem[warp] = v;
  __syncthreads();
  T r = smem[0];
  for (int w = 1; w < n_warps; ++w) r = op(r, smem[w]);
  __syncthreads();
  return r;
}

// ------------------------------------------------------------------------------------------------- launches

// Blocks for n independent work items (rows, groups, sequences) with a grid-stride loop inside the kernel:
// grid.x is limited to 2^31 - 1, so any int64 count works.
inline unsigned int grid_for(int64_t n) {
  const int64_t max_grid = 2147483647;
  return static_cast<unsigned int>(n < max_grid ? n : max_grid);
}

// Smallest power of two >= n, clamped to [lo, hi].
inline int pow2_threads(int64_t n, int lo, int hi) {
  int t = lo;
  while (t < hi && t < n) t *= 2;
  return t;
}

// The status of the launch just made (cudaSuccess = 0).
inline int launch_status() { return static_cast<int>(cudaGetLastError()); }

inline int invalid_value() { return static_cast<int>(cudaErrorInvalidValue); }

}}}  // namespace ptk::cuda::detail
