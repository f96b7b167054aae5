// ptkernels._C: one pybind11 module over the CPU kernels (csrc/cpu) and, when built with PTK_WITH_CUDA, the CUDA
// kernels (csrc/cuda/ptk_cuda.h).
//
// The ABI is deliberately small and pointer-based: tensors arrive as data pointers (Python ints), sizes, row
// strides and a dtype code, so this module compiles without PyTorch's headers and links against no PyTorch
// library. The Python side (ptkernels/ops/backends/native_ops.py) is the only caller: it validates every dtype, shape, stride,
// device and index before a call, so that no argument can make a kernel read or write out of bounds; the kernels
// check again what is cheap to check (label range, segment bounds, sizes) and report it through their return
// value, which becomes a Python exception here. The GIL is released while a kernel runs.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "cpu/ptk_cpu.h"
#ifdef PTK_WITH_CUDA
#include "cuda/ptk_cuda.h"
#endif

namespace py = pybind11;

namespace {

constexpr int kAbiVersion = 1;

template <typename T = void> T* ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

// Negative statuses are argument errors (Python validates first, so reaching one is a bug); >= 0 is returned.
int64_t check_status(int64_t status, const char* what) {
  if (status >= 0) return status;
  std::string msg = std::string("ptkernels._C.") + what + ": ";
  switch (status) {
    case -1: msg += "unsupported dtype code"; break;
    case -2: msg += "invalid sizes or strides"; break;
    case -3: msg += "cu_seqlens must start at 0, never decrease and end at the number of tokens"; break;
    case -4: msg += "invalid option or missing buffer"; break;
    default: msg += "error " + std::to_string(status); break;
  }
  throw py::value_error(msg);
}

#ifdef PTK_WITH_CUDA
void check_cuda(int code, const char* what) {
  if (code != 0) {
    throw std::runtime_error(std::string("ptkernels._C.") + what + ": CUDA error " + std::to_string(code) +
                             (code == 1 ? " (cudaErrorInvalidValue: bad sizes or options)" : ""));
  }
}
#endif

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "ptkernels native kernels (C++ / OpenMP on CPU; CUDA when built with it). Called only through "
            "ptkernels.ops.backends.native_ops, which validates every argument.";
  m.attr("abi_version") = kAbiVersion;
#ifdef PTK_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
  m.def("build_info", []() { return std::string(ptk::cpu::build_info()); });

  // ------------------------------------------------------------------------------------------------- CPU
  m.def(
      "cpu_ce_rows",
      [](uintptr_t logits, int64_t logits_stride, uintptr_t grad, int64_t grad_stride, int dtype, uintptr_t labels,
         uintptr_t grad_scale, int64_t scale_stride, uintptr_t loss, uintptr_t lse, int64_t n_rows, int64_t n_cols,
         int64_t ignore_index, double label_smoothing, double z_loss, double softcap, double inv_temperature,
         int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::ce_rows(ptr(logits), logits_stride, ptr(grad), grad_stride, dtype, ptr<const int64_t>(labels),
                                ptr(grad_scale), scale_stride, ptr(loss), ptr(lse), n_rows, n_cols, ignore_index,
                                label_smoothing, z_loss, softcap, inv_temperature, n_threads);
        }
        return check_status(s, "cpu_ce_rows");
      },
      "Cross-entropy rows; returns the number of out-of-range labels (see csrc/cpu/ptk_cpu.h).",
      py::arg("logits"), py::arg("logits_stride"), py::arg("grad"), py::arg("grad_stride"), py::arg("dtype"),
      py::arg("labels"), py::arg("grad_scale"), py::arg("scale_stride"), py::arg("loss"), py::arg("lse"),
      py::arg("n_rows"), py::arg("n_cols"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::arg("inv_temperature"), py::arg("n_threads"));

  m.def(
      "cpu_logprob_fwd",
      [](uintptr_t logits, int64_t logits_stride, int dtype, uintptr_t targets, uintptr_t logp, uintptr_t lse,
         uintptr_t mean_s, int64_t n_rows, int64_t n_cols, int64_t ignore_index, double softcap,
         double inv_temperature, int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::logprob_fwd(ptr(logits), logits_stride, dtype, ptr<const int64_t>(targets), ptr(logp),
                                    ptr(lse), ptr(mean_s), n_rows, n_cols, ignore_index, softcap, inv_temperature,
                                    n_threads);
        }
        return check_status(s, "cpu_logprob_fwd");
      },
      "Token log-prob rows (and E_p[s] when mean_s != 0); returns the number of out-of-range targets.",
      py::arg("logits"), py::arg("logits_stride"), py::arg("dtype"), py::arg("targets"), py::arg("logp"),
      py::arg("lse"), py::arg("mean_s"), py::arg("n_rows"), py::arg("n_cols"), py::arg("ignore_index"),
      py::arg("softcap"), py::arg("inv_temperature"), py::arg("n_threads"));

  m.def(
      "cpu_logprob_bwd",
      [](uintptr_t logits, int64_t logits_stride, uintptr_t grad, int64_t grad_stride, int dtype, uintptr_t targets,
         uintptr_t lse, uintptr_t mean_s, uintptr_t g_logp, uintptr_t g_ent, int64_t n_rows, int64_t n_cols,
         int64_t ignore_index, double softcap, double inv_temperature, int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::logprob_bwd(ptr(logits), logits_stride, ptr(grad), grad_stride, dtype,
                                    ptr<const int64_t>(targets), ptr(lse), ptr(mean_s), ptr(g_logp), ptr(g_ent),
                                    n_rows, n_cols, ignore_index, softcap, inv_temperature, n_threads);
        }
        return check_status(s, "cpu_logprob_bwd");
      },
      "Gradient of log-prob (and entropy when g_ent != 0) rows; returns the number of out-of-range targets.",
      py::arg("logits"), py::arg("logits_stride"), py::arg("grad"), py::arg("grad_stride"), py::arg("dtype"),
      py::arg("targets"), py::arg("lse"), py::arg("mean_s"), py::arg("g_logp"), py::arg("g_ent"), py::arg("n_rows"),
      py::arg("n_cols"), py::arg("ignore_index"), py::arg("softcap"), py::arg("inv_temperature"),
      py::arg("n_threads"));

  m.def(
      "cpu_segment_sums",
      [](uintptr_t x, uintptr_t mask, uintptr_t cu, uintptr_t out, uintptr_t den, int64_t n_seqs, int64_t seq_len,
         int64_t total, bool average, int dtype, int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::segment_sums(ptr(x), ptr(mask), ptr<const int64_t>(cu), ptr(out), ptr(den), n_seqs, seq_len,
                                     total, average ? 1 : 0, dtype, n_threads);
        }
        check_status(s, "cpu_segment_sums");
      },
      "Per-sequence (masked) sums or means; cu == 0: padded rows of seq_len.", py::arg("x"), py::arg("mask"),
      py::arg("cu"), py::arg("out"), py::arg("den"), py::arg("n_seqs"), py::arg("seq_len"), py::arg("total"),
      py::arg("average"), py::arg("dtype"), py::arg("n_threads"));

  m.def(
      "cpu_segment_sums_bwd",
      [](uintptr_t g, uintptr_t den, uintptr_t mask, uintptr_t cu, uintptr_t grad, int64_t n_seqs, int64_t seq_len,
         int64_t total, bool average, int dtype, int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::segment_sums_bwd(ptr(g), ptr(den), ptr(mask), ptr<const int64_t>(cu), ptr(grad), n_seqs,
                                         seq_len, total, average ? 1 : 0, dtype, n_threads);
        }
        check_status(s, "cpu_segment_sums_bwd");
      },
      "Backward of cpu_segment_sums: the per-sequence gradient broadcast to the tokens.", py::arg("g"),
      py::arg("den"), py::arg("mask"), py::arg("cu"), py::arg("grad"), py::arg("n_seqs"), py::arg("seq_len"),
      py::arg("total"), py::arg("average"), py::arg("dtype"), py::arg("n_threads"));

  m.def(
      "cpu_group_advantages",
      [](uintptr_t rewards, uintptr_t out, int64_t n, int64_t group_size, int scale_mode, double eps, int dtype,
         int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::group_advantages(ptr(rewards), ptr(out), n, group_size, scale_mode, eps, dtype, n_threads);
        }
        check_status(s, "cpu_group_advantages");
      },
      "GRPO group advantages; scale_mode 0 group, 1 batch, 2 none.", py::arg("rewards"), py::arg("out"),
      py::arg("n"), py::arg("group_size"), py::arg("scale_mode"), py::arg("eps"), py::arg("dtype"),
      py::arg("n_threads"));

  m.def(
      "cpu_gae",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t adv, uintptr_t ret, int64_t batch,
         int64_t seq_len, double gamma, double lam, int dtype, int n_threads) {
        int64_t s;
        {
          py::gil_scoped_release nogil;
          s = ptk::cpu::gae(ptr(rewards), ptr(values), ptr(mask), ptr(adv), ptr(ret), batch, seq_len, gamma, lam,
                            dtype, n_threads);
        }
        check_status(s, "cpu_gae");
      },
      "Generalized advantage estimation on contiguous [batch, seq_len] arrays.", py::arg("rewards"),
      py::arg("values"), py::arg("mask"), py::arg("advantages"), py::arg("returns"), py::arg("batch"),
      py::arg("seq_len"), py::arg("gamma"), py::arg("lam"), py::arg("dtype"), py::arg("n_threads"));

#ifdef PTK_WITH_CUDA
  // ------------------------------------------------------------------------------------------------ CUDA
  // Asynchronous on `stream` (torch.cuda.current_stream().cuda_stream); the caller sets the current device.
  m.def(
      "cuda_ce_rows",
      [](uintptr_t logits, int64_t logits_stride, uintptr_t grad, int64_t grad_stride, int dtype, uintptr_t labels,
         uintptr_t grad_scale, int64_t scale_stride, uintptr_t loss, uintptr_t lse, int64_t n_rows, int64_t n_cols,
         int64_t ignore_index, float label_smoothing, float z_loss, float softcap, float inv_temperature,
         uintptr_t stream) {
        int code;
        {
          py::gil_scoped_release nogil;
          code = ptk::cuda::ce_rows(ptr<const void>(logits), logits_stride, ptr(grad), grad_stride, dtype,
                                    ptr<const int64_t>(labels), ptr<const float>(grad_scale), scale_stride,
                                    ptr<float>(loss), ptr<float>(lse), n_rows, n_cols, ignore_index, label_smoothing,
                                    z_loss, softcap, inv_temperature, ptr(stream));
        }
        check_cuda(code, "cuda_ce_rows");
      },
      py::arg("logits"), py::arg("logits_stride"), py::arg("grad"), py::arg("grad_stride"), py::arg("dtype"),
      py::arg("labels"), py::arg("grad_scale"), py::arg("scale_stride"), py::arg("loss"), py::arg("lse"),
      py::arg("n_rows"), py::arg("n_cols"), py::arg("ignore_index"), py::arg("label_smoothing"), py::arg("z_loss"),
      py::arg("softcap"), py::arg("inv_temperature"), py::arg("stream"));

  m.def(
      "cuda_group_advantages",
      [](uintptr_t rewards, uintptr_t out, int64_t n, int64_t group_size, int scale_mode, float eps,
         uintptr_t stream) {
        int code;
        {
          py::gil_scoped_release nogil;
          code = ptk::cuda::group_advantages(ptr<const float>(rewards), ptr<float>(out), n, group_size, scale_mode,
                                             eps, ptr(stream));
        }
        check_cuda(code, "cuda_group_advantages");
      },
      py::arg("rewards"), py::arg("out"), py::arg("n"), py::arg("group_size"), py::arg("scale_mode"), py::arg("eps"),
      py::arg("stream"));

  m.def(
      "cuda_gae",
      [](uintptr_t rewards, uintptr_t values, uintptr_t mask, uintptr_t adv, uintptr_t ret, int64_t batch,
         int64_t seq_len, float gamma, float lam, uintptr_t stream) {
        int code;
        {
          py::gil_scoped_release nogil;
          code = ptk::cuda::gae(ptr<const float>(rewards), ptr<const float>(values), ptr<const float>(mask),
                                ptr<float>(adv), ptr<float>(ret), batch, seq_len, gamma, lam, ptr(stream));
        }
        check_cuda(code, "cuda_gae");
      },
      py::arg("rewards"), py::arg("values"), py::arg("mask"), py::arg("advantages"), py::arg("returns"),
      py::arg("batch"), py::arg("seq_len"), py::arg("gamma"), py::arg("lam"), py::arg("stream"));

  m.def(
      "cuda_segment_sums",
      [](uintptr_t x, uintptr_t mask, uintptr_t cu, uintptr_t out, int64_t n_seqs, bool average, uintptr_t stream) {
        int code;
        {
          py::gil_scoped_release nogil;
          code = ptk::cuda::segment_sums(ptr<const float>(x), ptr<const float>(mask), ptr<const int64_t>(cu),
                                         ptr<float>(out), n_seqs, average ? 1 : 0, ptr(stream));
        }
        check_cuda(code, "cuda_segment_sums");
      },
      py::arg("x"), py::arg("mask"), py::arg("cu"), py::arg("out"), py::arg("n_seqs"), py::arg("average"),
      py::arg("stream"));
#endif
}
