"""Eager definitions of the distillation losses: the spec and the test oracle (full logits on purpose).

Generalized Jensen-Shannon divergence between a teacher (reference) distribution ``P`` and a student
distribution ``Q`` over the vocabulary, per token, as in TRL's ``GKDTrainer.generalized_jsd_loss`` (Eq. 1 of
the GKD paper, arXiv:2306.13649) and Liger-Kernel's ``LigerFusedLinearJSD``::

    P = softmax(teacher_logits / temperature)     (no gradient flows into the teacher)
    Q = softmax(student_logits / temperature)
    M = beta * P + (1 - beta) * Q
    JSD_beta = beta * KL(P || M) + (1 - beta) * KL(Q || M)        0 < beta < 1
    beta = 0:  KL(P || Q)   forward KL (teacher || student), mass covering
    beta = 1:  KL(Q || P)   reverse KL (student || teacher), mode seeking

The two ends are special cases, as in TRL and Liger, not the limits of the mixture formula (which tends to 0
at both ends). Each KL sums over the whole vocabulary. Rows whose label is ``ignore_index`` are skipped;
``reduction="mean"`` divides by the number of kept rows, 0 when there are none (TRL 1.16's
``DistillationTrainer``, Liger 0.8.5, and TRL's GKD "batchmean" when labels are given); ``"batchmean"`` is TRL
1.16 ``GKDTrainer.generalized_jsd_loss``'s: with labels the same, without labels ``sum / size(0)`` (B for
``[B, T, V]`` logits, not B * T).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..types import compute_dtype
from .cross_entropy import reduce_losses, transform_logits


def generalized_jsd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    beta: float = 0.5,
    ignore_index: int = -100,
    temperature: float = 1.0,
    reduction: str = "mean",
) -> torch.Tensor:
    """Per-token generalized JSD between ``softmax(teacher/T)`` and ``softmax(student/T)`` (module docstring).

    ``student_logits`` and ``teacher_logits`` are ``[..., V]``; ``labels`` ``[...]`` or None (every row kept).
    The teacher is detached. Returns fp32 (fp64 for fp64 student logits); ``reduction="none"`` gives
    ``[...]`` with 0 at ignored rows.
    """
    cd = compute_dtype(student_logits.dtype)
    log_q = F.log_softmax(transform_logits(student_logits, temperature=temperature).to(cd), dim=-1)
    log_p = F.log_softmax(transform_logits(teacher_logits.detach(), temperature=temperature).to(cd), dim=-1)
    # F.kl_div(input, target, log_target=True) = exp(target) * (target - input) = KL(target || input) per term.
    if beta == 0:
        per_vocab = F.kl_div(log_q, log_p, reduction="none", log_target=True)  # KL(P || Q)
    elif beta == 1:
        per_vocab = F.kl_div(log_p, log_q, reduction="none", log_target=True)  # KL(Q || P)
    else:
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        kl_p = F.kl_div(log_m, log_p, reduction="none", log_target=True)  # KL(P || M)
        kl_q = F.kl_div(log_m, log_q, reduction="none", log_target=True)  # KL(Q || M)
        per_vocab = beta * kl_p + (1.0 - beta) * kl_q
    loss = per_vocab.sum(dim=-1)
    if reduction == "batchmean":
        if labels is None:
            return loss.sum() / max(loss.shape[0] if loss.dim() > 0 else 1, 1)
        reduction = "mean"
    if labels is None:
        valid = torch.ones(loss.shape, dtype=torch.bool, device=loss.device)
    else:
        valid = labels != ignore_index
        loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce_losses(loss, valid, reduction)


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
) -> torch.Tensor:
    """``generalized_jsd(hidden @ weight.T + bias, ref_hidden @ ref_weight.T + ref_bias, labels)``; the
    reference (teacher) logits are computed without gradient."""
    logits = F.linear(hidden, weight, bias)
    with torch.no_grad():
        ref_logits = F.linear(ref_hidden, ref_weight, ref_bias)
    return generalized_jsd(logits, ref_logits, labels, beta=beta, ignore_index=ignore_index,
                           temperature=temperature, reduction=reduction)


def linear_kl_divergence(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    ref_hidden: torch.Tensor,
    ref_weight: torch.Tensor,
    *,
    direction: str = "forward",
    **kwargs,
) -> torch.Tensor:
    """``direction="forward"``: KL(P_ref || P) (``beta=0``); ``"reverse"``: KL(P || P_ref) (``beta=1``)."""
    beta = {"forward": 0.0, "reverse": 1.0}[direction]
    return linear_jsd(hidden, weight, ref_hidden, ref_weight, beta=beta, **kwargs)
