// GRPO group-relative advantages (ptkernels/ops/grpo.py:group_advantages) of rewards [n] laid out as n / group_size
// consecutive groups:
//     scale_mode 0 (group): A_i = (r_i - mean_g) / (std_g + eps)    std_g Bessel-corrected as torch.std (0 for size 1)
//     scale_mode 1 (batch): A_i = (r_i - mean_g) / (std + eps)      std of all n rewards, Bessel-corrected
//     scale_mode 2 (none):  A_i =  r_i - mean_g
// A group whose rewards are all equal (max == min) gives exactly 0. eps == 0: A_i = 0 where r_i - mean_g is 0,
// else (r_i - mean_g) / std (as the op's torch path).
//
// group_kernel: one block per group (grid-stride over groups), a loop over the group's rewards, fp32 block
// all-reductions (sum, max, min; then the sum of squared deviations: two passes as torch.std). batch mode runs it
// in "none" mode into `out`, then batch_scale_kernel: one block computes the batch std of the rewards (fp64
// accumulators, two passes) and divides `out` in place. That second kernel is O(n) work on one SM: a few
// microseconds for GRPO batches (n up to ~1e5), about 0.1 ms at n = 1e6.
#include <cmath>

#include "common.cuh"
#include "ptk_cuda.h"

namespace ptk { namespace cuda {
namespace {

constexpr int kGroupThreads = 256;
constexpr int kBatchThreads = 1024;

struct Stats {
  float sum, max, min;
};

__device__ __forceinline__ Stats shfl_xor(const Stats& v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.sum, o), __shfl_xor_sync(0xffffffffu, v.max, o),
          __shfl_xor_sync(0xffffffffu, v.min, o)};
}

// max / min that propagate nan (as torch.amax / amin): a group holding a nan is never "flat", so it gives nan.
__device__ __forceinline__ float nan_max(float a, float b) { return (a > b || a != a) ? a : b; }
__device__ __forceinline__ float nan_min(float a, float b) { return (a < b || a != a) ? a : b; }

struct MergeStats {
  __device__ __forceinline__ Stats operator()(const Stats& a, const Stats& b) const {
    return {a.sum + b.sum, nan_max(a.max, b.max), nan_min(a.min, b.min)};
  }
};

// scale: 0 group, 2 none (batch mode runs as none, then batch_scale_kernel)
__global__ void __launch_bounds__(kGroupThreads)
group_kernel(const float* __restrict__ rewards, float* __restrict__ out, int64_t n_groups, int64_t group_size,
             int scale, float eps) {
  __shared__ Stats red_stats[detail::kMaxWarps];
  __shared__ float red_sum[detail::kMaxWarps];
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  for (int64_t g = blockIdx.x; g < n_groups; g += gridDim.x) {
    const float* r = rewards + g * group_size;
    float* o = out + g * group_size;
    Stats st{0.0f, -INFINITY, INFINITY};
    for (int64_t i = tid; i < group_size; i += nt) {
      const float x = r[i];
      st.sum += x;
      st.max = nan_max(st.max, x);
      st.min = nan_min(st.min, x);
    }
    st = detail::block_allreduce(st, MergeStats{}, red_stats);
    const float mean = st.sum / static_cast<float>(group_size);
    const bool flat = st.max == st.min;  // uniform over the block
    if (flat) {
      for (int64_t i = tid; i < group_size; i += nt) o[i] = 0.0f;
      continue;
    }
    if (scale == 2) {
      for (int64_t i = tid; i < group_size; i += nt) o[i] = r[i] - mean;
      continue;
    }
    // group std, Bessel-corrected (group_size >= 2 here: a single value is always flat)
    float ss = 0.0f;
    for (int64_t i = tid; i < group_size; i += nt) {
      const float dx = r[i] - mean;
      ss += dx * dx;
    }
    ss = detail::block_allreduce(ss, detail::Sum{}, red_sum);
    const float std_g = sqrtf(ss / static_cast<float>(group_size - 1));
    if (eps == 0.0f) {
      for (int64_t i = tid; i < group_size; i += nt) {
        const float a = r[i] - mean;
        o[i] = a == 0.0f ? a : a / std_g;
      }
    } else {
      const float den = std_g + eps;
      for (int64_t i = tid; i < group_size; i += nt) o[i] = (r[i] - mean) / den;
    }
  }
}

// out[i] /= (std + eps) with std the Bessel-corrected std of all n rewards (0 for n == 1). One block.
__global__ void __launch_bounds__(kBatchThreads)
batch_scale_kernel(const float* __restrict__ rewards, float* __restrict__ out, int64_t n, float eps) {
  __shared__ double red[detail::kMaxWarps];
  const int64_t tid = threadIdx.x, nt = blockDim.x;
  double s = 0.0;
  for (int64_t i = tid; i < n; i += nt) s += static_cast<double>(rewards[i]);
  const double mean = detail::block_allreduce(s, detail::Sum{}, red) / static_cast<double>(n);
  double ss = 0.0;
  for (int64_t i = tid; i < n; i += nt) {
    const double dx = static_cast<double>(rewards[i]) - mean;
    ss += dx * dx;
  }
  ss = detail::block_allreduce(ss, detail::Sum{}, red);
  const float std_b = n > 1 ? static_cast<float>(sqrt(ss / static_cast<double>(n - 1))) : 0.0f;
  if (eps == 0.0f) {
    for (int64_t i = tid; i < n; i += nt) {
      const float a = out[i];
      out[i] = a == 0.0f ? a : a / std_b;
    }
  } else {
    const float den = std_b + eps;
    for (int64_t i = tid; i < n; i += nt) out[i] = out[i] / den;
  }
}

}  // namespace
}}  // namespace ptk::cuda

// Qualified definition: a signature that drifts from ptk_cuda.h is a compile error, not a new overload.
int ptk::cuda::group_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, int scale_mode,
                                float eps, void* stream) {
  namespace detail = ptk::cuda::detail;
  if (n < 0 || group_size <= 0 || n % group_size != 0 || scale_mode < 0 || scale_mode > 2 || !(eps >= 0.0f))
    return detail::invalid_value();
  if (n == 0) return 0;
  if (rewards == nullptr || out == nullptr) return detail::invalid_value();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  const int64_t n_groups = n / group_size;
  const int threads = detail::pow2_threads(group_size, 32, kGroupThreads);
  group_kernel<<<detail::grid_for(n_groups), threads, 0, s>>>(rewards, out, n_groups, group_size,
                                                               scale_mode == 1 ? 2 : scale_mode, eps);
  if (scale_mode == 1) {
    const int err = detail::launch_status();
    if (err != 0) return err;
    const int batch_threads = detail::pow2_threads(n, 32, kBatchThreads);
    batch_scale_kernel<<<1, batch_threads, 0, s>>>(rewards, out, n, eps);
  }
  return detail::launch_status();
}
