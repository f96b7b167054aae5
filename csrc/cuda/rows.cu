// Cross-entropy rows from logits: forward (loss, lse) and, optionally, dloss/dz written in place of (or beside) z.
//
// Same formulas as the Triton ce_rows_kernel (ptkernels/kernels/rows.py); with s = softcap * tanh(z /
// softcap) / T (or z / T without soft capping), p = softmax(s), lse = logsumexp(s), y the label, eps the label
// smoothing and c the z-loss coefficient:
//     loss     = (1 - eps)(lse - s_y) + eps (lse - mean(s)) + c lse^2
//     dloss/dz = scale * [p (1 + 2 c lse) - eps / V - (1 - eps) onehot(y)] * ds/dz,   ds/dz = (1 - tanh^2) / T
// Rows whose label is ignore_index give loss 0, lse 0 and a zero gradient row.
//
// One block per row (grid-stride over rows, so any number of rows), two passes over the row with a loop over V
// (any vocabulary size): pass 1 is an online log-sum-exp (per-thread running max and rescaled sum, merged with
// warp shuffles and one shared-memory step), pass 2 recomputes p and writes the gradient. Loads and stores are
// 16 bytes wide over the 16-byte aligned body of each row (a scalar head and tail around it), so any row stride
// works. Math is fp32 whatever the storage (fp32, fp16, bf16); row offsets are int64.
//
// In place: grad may be logits itself. Pass 2 only writes after the block-wide barrier that ends pass 1, and each
// element is read before it is written by the same thread, so no thread reads an overwritten logit. The logits
// are therefore read with ordinary (coherent) loads, never through the read-only cache.
#include <cmath>
#include <climits>

#include "common.cuh"
#include "ptk_cuda.h"

namespace ptk { namespace cuda {
namespace {

using detail::aligned_head;
using detail::from_float;
using detail::to_float;
using detail::Vec16;

constexpr int kMaxThreads = 512;
constexpr int kUnroll = 2;                       // 16-byte vectors in flight per thread and loop step
constexpr int64_t kMaxCols = INT_MAX - 65536;    // column indices are int inside a row

// s = softcap * tanh(z / softcap) / T and t = tanh(z / softcap); tanh written with exp as in the Triton kernel.
template <bool SOFTCAP> struct Transform {
  float inv_cap, cap_over_t, inv_temp;
  __device__ __forceinline__ Transform(float softcap, float inv_temperature)
      : inv_cap(SOFTCAP ? 1.0f / softcap : 0.0f), cap_over_t(softcap * inv_temperature), inv_temp(inv_temperature) {}
  __device__ __forceinline__ float operator()(float z, float& t) const {
    if constexpr (SOFTCAP) {
      const float x = z * inv_cap;
      const float e = __expf(-2.0f * fabsf(x));
      const float th = __fdividef(1.0f - e, 1.0f + e);
      t = x < 0.0f ? -th : th;
      return cap_over_t * t;
    } else {
      t = 0.0f;
      return z * inv_temp;
    }
  }
};

// Online log-sum-exp state: running max m, sum d of exp(s - m), and the plain sum of s (label smoothing).
struct LseState {
  float m, d, s_sum;
};

__device__ __forceinline__ LseState shfl_xor(const LseState& v, int o) {
  return {__shfl_xor_sync(0xffffffffu, v.m, o), __shfl_xor_sync(0xffffffffu, v.d, o),
          __shfl_xor_sync(0xffffffffu, v.s_sum, o)};
}

struct MergeLse {
  __device__ __forceinline__ LseState operator()(const LseState& a, const LseState& b) const {
    const float m = fmaxf(a.m, b.m);
    // a.m == m covers m == -inf (both states empty: d stays 0 instead of 0 * exp(nan))
    const float da = a.m == m ? a.d : a.d * __expf(a.m - m);
    const float db = b.m == m ? b.d : b.d * __expf(b.m - m);
    return {m, da + db, a.s_sum + b.s_sum};
  }
};

template <bool SOFTCAP> struct Pass1 {
  Transform<SOFTCAP> tf;
  LseState st;
  // K values at once: one max and at most one rescale of the running sum per K values.
  template <int K> __device__ __forceinline__ void add(const float* z) {
    float s[K];
    float vmax = -INFINITY;
#pragma unroll
    for (int k = 0; k < K; ++k) {
      float t;
      s[k] = tf(z[k], t);
      vmax = fmaxf(vmax, s[k]);  // ignores nan; a nan s still reaches d below
    }
    if (vmax > st.m) {  // rare after the first values: rescale the running sum to the new max
      st.d *= __expf(st.m - vmax);
      st.m = vmax;
    }
#pragma unroll
    for (int k = 0; k < K; ++k) {
      // s == -inf adds nothing (and must not give exp(-inf - -inf) = nan while m is still -inf)
      const float e = __expf(s[k] - st.m);
      st.d += s[k] == -INFINITY ? 0.0f : e;
      st.s_sum += s[k];
    }
  }
};

template <bool SOFTCAP> struct Pass2 {
  Transform<SOFTCAP> tf;
  float lse, p_coef, uniform, onehot;
  int y;  // label column, -1 when none
  __device__ __forceinline__ float operator()(int col, float z) const {
    float t;
    const float s = tf(z, t);
    float g = p_coef * __expf(s - lse) - uniform;
    if (col == y) g -= onehot;
    if constexpr (SOFTCAP) g *= 1.0f - t * t;
    return g * tf.inv_temp;
  }
};

// Pass 1 over a row: f.add<K>(z) for every value, K = 16 / sizeof(T) at a time over the 16-byte aligned body.
template <typename T, typename F> __device__ __forceinline__ void visit_row(const T* row, int n, F& f) {
  constexpr int kVec = Vec16<T>::kN;
  const int head = aligned_head<T>(row, n);
  const int n_vec = (n - head) / kVec;
  const int tail = head + n_vec * kVec;
  const int tid = threadIdx.x, nt = blockDim.x;
  for (int c = tid; c < head; c += nt) {
    const float z = to_float(row[c]);
    f.template add<1>(&z);
  }
  const Vec16<T>* body = reinterpret_cast<const Vec16<T>*>(row + head);
  for (int i0 = tid; i0 < n_vec; i0 += kUnroll * nt) {
    Vec16<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * nt < n_vec) v[u] = body[i0 + u * nt];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i0 + u * nt < n_vec) {
        float z[kVec];
#pragma unroll
        for (int k = 0; k < kVec; ++k) z[k] = to_float(v[u].v[k]);
        f.template add<kVec>(z);
      }
    }
  }
  for (int c = tail + tid; c < n; c += nt) {
    const float z = to_float(row[c]);
    f.template add<1>(&z);
  }
}

// out[col] = f(col, in[col]) for every column; 16-byte loads and stores when in and out share their alignment
// modulo 16 bytes (always when out == in), else element by element.
template <typename T, typename F> __device__ __forceinline__ void map_row(const T* in, T* out, int n, const F& f) {
  const int tid = threadIdx.x, nt = blockDim.x;
  if (reinterpret_cast<uintptr_t>(in) % 16 != reinterpret_cast<uintptr_t>(out) % 16) {
    for (int c = tid; c < n; c += nt) out[c] = from_float<T>(f(c, to_float(in[c])));
    return;
  }
  constexpr int kVec = Vec16<T>::kN;
  const int head = aligned_head<T>(in, n);
  const int n_vec = (n - head) / kVec;
  const int tail = head + n_vec * kVec;
  for (int c = tid; c < head; c += nt) out[c] = from_float<T>(f(c, to_float(in[c])));
  const Vec16<T>* src = reinterpret_cast<const Vec16<T>*>(in + head);
  Vec16<T>* dst = reinterpret_cast<Vec16<T>*>(out + head);
  for (int i0 = tid; i0 < n_vec; i0 += kUnroll * nt) {
    Vec16<T> v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      if (i0 + u * nt < n_vec) v[u] = src[i0 + u * nt];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int i = i0 + u * nt;
      if (i < n_vec) {
#pragma unroll
        for (int k = 0; k < kVec; ++k) v[u].v[k] = from_float<T>(f(head + i * kVec + k, to_float(v[u].v[k])));
        dst[i] = v[u];
      }
    }
  }
  for (int c = tail + tid; c < n; c += nt) out[c] = from_float<T>(f(c, to_float(in[c])));
}

template <typename T> __device__ __forceinline__ void zero_row(T* out, int n) {
  constexpr int kVec = Vec16<T>::kN;
  const int head = aligned_head<T>(out, n);
  const int n_vec = (n - head) / kVec;
  const int tail = head + n_vec * kVec;
  const int tid = threadIdx.x, nt = blockDim.x;
  const T zero = from_float<T>(0.0f);
  for (int c = tid; c < head; c += nt) out[c] = zero;
  Vec16<T> zv;
#pragma unroll
  for (int k = 0; k < kVec; ++k) zv.v[k] = zero;
  Vec16<T>* body = reinterpret_cast<Vec16<T>*>(out + head);
  for (int i = tid; i < n_vec; i += nt) body[i] = zv;
  for (int c = tail + tid; c < n; c += nt) out[c] = zero;
}

template <typename T, bool SOFTCAP, bool WRITE_GRAD>
__global__ void __launch_bounds__(kMaxThreads)
ce_rows_kernel(const T* logits, int64_t z_stride, T* grad, int64_t g_stride, const int64_t* __restrict__ labels,
               const float* __restrict__ grad_scale, int64_t scale_stride, float* __restrict__ loss_out,
               float* __restrict__ lse_out, int64_t n_rows, int n_cols, int64_t ignore_index, float eps,
               float z_loss, float softcap, float inv_temp) {
  __shared__ LseState red[detail::kMaxWarps];
  const Transform<SOFTCAP> tf(softcap, inv_temp);
  for (int64_t row = blockIdx.x; row < n_rows; row += gridDim.x) {
    const T* z_row = logits + row * z_stride;
    const int64_t label = labels[row];
    if (label == ignore_index) {
      if (threadIdx.x == 0) {
        loss_out[row] = 0.0f;
        lse_out[row] = 0.0f;
      }
      if constexpr (WRITE_GRAD) zero_row(grad + row * g_stride, n_cols);
      continue;
    }
    // A label outside [0, V) (the op checks labels; this only keeps the kernel in bounds) gives a nan loss and
    // a gradient without the one-hot term.
    const bool label_ok = label >= 0 && label < n_cols;
    float s_y = NAN;
    if (threadIdx.x == 0 && label_ok) {  // read before pass 1's closing barrier: safe when grad aliases logits
      float t;
      s_y = tf(to_float(z_row[label]), t);
    }
    Pass1<SOFTCAP> p1{tf, {-INFINITY, 0.0f, 0.0f}};
    visit_row(z_row, n_cols, p1);
    const LseState st = detail::block_allreduce(p1.st, MergeLse{}, red);
    const float lse = st.m + logf(st.d);
    if (threadIdx.x == 0) {
      float loss = (1.0f - eps) * (lse - s_y);
      if (eps != 0.0f) loss += eps * (lse - st.s_sum / static_cast<float>(n_cols));
      if (z_loss != 0.0f) loss += z_loss * lse * lse;
      loss_out[row] = loss;
      lse_out[row] = lse;
    }
    if constexpr (WRITE_GRAD) {
      const float scale = grad_scale != nullptr ? grad_scale[row * scale_stride] : 1.0f;
      const Pass2<SOFTCAP> p2{tf,
                              lse,
                              scale * (1.0f + 2.0f * z_loss * lse),
                              scale * (eps / static_cast<float>(n_cols)),
                              scale * (1.0f - eps),
                              label_ok ? static_cast<int>(label) : -1};
      map_row(z_row, grad + row * g_stride, n_cols, p2);
    }
  }
}

template <typename T>
int launch(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, const int64_t* labels,
           const float* grad_scale, int64_t scale_stride, float* loss, float* lse, int64_t n_rows, int64_t n_cols,
           int64_t ignore_index, float eps, float z_loss, float softcap, float inv_temp, cudaStream_t stream) {
  const int threads = detail::pow2_threads((n_cols + Vec16<T>::kN - 1) / Vec16<T>::kN, 32, kMaxThreads);
  const dim3 grid(detail::grid_for(n_rows));
  const T* z = static_cast<const T*>(logits);
  T* g = static_cast<T*>(grad);
  const int v = static_cast<int>(n_cols);
#define PTK_CE_LAUNCH(SOFTCAP, WRITE_GRAD)                                                                    \
  ce_rows_kernel<T, SOFTCAP, WRITE_GRAD><<<grid, threads, 0, stream>>>(z, logits_stride, g, grad_stride, labels, \
                                                                       grad_scale, scale_stride, loss, lse,      \
                                                                       n_rows, v, ignore_index, eps, z_loss,     \
                                                                       softcap, inv_temp)
  const bool has_softcap = softcap > 0.0f;
  if (g != nullptr) {
    if (has_softcap) PTK_CE_LAUNCH(true, true);
    else PTK_CE_LAUNCH(false, true);
  } else {
    if (has_softcap) PTK_CE_LAUNCH(true, false);
    else PTK_CE_LAUNCH(false, false);
  }
#undef PTK_CE_LAUNCH
  return detail::launch_status();
}

}  // namespace
}}  // namespace ptk::cuda

// Qualified definition: a signature that drifts from ptk_cuda.h is a compile error, not a new overload.
int ptk::cuda::ce_rows(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
            const int64_t* labels, const float* grad_scale, int64_t scale_stride, float* loss, float* lse,
            int64_t n_rows, int64_t n_cols, int64_t ignore_index, float label_smoothing, float z_loss,
            float softcap, float inv_temperature, void* stream) {
  namespace detail = ptk::cuda::detail;
  if (n_rows < 0 || n_cols < 0 || n_cols > kMaxCols || dtype < 0 || dtype > 2) return detail::invalid_value();
  if (n_rows == 0) return 0;
  if (logits == nullptr || labels == nullptr || loss == nullptr || lse == nullptr) return detail::invalid_value();
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case 0:
      return launch<float>(logits, logits_stride, grad, grad_stride, labels, grad_scale, scale_stride, loss, lse,
                           n_rows, n_cols, ignore_index, label_smoothing, z_loss, softcap, inv_temperature, s);
    case 1:
      return launch<__half>(logits, logits_stride, grad, grad_stride, labels, grad_scale, scale_stride, loss, lse,
                            n_rows, n_cols, ignore_index, label_smoothing, z_loss, softcap, inv_temperature, s);
    default:
      return launch<__nv_bfloat16>(logits, logits_stride, grad, grad_stride, labels, grad_scale, scale_stride, loss,
                                   lse, n_rows, n_cols, ignore_index, label_smoothing, z_loss, softcap,
                                   inv_temperature, s);
  }
}
