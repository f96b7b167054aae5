"""Eager definitions of the preference losses (TRL's DPOTrainer, CPOTrainer, ORPOTrainer, KTOTrainer): the spec.

Written as TRL writes them (``F.logsigmoid``, ``torch.log1p(-torch.exp(...))``, ...) so that each formula can be
checked against TRL line by line; ``ptkernels.ops.preference`` holds the numerically hardened versions the fused
ops use, tested against these in float64. Notation, per pair ``i`` (sequence log-probs, summed over completion
tokens unless a loss says otherwise; ``sigma`` the logistic function, ``ls = log sigma``, ``eps`` label smoothing):

    pi_c, pi_r     policy log-probs of the chosen / rejected completion
    ref_c, ref_r   reference-model log-probs
    u = beta * ((pi_c - pi_r) - (ref_c - ref_r))          the DPO margin
    rewards        chosen = beta * (pi_c - ref_c), rejected = beta * (pi_r - ref_r)   (detached)

The batch loss is the mean of the per-pair losses (plus ``nll_weight * nll_loss`` when an NLL term is given).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..types import (
    CPO_LOSS_TYPES,
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    KTOLossOutput,
    PreferenceLossOutput,
    compute_dtype,  # noqa: F401 - re-exported: the oracle returns the public types
)


def _up(t):
    return None if t is None else t.to(compute_dtype(t.dtype))


def _output(losses, chosen_rewards, rejected_rewards, chosen_logps, rejected_logps, nll_loss=None,
            nll_weight=1.0, **extra) -> PreferenceLossOutput:
    loss = losses.mean()
    if nll_loss is not None:
        loss = loss + nll_weight * nll_loss.to(loss.dtype)
    return PreferenceLossOutput(
        loss=loss, losses=losses, chosen_rewards=chosen_rewards, rejected_rewards=rejected_rewards,
        reward_accuracy=(chosen_rewards > rejected_rewards).to(losses.dtype).mean(),
        reward_margin=(chosen_rewards - rejected_rewards).mean(),
        chosen_logps=chosen_logps.detach(), rejected_logps=rejected_logps.detach(),
        nll_loss=None if nll_loss is None else nll_loss.detach(), **extra)


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, bco_delta=None,
             reference_free=False, nll_loss=None, nll_weight=1.0) -> PreferenceLossOutput:
    """TRL's ``DPOTrainer.dpo_loss``, with ``u = beta * logits``, ``logits = (pi_c - pi_r) - (ref_c - ref_r)``:

        sigmoid   -(1 - eps) ls(u) - eps ls(-u)                          (eps > 0: conservative DPO, cDPO)
        robust    (-(1 - eps) ls(u) + eps ls(-u)) / (1 - 2 eps)
        exo_pair  sigma(u) (ls(u) - log(1 - eps)) + sigma(-u) (ls(-u) - log eps)     (eps = 0 -> 1e-3)
        hinge     relu(1 - u)
        ipo       (logits - 1 / (2 beta))^2, on length-averaged log-probs (all four divided by the lengths)
        bco_pair  -ls(beta (pi_c - ref_c) - delta) - ls(-(beta (pi_r - ref_r) - delta)),
                  delta = bco_delta, or the batch mean of both rewards (detached) when None
        apo_zero  1 - sigma(beta (pi_c - ref_c)) + sigma(beta (pi_r - ref_r))
        apo_down  sigma(beta (pi_c - ref_c)) + 1 - sigma(beta ((pi_c - ref_c) - (pi_r - ref_r)))

    ``reference_free`` treats the reference log-probs as 0 (TRL's ``reference_free``; CPO's losses).
    """
    pc, pr = _up(policy_chosen_logps), _up(policy_rejected_logps)
    if reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        rc, rr = _up(ref_chosen_logps), _up(ref_rejected_logps)
    if loss_type == "ipo":
        lc, lr = chosen_lengths.to(pc.dtype), rejected_lengths.to(pc.dtype)
        pc, pr, rc, rr = pc / lc, pr / lr, rc / lc, rr / lr
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    logits = (pc - pr) - (rc - rr)
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "robust":
        losses = (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    elif loss_type == "exo_pair":
        if eps == 0:
            eps = 1e-3
        losses = (beta * logits).sigmoid() * (F.logsigmoid(beta * logits) - math.log(1 - eps)) + (
            -beta * logits).sigmoid() * (F.logsigmoid(-beta * logits) - math.log(eps))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    elif loss_type == "bco_pair":
        chosen_rewards = beta * chosen_logratios
        rejected_rewards = beta * rejected_logratios
        if bco_delta is None:
            delta = torch.cat((chosen_rewards, rejected_rewards), 0).mean().detach()
        else:
            delta = torch.as_tensor(bco_delta, dtype=pc.dtype, device=pc.device)
        losses = -F.logsigmoid(beta * chosen_logratios - delta) - F.logsigmoid(-(beta * rejected_logratios - delta))
    elif loss_type == "apo_zero":
        losses = (1 - F.sigmoid(beta * chosen_logratios)) + F.sigmoid(beta * rejected_logratios)
    elif loss_type == "apo_down":
        losses = F.sigmoid(beta * chosen_logratios) + (1 - F.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    chosen_rewards = beta * (pc - rc).detach()
    rejected_rewards = beta * (pr - rr).detach()
    return _output(losses, chosen_rewards, rejected_rewards, pc, pr, _up(nll_loss), nll_weight)


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             simpo_gamma=0.5, nll_loss=None, nll_weight=1.0) -> PreferenceLossOutput:
    """TRL's ``CPOTrainer.cpo_loss`` (no reference model), ``logits = pi_c - pi_r``:

        sigmoid   -(1 - eps) ls(beta logits) - eps ls(-beta logits)
        simpo     the same with logits - simpo_gamma / beta
        hinge     relu(1 - beta logits)
        ipo       (logits - 1 / (2 beta))^2
    rewards = beta * pi (detached); loss = mean(losses) + nll_weight * nll_loss (TRL's ``cpo_alpha``).
    """
    pc, pr = _up(policy_chosen_logps), _up(policy_rejected_logps)
    logits = pc - pr
    eps = label_smoothing
    if loss_type == "simpo":
        logits = logits - simpo_gamma / beta
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(CPO_LOSS_TYPES)}")
    return _output(losses, beta * pc.detach(), beta * pr.detach(), pc, pr, _up(nll_loss), nll_weight)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=2.0, gamma=0.5, label_smoothing=0.0,
               nll_loss=None, nll_weight=1.0) -> PreferenceLossOutput:
    """SimPO as TRL's CPO with ``loss_type="simpo"`` on length-averaged log-probs:
    ``-(1 - eps) ls(beta (pi_c - pi_r) - gamma) - eps ls(-(beta (pi_c - pi_r) - gamma))``."""
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type="simpo",
                    label_smoothing=label_smoothing, simpo_gamma=gamma, nll_loss=nll_loss, nll_weight=nll_weight)


def orpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, nll_loss=None,
              nll_weight=1.0) -> PreferenceLossOutput:
    """TRL's ``ORPOTrainer.odds_ratio_loss`` on length-averaged log-probs:

        log_odds = (pi_c - pi_r) - (log(1 - exp(pi_c)) - log(1 - exp(pi_r)))
        TRL: losses = beta * ls(log_odds);  loss = nll - mean(losses)
    Here ``losses`` holds the per-pair loss ``-beta * ls(log_odds)``, so ``loss = mean(losses) + nll``.
    """
    pc, pr = _up(policy_chosen_logps), _up(policy_rejected_logps)
    log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
    ratio = F.logsigmoid(log_odds)
    losses = -beta * ratio
    return _output(losses, beta * pc.detach(), beta * pr.detach(), pc, pr, _up(nll_loss), nll_weight,
                   log_odds_ratio=ratio.detach().mean(), log_odds_chosen=log_odds.detach().mean())


def kto_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *,
             policy_kl_logps=None, ref_kl_logps=None, kl=None, beta=0.1, desirable_weight=1.0,
             undesirable_weight=1.0, loss_type="kto") -> KTOLossOutput:
    """TRL's ``KTOTrainer.kto_loss``:

        z0 = clamp(mean(pi_KL - ref_KL), min=0), detached (or ``kl`` given; 0 when neither is given)
        desirable    kto: 1 - sigma(beta ((pi - ref) - z0))     apo_zero_unpaired: 1 - sigma(beta (pi - ref))
        undesirable  kto: 1 - sigma(beta (z0 - (pi - ref)))     apo_zero_unpaired: sigma(beta (pi - ref))
        losses = cat(desirable_weight * desirable, undesirable_weight * undesirable);  loss = mean(losses)
    """
    pc, pr, rc, rr = map(_up, (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps))
    if kl is not None:
        z0 = torch.as_tensor(kl, dtype=pc.dtype, device=pc.device).detach().clamp(min=0)
    elif policy_kl_logps is not None:
        z0 = (_up(policy_kl_logps) - _up(ref_kl_logps)).mean().detach().clamp(min=0)
    else:
        z0 = torch.zeros((), dtype=pc.dtype, device=pc.device)
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    if loss_type == "kto":
        chosen_losses = 1 - F.sigmoid(beta * (chosen_logratios - z0))
        rejected_losses = 1 - F.sigmoid(beta * (z0 - rejected_logratios))
    elif loss_type == "apo_zero_unpaired":
        chosen_losses = 1 - F.sigmoid(beta * chosen_logratios)
        rejected_losses = F.sigmoid(beta * rejected_logratios)
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(KTO_LOSS_TYPES)}")
    losses = torch.cat((desirable_weight * chosen_losses, undesirable_weight * rejected_losses), 0)
    return KTOLossOutput(loss=losses.mean(), losses=losses, chosen_rewards=beta * chosen_logratios.detach(),
                         rejected_rewards=beta * rejected_logratios.detach(), kl=z0)


# ------------------------------------------------------------------------- from hidden states (the oracle)


def _sequence_logps(hidden, weight, bias, labels, average, ignore_index, temperature, softcap):
    from .cross_entropy import linear_token_logprobs
    from .sequence import sequence_logprobs

    tok = linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=ignore_index,
                                temperature=temperature, softcap=softcap)
    return tok, sequence_logprobs(tok, labels != ignore_index, average=average)


def linear_preference_loss(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                           ref_hidden=None, ref_weight=None, ref_bias=None, loss_type="sigmoid", beta=0.1,
                           label_smoothing=0.0, simpo_gamma=0.5, bco_delta=None, reference_free=False,
                           nll_weight=0.0, average_logps=False, ignore_index=-100, shift=False, temperature=1.0,
                           softcap=None) -> PreferenceLossOutput:
    """Eager ``fused_linear_preference_loss``: full logits -> token log-probs -> sequence log-probs (sum, or mean
    with ``average_logps``) -> the loss above. ``hidden [2B, T, D]`` holds the chosen then the rejected batch;
    the NLL term is the mean of ``-logp`` over the chosen completions' tokens. Nothing is defaulted here: pass
    ``nll_weight`` and ``average_logps`` explicitly."""
    from .cross_entropy import shift_labels

    if shift:
        labels = shift_labels(labels, ignore_index)
    n = hidden.shape[0] // 2
    tok, seq = _sequence_logps(hidden, weight, bias, labels, average_logps, ignore_index, temperature, softcap)
    if ref_hidden is not None:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        with torch.no_grad():
            _, ref_seq = _sequence_logps(ref_hidden, ref_weight.detach(), None if ref_bias is None else
                                         ref_bias.detach(), labels, average_logps, ignore_index, temperature, softcap)
        ref_chosen_logps, ref_rejected_logps = ref_seq[:n], ref_seq[n:]
    elif ref_chosen_logps is not None:
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    nll = None
    if nll_weight:
        valid = labels[:n] != ignore_index
        nll = -tok[:n].sum() / valid.sum().clamp(min=1)
    pc, pr = seq[:n], seq[n:]
    if loss_type in DPO_LOSS_TYPES:
        ones = torch.ones_like(pc)  # ipo: the averaging (or not) was done above, by average_logps
        return dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=loss_type,
                        label_smoothing=label_smoothing, chosen_lengths=ones, rejected_lengths=ones,
                        bco_delta=bco_delta, reference_free=reference_free, nll_loss=nll, nll_weight=nll_weight)
    if loss_type == "orpo":
        return orpo_loss(pc, pr, beta=beta, nll_loss=nll, nll_weight=nll_weight)
    if loss_type in ("simpo", "cpo"):
        return cpo_loss(pc, pr, beta=beta, loss_type="simpo" if loss_type == "simpo" else "sigmoid",
                        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, nll_loss=nll, nll_weight=nll_weight)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def linear_kto_loss(hidden, weight, labels, desirable, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None,
                    ref_bias=None, kl=None, kl_hidden=None, kl_labels=None, ref_kl_logps=None, ref_kl_hidden=None,
                    loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100,
                    shift=False, temperature=1.0, softcap=None) -> KTOLossOutput:
    """Eager ``fused_linear_kto_loss``: summed sequence log-probs of the N examples from full logits, split by
    ``desirable`` into TRL's chosen/rejected subsets, then ``kto_loss``. The KL completions (when given) are
    scored by the policy head under no_grad."""
    from .cross_entropy import shift_labels

    if shift:
        labels = shift_labels(labels, ignore_index)
        if kl_labels is not None:
            kl_labels = shift_labels(kl_labels, ignore_index)
    if ref_weight is None:
        ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
    rw = ref_weight.detach()
    rb = None if ref_bias is None else ref_bias.detach()
    args = (ignore_index, temperature, softcap)
    _, seq = _sequence_logps(hidden, weight, bias, labels, False, *args)
    if ref_hidden is not None:
        with torch.no_grad():
            _, ref_logps = _sequence_logps(ref_hidden, rw, rb, labels, False, *args)
    policy_kl = None
    if kl is None and kl_hidden is not None:
        with torch.no_grad():
            _, policy_kl = _sequence_logps(kl_hidden, weight.detach(), None if bias is None else bias.detach(),
                                           kl_labels, False, *args)
            if ref_kl_hidden is not None:
                _, ref_kl_logps = _sequence_logps(ref_kl_hidden, rw, rb, kl_labels, False, *args)
    return kto_loss(seq[desirable], seq[~desirable], ref_logps[desirable], ref_logps[~desirable],
                    policy_kl_logps=policy_kl, ref_kl_logps=ref_kl_logps, kl=kl, beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type)
