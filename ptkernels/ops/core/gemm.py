"""The three GEMMs around every chunk of rows, on the fastest library the tensors' device has.

    logits              z   = h @ W.T (+ b)           GEMM 1
    input_grad          dh  = dz @ W                  GEMM 2
    accumulate_weight_grad  acc += alpha * dz.T @ h   GEMM 3 (fp32 accumulator)

CUDA, and every dtype but fp32 on CPU: ``torch.mm`` / ``addmm`` (cuBLAS; on CPU, bf16 already goes to oneDNN).

CPU fp32: the library is chosen per machine (``cpu_gemm_choice``), by rules on the CPU's vendor and instruction
set, reproducible for a given machine (the choice never depends on a timing):

    GenuineIntel  -> "blas": ``torch.mm``, i.e. the wheel's BLAS (MKL on x86), when that BLAS is MKL. MKL runs
                     its own best kernels on Intel CPUs (AVX-512 where present). Measured on an Intel Xeon
                     (AVX-512) at N=2048, D=512, V=128256, fp32, one run: the fused CE on torch.mm 0.74x eager and
                     1.18x the GEMM floor, on oneDNN 0.99x and 1.39x. That figure is from the issue's Intel host;
                     the development machines (and this rule's tests) are AMD, where the Intel branch is tested
                     with a mocked CPU only.
    other vendors with AVX-512 -> "onednn": ``torch.ops.mkldnn._linear_pointwise`` (the op Inductor lowers CPU
                     linears to), for GEMMs of at least ``ONEDNN_MIN_FLOPS`` multiply-adds (``torch.mm`` below
                     that, where building oneDNN's primitive for a new shape costs more than oneDNN saves). Why:
                     MKL picks its code path by CPU vendor and runs its AVX2 kernels on AMD even where the CPU has
                     AVX-512, while oneDNN dispatches on the instruction set. On a 2-core AMD EPYC Zen 5 (family
                     26, AVX-512) oneDNN ran the CPU benchmark size's GEMMs 1.4-2.2x faster (benchmarks/RESULTS.md).
                     On a 2-core Zen 4 (family 25, AVX-512; 2026-12-04) oneDNN ran GEMMs 1 and 2 1.3-2.8x faster
                     at 48-3072 rows (GEMM 2 at 768 rows excepted: 0.92x); GEMM 3 into the transposed buffer was
                     faster at 3072 rows (511 against 761 ms at D=512, V=32000) but not below: at 48-1536 rows
                     addmm into a contiguous buffer took 0.61-1.06x of its time, 0.16-0.80x with the transposing
                     copy at the end counted. ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD is Zen 5's figure; on Zen 4 the
                     buffer is transposed only for chunks of at least ``ZEN4_TRANSPOSED_GRAD_MIN_CHUNK_ROWS``
                     rows, calls of at least ``ZEN4_TRANSPOSED_GRAD_MIN_ROWS`` and D <=
                     ``ZEN4_TRANSPOSED_GRAD_MAX_DIM`` (``transposed_grad_bounds``: why there).
    other vendors without AVX-512 -> "blas": there MKL's AVX2 kernels are the CPU's best and oneDNN has nothing
                     wider. On a 2-core AMD EPYC Zen 3 (family 25, AVX2 only; 2026-12-04) oneDNN was 1.0-1.5x
                     slower than torch.mm on GEMMs 2 and 3 at every shape tried, and the fused CE on torch.mm took
                     0.85x the oneDNN route's time at N=4096, D=512, V=32000, 0.80x at N=1024, V=872, 0.70x at
                     N=256, V=128256.

``PTK_CPU_GEMM=auto|blas|onednn`` overrides the rule (read at import); ``torch.backends.mkldnn.flags
(enabled=False)`` also keeps every GEMM on ``torch.mm``. Both libraries compute in IEEE fp32 with fp32
accumulation (oneDNN follows ``torch.backends.mkldnn.matmul.fp32_precision`` like the rest of PyTorch), so the
tests' float64 bounds hold on either (they run on both: tests/ops/core/test_gemm.py, and .ci/run's second suite pass).

oneDNN is only handed operands that are contiguous or the transpose of a contiguous matrix: other strides
(a column slice, say) send it down a reference path thousands of times slower. GEMM 3 on this route
accumulates into a transposed buffer (``weight_grad_buffer``): ``acc.T += h.T @ dz`` is a dense GEMM plus a
dense add, against 0.6x that speed for ``acc += dz.T @ h`` with oneDNN.

oneDNN writes every product into a fresh tensor. glibc serves an allocation above its largest mmap threshold
(32 MiB) with fresh pages each time: mapped, zero-filled on first touch, unmapped when freed. Every fresh
product here is therefore kept within ``CPU_FRESH_BUFFER_BYTES``: the chunk loop's default chunk of logits
(``chunking.default_chunk_size``) and GEMM 3's product, formed in blocks of the hidden dimension. At the
benchmark CPU size that took GEMM 3 from 0.34 s to 0.25 s, GEMM 1 from 0.32 s to 0.22 s. The bound sits a little
below 32 MiB: a block of exactly 32 MiB is mapped every time too (the allocator's header and alignment put the
request over the threshold), and power-of-two vocabularies made exactly such chunks (1024 rows at V=8192: a fresh
[1024, 8192] product took 10.7 ms to allocate and touch against 0.26 ms at 1023 rows, Zen 4 EPYC).
"""

from __future__ import annotations

import os

import torch

from .cpu_info import CPUInfo, cpu_info

# m * n * k. oneDNN builds (JITs) a primitive for every new shape, ~0.3 ms; small GEMMs of ever-changing shapes
# (GRPO's trained rows x completion length at the quick preset) ran ~10-20% slower on it at 2^24. From 2^27 it
# wins even on a new shape (128 x 872 x ~2000: 1.5 ms against 2.9 ms on torch.mm).
ONEDNN_MIN_FLOPS = 1 << 27
ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD = 256  # GEMM 3's inner dimension; shorter ones lose to addmm_ (0.7x at 128)
ZEN4_TRANSPOSED_GRAD_MIN_CHUNK_ROWS = 512  # rows of one GEMM 3 (a chunk): see transposed_grad_bounds
ZEN4_TRANSPOSED_GRAD_MIN_ROWS = 2048  # rows in all of one call's GEMM 3s: see transposed_grad_bounds
ZEN4_TRANSPOSED_GRAD_MAX_DIM = 512  # hidden sizes above it: never transposed on Zen 4 (transposed_grad_bounds)
# glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit (32 MiB), less a margin: larger blocks are mmapped (docstring)
CPU_FRESH_BUFFER_BYTES = (32 << 20) - (64 << 10)

CPU_GEMM_CHOICES = ("auto", "blas", "onednn")
_CPU_GEMM = os.environ.get("PTK_CPU_GEMM", "auto").strip().lower()
if _CPU_GEMM not in CPU_GEMM_CHOICES:
    raise ValueError(f"PTK_CPU_GEMM must be one of {', '.join(CPU_GEMM_CHOICES)}, got {_CPU_GEMM!r}")


def rule_for_cpu(cpu: CPUInfo, blas_is_mkl: bool) -> tuple[str, str]:
    """The rule of the module docstring: ("blas" | "onednn", why) for this CPU and wheel."""
    if cpu.vendor == "GenuineIntel" and blas_is_mkl:
        isa = "AVX-512" if cpu.avx512 else "no AVX-512"
        return "blas", f"GenuineIntel ({isa}): MKL runs its own kernels for this CPU"
    if cpu.vendor == "GenuineIntel":
        return "onednn", "GenuineIntel, but the wheel's BLAS is not MKL"
    vendor = cpu.vendor or "unknown vendor"
    if cpu.avx512:
        return "onednn", f"{vendor} with AVX-512: MKL would run its AVX2 kernels, oneDNN uses AVX-512"
    return "blas", f"{vendor} without AVX-512: MKL's AVX2 kernels are as wide as this CPU goes (and were faster)"


def choose_cpu_gemm(setting: str, cpu: CPUInfo, blas_is_mkl: bool, onednn_ok: bool) -> tuple[str, str]:
    """("blas" | "onednn", why) for a ``PTK_CPU_GEMM`` setting on this machine."""
    if setting == "blas":
        return "blas", "PTK_CPU_GEMM=blas"
    if not onednn_ok:
        return "blas", "this PyTorch build has no oneDNN linear"
    if setting == "onednn":
        return "onednn", "PTK_CPU_GEMM=onednn"
    return rule_for_cpu(cpu, blas_is_mkl)


_CHOICE: dict[str, tuple[str, str]] = {}  # memoized in a plain dict so torch.compile traces through it


def cpu_gemm_choice() -> tuple[str, str]:
    """The fp32 CPU GEMM library of this process and why: ("blas" | "onednn", reason). Memoized; tests
    monkeypatch ``_CPU_GEMM`` and clear ``_CHOICE``."""
    if _CPU_GEMM not in _CHOICE:
        _CHOICE[_CPU_GEMM] = choose_cpu_gemm(_CPU_GEMM, cpu_info(), torch.backends.mkl.is_available(),
                                             _onednn_available())
    return _CHOICE[_CPU_GEMM]


def transposed_grad_bounds(cpu: CPUInfo) -> tuple[int, int, int | None]:
    """(fewest rows per chunk, fewest rows in all over one call's chunks, largest hidden size D; None: any) for
    which the weight-gradient accumulator is stored transposed so that GEMM 3 can take oneDNN
    (``weight_grad_buffer``); (0, 0, None): no bound beyond ``ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD`` per chunk.

    The transposed buffer trades a faster GEMM 3 per chunk for one transposing copy of the whole [V, D] gradient
    at the end, so it pays only where GEMM 3 gains and over enough rows. AMD family 25 with AVX-512 (Zen 4; its
    AVX-512 runs on 256-bit units), 2-core EPYC, fp32, 2026-12-04, medians of 9, oneDNN into the transposed buffer
    against addmm into a contiguous one: 1.14-1.29x faster at D <= 512 (256-2048 rows, V=8192-32000), but
    0.68-1.03x at D = 1024, 2048 and 4096 (256-2048 rows, V=872-32000) and 0.89-1.02x at V=872; the copy took
    0.8 ms per MiB of gradient for 64 MiB (1.3 GB/s; 5 ms for 16 MiB): about 1.3k rows of the D <= 512 gain pay
    for it, at any V x D (both grow with V x D), and nothing pays for it above D=512. End to end, interleaved (CE
    time x eager, 7-11 rounds, transposed as before -> these bounds): N=1024, D=2048, V=8192 0.76-0.77 -> 0.62-0.65;
    N=1024, D=512, V=32000 0.61 -> 0.55; N=4096, D=2048, V=8192 0.68 -> 0.65; N >= 4096 at D <= 512 unchanged.
    Elsewhere (Zen 5, where ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD was set; other CPUs take the BLAS route) no bound is
    measured, so none is set.

    Rows per chunk on Zen 4 (later the same day, medians of 9, addmm into a contiguous buffer over oneDNN into the
    transposed one, per chunk, before the copy): 0.83-0.96x at 256 rows (D=128-512, V=8192-128256), 1.00-1.02x
    at 384, 1.04-1.18x at 512-992; and at 256 rows the copy is pure loss (49 ms for the 62 MiB gradient at D=512,
    V=32000, whose CPU chunks hold 256 rows; the 1.14-1.29x above at 256 rows did not repeat). So on Zen 4 a chunk
    must also hold 512 rows."""
    if cpu.vendor == "AuthenticAMD" and cpu.family == 25 and cpu.avx512:
        return ZEN4_TRANSPOSED_GRAD_MIN_CHUNK_ROWS, ZEN4_TRANSPOSED_GRAD_MIN_ROWS, ZEN4_TRANSPOSED_GRAD_MAX_DIM
    return 0, 0, None


_GRAD_BOUNDS: dict[str, tuple[int, int, int | None]] = {}  # memoized in a plain dict so torch.compile traces through it


def _transposed_grad_pays(rows_per_gemm: int, rows_in_all: int, dim: int) -> bool:
    """The one check of the transposed layout: ``ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD`` per product and this CPU's
    ``transposed_grad_bounds``."""
    if "bounds" not in _GRAD_BOUNDS:
        _GRAD_BOUNDS["bounds"] = transposed_grad_bounds(cpu_info())
    min_chunk_rows, min_rows, max_dim = _GRAD_BOUNDS["bounds"]
    return (rows_per_gemm >= max(min_chunk_rows, ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD) and rows_in_all >= min_rows
            and (max_dim is None or dim <= max_dim))


_ONEDNN: dict[str, bool] = {}  # memoized in a plain dict so torch.compile traces through it


def _onednn_available() -> bool:
    if "ok" not in _ONEDNN:
        _ONEDNN["ok"] = bool(torch.backends.mkldnn.is_available()
                             and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    return _ONEDNN["ok"]


def onednn_route(device: torch.device, dtype: torch.dtype) -> bool:
    """True when fp32 GEMMs on ``device`` of at least ``ONEDNN_MIN_FLOPS`` go to oneDNN."""
    # Under CPU autocast the GEMMs stay on torch.mm, which autocast casts like every other CPU matmul.
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.enabled
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and cpu_gemm_choice()[0] == "onednn")


def cpu_gemm_library(dtype: torch.dtype = torch.float32) -> str:
    """Which library runs the large CPU GEMMs of the fused ops in ``dtype``: "onednn" or "blas"."""
    return "onednn" if onednn_route(torch.device("cpu"), dtype) else "blas"


def _dense_or_transposed(t: torch.Tensor) -> bool:
    return t.is_contiguous() or t.t().is_contiguous()


def _use_onednn(a: torch.Tensor, b: torch.Tensor, m: int, n: int, k: int) -> bool:
    return (m * n * k >= ONEDNN_MIN_FLOPS and a.dtype == b.dtype and onednn_route(a.device, a.dtype)
            and _dense_or_transposed(a) and _dense_or_transposed(b))


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T (+ bias) on oneDNN: x [m, k], w [n, k]."""
    return torch.ops.mkldnn._linear_pointwise(x, w, bias, "none", [], "")


def logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           out: torch.Tensor | None = None) -> torch.Tensor:
    """GEMM 1: ``h @ weight.T + bias`` in the input dtype (into ``out`` where the library can write there)."""
    m, k = h.shape
    if _use_onednn(h, weight, m, weight.shape[0], k) and (bias is None or bias.dtype == h.dtype):
        return _linear(h, weight, bias)
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


def writes_into_out(h_rows: int, weight: torch.Tensor, like: torch.Tensor) -> bool:
    """Whether ``logits`` honours ``out`` for a chunk of ``h_rows`` rows (oneDNN returns a fresh tensor, so a
    reused buffer would only hold memory)."""
    v, d = weight.shape
    big = h_rows * v * d >= ONEDNN_MIN_FLOPS
    return not (big and like.dtype == weight.dtype and onednn_route(like.device, like.dtype)
                and _dense_or_transposed(weight))


def input_grad(dz: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """GEMM 2: ``dz @ weight`` ([c, V] @ [V, D])."""
    m, n = dz.shape[0], weight.shape[1]
    if _use_onednn(dz, weight, m, n, dz.shape[1]):
        return _linear(dz, weight.t())
    return torch.mm(dz, weight)


def weight_grad_buffer(weight: torch.Tensor, like: torch.Tensor, acc_dtype: torch.dtype,
                       rows_per_gemm: int | None = None, rows_in_all: int | None = None) -> torch.Tensor:
    """A zeroed ``[V, D]`` accumulator in ``acc_dtype`` for GEMM 3 over ``rows_in_all`` rows (default: those of
    ``like``, [N, D]), at most ``rows_per_gemm`` per product (default: all of them). Where GEMM 3 can take the
    oneDNN route, where its gain pays for the transposing copy at the end (``transposed_grad_bounds``), it
    is stored transposed (a ``[D, V]`` contiguous tensor seen as ``[V, D]``); hand it back through
    ``weight_grad_result``. Only then: a transposed buffer no oneDNN product is added into costs a slower addmm
    per chunk and that copy (70 ms at V=8192, D=2048 on a Zen 4 EPYC)."""
    v, d = weight.shape
    total = like.shape[0] if rows_in_all is None else rows_in_all
    rows = total if rows_per_gemm is None else rows_per_gemm
    if (like.dtype == acc_dtype and rows * v * d >= ONEDNN_MIN_FLOPS
            and onednn_route(like.device, like.dtype) and _transposed_grad_pays(rows, total, d)):
        return torch.zeros(d, v, dtype=acc_dtype, device=weight.device).t()
    return torch.zeros(v, d, dtype=acc_dtype, device=weight.device)


def accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, alpha: float = 1.0) -> None:
    """GEMM 3: ``acc += alpha * dz.T @ h``, ``acc`` in fp32 (fp64) whatever the dtype of dz and h.

    Same dtypes: oneDNN into a transposed accumulator (see the module docstring), else an in-place addmm.
    bf16/fp16 on CUDA: addmm with ``out_dtype=float32`` writes straight into the fp32 accumulator
    (PyTorch >= 2.8); elsewhere the chunk's product is formed in the input dtype (fp32 accumulation inside the
    GEMM) and added to the fp32 accumulator.
    """
    if dz.dtype == acc.dtype:
        rows = h.shape[0]
        transposed = not acc.is_contiguous() and acc.t().is_contiguous()
        if (transposed and rows >= ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD
                and _use_onednn(dz, h, dz.shape[1], h.shape[1], rows)):
            _accumulate_transposed_onednn(acc.t(), dz, h, alpha)
        elif transposed:
            acc.t().addmm_(h.t(), dz, alpha=alpha)
        else:
            acc.addmm_(dz.t(), h, alpha=alpha)
        return
    _accumulate_mixed(acc, dz, h, alpha)


def weight_grad(dz: torch.Tensor, h: torch.Tensor, acc_dtype: torch.dtype) -> torch.Tensor:
    """GEMM 3 when one chunk covers every row (the small-shape fast path): ``dz.T @ h`` in ``acc_dtype``,
    written once instead of added into a zeroed accumulator; the same numbers as ``accumulate_weight_grad``
    into zeros (fp32 accumulation inside the GEMM, one rounding to ``acc_dtype``)."""
    if dz.dtype == acc_dtype:
        rows = h.shape[0]
        if _use_onednn(dz, h, dz.shape[1], h.shape[1], rows) and _transposed_grad_pays(rows, rows, h.shape[1]):
            return _linear(h.t().contiguous(), dz.t()).t()  # [D, V] product, seen as [V, D]
        return torch.mm(dz.t(), h)
    acc = torch.zeros(dz.shape[1], h.shape[1], dtype=acc_dtype, device=dz.device)
    _accumulate_mixed(acc, dz, h, 1.0)
    return acc


def _accumulate_transposed_onednn(acc_t: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, alpha: float) -> None:
    """acc_t [D, V] += alpha * h.T @ dz, in blocks of D whose [d, V] products fit CPU_FRESH_BUFFER_BYTES."""
    d, v = acc_t.shape
    per_row = v * acc_t.element_size()
    blocks = max(1, -(-d * per_row // CPU_FRESH_BUFFER_BYTES))
    step = -(-d // blocks)
    for d0 in range(0, d, step):
        h_block = h[:, d0:d0 + step].t()  # a column slice: oneDNN gets a contiguous copy ([d, c], small)
        h_block = (h_block * alpha if alpha != 1.0 else h_block).contiguous()
        acc_t[d0:d0 + step].add_(_linear(h_block, dz.t()))


_MIXED_ADDMM_OK: dict[torch.device, bool] = {}


def _accumulate_mixed(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, alpha: float) -> None:
    dev = acc.device
    if dev.type == "cuda" and _MIXED_ADDMM_OK.get(dev, True):
        try:
            torch.addmm(acc, dz.t(), h, alpha=alpha, out_dtype=acc.dtype, out=acc)
            _MIXED_ADDMM_OK[dev] = True
            return
        except (TypeError, RuntimeError):
            _MIXED_ADDMM_OK[dev] = False
    acc.add_(torch.mm(dz.t(), h), alpha=alpha)


def weight_grad_result(acc: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The accumulated weight gradient in the weight's dtype and layout (contiguous ``[V, D]``)."""
    # (a layout property dynamo cannot read while it speculates a backward: the copy stays in the graph there)
    if acc.dtype == dtype and not torch.compiler.is_compiling() and acc.is_contiguous():
        return acc
    return acc.to(dtype).contiguous()
