// Per-sequence sums (or means) of token log-probs over packed segments (ptkernels/reference/sequence.py):
//     out[s] = sum_{t in [cu[s], cu[s+1])} m[t] * logp[t]
//     average: out[s] / sum_t m[t], 0 when that sum is 0
// with m = 1 when mask is null (the mean is then over the segment's length; an empty segment gives 0). A padded
// [S, T] batch is the packed case with cu_seqlens = [0, T, 2T, ...]. The product m * logp is not guarded: a nan or
// inf log-prob under a zero mask gives nan, as in the reference.
//
// One block per sequence (grid-stride over sequences), a strided loop over its tokens, fp32 accumulation per
// thread and one block all-reduction of (sum, mask sum). Offsets are int64.
#include "common.cuh"
#include "ptk_cuda.h"

namespace ptk { namespace cuda {
namespace {

constexpr int kThreads = 256;

struct SumDen {
  float sum, den;
};

__device__ __forceinline__ SumDen shfl_xor(const SumDen& v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.sum, o), __shfl_xor_sync(0xffffffffu, v.den, o)};
}

struct MergeSumDen {
  __device__ __forceinline__ SumDen operator()(const SumDen& a, const SumDen& b) const {
    return {a.sum + b.sum, a.den + b.den};
  }
};

template <bool HAS_MASK>
__global__ void __launch_bounds__(kThreads)
segment_sums_kernel(const float* __restrict__ logp, const float* __restrict__ mask, const int64_t* __restrict__ cu,
                    float* __restrict__ out, int64_t n_seqs, int average) {
  __shared__ SumDen red[detail::kMaxWarps];
  for (int64_t s = blockIdx.x; s < n_seqs; s += gridDim.x) {
    const int64_t start = cu[s];
    const int64_t end = cu[s + 1];
    SumDen acc{0.0f, 0.0f};
    for (int64_t t = start + threadIdx.x; t < end; t += blockDim.x) {
      if constexpr (HAS_MASK) {
        const float w = mask[t];
        acc.sum += logp[t] * w;
        acc.den += w;
      } else {
        acc.sum += logp[t];
      }
    }
    acc = detail::block_allreduce(acc, MergeSumDen{}, red);
    if (threadIdx.x == 0) {
      const float den = HAS_MASK ? acc.den : static_cast<float>(end > start ? end - start : 0);
      out[s] = average ? (den != 0.0f ? acc.sum / den : 0.0f) : acc.sum;
    }
  }
}

}  // namespace
}}  // namespace ptk::cuda

// Qualified definition: a signature that drifts from ptk_cuda.h is a compile error, not a new overload.
int ptk::cuda::segment_sums(const float* token_logps, const float* mask, const int64_t* cu_seqlens, float* out,
                            int64_t n_seqs, int average, void* stream) {
  namespace detail = ptk::cuda::detail;
  if (n_seqs < 0) return detail::invalid_value();
  if (n_seqs == 0) return 0;
  if (cu_seqlens == nullptr || out == nullptr) return detail::invalid_value();
  // token_logps may be null only for an empty batch; the kernel never reads it then (every segment is empty)
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const dim3 grid(detail::grid_for(n_seqs));
  if (mask != nullptr) {
    segment_sums_kernel<true><<<grid, kThreads, 0, s>>>(token_logps, mask, cu_seqlens, out, n_seqs, average);
  } else {
    segment_sums_kernel<false><<<grid, kThreads, 0, s>>>(token_logps, mask, cu_seqlens, out, n_seqs, average);
  }
  return detail::launch_status();
}
