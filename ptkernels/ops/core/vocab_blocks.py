"""The compact-memory weight gradient (``memory="compact"``): dW and db of a per-row loss over an output head,
one block of the vocabulary at a time, with no ``[V, D]`` accumulator in fp32.

The default backward (chunking.py) walks chunks of rows and adds each chunk's ``dz.T @ h`` into one fp32
``[V, D]`` accumulator, rounded to the weight's dtype at the end: for bf16 weights that buffer is twice the
gradient itself (on an H200 at N=8192, D=4096, V=128256: 2004 MiB of a 3070 MiB peak, against a dX + dW floor
of 1066 MiB). Here the loops are turned around, once every row's log-sum-exp is known (the op's chunk loop
keeps it, and forms dX there with the whole vocabulary in one GEMM, as the default path does):

    for each block [v0, v1) of the vocabulary:            acc = 0   (fp32 [Vb, D], one buffer for all blocks)
        for each tile of rows:
            z    = h_t @ W[v0:v1].T (+ b[v0:v1])            GEMM 1 again (the extra pass)
            g    = d loss / d z from each row's lse          the backend's grad_block (base.py)
            acc += g.T @ h_t                                 GEMM 3
            db[v0:v1] += g.sum(0)
        dW[v0:v1] = acc                                      one rounding to the weight's dtype

Numerics: every element of dW is an fp32 sum over all rows, rounded once to the weight's dtype, as on the
default path; only the order of the sum differs (tiles of rows instead of chunks). For fp32 (fp64) weights
the gradient itself is the accumulator. Cost: GEMM 1 runs once more over every row and the whole vocabulary
(4 GEMMs instead of 3 for a reduced loss, 5 instead of 4 for ``reduction="none"`` and token log-probs), plus
one elementwise pass per tile; the memory beyond dX + dW is one ``[Vb, D]`` accumulator, one tile of logits
and one tile of gathered rows (``block_shape``).
"""

from __future__ import annotations

import torch

from ...types import compute_dtype
from . import gemm
from .chunking import RowPlan, put, take

# Bytes of the per-block fp32 accumulator and logits per tile. CUDA: 32 MiB ([2048, 4096] fp32) and 2^24
# logits (8192 rows x 2048 columns, 32 MiB in bf16): at N=8192, D=4096, V=128256 the accumulator, a tile and
# its gathered rows (64 MiB) add ~128 MiB (12%) to the 1066 MiB dX + dW floor, and every GEMM side is >= 2048.
# The chunk loop's own [chunk, V] logits are freed before dW is allocated, so they do not add to that peak.
# CPU: 16 MiB and 2^22 logits, under glibc's mmap threshold (gemm.CPU_FRESH_BUFFER_BYTES) like the chunk loop.
ACC_BYTES = {"cuda": 1 << 25, "cpu": 1 << 24}
TILE_LOGITS = {"cuda": 1 << 24, "cpu": 1 << 22}


def _pow2_floor(x: int) -> int:
    return 1 << (max(int(x), 1).bit_length() - 1)


def block_shape(num_classes: int, dim: int, device: torch.device) -> tuple[int, int]:
    """(vocabulary columns per block, rows per tile) for a ``[num_classes, dim]`` head on ``device``."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    vb = min(_pow2_floor(max(ACC_BYTES[kind] // (4 * max(dim, 1)), 256)), max(num_classes, 1))
    rows = min(_pow2_floor(max(TILE_LOGITS[kind] // vb, 256)), 8192 if kind == "cuda" else 4096)
    return vb, rows


def ce_coefficients(lse: torch.Tensor, scale, z_loss: float, label_smoothing: float, num_classes: int):
    """grad_block's per-row (A, B, M, C, D) for cross-entropy with gradient weight ``scale`` (a float or a [N]
    tensor): d loss / d s = a [p (1 + 2 c lse) - eps / V - (1 - eps) onehot]."""
    a = scale if torch.is_tensor(scale) else torch.full_like(lse, float(scale))
    a = a.to(lse.dtype).expand(lse.shape)
    zero = torch.zeros_like(lse)
    big_a = a * (1.0 + 2.0 * z_loss * lse) if z_loss else a
    return torch.stack((big_a, zero, zero, a * (-label_smoothing / num_classes), a * -(1.0 - label_smoothing)), 1)


def logprob_coefficients(g_logp: torch.Tensor, g_ent: torch.Tensor | None, mean_s: torch.Tensor | None):
    """(coef, has_b) for log-probs (and entropies): d/ds [g_logp logp + g_H H] = g_logp onehot
    - p (g_logp + g_H (s - E_p[s]))."""
    zero = torch.zeros_like(g_logp)
    if g_ent is None:
        return torch.stack((-g_logp, zero, zero, zero, g_logp), 1), False
    return torch.stack((-g_logp, -g_ent.to(g_logp.dtype), mean_s.to(g_logp.dtype), zero, g_logp), 1), True


def weight_grads(hidden2d, weight, bias, labels1d, lse, coef, has_b: bool, plan, block_rows, o,
                 need_dw: bool, need_db: bool):
    """(dW in the weight's dtype or None, db in the compute dtype or None) of the rows of ``plan`` (module
    docstring). ``coef [N, 5]``: grad_block's per-row coefficients (``ce_coefficients``,
    ``logprob_coefficients``); ``lse [N]``: each row's log-sum-exp from the forward."""
    cd = compute_dtype(hidden2d.dtype)
    v, d = weight.shape
    vb, tile = block_shape(v, d, hidden2d.device)
    gw = torch.empty(v, d, dtype=weight.dtype, device=weight.device) if need_dw else None
    gb = torch.zeros(v, dtype=cd, device=weight.device) if need_db else None
    direct = weight.dtype == cd  # fp32/fp64 weights: the gradient itself is the accumulator
    acc = torch.empty(min(vb, v), d, dtype=cd, device=weight.device) if need_dw and not direct else None
    for v0 in range(0, v, vb):
        v1 = min(v0 + vb, v)
        w_b = weight[v0:v1]
        b_b = bias[v0:v1] if bias is not None else None
        a = None
        if need_dw:
            a = gw[v0:v1] if direct else acc[: v1 - v0]
            a.zero_()
        for rows in plan.chunks(tile):
            h = take(hidden2d, rows)
            z = gemm.logits(h, w_b, b_b)
            g = block_rows.grad_block(z, take(labels1d, rows), take(lse, rows), take(coef, rows), v0, o,
                                      has_b=has_b)
            if g.dtype != weight.dtype:  # the torch rows return fp32 work buffers; the GEMMs run in the input dtype
                g = g.to(weight.dtype)
            if a is not None:
                gemm.accumulate_weight_grad(a, g, h)
            if gb is not None:
                gb[v0:v1] += g.sum(dim=0, dtype=cd)
        if a is not None and not direct:
            gw[v0:v1].copy_(a)
    return gw, gb


class TokenRows:
    """What the weight pass needs of each row a loop scores, collected as the loop goes (for ops whose per-row
    coefficients are known only inside their own loop, e.g. fused GRPO): flat ``[N]`` lse, d loss / d logp and,
    with an entropy term, d loss / d H and E_p[s] (0 at rows never scored), and the rows themselves."""

    def __init__(self, n: int, dtype: torch.dtype, device, entropy: bool):
        zeros = lambda: torch.zeros(n, dtype=dtype, device=device)  # noqa: E731
        self.n, self.rows = n, []
        self.lse, self.g_logp = zeros(), zeros()
        self.g_ent, self.mean_s = (zeros(), zeros()) if entropy else (None, None)

    def put(self, rows, lse, g_logp, g_ent, mean_s) -> None:
        """One chunk's rows (a slice or an index tensor) and their values."""
        self.rows.append(rows)
        put(self.lse, rows, lse)
        put(self.g_logp, rows, g_logp)
        if self.g_ent is not None:
            put(self.g_ent, rows, g_ent)
            put(self.mean_s, rows, mean_s)

    def coefficients(self, grad_out: torch.Tensor):
        """(coef, has_b) with the incoming scalar gradient folded in, so dW is rounded once."""
        g = grad_out.to(self.g_logp.dtype)
        return logprob_coefficients(self.g_logp.mul_(g), None if self.g_ent is None else self.g_ent.mul_(g),
                                    self.mean_s)

    def plan(self, chunk: int) -> RowPlan:
        """The rows seen, as a plan: slices when they were consecutive slices over all ``n`` rows (sync-free
        loops), else their index tensors in order."""
        ends = [0] + [r.stop for r in self.rows if isinstance(r, slice)]
        if all(isinstance(r, slice) and r.start == e for r, e in zip(self.rows, ends)) and ends[-1] == self.n:
            return RowPlan.of_rows(None, self.n, chunk)
        dev = self.lse.device
        parts = [torch.arange(r.start, r.stop, device=dev) if isinstance(r, slice) else r for r in self.rows]
        return RowPlan.of_rows(torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long, device=dev),
                               self.n, chunk)
