// GAE on CPU (ptkernels/ops/ppo.py:gae; CUDA: cuda/gae.cu).
#include <cmath>

#include "common.h"
#include "ptk_cpu.h"

namespace ptk { namespace cpu {
namespace {

// delta_t = r_t + gamma v_{t+1} - v_t, A_t = delta_t + gamma lam A_{t+1} with r, v times the mask (entries where
// the mask is 0 are never read unmasked); advantages = A m, returns = (A + v) m.
template <typename C>
void gae_impl(const C* rewards, const C* values, const C* mask, C* adv, C* ret, int64_t batch, int64_t seq_len,
              C gamma, C gl, int nt) {
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t base = b * seq_len;
    C last = 0, next_v = 0;
    for (int64_t t = seq_len - 1; t >= 0; --t) {
      const C m = mask[base + t];
      const bool valid = m != C(0);
      const C r = (valid ? rewards[base + t] : C(0)) * m;
      const C v = (valid ? values[base + t] : C(0)) * m;
      last = r + gamma * next_v - v + gl * last;
      adv[base + t] = valid ? last * m : C(0);
      ret[base + t] = valid ? (last + v) * m : C(0);
      next_v = v;
    }
  }
}

}  // namespace

int64_t gae(const void* rewards, const void* values, const void* mask, void* advantages, void* returns,
            int64_t batch, int64_t seq_len, double gamma, double lam, int dtype, int n_threads) {
  if (batch < 0 || seq_len < 0) return kBadShape;
  if (batch == 0 || seq_len == 0) return kOk;
  const int nt = threads_for(n_threads, batch, seq_len, 1 << 14);
  const double gl = gamma * lam;
  if (dtype == kFloat32) {
    gae_impl<float>(static_cast<const float*>(rewards), static_cast<const float*>(values),
                    static_cast<const float*>(mask), static_cast<float*>(advantages), static_cast<float*>(returns),
                    batch, seq_len, static_cast<float>(gamma), static_cast<float>(gl), nt);
  } else if (dtype == kFloat64) {
    gae_impl<double>(static_cast<const double*>(rewards), static_cast<const double*>(values),
                     static_cast<const double*>(mask), static_cast<double*>(advantages),
                     static_cast<double*>(returns), batch, seq_len, gamma, gl, nt);
  } else {
    return kBadDType;
  }
  return kOk;
}

}}  // namespace ptk::cpu
