"""The chunk loop shared by the fused ops: which rows, how many at a time, and the GEMMs around the rows.

Row selection. By default the valid rows (label != ignore_index) are found once per call with
``nonzero()``: that is the one host-device synchronization of a fused op, and it is what lets masked rows
(prompts, padding) skip every GEMM. ``sync_free=True`` instead walks all rows in fixed chunks with no
synchronization at all (for CUDA graphs and ``torch.compile``); the row kernels then skip the masked rows on
the device (loss 0, zero gradient), while the GEMMs still cover them.
"""

from __future__ import annotations

import torch

from . import gemm


def default_chunk_size(num_classes: int, device: torch.device, dtype: torch.dtype | None = None,
                       dim: int | None = None) -> int:
    """Rows per chunk so that one chunk of logits stays small but the GEMMs stay efficient. ``dtype``: that of
    the hidden states when the loop runs GEMMs (None for the ops that take logits); ``dim``: their width D.

    CUDA: about 2^28 logits per chunk (2048 rows at V=128256: 512 MiB in bf16): GEMM 3 (``dW += dz.T @ h``)
    reads and writes the whole fp32 [V, D] accumulator once per chunk, so few, tall chunks keep the tensor cores
    busy. On an H200 at N=8192 (25% masked), D=4096, V=128256, bf16, fwd+bwd ran at 1.56x the 3-GEMM floor with
    512-row chunks, 1.22x with 2048 and 1.19x with 4096, the peak memory unchanged up to 2048 (the fp32
    accumulator and the bf16 dW outweigh a chunk; benchmarks/RESULTS.md).

    CPU on ``torch.mm``: about 2^24 logits (64 MiB in fp32; 512 rows at V=32000), a power of two; its GEMM 2
    (``dz @ W``, K = V) packs all of W again for every chunk (at 256 rows that cost ~5% at the benchmark CPU
    size), and GEMM 1 writes into one buffer reused by every chunk (``ChunkLogits``).

    CPU on oneDNN (``gemm.onednn_route``), which returns a fresh chunk of logits every time: as many rows as keep
    it below glibc's largest mmap threshold (``gemm.CPU_FRESH_BUFFER_BYTES``), a multiple of 32. A chunk above it
    is mapped, zero-filled by page faults and unmapped again per chunk (GEMM 1 over the benchmark CPU size: 0.32
    s at 512 rows, 0.22 s at 256), and so was one of exactly 32 MiB, which the earlier power-of-two rule made at
    every power-of-two vocabulary: fused CE against the 3-GEMM floor (as measured then: with its own page
    faults, benchmarks/_measure.py), interleaved, Zen 4 EPYC, N=16384, D=128,
    V=8192: 1.12x at 1024 rows, 0.93-0.98x at 512-1000; N=8192, D=128, V=16384: 1.10x at 512, 0.92-0.97x at
    256-500; V=32768, N=4096, D=128 / N=2048, D=512: 1.12x / 1.09x at 256, 1.05x / 0.99x at 224. Where fewer
    than ``CPU_MIN_FRESH_CHUNK_ROWS`` rows fit (V above ~43k), 256 rows all the same: there the GEMMs' short
    dimension costs more than the page faults (N=1024, V=128256, D=128 / 512: 1.13x / 1.07x the floor at 256
    rows, 1.22x / 1.15x at 128, 1.37x / 1.26x at 64). The row kernels work one row at a time (a row sits in
    L2), so the chunk need not fit a cache. The price: a heap block freed by one chunk is not always reused by the
    next (smaller allocations between them split it), so the peak may hold two chunks' logits where a mapped
    chunk held one (CE at N=16384, D=128, V=8192: 64-95 MiB over runs, against 64 with mapped chunks and 1542
    for eager).

    CPU, also at most ``CPU_CHUNK_HIDDEN`` hidden values per chunk (512 rows at D=2048), never fewer than 256: a
    chunk gathers its rows of the hidden states and forms their dX before scattering it, two [rows, D]
    temporaries that outweigh the logits where D is large against V. Peak memory against eager's (fp32, 2-core
    AMD EPYC Zen 3): at N=4096, D=2048, V=872, one 4096-row chunk took 103.8 MiB against 62.9, 2^21 values
    (1024 rows) 63.8-65.1, 2^20 61.5; at N=1024, D=2048, V=8192, 118.1 at 2^21 and 105.7 at 2^20 against 113.9;
    time unchanged within the noise (0.73-0.81x eager at both). It changes the chunk only where D is large
    against V (at D=2048 below V=32000, at D=512 below V=8192): elsewhere the logits bound is the smaller.
    """
    v = max(num_classes, 1)
    if device.type == "cuda":
        rows = max((1 << 28) // v, 256)
        return min(1 << (rows.bit_length() - 1), 8192)  # a power of two: fewer shapes for the GEMM heuristics
    by_hidden = max(CPU_CHUNK_HIDDEN // dim, 256) if dim else 4096
    if dtype is not None and gemm.onednn_route(device, dtype):
        fit = gemm.CPU_FRESH_BUFFER_BYTES // (4 * v)
        rows = min(fit, by_hidden) // 32 * 32 if fit >= CPU_MIN_FRESH_CHUNK_ROWS else 256
    else:
        rows = max(min((1 << 24) // v, by_hidden), 256)
        rows = 1 << (rows.bit_length() - 1)
    return min(rows, 4096)


CPU_CHUNK_HIDDEN = 1 << 20  # hidden values per CPU chunk (4 MiB in fp32): see default_chunk_size
CPU_MIN_FRESH_CHUNK_ROWS = 192  # a oneDNN chunk is cut to fit below the mmap threshold down to this: default_chunk_size


# The small-shape fast path (``one_chunk``): below this many multiply-adds per GEMM (rows x V x D) a call runs
# as one straight-line chunk over every row. Why: there the fixed per-call cost decides, not the GEMMs. At
# N=64, D=128, V=872 (the quick preset's head, fp32, 2-core AMD EPYC) the chunked path's Python (row plan, the
# loop, gathering the valid rows and scattering their gradients into zeroed buffers, an fp32 accumulator for
# GEMM 3) was ~40% of a call and left it 1.0-1.08x eager. The price of the straight path is that masked rows
# go through the GEMMs (the row kernels give them loss 0 and a zero gradient, as in sync-free mode): at 25%
# masked that is 1.33x the GEMM work, which the fixed cost outweighs only while the GEMMs are small.
# 2^26 (N=512 at D=128, V=872; N=16 at D=512, V=8192) covers the range where the straight path was measured to
# help (N=64-512 at D=128, V=872, 2-core AMD EPYC under heavy load: benchmarks/RESULTS.md, "small-shape fast
# path"); the crossover above it was lost in that machine's noise and is still to be measured on a quiet one.
ONE_CHUNK_MAX_MACS = 1 << 26


def one_chunk(n_rows: int, chunk: int, num_classes: int, dim: int, max_macs: int | None = None) -> bool:
    """Whether a call of ``n_rows`` rows takes the small-shape fast path: every row in one chunk (no
    ``nonzero``, no gather/scatter, no accumulators), the logits no larger than one chunk of the chunked path,
    and GEMMs small enough that skipping the masked rows would not pay (``max_macs``, default
    ``ONE_CHUNK_MAX_MACS``; the CPU small path passes its own, ``small_head.SMALL_PATH_MAX_MACS``)."""
    limit = ONE_CHUNK_MAX_MACS if max_macs is None else max_macs
    return 0 < n_rows <= chunk and n_rows * num_classes * dim <= limit


def want_sync_free(sync_free: bool | None, device: torch.device) -> bool:
    """Resolve ``sync_free=None``: on when tracing with torch.compile or capturing a CUDA graph."""
    if sync_free is not None:
        return bool(sync_free)
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class RowPlan:
    """Which rows of a flat ``[N, ...]`` problem are processed, in chunks of ``chunk`` rows."""

    def __init__(self, labels1d: torch.Tensor, ignore_index: int, chunk: int, sync_free: bool,
                 single: bool = False):
        self.single = single  # the small-shape fast path (``one_chunk``): all rows at once, no ``nonzero``
        self.n_rows = labels1d.shape[0]
        self.chunk = chunk
        self.valid = labels1d != ignore_index
        if sync_free or single:
            self.index = None  # all rows, contiguous slices
            self.n_valid = self.valid.sum()  # a device tensor: no synchronization
            if single and not sync_free and labels1d.device.type == "cpu":
                self.n_valid = int(self.n_valid)  # free on CPU, and a Python scale saves tensor ops per call
            self.n_process = self.n_rows
        else:
            self.index = self.valid.nonzero().squeeze(1)  # the one synchronization of the call
            self.n_valid = self.index.numel()
            self.n_process = self.n_valid

    @classmethod
    def of_rows(cls, index: torch.Tensor | None, n_rows: int, chunk: int) -> RowPlan:
        """A plan over rows a loop already knows, with no ``nonzero`` (no synchronization): ``index`` (the
        row ids, 1-D) or None (all ``n_rows`` rows, in slices). For the compact-memory weight pass of the ops
        whose own loops pick their rows (ops/core/vocab_blocks.py); ``valid`` is not set."""
        plan = cls.__new__(cls)
        plan.single, plan.n_rows, plan.chunk, plan.valid, plan.index = False, n_rows, chunk, None, index
        plan.n_process = plan.n_valid = n_rows if index is None else index.numel()
        return plan

    @property
    def rows_per_chunk(self) -> int:
        """The most rows one chunk of ``chunks()`` holds (GEMM 3's inner dimension)."""
        return min(self.chunk, self.n_process)

    def chunks(self, size: int | None = None):
        """Yields row selectors of ``size`` rows (default: the plan's chunk): slices (sync-free) or index tensors
        (valid rows only)."""
        size = size or self.chunk
        for start in range(0, self.n_process, size):
            if self.index is None:
                yield slice(start, min(start + size, self.n_rows))
            else:
                yield self.index[start:start + size]


def take(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of ``t``: a view for a slice, a gathered copy for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


class ChunkLogits:
    """GEMM 1 of a chunk loop into one ``[chunk, V]`` buffer reused by every chunk, where the GEMM library
    writes into a given buffer (torch.mm; oneDNN returns a fresh tensor, see ``gemm.writes_into_out``).

    Why: on CPU a fresh chunk of logits above glibc's largest mmap threshold (32 MiB) pays for mapping,
    zero-filling and unmapping its pages every time: 1.068x the GEMM floor against 1.019x with the buffer at
    64 MiB chunks, native backend, benchmark CPU size (2026-11-30). Each chunk's logits are dead once its
    gradient GEMMs have run, so the next chunk overwrites them. Under torch.compile the loop allocates per
    chunk as before (no ``out=`` in the graph).
    """

    def __init__(self, plan_rows: int, chunk: int, like: torch.Tensor, weight: torch.Tensor):
        rows = min(chunk, plan_rows)
        self.buf = None
        if rows > 0 and not torch.compiler.is_compiling() and gemm.writes_into_out(rows, weight, like):
            self.buf = torch.empty(rows, weight.shape[0], dtype=like.dtype, device=like.device)

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fits = self.buf is not None and h.shape[0] <= self.buf.shape[0]
        out = self.buf[: h.shape[0]] if fits else None
        return gemm.logits(h, weight, bias, out=out)


def reduction_scale(plan: RowPlan, reduction: str, dtype: torch.dtype):
    """``(scale, row_scale)``: the factor turning the sum of row losses into ``reduction``, and the per-chunk
    gradient weight ``row_scale(rows, c)`` (a float, or a per-row device tensor in sync-free mode, where
    1/n_valid never leaves the device)."""
    if reduction == "mean" and torch.is_tensor(plan.n_valid):
        scale = 1.0 / plan.n_valid.clamp(min=1).to(dtype)
        return scale, lambda rows, c: scale.expand(c)
    scale = 1.0 / max(plan.n_valid, 1) if reduction == "mean" else 1.0
    return scale, lambda rows, c: scale


def _is_cpu_one(t: torch.Tensor) -> bool:
    """A CPU scalar equal to 1 (the usual ``loss.backward()``): multiplying by it is the identity, bit for bit,
    so the [V, D] pass is skipped; reading it costs no synchronization on CPU (never tried under tracing)."""
    return t.device.type == "cpu" and t.numel() == 1 and not torch.compiler.is_compiling() and t.item() == 1


def finish_head_grads(grads, grad_out, h_dtype: torch.dtype, w_dtype: torch.dtype):
    """Scale gradients formed in the forward pass by the incoming gradient (None: already applied per row)
    and cast them to the parameters' dtypes (the weight gradient was accumulated in fp32)."""
    gh, gw, gb = grads
    if grad_out is not None and not _is_cpu_one(grad_out):
        gh, gw, gb = (g.mul_(grad_out) if g is not None else None for g in (gh, gw, gb))
    return (_as(gh, h_dtype), gemm.weight_grad_result(gw, w_dtype) if gw is not None else None, _as(gb, w_dtype))


def _as(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def apply_head_grads(g, h, weight, rows, scale, gh, gw, gb):
    """GEMMs 2 and 3 for one chunk: gh[rows] = scale * g @ W; gw += (scale * g).T @ h; gb += (scale * g).sum(0).

    ``scale`` (a Python float, or a per-row tensor [c]) is applied on the D side (alpha, or a scaled copy of the
    [c, D] rows) so the [c, V] gradient is never touched again.
    """
    per_row = torch.is_tensor(scale)
    if g.dtype != weight.dtype:  # the torch rows return fp32 work buffers; the GEMMs run in the input dtype
        g = g.to(weight.dtype)
    if gh is not None:
        dh = gemm.input_grad(g, weight)
        if per_row:
            dh.mul_(scale.unsqueeze(1).to(dh.dtype))
        elif scale != 1.0:
            dh.mul_(scale)
        put(gh, rows, dh)
    if gw is not None:
        if per_row:
            gemm.accumulate_weight_grad(gw, g, h * scale.unsqueeze(1).to(h.dtype))
        else:
            gemm.accumulate_weight_grad(gw, g, h, alpha=scale)
    if gb is not None:
        if per_row:
            gb.add_(torch.mv(g.t(), scale.to(g.dtype)).to(gb.dtype))
        else:
            gb.add_(g.sum(dim=0, dtype=gb.dtype), alpha=scale)
