"""Preference losses on sequence log-probs (TRL's DPO family, CPO, SimPO, ORPO, KTO), numerically hardened.

These act on ``[B]`` tensors (one value per completion), so they are plain differentiable PyTorch: no kernel
would pay for itself. ``ptkernels.reference.preference`` is the TRL-verbatim spec they are tested against; the
fused op (``ops/fused_preference.py``) calls ``pair_losses`` below on each chunk of pairs. Math in fp32 (fp64
for fp64 input); outputs fp32. Every function returns a frozen dataclass (``PreferenceLossOutput`` or
``KTOLossOutput``), never a positional tuple. Notation (``sigma`` logistic, ``ls = log sigma``,
``eps`` label smoothing)::

    pi_c, pi_r, ref_c, ref_r   policy / reference log-probs of the chosen / rejected completions
    u = beta * logits,  logits = (pi_c - pi_r) - (ref_c - ref_r)
"""

from __future__ import annotations

import torch

from ..types import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    KTOLossOutput,
    PreferenceLossOutput,
)
from .preference_math import (
    bco_batch_delta,
    check_batch,
    check_loss_options,
    kto_example_losses,
    kto_reference_point,
    lengths_like,
    make_output,
    nll_scalar,
    pair_losses,
    scalar_like,
    upcast,
)

__all__ = [
    "CPO_LOSS_TYPES",
    "DPO_LOSS_TYPES",
    "KTO_LOSS_TYPES",
    "KTOLossOutput",
    "PreferenceLossOutput",
    "cpo_loss",
    "dpo_loss",
    "kto_loss",
    "orpo_loss",
    "simpo_loss",
]

# ------------------------------------------------------------------------------------------------ public


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None,
    ref_rejected_logps: torch.Tensor | None,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor | None = None,
    reference_free: bool = False,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
) -> PreferenceLossOutput:
    """DPO and its variants on sequence log-probs ``[B]`` (TRL's ``DPOTrainer.dpo_loss``).

    With ``logits = (pi_c - pi_r) - (ref_c - ref_r)`` and ``u = beta * logits``, per pair:

        sigmoid   -(1 - eps) ls(u) - eps ls(-u)            (DPO; label_smoothing eps > 0 is conservative DPO)
        robust    (-(1 - eps) ls(u) + eps ls(-u)) / (1 - 2 eps)        (needs eps < 0.5)
        exo_pair  sigma(u) (ls(u) - log(1 - eps)) + sigma(-u) (ls(-u) - log eps)      (eps = 0 -> 1e-3)
        hinge     relu(1 - u)                                           (RSO)
        ipo       (logits - 1 / (2 beta))^2 on length-averaged log-probs: TRL divides the policy and the
                  reference log-probs by the completion lengths, so ``chosen_lengths``/``rejected_lengths``
                  (valid-token counts, ``[B]``) are required and all four inputs are divided by them
        bco_pair  -ls(beta (pi_c - ref_c) - delta) - ls(-(beta (pi_r - ref_r) - delta)); TRL's delta is a
                  running mean (across steps) of the batch-mean reward: pass it as ``bco_delta``; None uses
                  this batch's mean of both rewards (detached), TRL's value at its first step
        apo_zero  1 - sigma(beta (pi_c - ref_c)) + sigma(beta (pi_r - ref_r))
        apo_down  sigma(beta (pi_c - ref_c)) + 1 - sigma(beta ((pi_c - ref_c) - (pi_r - ref_r)))

    ``loss = mean(losses)`` (+ ``nll_weight * nll_loss`` when ``nll_loss`` is given: RPO, TRL's ``rpo_alpha``).
    Rewards ``beta * (pi - ref)`` are detached. ``reference_free=True`` takes the reference log-probs as 0
    (pass None for them): TRL's ``reference_free``, and CPO's losses.
    """
    check_loss_options(loss_type, DPO_LOSS_TYPES, beta=beta, label_smoothing=label_smoothing)
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = None
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required (or pass reference_free=True)")
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
                 ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)])
    pc, pr, rc, rr = map(upcast, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' is length-normalized as in TRL: pass chosen_lengths and "
                             "rejected_lengths (the number of completion tokens of each sequence)")
        lc = lengths_like("chosen_lengths", chosen_lengths, pc, "policy_chosen_logps")
        lr = lengths_like("rejected_lengths", rejected_lengths, pr, "policy_rejected_logps")
        pc, pr = pc / lc, pr / lr
        if rc is not None:
            rc, rr = rc / lc, rr / lr
    delta = None
    if loss_type == "bco_pair":
        if bco_delta is None:
            cr = pc - rc if rc is not None else pc
            rj = pr - rr if rr is not None else pr
            delta = bco_batch_delta(beta * cr, beta * rj)
        else:
            delta = scalar_like(bco_delta, pc.dtype, pc.device)
    losses, cw, rw, extras = pair_losses(loss_type, pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing,
                                         delta=delta)
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll_scalar(nll_loss, pc), nll_weight=nll_weight, extras=extras)


def cpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
) -> PreferenceLossOutput:
    """CPO (TRL's ``CPOTrainer.cpo_loss``): no reference model, ``logits = pi_c - pi_r``, per pair

        sigmoid   -(1 - eps) ls(beta logits) - eps ls(-beta logits)
        simpo     -(1 - eps) ls(beta logits - simpo_gamma) - eps ls(-(beta logits - simpo_gamma))
        hinge     relu(1 - beta logits)
        ipo       (logits - 1 / (2 beta))^2

    ``loss = mean(losses) + nll_weight * nll_loss`` (TRL's ``cpo_alpha``, default 1; ``nll_loss`` is the
    cross-entropy of the chosen completions, e.g. ``ptk.linear_cross_entropy``). TRL feeds ``ipo`` and
    ``simpo`` length-averaged log-probs and the others summed ones. Rewards ``beta * pi`` (detached).
    """
    check_loss_options(loss_type, CPO_LOSS_TYPES, beta=beta, label_smoothing=label_smoothing)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)])
    pc, pr = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    losses, cw, rw, extras = pair_losses(loss_type, pc, pr, None, None, beta=beta,
                                         label_smoothing=label_smoothing, gamma=simpo_gamma)
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll_scalar(nll_loss, pc), nll_weight=nll_weight, extras=extras)


def simpo_gamma_from(beta: float, gamma: float | None, gamma_beta_ratio: float | None) -> float:
    """SimPO's margin gamma from either ``gamma`` or ``gamma_beta_ratio`` (gamma = ratio * beta); 0.5 if neither."""
    if gamma is not None and gamma_beta_ratio is not None:
        raise ValueError("pass gamma or gamma_beta_ratio, not both (gamma = gamma_beta_ratio * beta)")
    if gamma_beta_ratio is not None:
        return float(gamma_beta_ratio) * float(beta)
    return 0.5 if gamma is None else float(gamma)


def simpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float | None = None,
    gamma_beta_ratio: float | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
) -> PreferenceLossOutput:
    """SimPO (TRL: ``CPOTrainer`` with ``loss_type="simpo"``, ``cpo_alpha=0``) on length-averaged log-probs:

        losses = -(1 - eps) ls(beta (pi_c - pi_r) - gamma) - eps ls(-(beta (pi_c - pi_r) - gamma))

    ``gamma`` is TRL's ``simpo_gamma`` (default 0.5); or give SimPO's ``gamma_beta_ratio`` (gamma = ratio *
    beta). ``beta`` defaults to SimPO's 2.0. The inputs are average log-probs; or pass summed log-probs with
    ``chosen_lengths``/``rejected_lengths`` and they are divided here. ``nll_loss`` (optional) adds
    ``nll_weight * nll_loss`` (CPO-SimPO). Rewards ``beta * pi`` (detached).
    """
    check_loss_options("simpo", ("simpo",), beta=beta, label_smoothing=label_smoothing)
    g = simpo_gamma_from(beta, gamma, gamma_beta_ratio)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)])
    pc, pr = _averaged(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    losses, cw, rw, extras = pair_losses("simpo", pc, pr, None, None, beta=beta, label_smoothing=label_smoothing,
                                         gamma=g)
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll_scalar(nll_loss, pc), nll_weight=nll_weight, extras=extras)


def _averaged(pc, pr, lc, lr):
    pc, pr = upcast(pc), upcast(pr)
    if (lc is None) != (lr is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    if lc is not None:
        pc = pc / lengths_like("chosen_lengths", lc, pc, "policy_chosen_logps")
        pr = pr / lengths_like("rejected_lengths", lr, pr, "policy_rejected_logps")
    return pc, pr


def orpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
) -> PreferenceLossOutput:
    """ORPO (TRL's ``ORPOTrainer``) on length-averaged log-probs (``< 0``):

        log_odds = (pi_c - pi_r) - (log(1 - exp(pi_c)) - log(1 - exp(pi_r)))
        losses   = -beta * ls(log_odds)
        loss     = mean(losses) + nll_weight * nll_loss        (TRL: nll_loss - mean(beta * ls(log_odds)))

    ``nll_loss`` is the chosen completions' cross-entropy (ORPO's SFT term; omitted when None). TRL's
    ``losses`` is ``beta * ls(log_odds)``; here ``losses`` holds its negation, the per-pair loss. Summed
    log-probs can be passed with ``chosen_lengths``/``rejected_lengths``. Also returns TRL's metrics
    ``log_odds_ratio = mean(ls(log_odds))`` and ``log_odds_chosen = mean(log_odds)``. Rewards ``beta * pi``.
    """
    check_loss_options("orpo", ("orpo",), beta=beta)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)])
    pc, pr = _averaged(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    losses, cw, rw, extras = pair_losses("orpo", pc, pr, None, None, beta=beta)
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll_scalar(nll_loss, pc), nll_weight=nll_weight, extras=extras)


def kto_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    policy_kl_logps: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    loss_type: str = "kto",
) -> KTOLossOutput:
    """KTO (TRL's ``KTOTrainer.kto_loss``), unpaired: desirable (chosen) and undesirable (rejected) examples
    come in batches of any sizes (either may be empty), with ``r = pi - ref`` per example:

        z0           clamp(mean(policy_kl_logps - ref_kl_logps), min=0), detached: the KL reference point from
                     mismatched (prompt, completion) pairs; or ``kl`` given (e.g. already averaged across
                     processes, clamped here); 0 when neither is given (TRL's ``calculate_KL=False``)
        desirable    kto: 1 - sigma(beta (r - z0))      apo_zero_unpaired: 1 - sigma(beta r)
        undesirable  kto: 1 - sigma(beta (z0 - r))      apo_zero_unpaired: sigma(beta r)
        losses = cat(desirable_weight * desirable, undesirable_weight * undesirable);  loss = mean(losses)

    Rewards ``beta * r`` (detached).
    """
    check_loss_options(loss_type, KTO_LOSS_TYPES, beta=beta)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("ref_chosen_logps", ref_chosen_logps)],
                allow_empty=True)
    check_batch([("policy_rejected_logps", policy_rejected_logps), ("ref_rejected_logps", ref_rejected_logps)],
                allow_empty=True)
    if policy_chosen_logps.device != policy_rejected_logps.device:
        raise ValueError(f"policy_rejected_logps is on {policy_rejected_logps.device} but policy_chosen_logps is "
                         f"on {policy_chosen_logps.device}")
    if policy_chosen_logps.shape[0] + policy_rejected_logps.shape[0] == 0:
        raise ValueError("kto_loss needs at least one example (policy_chosen_logps and policy_rejected_logps "
                         "are both empty)")
    pc, pr, rc, rr = map(upcast, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    z0 = kto_reference_point(kl, policy_kl_logps, ref_kl_logps, like=pc)
    cr, rj = pc - rc, pr - rr
    desirable = torch.cat((torch.ones_like(cr, dtype=torch.bool), torch.zeros_like(rj, dtype=torch.bool)))
    losses = kto_example_losses(loss_type, torch.cat((cr, rj)), desirable, z0, beta, desirable_weight,
                                undesirable_weight)
    return KTOLossOutput(loss=losses.mean(), losses=losses, chosen_rewards=(beta * cr).detach(),
                         rejected_rewards=(beta * rj).detach(), kl=z0)
