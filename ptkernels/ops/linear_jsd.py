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
q - p. Row implementations: ``TorchJSDRows`` (ptkernels/ops/backends/torch.py, PyTorch ops, any device) and
``TritonJSDRows`` (ptkernels/ops/backends/triton.py launching ptkernels/kernels/jsd.py, one program per row).
"""

from __future__ import annotations

import torch

from ..reference import distill as reference
from ..types import compute_dtype
from . import backends
from .backends.base import JSDRowOptions
from .core import gemm
from .core.checks import check_head, check_labels, check_options, check_ref_head
from .core.chunking import (
    ChunkLogits,
    RowPlan,
    apply_head_grads,
    default_chunk_size,
    put,
    take,
    want_sync_free,
)
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd
from .core.head_loss import head_loss_backward, head_loss_forward

KL_DIRECTIONS = ("forward", "reverse")


# ---------------------------------------------------------------------------------------------------------
# Chunk loop and autograd


class _AllRows:
    """RowPlan's interface when there are no labels: every row is valid, contiguous slices, no synchronization,
    and the number of valid rows is known on the host."""

    index = None

    def __init__(self, n_rows: int, chunk: int):
        self.n_rows = self.n_valid = self.n_process = n_rows
        self.chunk = chunk
        self.rows_per_chunk = min(chunk, n_rows)

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
    gw = (gemm.weight_grad_buffer(weight, hidden2d, cd, plan.rows_per_chunk, plan.n_process)
          if grads and need_dw else None)
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
        del zs, g  # dead: freed before the next chunk's GEMM 1 (one chunk alive, not two)
    return loss, gh, gw, gb


class LinearJSDFunction(torch.autograd.Function):
    """Precompute-or-recompute (ops/core/head_loss.py) over ``_jsd_chunk_loop``."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d, o: JSDRowOptions,
                reduction: str, chunk: int, rows_impl, sync_free: bool):
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ctx.args = (o, chunk, rows_impl, sync_free, need)
        run, make_plan = LinearJSDFunction._loop(ctx.args)
        tensors = (hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias, labels1d)
        return head_loss_forward(ctx, tensors, run, make_plan, reduction, need)

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = head_loss_backward(ctx, grad_out, *LinearJSDFunction._loop(ctx.args))
        return gh, gw, gb, None, None, None, None, None, None, None, None, None

    @staticmethod
    def _loop(args):
        o, chunk, rows_impl, sync_free, need = args

        def make_plan(tensors):
            return _plan(tensors[6], tensors[0].shape[0], o.ignore_index, chunk, sync_free)

        def run(tensors, plan, row_scale):
            return _jsd_chunk_loop(*tensors, plan, rows_impl, o, row_scale, *need)

        return run, make_plan


# ---------------------------------------------------------------------------------------------------------
# Public functions


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

    Per token, as TRL 1.16's ``GKDTrainer.generalized_jsd_loss`` and Liger-Kernel 0.8.5's ``LigerFusedLinearJSD``::

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
        reduction: "mean" (over the kept rows, a per-token mean; 0 when there are none: TRL 1.16's
            ``DistillationTrainer`` and Liger 0.8.5's divisor, and TRL's GKD ``batchmean`` when labels are given),
            "batchmean" (TRL 1.16 ``GKDTrainer.generalized_jsd_loss``'s exactly: with labels as "mean"; without
            labels the sum divided by the leading dimension, B for ``[B, T, D]`` hidden states), "sum" or "none"
            (``[...]``, 0 at ignored rows).
        chunk_size, sync_free, backend: as in ``linear_cross_entropy``; ``backend`` is "auto", "reference",
            "torch" or "triton".

    Returns the loss in fp32 (fp64 for fp64 student input). Gradients flow into hidden, weight and bias only.
    """
    if reduction == "batchmean":  # TRL's GKD: per token with labels; without, sum / leading dimension
        if labels is not None:
            reduction = "mean"
        else:
            total = linear_jsd(hidden, weight, ref_hidden, ref_weight, bias=bias, ref_bias=ref_bias, beta=beta,
                               ignore_index=ignore_index, temperature=temperature, reduction="sum",
                               chunk_size=chunk_size, sync_free=sync_free, backend=backend)
            return total / max(hidden.shape[0] if hidden.dim() > 1 else 1, 1)
    check_head(hidden, weight, bias)
    ref_hidden, ref_weight, ref_bias = check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    check_options(reduction=reduction, temperature=temperature, chunk_size=chunk_size)
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    if labels is not None:
        check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden")
    name = resolve_backend(backend, hidden.device)
    if backend == "auto" and name == "native":  # no native JSD kernels: the chunked PyTorch rows on CPU
        name = "torch"
    if name == "reference":
        return reference.linear_jsd(hidden, weight, ref_hidden, ref_weight, labels=labels, bias=bias,
                                    ref_bias=ref_bias, beta=beta, ignore_index=ignore_index,
                                    temperature=temperature, reduction=reduction)
    rows_impl = backends.get(name, "JSD_ROWS")
    o = JSDRowOptions(beta=beta, temperature=float(temperature), ignore_index=ignore_index)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype, hidden.shape[-1])
    hidden2d = hidden.reshape(-1, hidden.shape[-1])
    ref_hidden2d = ref_hidden.reshape(-1, ref_hidden.shape[-1])
    labels1d = None if labels is None else labels.reshape(-1)
    hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias = for_autograd(
        hidden2d, weight, bias, ref_hidden2d, ref_weight, ref_bias)
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
