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

from dataclasses import replace

import torch

from ..types import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    KTOLossOutput,
    PreferenceLossOutput,
)
from .preference_math import (
    SFT_NEEDS_NLL,
    check_batch,
    check_loss_options,
    dpo_losses,
    dpo_spec,
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
    loss_type: str | list[str] = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    bco_delta: float | torch.Tensor | None = None,
    reference_free: bool = False,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
    loss_weights: list[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    wpo_weights: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """DPO and its variants on sequence log-probs ``[B]``, as TRL 1.16.0's ``DPOTrainer._compute_loss``.

    Inputs are the summed completion log-probs (TRL 1.16 never averages them; only ``ipo`` and ``sigmoid_norm``
    divide, by the lengths). With the log-ratios ``lr_c = pi_c - ref_c``, ``lr_r = pi_r - ref_r``, the
    f-divergence scores ``s = f'(exp(lr))`` (``f_divergence_type``: reverse_kl ``lr``; forward_kl
    ``1 - exp(-lr)``; js_divergence ``log 2 + ls(lr)``; alpha_divergence ``(exp((a-1) lr) - 1) / (a-1)``,
    ``a = f_alpha_divergence_coef``, exponent clamped at 80 (11 for fp16 input)), ``u = beta (s_c - s_r)``,
    ``eps = label_smoothing``, ``N = clamp(lengths, min=1)``, per pair:

        sigmoid       -ls(u)                          (label_smoothing is NOT read, as in TRL 1.16 and Liger 0.8.5)
        cdpo          -(1 - eps) ls(u) - eps ls(-u)   conservative DPO: ptkernels' name for what TRL < 1.0 did
                                                      with sigmoid + label_smoothing (not a TRL 1.16 loss type)
        hinge         relu(1 - u)
        ipo           ((s_c / N_c - s_r / N_r) - 1 / (2 beta))^2
        sigmoid_norm  -ls(beta (s_c / N_c - s_r / N_r))
        exo_pair      sigma(u) (ls(u) - log(1 - eps)) + sigma(-u) (ls(-u) - log eps)     (eps > 0 required)
        robust        (-(1 - eps) ls(u) + eps ls(-u)) / (1 - 2 eps)                       (eps < 0.5 required)
        nca_pair      -ls(beta lr_c) - ls(-beta lr_c) / 2 - ls(-beta lr_r) / 2
        bco_pair      -ls(beta lr_c - delta) - ls(delta - beta lr_r); delta = ``bco_delta``, default 0 (TRL 1.16
                      and Liger 0.8.5 have no offset; BCO's running mean, if wanted, is the caller's to pass)
        sppo_hard     (lr_c - 1 / (2 beta))^2 + (lr_r + 1 / (2 beta))^2
        aot           d = sort(pi_c - pi_r) - sort(ref_c - ref_r) (sorted over the batch);
                      -(1 - eps) ls(beta d) - eps ls(-beta d)
        aot_unpaired  the same with d = sort(lr_c) - sort(lr_r)
        apo_zero      1 - sigma(beta lr_c) + sigma(beta lr_r)
        apo_down      sigma(beta lr_c) + 1 - sigma(beta (lr_c - lr_r))
        discopop      -ls(u) (1 - m) + exp(-u) m,  m = sigma(u / discopop_tau)
        sft           ``nll_loss`` for every pair (required: ValueError without it; see below)

    nca_pair, bco_pair, sppo_hard, aot*, apo_* read the log-ratios, so like TRL 1.16 they reject a non-default
    ``f_divergence_type`` (ValueError). ``loss_type`` may be a list with ``loss_weights`` (TRL's MPO; RPO is
    ``["sigmoid", "sft"]`` with weights ``[1, alpha]``): ``losses = sum_k w_k l_k``. ``wpo_weights`` [B]
    (detached) multiplies every pair's loss: WPO's ``w_c * w_r`` with ``w = exp(mean_t(logp_t - log sum_v
    p_v^2))`` over the completion's tokens, which needs the logits (``fused_linear_preference_loss(...,
    use_weighting=True)`` computes it). LD-DPO (``ld_alpha``) also needs per-token log-probs: pass
    ``sum(shared tokens) + ld_alpha * sum(tail)`` as the four inputs, or use the fused op's ``ld_alpha``.

    ``sft`` (alone or in a list, e.g. RPO) takes its value from ``nll_loss`` and nothing else: TRL 1.16's sft term
    (``dpo_trainer.py``, ``-chosen_per_token_logps[chosen_mask].mean()``) is the mean of ``-log p`` over every
    scored token of the batch's chosen completions (its shifted completion mask), unweighted even under LD-DPO.
    Pass that scalar as ``nll_loss`` (``fused_linear_preference_loss`` computes it itself). The four sums here
    cannot give it in general: LD-DPO's ``sum(shared) + ld_alpha * sum(tail)`` is not the plain sum, and the
    lengths ``ipo``/``sigmoid_norm`` divide by (TRL's unshifted ``completion_mask.sum(1)``) count one token more
    than TRL's sft mean when a completion starts the sequence (empty prompt). So nothing is derived from
    ``chosen_lengths``: only for plain (not LD-weighted) sums over exactly ``n_b`` scored tokens each is TRL's
    value ``nll_loss = -policy_chosen_logps.sum() / n.sum()``, which the caller states by passing it.

    ``loss = mean(losses)``, plus ``nll_weight * nll_loss`` when ``nll_loss`` is given and ``sft`` is not a loss
    type. Rewards are ``beta * lr`` of the summed log-ratios for every loss type (ipo and the f-divergences
    included), as TRL 1.16 logs them. ``reference_free=True`` takes the reference log-probs as 0.
    """
    spec = dpo_spec(loss_type, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
                    f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                    discopop_tau=discopop_tau, bco_delta=None, use_weighting=wpo_weights is not None)
    if reference_free:
        ref_chosen_logps = ref_rejected_logps = None
    elif ref_chosen_logps is None or ref_rejected_logps is None:
        raise ValueError("ref_chosen_logps and ref_rejected_logps are required (or pass reference_free=True)")
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps),
                 ("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps),
                 ("wpo_weights", wpo_weights)])
    pc, pr, rc, rr = map(upcast, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError("pass both chosen_lengths and rejected_lengths, or neither")
    lengths = None
    if chosen_lengths is not None:
        lengths = (lengths_like("chosen_lengths", chosen_lengths, pc, "policy_chosen_logps"),
                   lengths_like("rejected_lengths", rejected_lengths, pr, "policy_rejected_logps"))
    if spec.bco_delta is None and bco_delta is not None:
        spec = replace(spec, bco_delta=scalar_like(bco_delta, pc.dtype, pc.device))
    nll = nll_scalar(nll_loss, pc)
    has_sft = "sft" in spec.loss_types
    if has_sft and nll is None:
        raise ValueError(SFT_NEEDS_NLL)
    weights = None if wpo_weights is None else upcast(wpo_weights).detach()
    losses, cw, rw = dpo_losses(spec, pc, pr, rc, rr, lengths=lengths, nll=nll if has_sft else None,
                                pair_weights=weights, input_dtype=policy_chosen_logps.dtype)
    loss = losses.mean()
    if nll is not None and not has_sft:
        loss = loss + nll_weight * nll
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll, loss=loss)


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
    alpha: float = 0.0,
) -> PreferenceLossOutput:
    """CPO (TRL 1.16's ``CPOTrainer.cpo_loss``): no reference model, ``logits = pi_c - pi_r``, per pair

        sigmoid   -(1 - eps) ls(beta logits) - eps ls(-beta logits)
        simpo     -(1 - eps) ls(beta logits - simpo_gamma) - eps ls(-(beta logits - simpo_gamma))
        hinge     relu(1 - beta logits)
        ipo       (logits - 1 / (2 beta))^2

    ``loss = mean(losses) + nll_weight * nll_loss`` (TRL's ``cpo_alpha``, default 1; ``nll_loss`` is the
    cross-entropy of the chosen completions, e.g. ``ptk.linear_cross_entropy``). TRL feeds ``ipo`` and
    ``simpo`` length-averaged log-probs and the others summed ones. CPO keeps cDPO's smoothing on ``sigmoid``
    (TRL 1.16 CPO does; its DPO does not). AlphaPO (``alpha != 0``, TRL's ``CPOConfig.alpha``): every ``pi`` is
    replaced by ``(1 - exp(pi)^(-alpha)) / alpha`` before the loss and the rewards. Rewards ``beta * pi``
    (detached).
    """
    check_loss_options(loss_type, CPO_LOSS_TYPES, beta=beta, label_smoothing=label_smoothing)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)])
    pc, pr = upcast(policy_chosen_logps), upcast(policy_rejected_logps)
    losses, cw, rw, extras = pair_losses(loss_type, pc, pr, None, None, beta=beta,
                                         label_smoothing=label_smoothing, gamma=simpo_gamma, alpha=float(alpha))
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
    beta: float = 0.1,
    gamma: float | None = None,
    gamma_beta_ratio: float | None = None,
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    nll_loss: torch.Tensor | None = None,
    nll_weight: float = 1.0,
    alpha: float = 0.0,
) -> PreferenceLossOutput:
    """SimPO (TRL 1.16: ``CPOTrainer`` with ``loss_type="simpo"``) on length-averaged log-probs:

        losses = -(1 - eps) ls(beta (pi_c - pi_r) - gamma) - eps ls(-(beta (pi_c - pi_r) - gamma))

    Defaults are TRL 1.16's ``CPOConfig`` and Liger 0.8.5's ``LigerFusedLinearSimPOLoss``: ``beta=0.1``,
    ``gamma=0.5`` (TRL's ``simpo_gamma``, gamma itself). The SimPO paper and repository use ``beta=2.0`` with
    ``gamma_beta_ratio`` (gamma = ratio * beta): pass them explicitly. The inputs are average log-probs; or pass
    summed log-probs with ``chosen_lengths``/``rejected_lengths`` and they are divided here. ``nll_loss``
    (optional) adds ``nll_weight * nll_loss`` (CPO-SimPO, TRL's default ``cpo_alpha=1``; pure SimPO has none).
    AlphaPO (``alpha != 0``; TRL's ``loss_type="alphapo"``): ``pi`` becomes ``(1 - exp(pi)^(-alpha)) / alpha``
    first. Rewards ``beta * pi`` (detached).
    """
    check_loss_options("simpo", ("simpo",), beta=beta, label_smoothing=label_smoothing)
    g = simpo_gamma_from(beta, gamma, gamma_beta_ratio)
    check_batch([("policy_chosen_logps", policy_chosen_logps), ("policy_rejected_logps", policy_rejected_logps)])
    pc, pr = _averaged(policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    losses, cw, rw, extras = pair_losses("simpo", pc, pr, None, None, beta=beta, label_smoothing=label_smoothing,
                                         gamma=g, alpha=float(alpha))
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
    """ORPO (TRL 1.16's ``ORPOTrainer.odds_ratio_loss``) on length-averaged log-probs (``< 0``):

        log_odds = (pi_c - pi_r) - (log(1 - exp(pi_c)) - log(1 - exp(pi_r)))
        losses   = -beta * ls(log_odds)
        loss     = mean(losses) + nll_weight * nll_loss        (TRL: nll_loss - mean(beta * ls(log_odds)))

    ``nll_loss`` is ORPO's SFT term (omitted when None): TRL 1.16's ``ORPOTrainer`` takes the token-pooled
    cross-entropy of the chosen rows over prompt AND completion (every non-padding token, shifted), while
    Liger 0.8.5 takes the completion only unless given ``nll_target``. TRL's
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
    """KTO (TRL 1.16's ``KTOTrainer._compute_loss``, summed log-probs), unpaired: desirable (chosen) and
    undesirable (rejected) examples
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
