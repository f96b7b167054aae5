// CPU row kernels over one chunk of logits z [n_rows, n_cols]: the non-GEMM half of the fused ops.
//
// The same formulas as ptkernels/ops/backends/torch.py (TorchRows is the spec) and ptkernels/kernels/rows.py:
// one OpenMP thread per row at a time; per row,
//   pass 1 streams the row once in blocks of kBlock columns: each block's transformed logits s go to an
//          L1-resident buffer, its max updates the running max (rescaling the running sum of exp), then one
//          vectorized exp pass adds exp(s - max) (and sum(s) for label smoothing, exp(s - max) * s for E_p[s]);
//   pass 2 (gradients only) streams the row again and writes dL/dz over it or into a separate buffer.
// Plain fp32 / fp64 logits with a gradient take a variant with one exp per element (ce_impl: max, exp stored
// into the gradient buffer, then a scaling pass), the common case of the fused linear cross-entropy.
// Every inner loop is `#pragma omp simd` with the inline fast_exp of common.h, so it vectorizes with the
// target's widest vectors (AVX2 / AVX-512 under -march=native). Math in fp32 (fp64 for fp64 storage).
#include <algorithm>
#include <type_traits>

#include "common.h"
#include "ptk_cpu.h"

namespace ptk { namespace cpu {
namespace {

// s = softcap * tanh(z / softcap) * inv_temp (CAP) or z * inv_temp, and ds/dz as a function of s.
template <typename C, bool CAP> struct Transform {
  C softcap, inv_softcap, inv_temp, t_of_s;  // t = tanh(z / softcap) = s * t_of_s
  Transform(double cap, double inv_temperature)
      : softcap(static_cast<C>(CAP ? cap : 1.0)), inv_softcap(static_cast<C>(CAP ? 1.0 / cap : 1.0)),
        inv_temp(static_cast<C>(inv_temperature)),
        t_of_s(static_cast<C>(CAP ? 1.0 / (cap * inv_temperature) : 1.0)) {}
  PTK_INLINE C apply(C z) const {
    if (CAP) return softcap * fast_tanh(z * inv_softcap) * inv_temp;
    return z * inv_temp;
  }
  PTK_INLINE C dsdz(C s) const {
    if (CAP) {
      const C t = s * t_of_s;
      return (static_cast<C>(1) - t * t) * inv_temp;
    }
    return inv_temp;
  }
};

template <typename C> constexpr int64_t block_cols() { return 4096 / static_cast<int64_t>(sizeof(C)); }

template <typename C> struct RowStats {
  C max, sum_exp, sum_s, sum_es;  // sum_exp = sum exp(s - max); sum_es = sum exp(s - max) * s
};

// Pass 1: online (block-wise) max and sum of exp; SUM_S adds sum(s), ES adds sum exp(s - max) * s.
template <typename T, typename C, bool CAP, bool SUM_S, bool ES>
PTK_INLINE RowStats<C> row_stats(const T* z, int64_t n_cols, const Transform<C, CAP> tr) {
  constexpr int64_t kBlock = block_cols<C>();
  alignas(64) C buf[kBlock];
  const C neg_inf = -std::numeric_limits<C>::infinity();
  C m = neg_inf, d = 0, ss = 0, es = 0;
  for (int64_t j0 = 0; j0 < n_cols; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n_cols - j0);
    const T* zb = z + j0;
    C bm = neg_inf;
#pragma omp simd reduction(max : bm)
    for (int64_t k = 0; k < len; ++k) {
      const C s = tr.apply(load<C>(zb, k));
      buf[k] = s;
      bm = s > bm ? s : bm;
    }
    if (bm > m) {
      const C alpha = m == neg_inf ? C(0) : std::exp(m - bm);
      d *= alpha;
      es *= alpha;
      m = bm;
    }
    C acc = 0, acc_s = 0, acc_es = 0;
    if (m == neg_inf) {  // every s so far is -inf (or NaN): nothing to add but sum(s)
      if (SUM_S) {
#pragma omp simd reduction(+ : acc_s)
        for (int64_t k = 0; k < len; ++k) acc_s += buf[k];
        ss += acc_s;
      }
      continue;
    }
#pragma omp simd reduction(+ : acc, acc_s, acc_es)
    for (int64_t k = 0; k < len; ++k) {
      const C s = buf[k];
      const C e = fast_exp(s - m);
      acc += e;
      if (SUM_S) acc_s += s;
      if (ES) acc_es += e * s;
    }
    d += acc;
    ss += acc_s;
    es += acc_es;
  }
  return {m, d, ss, es};
}

template <typename T, typename C> PTK_INLINE void zero_row(T* g, int64_t n_cols) {
#pragma omp simd
  for (int64_t j = 0; j < n_cols; ++j) store<C>(g, j, C(0));
}

// Pass 2 of cross-entropy: g = (pc p - sub) ds/dz, p = exp(s - lse) (g may be z itself).
template <typename T, typename C, bool CAP>
PTK_INLINE void ce_grad_row(const T* z, T* g, int64_t n_cols, C lse, C pc, C sub, const Transform<C, CAP> tr) {
#pragma omp simd
  for (int64_t j = 0; j < n_cols; ++j) {
    const C s = tr.apply(load<C>(z, j));
    const C p = fast_exp(s - lse);
    store<C>(g, j, (pc * p - sub) * tr.dsdz(s));
  }
}

// The gradient path of plain logits (no soft cap) stored in the compute type: one exp per element instead of two.
//   pass A: max and sum of z (s = z * inv_temp, inv_temp > 0, so max(s) = inv_temp max(z))
//   pass B: g = exp(s - max(s)) and their sum              (g may be z itself)
//   pass C: g = a [g / sum (1 + 2 c lse) - eps / V] inv_temp
//
// Both sums over the row are taken in blocks of block_cols() columns (a vector-lane sum per block, then the
// block sums), as row_stats does. One simd reduction over the whole row would give each vector lane a chain of
// V / lanes additions: at V = 70001 and 8 lanes (GCC's default 256-bit vectors, also on AVX-512 CPUs) the sum
// of exp carried ~8750 roundings, and its relative error scales every p_j of the row alike, so it reached the
// input gradient as error * E_p[w] (2-4x eager's error where ATen summed with 16 lanes). Blocked, a chain is
// block_cols() / lanes + V / block_cols() long, whatever the vector width.
template <typename C> PTK_INLINE void row_max_sum(const C* z, int64_t n_cols, C& max_out, C& sum_out) {
  constexpr int64_t kBlock = block_cols<C>();
  C m = -std::numeric_limits<C>::infinity(), total = 0;
  for (int64_t j0 = 0; j0 < n_cols; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n_cols - j0);
    const C* zb = z + j0;
    C acc = 0;
#pragma omp simd reduction(max : m) reduction(+ : acc)
    for (int64_t k = 0; k < len; ++k) {
      m = zb[k] > m ? zb[k] : m;
      acc += zb[k];
    }
    total += acc;
  }
  max_out = m;
  sum_out = total;
}

template <typename C> PTK_INLINE C exp_store_row(const C* z, C* g, int64_t n_cols, C inv_temp, C shift) {
  constexpr int64_t kBlock = block_cols<C>();
  C total = 0;
  for (int64_t j0 = 0; j0 < n_cols; j0 += kBlock) {
    const int64_t len = std::min(kBlock, n_cols - j0);
    const C* zb = z + j0;
    C* gb = g + j0;
    C acc = 0;
#pragma omp simd reduction(+ : acc)
    for (int64_t k = 0; k < len; ++k) {
      const C e = fast_exp(zb[k] * inv_temp - shift);
      gb[k] = e;
      acc += e;
    }
    total += acc;
  }
  return total;
}

template <typename C> PTK_INLINE void affine_row(C* g, int64_t n_cols, C mul, C sub) {
#pragma omp simd
  for (int64_t j = 0; j < n_cols; ++j) g[j] = g[j] * mul - sub;
}

// ------------------------------------------------------------------------------------------- cross-entropy

template <typename T, typename C, bool CAP>
int64_t ce_impl(const T* logits, int64_t ls, T* grad, int64_t gs, const int64_t* labels, const C* scale,
                int64_t scale_stride, C* loss, C* lse, int64_t n_rows, int64_t n_cols, int64_t ignore_index,
                C eps, C zl, const Transform<C, CAP> tr, int nt) {
  int64_t n_bad = 0;
  const C nan = std::numeric_limits<C>::quiet_NaN();
  const C inv_cols = C(1) / static_cast<C>(n_cols);
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : n_bad)
  for (int64_t i = 0; i < n_rows; ++i) {
    const T* z = logits + i * ls;
    T* g = grad != nullptr ? grad + i * gs : nullptr;
    const int64_t y = labels[i];
    if (y == ignore_index || y < 0 || y >= n_cols) {
      const bool ignored = y == ignore_index;
      n_bad += ignored ? 0 : 1;
      loss[i] = ignored ? C(0) : nan;
      lse[i] = ignored ? C(0) : nan;
      if (g != nullptr) zero_row<T, C>(g, n_cols);
      continue;
    }
    if constexpr (!CAP && std::is_same<T, C>::value) {
      if (g != nullptr) {
        const C it = tr.inv_temp;
        C zmax, zsum;
        row_max_sum<C>(z, n_cols, zmax, zsum);
        const C m = zmax * it;
        const C s_y = z[y] * it;  // read before pass B may overwrite z
        const C d = exp_store_row<C>(z, g, n_cols, it, m);
        const C lse_i = m + std::log(d);
        C l = (C(1) - eps) * (lse_i - s_y);
        if (eps != C(0)) l += eps * (lse_i - zsum * it * inv_cols);
        if (zl != C(0)) l += zl * lse_i * lse_i;
        loss[i] = l;
        lse[i] = lse_i;
        const C a = scale != nullptr ? scale[i * scale_stride] : C(1);
        const C pc = a * (C(1) + C(2) * zl * lse_i);
        const C sub = a * eps * inv_cols;
        const C p_y = g[y] / d;
        affine_row<C>(g, n_cols, pc * it / d, sub * it);
        g[y] = (pc * p_y - sub - a * (C(1) - eps)) * it;
        continue;
      }
    }
    const RowStats<C> st = eps != C(0) ? row_stats<T, C, CAP, true, false>(z, n_cols, tr)
                                       : row_stats<T, C, CAP, false, false>(z, n_cols, tr);
    const C lse_i = st.max + std::log(st.sum_exp);
    const C s_y = tr.apply(load<C>(z, y));  // read before pass 2 may overwrite z
    C l = (C(1) - eps) * (lse_i - s_y);
    if (eps != C(0)) l += eps * (lse_i - st.sum_s * inv_cols);
    if (zl != C(0)) l += zl * lse_i * lse_i;
    loss[i] = l;
    lse[i] = lse_i;
    if (g == nullptr) continue;
    // dL/dz = a [p (1 + 2 c lse) - eps / V - (1 - eps) onehot(y)] ds/dz
    const C a = scale != nullptr ? scale[i * scale_stride] : C(1);
    const C pc = a * (C(1) + C(2) * zl * lse_i);
    const C sub = a * eps * inv_cols;
    ce_grad_row<T, C, CAP>(z, g, n_cols, lse_i, pc, sub, tr);
    const C p_y = fast_exp(s_y - lse_i);
    store<C>(g, y, (pc * p_y - sub - a * (C(1) - eps)) * tr.dsdz(s_y));
  }
  return n_bad;
}

// ------------------------------------------------------------------------------------------- log-probs

template <typename T, typename C, bool CAP>
int64_t logprob_fwd_impl(const T* logits, int64_t ls, const int64_t* targets, C* logp, C* lse, C* mean_s,
                         int64_t n_rows, int64_t n_cols, int64_t ignore_index, const Transform<C, CAP> tr, int nt) {
  int64_t n_bad = 0;
  const C nan = std::numeric_limits<C>::quiet_NaN();
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : n_bad)
  for (int64_t i = 0; i < n_rows; ++i) {
    const T* z = logits + i * ls;
    const int64_t t = targets[i];
    if (t == ignore_index || t < 0 || t >= n_cols) {
      const bool ignored = t == ignore_index;
      n_bad += ignored ? 0 : 1;
      logp[i] = lse[i] = ignored ? C(0) : nan;
      if (mean_s != nullptr) mean_s[i] = ignored ? C(0) : nan;
      continue;
    }
    const RowStats<C> st = mean_s != nullptr ? row_stats<T, C, CAP, false, true>(z, n_cols, tr)
                                             : row_stats<T, C, CAP, false, false>(z, n_cols, tr);
    const C lse_i = st.max + std::log(st.sum_exp);
    logp[i] = tr.apply(load<C>(z, t)) - lse_i;
    lse[i] = lse_i;
    if (mean_s != nullptr) mean_s[i] = st.sum_es / st.sum_exp;
  }
  return n_bad;
}

// The log-prob gradient of one row without the one-hot term: g = -p (g_logp + g_ent (s - E_p[s])) ds/dz.
template <typename T, typename C, bool CAP, bool ENT>
PTK_INLINE void logprob_grad_row(const T* z, T* g, int64_t n_cols, C lse, C gl, C ge, C ms,
                                 const Transform<C, CAP> tr) {
#pragma omp simd
  for (int64_t j = 0; j < n_cols; ++j) {
    const C s = tr.apply(load<C>(z, j));
    const C p = fast_exp(s - lse);
    const C gv = ENT ? -p * (gl + ge * (s - ms)) : -p * gl;
    store<C>(g, j, gv * tr.dsdz(s));
  }
}

template <typename T, typename C, bool CAP, bool ENT>
int64_t logprob_bwd_impl(const T* logits, int64_t ls, T* grad, int64_t gs, const int64_t* targets, const C* lse,
                         const C* mean_s, const C* g_logp, const C* g_ent, int64_t n_rows, int64_t n_cols,
                         int64_t ignore_index, const Transform<C, CAP> tr, int nt) {
  int64_t n_bad = 0;
#pragma omp parallel for num_threads(nt) schedule(static) reduction(+ : n_bad)
  for (int64_t i = 0; i < n_rows; ++i) {
    const T* z = logits + i * ls;
    T* g = grad + i * gs;
    const int64_t t = targets[i];
    if (t == ignore_index || t < 0 || t >= n_cols) {
      n_bad += t == ignore_index ? 0 : 1;
      zero_row<T, C>(g, n_cols);
      continue;
    }
    const C lse_i = lse[i];
    const C gl = g_logp[i];
    const C ge = ENT ? g_ent[i] : C(0);
    const C ms = ENT ? mean_s[i] : C(0);
    const C s_t = tr.apply(load<C>(z, t));  // read before the loop may overwrite z
    logprob_grad_row<T, C, CAP, ENT>(z, g, n_cols, lse_i, gl, ge, ms, tr);
    const C p_t = fast_exp(s_t - lse_i);
    const C gv_t = (ENT ? -p_t * (gl + ge * (s_t - ms)) : -p_t * gl) + gl;
    store<C>(g, t, gv_t * tr.dsdz(s_t));
  }
  return n_bad;
}

// ---------------------------------------------------------------------------------------------- dispatch

// Calls f(T*, C-tag, CAP-tag) for the storage dtype and the soft-cap flag.
template <typename C> struct Tag { using type = C; };
template <bool B> struct BoolTag { static constexpr bool value = B; };

template <typename F> int64_t dispatch(int dtype, bool cap, F&& f) {
  auto with_cap = [&](auto storage, auto compute) -> int64_t {
    if (cap) return f(storage, compute, BoolTag<true>{});
    return f(storage, compute, BoolTag<false>{});
  };
  switch (dtype) {
    case kFloat32: return with_cap(Tag<float>{}, Tag<float>{});
    case kFloat16: return with_cap(Tag<Half>{}, Tag<float>{});
    case kBFloat16: return with_cap(Tag<BF16>{}, Tag<float>{});
    case kFloat64: return with_cap(Tag<double>{}, Tag<double>{});
    default: return kBadDType;
  }
}

bool bad_sizes(int64_t n_rows, int64_t n_cols, int64_t ls, int64_t gs) {
  return n_rows < 0 || n_cols <= 0 || ls < 0 || gs < 0;
}

}  // namespace

// Rows are costly elements (an exp or two each, ~1 ns per element on one core), so they split across threads from
// fewer elements than threads_for's default grain (a warm pool wakes in a few microseconds).
constexpr int64_t kRowGrain = 1 << 14;

int64_t ce_rows(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
                const int64_t* labels, const void* grad_scale, int64_t scale_stride, void* loss, void* lse,
                int64_t n_rows, int64_t n_cols, int64_t ignore_index, double label_smoothing, double z_loss,
                double softcap, double inv_temperature, int n_threads) {
  if (bad_sizes(n_rows, n_cols, logits_stride, grad_stride) || scale_stride < 0) return kBadShape;
  if (n_rows == 0) return kOk;
  const int nt = threads_for(n_threads, n_rows, n_cols, kRowGrain);
  return dispatch(dtype, softcap > 0, [&](auto storage, auto compute, auto cap) -> int64_t {
    using T = typename decltype(storage)::type;
    using C = typename decltype(compute)::type;
    constexpr bool CAP = decltype(cap)::value;
    return ce_impl<T, C, CAP>(static_cast<const T*>(logits), logits_stride, static_cast<T*>(grad), grad_stride,
                              labels, static_cast<const C*>(grad_scale), scale_stride, static_cast<C*>(loss),
                              static_cast<C*>(lse), n_rows, n_cols, ignore_index, static_cast<C>(label_smoothing),
                              static_cast<C>(z_loss), Transform<C, CAP>(softcap, inv_temperature), nt);
  });
}

int64_t logprob_fwd(const void* logits, int64_t logits_stride, int dtype, const int64_t* targets, void* logp,
                    void* lse, void* mean_s, int64_t n_rows, int64_t n_cols, int64_t ignore_index, double softcap,
                    double inv_temperature, int n_threads) {
  if (bad_sizes(n_rows, n_cols, logits_stride, 0)) return kBadShape;
  if (n_rows == 0) return kOk;
  const int nt = threads_for(n_threads, n_rows, n_cols, kRowGrain);
  return dispatch(dtype, softcap > 0, [&](auto storage, auto compute, auto cap) -> int64_t {
    using T = typename decltype(storage)::type;
    using C = typename decltype(compute)::type;
    constexpr bool CAP = decltype(cap)::value;
    return logprob_fwd_impl<T, C, CAP>(static_cast<const T*>(logits), logits_stride, targets, static_cast<C*>(logp),
                                       static_cast<C*>(lse), static_cast<C*>(mean_s), n_rows, n_cols, ignore_index,
                                       Transform<C, CAP>(softcap, inv_temperature), nt);
  });
}

int64_t logprob_bwd(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
                    const int64_t* targets, const void* lse, const void* mean_s, const void* g_logp,
                    const void* g_ent, int64_t n_rows, int64_t n_cols, int64_t ignore_index, double softcap,
                    double inv_temperature, int n_threads) {
  if (bad_sizes(n_rows, n_cols, logits_stride, grad_stride)) return kBadShape;
  if (n_rows == 0) return kOk;
  if (grad == nullptr || lse == nullptr || g_logp == nullptr || (g_ent != nullptr && mean_s == nullptr)) {
    return kBadOption;
  }
  const int nt = threads_for(n_threads, n_rows, n_cols, kRowGrain);
  return dispatch(dtype, softcap > 0, [&](auto storage, auto compute, auto cap) -> int64_t {
    using T = typename decltype(storage)::type;
    using C = typename decltype(compute)::type;
    constexpr bool CAP = decltype(cap)::value;
    const Transform<C, CAP> tr(softcap, inv_temperature);
    const auto* z = static_cast<const T*>(logits);
    auto* g = static_cast<T*>(grad);
    if (g_ent != nullptr) {
      return logprob_bwd_impl<T, C, CAP, true>(z, logits_stride, g, grad_stride, targets, static_cast<const C*>(lse),
                                               static_cast<const C*>(mean_s), static_cast<const C*>(g_logp),
                                               static_cast<const C*>(g_ent), n_rows, n_cols, ignore_index, tr, nt);
    }
    return logprob_bwd_impl<T, C, CAP, false>(z, logits_stride, g, grad_stride, targets, static_cast<const C*>(lse),
                                              nullptr, static_cast<const C*>(g_logp), nullptr, n_rows, n_cols,
                                              ignore_index, tr, nt);
  });
}

}}  // namespace ptk::cpu
