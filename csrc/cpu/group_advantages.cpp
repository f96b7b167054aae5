// GRPO group advantages on CPU (ptkernels/ops/grpo.py:group_advantages; CUDA: cuda/group_advantages.cu).
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

}}  // namespace ptk::cpu
