// C ABI of the ptkernels CUDA kernels (csrc/cuda/*.cu). Plain C++: no CUDA header is needed to include it, so
// the pybind11 module can call these from a translation unit compiled by the host compiler.
//
// Every function returns 0 on success, otherwise a cudaError_t code (cudaErrorInvalidValue = 1 for bad sizes or
// options, or the error of the launch). `stream` is a cudaStream_t passed as void* (nullptr: the legacy default
// stream). Kernels run on the current device: the caller sets it (c10::cuda::CUDAGuard). Nothing synchronizes.
// dtype codes: 0 = fp32, 1 = fp16, 2 = bf16. All float outputs are fp32. See csrc/README.md.
#pragma once
#include <cstdint>

namespace ptk { namespace cuda {

// Cross-entropy rows of logits z [n_rows, n_cols] (row stride logits_stride, unit column stride), the formulas of
// ptkernels/kernels/rows.py:ce_rows_kernel. loss[n_rows], lse[n_rows] (0 on ignore_index rows).
// grad == nullptr: no gradient; else grad [n_rows, n_cols] (stride grad_stride, same dtype as logits, may alias
// logits) = grad_scale[row * scale_stride] * dloss/dz (grad_scale == nullptr: 1). softcap <= 0: no soft capping.
int ce_rows(const void* logits, int64_t logits_stride, void* grad, int64_t grad_stride, int dtype,
            const int64_t* labels, const float* grad_scale, int64_t scale_stride, float* loss, float* lse,
            int64_t n_rows, int64_t n_cols, int64_t ignore_index, float label_smoothing, float z_loss,
            float softcap, float inv_temperature, void* stream);   // grad == nullptr: no gradient; softcap <= 0: none

// GRPO advantages of rewards [n] in n / group_size consecutive groups (ptkernels/ops/grpo.py:group_advantages).
int group_advantages(const float* rewards, float* out, int64_t n, int64_t group_size, int scale_mode /*0 group,1 batch,2 none*/, float eps, void* stream);

// Generalized advantage estimation on contiguous [batch, seq_len] tensors (ptkernels/ops/ppo.py:gae).
int gae(const float* rewards, const float* values, const float* mask, float* advantages, float* returns, int64_t batch, int64_t seq_len, float gamma, float lam, void* stream);

// out[s] = sum of mask * token_logps over [cu_seqlens[s], cu_seqlens[s + 1]) (average != 0: divided by the mask
// sum, 0 when it is 0); mask == nullptr counts every token as 1 (ptkernels/reference/sequence.py).
int segment_sums(const float* token_logps, const float* mask /*nullable*/, const int64_t* cu_seqlens, float* out, int64_t n_seqs, int average, void* stream);

}}  // namespace ptk::cuda
