// C++ ABI of the ptkernels CPU kernels (csrc/cpu/*.cpp). Plain pointers and sizes: no PyTorch header is needed,
// and the Python side (ptkernels/ops/backends/native_ops.py) validates every pointer, size, stride and dtype before a call.
//
// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16, 3 = fp64 (0..2 as in csrc/cuda/ptk_cuda.h). "Compute type" C is
// double for fp64 storage and float otherwise: per-row inputs and outputs (grad_scale, loss, lse, logp, mean_s,
// g_logp, g_ent) are arrays of C. Logit rows have unit column stride; `*_stride` is the row stride in elements.
// `n_threads` caps the OpenMP threads (the caller passes torch.get_num_threads()).
//
// Return values: >= 0 on success, the number of rows whose label / target was outside [0, n_cols) and not
// ignore_index (those rows get loss = lse = NaN and a zero gradient; nothing outside a row is ever touched);
// < 0 for bad arguments (ptk::cpu::Status).
#pragma once
#include <cstdint>

namespace ptk { namespace cpu {

// Cross-entropy rows (ptkernels/ops/backends/torch.py, TorchRows.ce):
//   s = softcap * tanh(z / softcap) * inv_temperature   (softcap <= 0: s = z * inv_temperature)
//   loss = (1 - eps)(lse - s_y) + eps (lse - mean(s)) + z_loss lse^2,   lse = logsumexp(s)
//   grad (when non-null, may be the logits themselves) = grad_scale[i] * dloss/dz (grad_scale null: 1)
// ignore_index rows: loss = lse = 0, zero gradient.
int64_t ce_rows(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
                const int64_t* labels, const void* grad_scale, int64_t scale_stride, void* loss, void* lse,
                int64_t n_rows, int64_t n_cols, int64_t ignore_index, double label_smoothing, double z_loss,
                double softcap, double inv_temperature, int n_threads);

// Token log-probs: logp = s_t - lse, and E_p[s] into mean_s when non-null (entropy = lse - E_p[s]).
int64_t logprob_fwd(const void* logits, int64_t logits_stride, int dtype, const int64_t* targets, void* logp,
                    void* lse, void* mean_s, int64_t n_rows, int64_t n_cols, int64_t ignore_index, double softcap,
                    double inv_temperature, int n_threads);

// d/dz [g_logp logp + g_ent H] = (g_logp onehot - p (g_logp + g_ent (s - E_p[s]))) ds/dz into grad (may be the
// logits); g_ent null: no entropy term (mean_s unused).
int64_t logprob_bwd(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
                    const int64_t* targets, const void* lse, const void* mean_s, const void* g_logp,
                    const void* g_ent, int64_t n_rows, int64_t n_cols, int64_t ignore_index, double softcap,
                    double inv_temperature, int n_threads);

// Per-sequence sums of x * mask (mask null: 1) over [cu[s], cu[s+1]) (cu null: padded rows [s*seq_len, +seq_len)),
// den[s] = sum of the mask; average: out = sum / den (0 when den == 0). dtype 0 or 3 (x, mask, out, den all of
// it). Returns kBadSegments when cu does not start at 0, decreases, or does not end at total.
int64_t segment_sums(const void* x, const void* mask, const int64_t* cu, void* out, void* den, int64_t n_seqs,
                     int64_t seq_len, int64_t total, int average, int dtype, int n_threads);

// The broadcast back: grad[t] = g[s] * mask[t] (/ den[s] when average, 0 when den == 0); tokens outside every
// segment get 0.
int64_t segment_sums_bwd(const void* g, const void* den, const void* mask, const int64_t* cu, void* grad,
                         int64_t n_seqs, int64_t seq_len, int64_t total, int average, int dtype, int n_threads);

// GRPO group advantages (ptkernels/ops/grpo.py): scale_mode 0 group, 1 batch, 2 none.
int64_t group_advantages(const void* rewards, void* out, int64_t n, int64_t group_size, int scale_mode, double eps,
                         int dtype, int n_threads);

// GAE (ptkernels/ops/ppo.py) on contiguous [batch, seq_len] rewards, values, mask (all of dtype 0 or 3).
int64_t gae(const void* rewards, const void* values, const void* mask, void* advantages, void* returns,
            int64_t batch, int64_t seq_len, double gamma, double lam, int dtype, int n_threads);

// What the kernels were compiled for (flags, OpenMP, vector ISA), for ptk.backends() diagnostics.
const char* build_info();

}}  // namespace ptk::cpu
