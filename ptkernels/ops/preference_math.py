"""The shared math of the preference losses: the per-pair losses of every loss type, KTO's per-example losses and
reference point, argument checks and the output dataclass. Used by the losses on sequence log-probs
(ops/preference.py) and by the fused chunk loop (ops/fused_preference_loop.py). Notation in ops/preference.py.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..types import DPO_LOSS_TYPES, PreferenceLossOutput, compute_dtype
from .core.checks import check_float

# Everything pair_losses understands: the DPO family (with a reference; reference-free they are CPO's losses),
# SimPO and ORPO (reference-free by definition).
PAIR_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo")
REFERENCE_FREE_TYPES = ("simpo", "orpo")
_LN2 = math.log(2.0)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, accurate on both sides of -log 2 (Maechler's log1mexp); -inf at x = 0."""
    near = torch.log(-torch.expm1(torch.maximum(x, torch.full_like(x, -_LN2))))
    far = torch.log1p(-torch.exp(torch.minimum(x, torch.full_like(x, -_LN2))))
    return torch.where(x > -_LN2, near, far)


def smoothed_sigmoid_loss(u: torch.Tensor, eps: float) -> torch.Tensor:
    """-(1 - eps) ls(u) - eps ls(-u)."""
    loss = -F.logsigmoid(u)
    if eps:
        loss = (1.0 - eps) * loss - eps * F.logsigmoid(-u)
    return loss


def pair_losses(loss_type: str, pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0,
                gamma: float = 0.0, delta=None):
    """Per-pair losses and implicit rewards from (already length-normalized where the loss wants it) log-probs.

    ``rc``/``rr`` None means reference-free (treated as 0: CPO's losses; SimPO and ORPO never use them).
    ``gamma`` is SimPO's margin; ``delta`` bco_pair's reference point (the caller computes the batch mean).
    Returns ``(losses, chosen_rewards, rejected_rewards, extras)``; rewards are detached; ``extras`` holds
    ORPO's ``log_odds`` and ``ratio = ls(log_odds)`` (else empty).
    """
    eps = float(label_smoothing)
    extras = {}
    if loss_type in REFERENCE_FREE_TYPES or rc is None:
        cr, rj = pc, pr  # log-ratios against a zero reference
    else:
        cr, rj = pc - rc, pr - rr
    if loss_type == "simpo":
        losses = smoothed_sigmoid_loss(beta * (pc - pr) - gamma, eps)
    elif loss_type == "orpo":
        log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
        ratio = F.logsigmoid(log_odds)
        losses = -beta * ratio
        extras = {"log_odds": log_odds.detach(), "ratio": ratio.detach()}
    else:
        logits = cr - rj
        u = beta * logits
        if loss_type == "sigmoid":
            losses = smoothed_sigmoid_loss(u, eps)
        elif loss_type == "robust":
            losses = (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)
        elif loss_type == "exo_pair":
            e = eps if eps else 1e-3
            losses = torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-e)) + torch.sigmoid(-u) * (
                F.logsigmoid(-u) - math.log(e))
        elif loss_type == "hinge":
            losses = torch.relu(1.0 - u)
        elif loss_type == "ipo":
            losses = (logits - 1.0 / (2.0 * beta)) ** 2
        elif loss_type == "bco_pair":
            losses = -F.logsigmoid(beta * cr - delta) - F.logsigmoid(delta - beta * rj)
        elif loss_type == "apo_zero":
            losses = torch.sigmoid(-beta * cr) + torch.sigmoid(beta * rj)  # 1 - sigma(x) = sigma(-x)
        elif loss_type == "apo_down":
            losses = torch.sigmoid(beta * cr) + torch.sigmoid(-u)
        else:
            raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(PAIR_LOSS_TYPES)}")
    return losses, (beta * cr).detach(), (beta * rj).detach(), extras


def bco_batch_delta(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> torch.Tensor:
    """bco_pair's reference point for one batch: mean of both rewards (TRL's running mean after one update)."""
    return torch.cat((chosen_rewards, rejected_rewards)).mean().detach()


# ------------------------------------------------------------------------------------------------ checks


def check_loss_options(loss_type: str, valid, *, beta: float, label_smoothing: float = 0.0) -> None:
    if loss_type not in valid:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(valid)}")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if loss_type == "robust" and not label_smoothing < 0.5:
        raise ValueError(f"loss_type='robust' needs label_smoothing < 0.5 (it divides by 1 - 2 eps), got "
                         f"{label_smoothing}")


def check_batch(pairs, *, allow_empty: bool = False) -> None:
    """``pairs``: [(name, tensor or None), ...]; the first tensor sets the expected [B] shape and device."""
    first_name, first = None, None
    for name, t in pairs:
        if t is None:
            continue
        check_float(name, t)
        if t.dim() != 1:
            raise ValueError(f"{name} must be 1-D [batch] (one value per sequence), got shape {tuple(t.shape)}")
        if first is None:
            first_name, first = name, t
            if t.shape[0] == 0 and not allow_empty:
                raise ValueError(f"{name} is empty: a preference loss needs at least one pair")
            continue
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has {t.shape[0]} entries but {first_name} has {first.shape[0]}: chosen and rejected "
                f"(and reference) batches must be the same size")
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")


def upcast(t):
    return None if t is None else t.to(compute_dtype(t.dtype))


def lengths_like(name: str, lengths, like: torch.Tensor, like_name: str) -> torch.Tensor:
    if not isinstance(lengths, torch.Tensor):
        lengths = torch.as_tensor(lengths, device=like.device)
    if tuple(lengths.shape) != tuple(like.shape):
        raise ValueError(f"{name} has shape {tuple(lengths.shape)} but {like_name} has shape {tuple(like.shape)}")
    if lengths.device != like.device:
        raise ValueError(f"{name} is on {lengths.device} but {like_name} is on {like.device}")
    return lengths.to(like.dtype)


def scalar_like(x, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A detached 0-d tensor of ``dtype`` (a Python float converts straight to it, keeping fp64 exact)."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar, got a tensor of shape {tuple(x.shape)}")
        return x.detach().to(device=device, dtype=dtype).reshape(())
    return torch.tensor(float(x), dtype=dtype, device=device)


def nll_scalar(nll_loss, like):
    if nll_loss is None:
        return None
    if not isinstance(nll_loss, torch.Tensor):
        nll_loss = torch.as_tensor(nll_loss, device=like.device)
    if nll_loss.numel() != 1:
        raise ValueError(f"nll_loss must be a scalar, got shape {tuple(nll_loss.shape)}")
    return nll_loss.reshape(()).to(like.dtype)


def make_output(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, *, nll_loss=None,
                nll_weight: float = 1.0, extras=None, loss=None) -> PreferenceLossOutput:
    """The output dataclass; ``loss`` defaults to mean(losses) + nll_weight * nll_loss."""
    if loss is None:
        loss = losses.mean()
        if nll_loss is not None:
            loss = loss + nll_weight * nll_loss
    extras = extras or {}
    log_odds = extras.get("log_odds")
    ratio = extras.get("ratio")
    return PreferenceLossOutput(
        loss=loss, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(chosen_rewards.dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        chosen_logps=chosen_logps.detach(), rejected_logps=rejected_logps.detach(),
        nll_loss=None if nll_loss is None else nll_loss.detach(),
        log_odds_ratio=None if ratio is None else ratio.mean(),
        log_odds_chosen=None if log_odds is None else log_odds.mean(),
    )


def kto_reference_point(kl=None, policy_kl_logps=None, ref_kl_logps=None, *, like: torch.Tensor) -> torch.Tensor:
    """KTO's z0: ``clamp(kl, min=0)`` when given, else ``clamp(mean(policy_kl_logps - ref_kl_logps), min=0)``,
    else 0; always detached."""
    cd = compute_dtype(like.dtype)
    if kl is not None:
        return scalar_like(kl, cd, like.device).clamp(min=0)
    if (policy_kl_logps is None) != (ref_kl_logps is None):
        raise ValueError("pass both policy_kl_logps and ref_kl_logps (log-probs of mismatched completions), "
                         "or neither")
    if policy_kl_logps is None:
        return torch.zeros((), dtype=cd, device=like.device)
    check_batch([("policy_kl_logps", policy_kl_logps), ("ref_kl_logps", ref_kl_logps)])
    return (upcast(policy_kl_logps) - upcast(ref_kl_logps)).mean().detach().clamp(min=0)


def kto_example_losses(loss_type: str, logratios: torch.Tensor, desirable: torch.Tensor, z0, beta: float,
                       desirable_weight: float, undesirable_weight: float) -> torch.Tensor:
    """Weighted KTO loss per example, ``r = pi - ref``, ``x = beta (r - z0)`` (kto) or ``beta r``
    (apo_zero_unpaired): desirable ``w_d sigma(-x)`` (= 1 - sigma(x)), undesirable ``w_u sigma(x)``
    (kto: = 1 - sigma(beta (z0 - r)))."""
    x = beta * (logratios - z0) if loss_type == "kto" else beta * logratios
    return torch.where(desirable, desirable_weight * torch.sigmoid(-x), undesirable_weight * torch.sigmoid(x))
