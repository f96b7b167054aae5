// RL helpers on CPU: GRPO group advantages (ptkernels/ops/grpo.py) and GAE (ptkernels/ops/ppo.py).
#include <cmath>

#include "common.h"
#include "ptk_cpu.h"

namespace ptk { namespace cpu {
namespace {

// A_i = r_i - mean_g (exactly 0 in a group whose rewards are all equal), divided by std_g + eps ("group"),
// std + eps over the whole batch ("batch"), or nothing ("none"); std Bessel-corrected as torch.std, the std of a
// single value counts as 0; eps == 0 divides only nonzero advantages. Sums in double whatever C.
template <typename C>
void group_advantages_impl(const C* r, C* out, int64_t n, int64_t gs, int mode, double eps, int nt) {
  const int64_t n_groups = n / gs;
  double batch_std = 0.0;
  if (mode == 1 && n > 1) {
    double sum = 0.0;
    for (int64_t i = 0; i < n; ++i) sum += static_cast<double>(r[i]);
    const double mean = sum / static_cast<double>(n);
    double sq = 0.0;
    for (int64_t i = 0; i < n; ++i) {
      const double dv = static_cast<double>(r[i]) - mean;
      sq += dv * dv;
    }
    batch_std = std::sqrt(sq / static_cast<double>(n - 1));
  }
#pragma omp parallel for num_threads(nt) schedule(static)
  for (int64_t g = 0; g < n_groups; ++g) {
    const C* rg = r + g * gs;
    C* og = out + g * gs;
    double sum = 0.0;
    C lo = rg[0], hi = rg[0];
    for (int64_t k = 0; k < gs; ++k) {
      sum += static_cast<double>(rg[k]);
      lo = rg[k] < lo ? rg[k] : lo;
      hi = rg[k] > hi ? rg[k] : hi;
    }
    const bool flat = lo == hi;
    const double mean = sum / static_cast<double>(gs);
    double std_g = 0.0;
    if (mode == 0 && gs > 1) {
      double sq = 0.0;
      for (int64_t k = 0; k < gs; ++k) {
        const double dv = static_cast<double>(rg[k]) - mean;
        sq += dv * dv;
      }
      std_g = std::sqrt(sq / static_cast<double>(gs - 1));
    }
    const double std_ = mode == 0 ? std_g : batch_std;
    for (int64_t k = 0; k < gs; ++k) {
      const double adv = flat ? 0.0 : static_cast<double>(rg[k]) - mean;
      double a = adv;
      if (mode != 2) a = eps == 0.0 ? (adv == 0.0 ? adv : adv / std_) : adv / (std_ + eps);
      og[k] = static_cast<C>(a);
    }
  }
}

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

int64_t group_advantages(const void* rewards, void* out, int64_t n, int64_t group_size, int scale_mode, double eps,
                         int dtype, int n_threads) {
  if (n < 0 || group_size <= 0 || n % group_size != 0) return kBadShape;
  if (scale_mode < 0 || scale_mode > 2 || !(eps >= 0.0)) return kBadOption;
  if (n == 0) return kOk;
  const int nt = threads_for(n_threads, n / group_size, group_size, 1 << 14);
  if (dtype == kFloat32) {
    group_advantages_impl<float>(static_cast<const float*>(rewards), static_cast<float*>(out), n, group_size,
                                 scale_mode, eps, nt);
  } else if (dtype == kFloat64) {
    group_advantages_impl<double>(static_cast<const double*>(rewards), static_cast<double*>(out), n, group_size,
                                  scale_mode, eps, nt);
  } else {
    return kBadDType;
  }
  return kOk;
}

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

const char* build_info() {
  return "cpu kernels: C++"
#if defined(__clang__)
         " clang " __clang_version__
#elif defined(__GNUC__)
         " gcc " __VERSION__
#endif
#ifdef _OPENMP
         ", OpenMP"
#else
         ", no OpenMP"
#endif
#if defined(__AVX512F__)
         ", AVX-512"
#elif defined(__AVX2__)
         ", AVX2"
#elif defined(__AVX__)
         ", AVX"
#elif defined(__SSE2__)
         ", SSE2"
#elif defined(__ARM_NEON)
         ", NEON"
#endif
#if defined(__FMA__)
         "+FMA"
#endif
      ;
}

}}  // namespace ptk::cpu
