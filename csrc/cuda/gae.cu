// Generalized advantage estimation (ptkernels/ops/ppo.py:gae) on contiguous [batch, seq_len] fp32 tensors. With
// m = mask, r = rewards * m and v = values * m where m != 0, else 0 (so garbage such as nan under the mask never
// leaks, and the value after a sequence's last valid token is 0: no bootstrap past a right-padded end):
//     delta_t = r_t + gamma * v_{t+1} - v_t                  (v_T = 0)
//     A_t     = delta_t + gamma * lam * A_{t+1}              (A_T = 0)
//     advantages = A * m,   returns = (A + v) * m            (0 where m == 0)
// A gap inside a mask is not skipped: the recursion runs through it with r = v = 0, as in TRL.
//
// One warp per sequence, 32 time steps per step of a reverse loop over T: lane i holds t = end - 32 + i, takes
// v_{t+1} from lane i + 1 (the next chunk's first value for lane 31), and a Kogge-Stone suffix scan with constant
// coefficient c = gamma * lam gives x_i = sum_{k >= i in the chunk} c^(k - i) delta_k; then
// A_i = x_i + c^(32 - i) A_carry with A_carry = A at the chunk's end (lane 0 of the previous step). Loads are
// coalesced 128-byte rows, the next chunk's are issued before the current one is scanned. Rounding differs from
// the sequential loop only in summation order.
#include "common.cuh"
#include "ptk_cuda.h"

namespace ptk { namespace cuda {
namespace {

constexpr int kWarpsPerBlock = 4;
constexpr unsigned kFull = 0xffffffffu;

struct Chunk {
  float r, v, m;
};

__device__ __forceinline__ Chunk load_chunk(const float* r, const float* v, const float* m, int64_t t) {
  Chunk c{0.0f, 0.0f, 0.0f};
  if (t >= 0) {  // all three issued together; the mask selects afterwards
    c.m = m[t];
    c.r = r[t];
    c.v = v[t];
  }
  return c;
}

__global__ void __launch_bounds__(kWarpsPerBlock * detail::kWarp)
gae_kernel(const float* __restrict__ rewards, const float* __restrict__ values, const float* __restrict__ mask,
           float* __restrict__ advantages, float* __restrict__ returns, int64_t batch, int64_t seq_len, float gamma,
           float gl) {
  const int lane = threadIdx.x % detail::kWarp;
  // c^(32 - lane), by binary exponentiation (exponent 1..32)
  float pw = 1.0f;
  {
    float base = gl;
    for (int e = detail::kWarp - lane; e > 0; e >>= 1) {
      if (e & 1) pw *= base;
      base *= base;
    }
  }
  const int64_t warps = static_cast<int64_t>(gridDim.x) * kWarpsPerBlock;
  for (int64_t seq = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / detail::kWarp; seq < batch;
       seq += warps) {
    const int64_t row = seq * seq_len;
    const float* r = rewards + row;
    const float* v = values + row;
    const float* m = mask + row;
    float carry_a = 0.0f;  // A at the current chunk's end
    float carry_v = 0.0f;  // v at the current chunk's end
    Chunk cur = load_chunk(r, v, m, seq_len - detail::kWarp + lane);
    for (int64_t end = seq_len; end > 0; end -= detail::kWarp) {
      const int64_t t = end - detail::kWarp + lane;
      const Chunk nxt = end > detail::kWarp ? load_chunk(r, v, m, t - detail::kWarp) : Chunk{0.0f, 0.0f, 0.0f};
      const bool valid = cur.m != 0.0f;
      const float rr = valid ? cur.r * cur.m : 0.0f;
      const float vv = valid ? cur.v * cur.m : 0.0f;
      float v_next = __shfl_down_sync(kFull, vv, 1);
      if (lane == detail::kWarp - 1) v_next = carry_v;
      float x = rr + gamma * v_next - vv;  // delta_t (0 on lanes before t = 0: they only feed lower lanes)
      float cp = gl;
#pragma unroll
      for (int o = 1; o < detail::kWarp; o <<= 1) {
        const float y = __shfl_down_sync(kFull, x, o);
        if (lane + o < detail::kWarp) x += cp * y;
        cp *= cp;
      }
      const float a = x + pw * carry_a;
      if (t >= 0) {
        advantages[t + row] = valid ? a * cur.m : 0.0f;
        returns[t + row] = valid ? (a + vv) * cur.m : 0.0f;
      }
      carry_a = __shfl_sync(kFull, a, 0);
      carry_v = __shfl_sync(kFull, vv, 0);
      cur = nxt;
    }
  }
}

}  // namespace
}}  // namespace ptk::cuda

// Qualified definition: a signature that drifts from ptk_cuda.h is a compile error, not a new overload.
int ptk::cuda::gae(const float* rewards, const float* values, const float* mask, float* advantages, float* returns,
                   int64_t batch, int64_t seq_len, float gamma, float lam, void* stream) {
  namespace detail = ptk::cuda::detail;
  if (batch < 0 || seq_len < 0) return detail::invalid_value();
  if (batch == 0 || seq_len == 0) return 0;
  if (rewards == nullptr || values == nullptr || mask == nullptr || advantages == nullptr || returns == nullptr)
    return detail::invalid_value();
  const float gl = static_cast<float>(static_cast<double>(gamma) * static_cast<double>(lam));
  const int64_t blocks = (batch + kWarpsPerBlock - 1) / kWarpsPerBlock;
  gae_kernel<<<detail::grid_for(blocks), kWarpsPerBlock * detail::kWarp, 0, static_cast<cudaStream_t>(stream)>>>(
      rewards, values, mask, advantages, returns, batch, seq_len, gamma, gl);
  return detail::launch_status();
}
