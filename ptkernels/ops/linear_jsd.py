"""Fused linear generalized JSD / KL between two models' distributions, from hidden states and heads.

For distillation (GKD, TRL's ``GKDTrainer``) and exact full-vocabulary KL to a reference model, without the
``[N, V]`` logits of either model. The loop (one chunk of valid rows at a time):

    z_s = h_c @ W.T (+ b)                         GEMM 1, student logits of the chunk
    z_t = h_ref_c @ W_ref.T (+ b_ref)             GEMM 2, teacher logits, no gradient
    row kernel: loss_c, and dz_s = dloss/dz_s written in place of z_s (fp32 math; see below)
    dh_c = dz_s @ W                               GEMM 3
    dW  += dz_s.T @ h_c  (fp32 accumulator)       GEMM 4
The loss is per row and the reduction's scale is known up front for "mean" and "sum", so the gradients are
formed in the forward pass and backward only scales them. For ``reduction="none"`` backward recomputes both
chunks of logits with the per-row incoming gradient. With no gradient needed, only GEMMs 1 and 2 run.

Row math (``JSDRowOptions``; P the teacher, Q the student, s = z_s / T, t = z_t / T)::

    beta = 0        loss = KL(P || Q)                          dloss/ds = q - p
    beta = 1        loss = KL(Q || P)                          dloss/ds = q (log q - log p - loss)
    0 < beta < 1    M = beta P + (1 - beta) Q
                    loss = beta KL(P || M) + (1 - beta) KL(Q || M)
                    dloss/ds = (1 - beta) q (log q - log m - KL(Q || M))
    dloss/dz_s = dloss/ds / T

Derivation (0 < beta < 1): loss = beta sum p log p + (1 - beta) sum q log q - sum m log m. With
dq_v/ds_j = q_v (delta_vj - q_j): d/ds_j sum q log q = q_j (log q_j - E_q[log q]) and
d/ds_j sum m log m = (1 - beta) q_j (log m_j - E_q[log m]); the difference is the formula above. At beta = 1,
d/ds_j sum q (log q - log p) = q_j (log q_j - log p_j) - q_j loss; at beta = 0, d/ds sum p (log p - log q) =
q - p. Row implementations: ``TorchJSDRows`` (PyTorch ops, any device) and ``TritonJSDRows``
(ptkernels/kernels/jsd_rows.py, one program per row).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..reference import distill as reference
from . import gemm
from .checks import check_float, check_head, check_labels, check_options, check_same
from .chunking import (
    ChunkLogits,
    RowPlan,
    default_chunk_size,
    finish_head_grads,
    put,
    reduction_scale,
    take,
    want_sync_free,
)
from .dispatch import resolve_backend
from .linear_cross_entropy import apply_head_grads
from .logit_rows import compute_dtype

KL_DIRECTIONS = ("forward", "reverse")


@dataclass(frozen=True)
class JSDRowOptions:
    beta: float = 0.5
    temperature: float = 1.0
    ignore_index: int = -100

    @property
    def mode(self) -> int:
        """0: forward KL (beta = 0), 1: reverse KL (beta = 1), 2: the mixture (0 < beta < 1)."""
        return 0 if self.beta == 0.0 else 1 if self.beta == 1.0 else 2


# ---------------------------------------------------------------------------------------------------------
# Row implementations. Interface (TorchJSDRows is the spec):
#     jsd(zs, zt, labels, o, *, want_grad, grad_scale=None, scratch=False) -> (loss [c], grad [c, V] or None)
# zs, zt: [c, V] student and teacher logits (any float dtypes); labels: [c] or None (every row valid).
# grad = dloss_i / dzs_i times grad_scale[i] (a [c] tensor, or None for 1), 0 at ignored rows; computed in
# fp32 (fp64 for fp64 zs). ``scratch`` lets the implementation overwrite zs with the gradient.


class TorchJSDRows:
    name = "torch"

    def jsd(self, zs, zt, labels, o: JSDRowOptions, *, want_grad=False, grad_scale=None, scratch=False):
        cd = compute_dtype(zs.dtype)
        s = zs.to(cd)
        t = zt.to(cd)
        if o.temperature != 1.0:
            s = s / o.temperature
            t = t / o.temperature
        log_q = torch.log_softmax(s, dim=1)
        log_p = torch.log_softmax(t, dim=1)
        del s, t
        q = log_q.exp()
        mode, beta = o.mode, o.beta
        if mode == 0:
            p = log_p.exp()
            loss = (p * (log_p - log_q)).sum(dim=1)
            g = q.sub_(p) if want_grad else None
        elif mode == 1:
            r = log_q.sub_(log_p)  # log q - log p
            loss = (q * r).sum(dim=1)
            g = r.sub_(loss.unsqueeze(1)).mul_(q) if want_grad else None
        else:
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=1)
            d = log_q.sub_(log_m)  # log q - log m
            kl_q = (q * d).sum(dim=1)
            loss = beta * kl_p + (1.0 - beta) * kl_q
            g = d.sub_(kl_q.unsqueeze(1)).mul_(q).mul_(1.0 - beta) if want_grad else None
        zero = torch.zeros((), dtype=cd, device=zs.device)
        valid = None if labels is None else labels != o.ignore_index
        if valid is not None:
            loss = torch.where(valid, loss, zero)
        if not want_grad:
            return loss, None
        coef = torch.full((zs.shape[0],), 1.0 / o.temperature, dtype=cd, device=zs.device)
        if grad_scale is not None:
            coef = coef * grad_scale.to(cd)
        if valid is not None:
            coef = torch.where(valid, coef, zero)
        g.mul_(coef.unsqueeze(1))
        return loss, g


JSD_MAX_BLOCK_V = 2048


def jsd_block_v(n_cols: int) -> int:
    """Columns per loop step of ``jsd_rows_kernel``: half the other row kernels' cap, because each step holds a
    block of the student's and of the teacher's logits (at 4096 columns, fp32, 8 warps, Triton 3.6 spilled)."""
    from .triton_rows import block_v

    return min(JSD_MAX_BLOCK_V, block_v(n_cols))


class TritonJSDRows:
    """Launches ``jsd_rows_kernel`` (ptkernels/kernels/jsd_rows.py) behind the TorchJSDRows interface."""

    name = "triton"

    def jsd(self, zs, zt, labels, o: JSDRowOptions, *, want_grad=False, grad_scale=None, scratch=False):
        from ..kernels.jsd_rows import jsd_rows_kernel
        from .grpo import split_fp32
        from .triton_rows import _row_major, _tl_compute, num_warps

        zs = _row_major(zs, "logits")
        zt = _row_major(zt, "ref_logits")
        n, v = zs.shape
        cd = compute_dtype(zs.dtype)
        loss = torch.empty(n, dtype=cd, device=zs.device)
        grad = None
        if want_grad:
            grad = zs if scratch else torch.empty_like(zs)
        if n == 0:
            return loss, grad
        if want_grad:
            scale = grad_scale.to(cd) if grad_scale is not None else torch.ones((), dtype=cd, device=zs.device)
            g_ptr, g_stride, s_stride = grad, grad.stride(0), (scale.stride(0) if scale.dim() else 0)
        else:  # dummies: WRITE_GRAD=False never touches them
            g_ptr, g_stride, scale, s_stride = zs, 0, loss, 0
        has_labels = labels is not None
        bv = jsd_block_v(v)
        jsd_rows_kernel[(n,)](
            zs, zs.stride(0), zt, zt.stride(0), g_ptr, g_stride, labels if has_labels else loss, scale, s_stride,
            loss, v, o.ignore_index, *split_fp32(float(o.beta)), *split_fp32(1.0 / o.temperature),
            MODE=o.mode, HAS_LABELS=has_labels, WRITE_GRAD=want_grad, BLOCK_V=bv, COMPUTE=_tl_compute(zs.dtype),
            num_warps=num_warps(bv),
        )
        return loss, grad


TORCH_JSD_ROWS = TorchJSDRows()
TRITON_JSD_ROWS = TritonJSDRows()


def get_jsd_rows(backend: str):
    """The JSD row implementation for a resolved backend name."""
    if backend == "torch":
        return TORCH_JSD_ROWS
    if backend == "triton":
        return TRITON_JSD_ROWS
    raise RuntimeError(f"backend={backend!r} has no linear_jsd row kernels; use 'torch' (any device), "
                       f"'triton' (CUDA) or 'reference'")


# ---------------------------------------------------------------------------------------------------------
# Chunk loop and autograd


class _AllRows:
    """RowPlan's interface when there are no labels: every row is valid, contiguous slices, no synchronization,
    and the number of valid rows is known on the host."""

    index = None

    def __init__(self, n_rows: int, chunk: int):
        self.n_rows = self.n_valid = self.n_process = n_rows
        self.chunk = chunk

    def chunks(self):
        for start in range(0, self.n_rows, self.chunk):
            yield slice(start, min(start + self.chunk, self.n_rows))


def _plan(labels1d, n: int, ignore_index: int, chunk: int, sync_free: bool):
    return _AllRows(n, chunk) if labels1d is None else RowPlan(labels1d, ignore_index, chunk, sync_free)


def _jsd_chunk_loop(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d, plan,
                    rows_impl, o: JSDRowOptions, row_scale, need_dh: bool, need_dw: bool, need_db: bool):
    """Runs the chunk loop. ``row_scale(rows, c)`` gives the gradient weight (float or per-row tensor), or is
    None when no gradient is wanted."""
    cd = compute_dtype(hidden2d.dtype)
    n, d = hidden2d.shape
    v = weight.shape[0]
    loss = torch.zeros(n, dtype=cd, device=hidden2d.device)
    grads = row_scale is not None
    gh = torch.zeros_like(hidden2d) if grads and need_dh else None
    gw = gemm.weight_grad_buffer(weight, hidden2d, cd) if grads and need_dw else None
    gb = torch.zeros(v, dtype=cd, device=weight.device) if grads and need_db else None
    student_logits = ChunkLogits(plan.n_process, plan.chunk, hidden2d, weight)
    teacher_logits = ChunkLogits(plan.n_process, plan.chunk, ref_hidden2d, ref_weight)
    for rows in plan.chunks():
        h = take(hidden2d, rows)
        zs = student_logits(h, weight, bias)
        with torch.no_grad():
            zt = teacher_logits(take(ref_hidden2d, rows), ref_weight, ref_bias)
        labels_c = None if labels1d is None else take(labels1d, rows)
        scale = row_scale(rows, h.shape[0]) if grads else None
        # A per-row scale (sync-free mean, reduction "none") goes into the row kernel; a float is applied on
        # the D side of the GEMMs.
        per_row = torch.is_tensor(scale)
        loss_c, g = rows_impl.jsd(zs, zt, labels_c, o, want_grad=grads, grad_scale=scale if per_row else None,
                                  scratch=True)
        del zt
        put(loss, rows, loss_c)
        if grads:
            apply_head_grads(g, h, weight, rows, 1.0 if per_row else scale, gh, gw, gb)
    return loss, gh, gw, gb


class LinearJSDFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d, o: JSDRowOptions,
                reduction: str, chunk: int, rows_impl, sync_free: bool):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        any_grad = need_dh or need_dw or need_db
        plan = _plan(labels1d, hidden2d.shape[0], o.ignore_index, chunk, sync_free)
        cd = compute_dtype(hidden2d.dtype)
        precompute = any_grad and reduction != "none"
        scale, row_scale = reduction_scale(plan, reduction, cd)
        loss, gh, gw, gb = _jsd_chunk_loop(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d,
                                           plan, rows_impl, o, row_scale if precompute else None, need_dh,
                                           need_dw, need_db)
        ctx.mode = "precomputed" if precompute else "recompute"
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        if precompute:
            ctx.grads = (gh, gw, gb)
        elif any_grad:
            ctx.save_for_backward(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d)
            ctx.args = (o, chunk, rows_impl, sync_free, need_dh, need_dw, need_db)
        if reduction == "none":
            return loss
        total = loss.sum()
        return total * scale if reduction == "mean" else total

    @staticmethod
    def backward(ctx, grad_out):
        h_dtype, w_dtype = ctx.dtypes
        if ctx.mode == "precomputed":
            gh, gw, gb = ctx.grads
            ctx.grads = None
        else:
            hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d = ctx.saved_tensors
            o, chunk, rows_impl, sync_free, need_dh, need_dw, need_db = ctx.args
            plan = _plan(labels1d, hidden2d.shape[0], o.ignore_index, chunk, sync_free)
            g = grad_out.to(compute_dtype(h_dtype))
            _, gh, gw, gb = _jsd_chunk_loop(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d,
                                            plan, rows_impl, o, lambda rows, c: take(g, rows), need_dh, need_dw,
                                            need_db)
            grad_out = None  # already applied per row
        gh, gw, gb = finish_head_grads((gh, gw, gb), grad_out, h_dtype, w_dtype)
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


# ---------------------------------------------------------------------------------------------------------
# Public functions


def _check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias) -> None:
    check_head(hidden, weight, bias)
    check_float("ref_hidden", ref_hidden)
    check_float("ref_weight", ref_weight)
    if ref_weight.dim() != 2:
        raise ValueError(f"ref_weight must be 2-D [V, D_ref], got shape {tuple(ref_weight.shape)}")
    if ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(
            f"weight has shape {tuple(weight.shape)} but ref_weight has shape {tuple(ref_weight.shape)}: the two "
            f"heads must share the vocabulary (V={weight.shape[0]} vs V={ref_weight.shape[0]})"
        )
    if ref_hidden.dim() < 1 or ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(
            f"ref_hidden has shape {tuple(ref_hidden.shape)} but ref_weight has shape {tuple(ref_weight.shape)}: "
            f"ref_hidden's last dim must equal ref_weight's D={ref_weight.shape[1]}"
        )
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"hidden has shape {tuple(hidden.shape)} but ref_hidden has shape {tuple(ref_hidden.shape)}: "
            f"their leading (token) dims must match"
        )
    check_same("ref_hidden", ref_hidden, "ref_weight", ref_weight)
    check_same("hidden", hidden, "ref_hidden", ref_hidden, dtype=False)
    if ref_bias is not None:
        check_float("ref_bias", ref_bias)
        if tuple(ref_bias.shape) != (ref_weight.shape[0],):
            raise ValueError(
                f"ref_bias has shape {tuple(ref_bias.shape)} but ref_weight implies ({ref_weight.shape[0]},)")
        check_same("ref_bias", ref_bias, "ref_weight", ref_weight)


def linear_jsd(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Generalized Jensen-Shannon divergence between a reference (teacher) model's next-token distribution
    and the student's, from hidden states and output heads, never building either model's logits.

    Per token, as TRL's ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel's ``LigerFusedLinearJSD``::

        Q = softmax((hidden @ weight.T + bias) / temperature)               student
        P = softmax((ref_hidden @ ref_weight.T + ref_bias) / temperature)   reference / teacher (no gradient)
        M = beta * P + (1 - beta) * Q
        loss = beta * KL(P || M) + (1 - beta) * KL(Q || M)                  0 < beta < 1
        beta = 0: loss = KL(P || Q)  (forward KL);   beta = 1: loss = KL(Q || P)  (reverse KL)

    Args:
        hidden: ``[..., D]`` student hidden states; ``weight``: ``[V, D]`` student head; ``bias``: ``[V]``.
        ref_hidden: ``[..., D_ref]`` reference hidden states (same leading dims; D_ref may differ from D);
            ``ref_weight``: ``[V, D_ref]`` (same V); ``ref_bias``: ``[V]``. These never receive gradients and
            may have another float dtype than the student's.
        labels: optional ``[...]`` integer tensor; rows where it equals ``ignore_index`` are skipped before any
            matmul. None: every row counts.
        beta: in [0, 1]; the weight of the teacher in the mixture M.
        temperature: divides both models' logits.
        reduction: "mean" (over the kept rows; 0 when there are none), "sum" or "none" (``[...]``, 0 at
            ignored rows).
        chunk_size, sync_free, backend: as in ``linear_cross_entropy``; ``backend`` is "auto", "reference",
            "torch" or "triton".

    Returns the loss in fp32 (fp64 for fp64 student input). Gradients flow into hidden, weight and bias only.
    """
    _check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    check_options(reduction=reduction, temperature=temperature, chunk_size=chunk_size)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if labels is not None:
        check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden")
    name = resolve_backend(backend, hidden.device)
    if backend == "auto" and name == "native":  # no native JSD kernels: the chunked PyTorch rows on CPU
        name = "torch"
    ref_hidden, ref_weight = ref_hidden.detach(), ref_weight.detach()
    ref_bias = None if ref_bias is None else ref_bias.detach()
    if name == "reference":
        return reference.linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, bias=bias,
                                    ref_bias=ref_bias, beta=beta, ignore_index=ignore_index,
                                    temperature=temperature, reduction=reduction)
    rows_impl = get_jsd_rows(name)
    o = JSDRowOptions(beta=beta, temperature=float(temperature), ignore_index=ignore_index)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype)
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    ref_hidden2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    labels1d = None if labels is None else labels.reshape(-1)
    out = LinearJSDFunction.apply(hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d, o,
                                  reduction, chunk, rows_impl, want_sync_free(sync_free, hidden.device))
    return out.view(hidden.shape[:-1]) if reduction == "none" else out


def linear_kl_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    direction: str = "forward",
    labels: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Exact full-vocabulary KL between the student ``Q`` (hidden, weight) and a reference ``P`` (ref_hidden,
    ref_weight) per token, without logits: ``linear_jsd`` at its two ends.

        direction="forward":  KL(P || Q) = sum_v P log(P / Q)    (beta = 0; distillation's usual KL)
        direction="reverse":  KL(Q || P) = sum_v Q log(Q / P)    (beta = 1; KL to a reference policy)

    Other arguments as in ``linear_jsd``.
    """
    if direction not in KL_DIRECTIONS:
        raise ValueError(f"direction must be one of {KL_DIRECTIONS}, got {direction!r}")
    return linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, bias=bias, ref_bias=ref_bias,
                      beta=0.0 if direction == "forward" else 1.0, ignore_index=ignore_index,
                      temperature=temperature, reduction=reduction, chunk_size=chunk_size, sync_free=sync_free,
                      backend=backend)


# ---------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (for ptkernels/kernels/aot.py's no-spill check)


def aot_kernel_specs(vocabs=(32000, 128256), dtypes=("bf16", "fp32")):
    """``KernelSpec``s of ``jsd_rows_kernel`` as ``TritonJSDRows`` launches it: every MODE, with and without
    the gradient pass, with labels; row-major chunks (stride V) and a stride-0 expanded gradient scale."""
    import torch

    from ..kernels import aot
    from . import triton_rows as launch

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    specs = []
    for v in vocabs:
        bv = jsd_block_v(v)
        for name in dtypes:
            dt = torch_dtypes[name]
            z, out = aot._ptr(dt), aot._ptr(compute_dtype(dt))
            for mode in (0, 1, 2):
                for write_grad in (False, True):
                    specs.append(aot.KernelSpec(
                        kernel="ptkernels.kernels.jsd_rows:jsd_rows_kernel",
                        args=(("zs_ptr", z), ("zs_stride", v), ("zt_ptr", z), ("zt_stride", v), ("grad_ptr", z),
                              ("grad_stride", v if write_grad else 0), ("labels_ptr", aot._ptr(torch.int64)),
                              ("scale_ptr", out), ("scale_stride", 0), ("loss_ptr", out), ("n_cols", v),
                              ("ignore_index", -100), ("beta_hi", 0.5), ("beta_lo", 0.0), ("inv_temp_hi", 1.0),
                              ("inv_temp_lo", 0.0)),
                        constexprs=(("MODE", mode), ("HAS_LABELS", True), ("WRITE_GRAD", write_grad),
                                    ("BLOCK_V", bv), ("COMPUTE", launch._tl_compute(dt).name)),
                        num_warps=launch.num_warps(bv), dtype=name, vocab=(v,), tag=f"mode{mode}-V{v}"))
    return specs
