// Per-sequence sums of token log-probs on CPU (ptkernels/ops/sequence_logprobs.py, reference/sequence.py):
// padded rows [S, T] (cu == nullptr) or packed segments [cu[s], cu[s + 1]) of a flat [total] array.
//   out[s] = sum_t m[t] x[t]   (average: / den[s], 0 when den[s] == 0),   den[s] = sum_t m[t]
// and the backward broadcast grad[t] = g[s] m[t] (/ den[s]). One OpenMP thread per sequence at a time.
#include "common.h"
#include "ptk_cpu.h"

namespace ptk { namespace cpu {
namespace {

bool segments_ok(const int64_t* cu, int64_t n_seqs, int64_t seq_len, int64_t total) {
  if (n_seqs < 0 || total < 0) return false;
  if (cu == nullptr) return seq_len >= 0 && n_seqs * seq_len == total;
  if (cu[0] != 0 || cu[n_seqs] != total) return false;
  for (int64_t s = 0; s < n_seqs; ++s) {
    if (cu[s + 1] < cu[s]) return false;
  }
  return true;
}

template <typename C>
void fwd_impl(const C* x, const C* mask, const int64_t* cu, C* out, C* den, int64_t n_seqs, int64_t seq_len,
              bool average, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t start = cu != nullptr ? cu[s] : s * seq_len;
    const int64_t end = cu != nullptr ? cu[s + 1] : start + seq_len;
    C acc = 0, d = 0;
    if (mask != nullptr) {
#pragma omp simd reduction(+ : acc, d)
      for (int64_t t = start; t < end; ++t) {
        acc += x[t] * mask[t];
        d += mask[t];
      }
    } else {
#pragma omp simd reduction(+ : acc)
      for (int64_t t = start; t < end; ++t) acc += x[t];
      d = static_cast<C>(end - start);
    }
    out[s] = average ? (d != C(0) ? acc / d : C(0)) : acc;
    den[s] = d;
  }
}

template <typename C>
void bwd_impl(const C* g, const C* den, const C* mask, const int64_t* cu, C* grad, int64_t n_seqs, int64_t seq_len,
              bool average, int nt) {
#pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (int64_t s = 0; s < n_seqs; ++s) {
    const int64_t start = cu != nullptr ? cu[s] : s * seq_len;
    const int64_t end = cu != nullptr ? cu[s + 1] : start + seq_len;
    C gs = g[s];
    if (average) gs = den[s] != C(0) ? gs / den[s] : C(0);
    if (mask != nullptr) {
#pragma omp simd
      for (int64_t t = start; t < end; ++t) grad[t] = gs * mask[t];
    } else {
#pragma omp simd
      for (int64_t t = start; t < end; ++t) grad[t] = gs;
    }
  }
}

}  // namespace

int64_t segment_sums(const void* x, const void* mask, const int64_t* cu, void* out, void* den, int64_t n_seqs,
                     int64_t seq_len, int64_t total, int average, int dtype, int n_threads) {
  if (!segments_ok(cu, n_seqs, seq_len, total)) return kBadSegments;
  if (n_seqs == 0) return kOk;
  const int nt = threads_for(n_threads, n_seqs, total / n_seqs + 1);
  if (dtype == kFloat32) {
    fwd_impl<float>(static_cast<const float*>(x), static_cast<const float*>(mask), cu, static_cast<float*>(out),
                    static_cast<float*>(den), n_seqs, seq_len, average != 0, nt);
  } else if (dtype == kFloat64) {
    fwd_impl<double>(static_cast<const double*>(x), static_cast<const double*>(mask), cu, static_cast<double*>(out),
                     static_cast<double*>(den), n_seqs, seq_len, average != 0, nt);
  } else {
    return kBadDType;
  }
  return kOk;
}

int64_t segment_sums_bwd(const void* g, const void* den, const void* mask, const int64_t* cu, void* grad,
                         int64_t n_seqs, int64_t seq_len, int64_t total, int average, int dtype, int n_threads) {
  if (!segments_ok(cu, n_seqs, seq_len, total)) return kBadSegments;
  if (n_seqs == 0) return kOk;
  const int nt = threads_for(n_threads, n_seqs, total / n_seqs + 1);
  if (dtype == kFloat32) {
    bwd_impl<float>(static_cast<const float*>(g), static_cast<const float*>(den), static_cast<const float*>(mask), cu,
                    static_cast<float*>(grad), n_seqs, seq_len, average != 0, nt);
  } else if (dtype == kFloat64) {
    bwd_impl<double>(static_cast<const double*>(g), static_cast<const double*>(den), static_cast<const double*>(mask),
                     cu, static_cast<double*>(grad), n_seqs, seq_len, average != 0, nt);
  } else {
    return kBadDType;
  }
  return kOk;
}

}}  // namespace ptk::cpu
