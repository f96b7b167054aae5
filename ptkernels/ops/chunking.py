"""The chunk loop shared by the fused ops: which rows, how many at a time, and the GEMMs around the rows.

Row selection. By default the valid rows (label != ignore_index) are found once per call with
``nonzero()``: that is the one host-device synchronization of a fused op, and it is what lets masked rows
(prompts, padding) skip every GEMM. ``sync_free=True`` instead walks all rows in fixed chunks with no
synchronization at all (for CUDA graphs and ``torch.compile``); the row kernels then skip the masked rows on
the device (loss 0, zero gradient), while the GEMMs still cover them.
"""

from __future__ import annotations

import torch


def default_chunk_size(num_classes: int, device: torch.device) -> int:
    """Rows per chunk so that one chunk of logits stays small but the GEMMs stay efficient.

    CUDA: about 2^26 logits (256 MiB in fp32) per chunk, at least 256 rows: large GEMMs keep the tensor cores
    busy. CPU: about 2^24 logits (64 MiB in fp32; 512 rows at V=32000). The row kernels work one row at a time
    (a row sits in L2), so the chunk need not fit a cache; what the rows per chunk buy is GEMM 2,
    ``dz @ W`` (M = rows, K = V), which packs all of W again for every chunk: at 256 rows that cost ~5% of the
    fused cross-entropy's time at the DESIGN.md CPU size, at 512 rows it runs at the unchunked GEMMs' rate
    (benchmarks/RESULTS.md, 2026-11-30 chunk sweep).
    """
    budget = 1 << 26 if device.type == "cuda" else 1 << 24
    rows = max(budget // max(num_classes, 1), 16)
    rows = 1 << (rows.bit_length() - 1)  # a power of two: fewer distinct shapes for the GEMM heuristics
    return max(16, min(rows, 8192 if device.type == "cuda" else 4096))


def want_sync_free(sync_free: bool | None, device: torch.device) -> bool:
    """Resolve ``sync_free=None``: on when tracing with torch.compile or capturing a CUDA graph."""
    if sync_free is not None:
        return bool(sync_free)
    if torch.compiler.is_compiling():
        return True
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class RowPlan:
    """Which rows of a flat ``[N, ...]`` problem are processed, in chunks of ``chunk`` rows."""

    def __init__(self, labels1d: torch.Tensor, ignore_index: int, chunk: int, sync_free: bool):
        self.n_rows = labels1d.shape[0]
        self.chunk = chunk
        self.valid = labels1d != ignore_index
        if sync_free:
            self.index = None  # all rows, contiguous slices
            self.n_valid = self.valid.sum()  # a device tensor: no synchronization
            self.n_process = self.n_rows
        else:
            self.index = self.valid.nonzero().squeeze(1)  # the one synchronization of the call
            self.n_valid = self.index.numel()
            self.n_process = self.n_valid

    def chunks(self):
        """Yields row selectors: slices (sync-free) or index tensors (valid rows only)."""
        for start in range(0, self.n_process, self.chunk):
            if self.index is None:
                yield slice(start, min(start + self.chunk, self.n_rows))
            else:
                yield self.index[start:start + self.chunk]


def take(t: torch.Tensor, rows) -> torch.Tensor:
    """Rows of ``t``: a view for a slice, a gathered copy for an index tensor."""
    return t[rows] if isinstance(rows, slice) else t.index_select(0, rows)


def put(dst: torch.Tensor, rows, src: torch.Tensor) -> None:
    if isinstance(rows, slice):
        dst[rows] = src
    else:
        dst.index_copy_(0, rows, src.to(dst.dtype))


def head_logits(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """One chunk of logits ``h @ weight.T + bias`` in the input dtype (a fresh buffer, or written into ``out``)."""
    if bias is None:
        return torch.mm(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


class ChunkLogits:
    """GEMM 1 of a chunk loop into one ``[chunk, V]`` buffer reused by every chunk.

    Why: on CPU a fresh chunk of logits (64 MiB at the default size) is above glibc's largest mmap threshold
    (32 MiB), so every chunk paid for mapping, zero-filling and unmapping its pages: 1.068x the GEMM floor
    against 1.019x with the buffer, native backend at the DESIGN.md CPU size (2026-11-30). Each chunk's logits
    are dead once its gradient GEMMs have run, so the next chunk overwrites them. Under torch.compile the loop
    allocates per chunk as before (no ``out=`` in the graph).
    """

    def __init__(self, plan_rows: int, chunk: int, like: torch.Tensor, num_classes: int):
        rows = min(chunk, plan_rows)
        self.buf = None
        if rows > 0 and not torch.compiler.is_compiling():
            self.buf = torch.empty(rows, num_classes, dtype=like.dtype, device=like.device)

    def __call__(self, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        fits = self.buf is not None and h.shape[0] <= self.buf.shape[0]
        out = self.buf[: h.shape[0]] if fits else None
        return head_logits(h, weight, bias, out=out)


_MIXED_ADDMM_OK: dict[torch.device, bool] = {}


def accumulate_weight_grad(acc: torch.Tensor, dz: torch.Tensor, h: torch.Tensor, alpha: float = 1.0) -> None:
    """acc += alpha * dz.T @ h with ``acc`` in fp32 (fp64) whatever the dtype of dz and h.

    Same dtypes: an in-place addmm. bf16/fp16 on CUDA: addmm with ``out_dtype=float32`` writes straight into
    the fp32 accumulator (PyTorch >= 2.8); elsewhere the chunk's product is formed in the input dtype (with
    fp32 accumulation inside the GEMM) and added to the fp32 accumulator.
    """
    if dz.dtype == acc.dtype:
        acc.addmm_(dz.t(), h, alpha=alpha)
        return
    dev = acc.device
    if dev.type == "cuda" and _MIXED_ADDMM_OK.get(dev, True):
        try:
            torch.addmm(acc, dz.t(), h, alpha=alpha, out_dtype=acc.dtype, out=acc)
            _MIXED_ADDMM_OK[dev] = True
            return
        except (TypeError, RuntimeError):
            _MIXED_ADDMM_OK[dev] = False
    acc.add_(torch.mm(dz.t(), h), alpha=alpha)


def reduction_scale(plan: RowPlan, reduction: str, dtype: torch.dtype):
    """``(scale, row_scale)``: the factor turning the sum of row losses into ``reduction``, and the per-chunk
    gradient weight ``row_scale(rows, c)`` (a float, or a per-row device tensor in sync-free mode, where
    1/n_valid never leaves the device)."""
    if reduction == "mean" and torch.is_tensor(plan.n_valid):
        scale = 1.0 / plan.n_valid.clamp(min=1).to(dtype)
        return scale, lambda rows, c: scale.expand(c)
    scale = 1.0 / max(plan.n_valid, 1) if reduction == "mean" else 1.0
    return scale, lambda rows, c: scale


def finish_head_grads(grads, grad_out, h_dtype: torch.dtype, w_dtype: torch.dtype):
    """Scale gradients formed in the forward pass by the incoming gradient (None: already applied per row)
    and cast them to the parameters' dtypes (the weight gradient was accumulated in fp32)."""
    gh, gw, gb = grads
    if grad_out is not None:
        gh, gw, gb = (g.mul_(grad_out) if g is not None else None for g in (gh, gw, gb))
    return (gh.to(h_dtype) if gh is not None else None, gw.to(w_dtype) if gw is not None else None,
            gb.to(w_dtype) if gb is not None else None)
