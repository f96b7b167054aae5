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


_F_DIV_OK = ("sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft", "cdpo")


def _scores(f_divergence_type, lr, alpha, input_dtype):
    """TRL 1.16 ``DPOTrainer._compute_loss``'s f-divergence scores (f'(t)'s constant term kept)."""
    if f_divergence_type == "reverse_kl":
        return lr
    if f_divergence_type == "forward_kl":
        return 1 - torch.exp(-lr)
    if f_divergence_type == "js_divergence":
        return math.log(2) + F.logsigmoid(lr)
    if f_divergence_type == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return lr
        cap = 11.0 if input_dtype == torch.float16 else 80.0
        return (torch.exp(((alpha - 1.0) * lr).clamp(max=cap)) - 1) / (alpha - 1.0)
    raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta=0.1,
             loss_type="sigmoid", label_smoothing=0.0, chosen_lengths=None, rejected_lengths=None, bco_delta=None,
             reference_free=False, nll_loss=None, nll_weight=1.0, loss_weights=None, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, discopop_tau=0.05, wpo_weights=None) -> PreferenceLossOutput:
    """TRL 1.16.0's ``DPOTrainer._compute_loss`` on summed log-probs. ``lr = pi - ref``, ``s`` the f-divergence
    score of ``lr`` (reverse_kl: lr; forward_kl: 1 - exp(-lr); js_divergence: log 2 + ls(lr); alpha_divergence:
    (exp((a-1) lr) - 1)/(a-1)), ``u = beta (s_c - s_r)``, ``N = clamp(lengths, 1)``, ``eps = label_smoothing``:

        sigmoid       -ls(u)                         (no label smoothing in TRL 1.16)
        cdpo          -(1 - eps) ls(u) - eps ls(-u)  (conservative DPO; ptkernels' name, TRL < 1.0's sigmoid)
        hinge         relu(1 - u)
        ipo           ((s_c/N_c - s_r/N_r) - 1/(2 beta))^2
        exo_pair      sigma(u) (ls(u) - log(1 - eps)) + sigma(-u) (ls(-u) - log eps)
        nca_pair      -ls(beta lr_c) - 0.5 ls(-beta lr_c) - 0.5 ls(-beta lr_r)
        robust        (-(1 - eps) ls(u) + eps ls(-u)) / (1 - 2 eps)
        bco_pair      -ls(beta lr_c - delta) - ls(-(beta lr_r - delta)),  delta = bco_delta or 0
        sppo_hard     (lr_c - 0.5/beta)^2 + (lr_r + 0.5/beta)^2
        aot           d = sort(pi_c - pi_r) - sort(ref_c - ref_r);  -ls(beta d)(1 - eps) - ls(-beta d) eps
        aot_unpaired  d = sort(lr_c) - sort(lr_r);  same
        apo_zero      1 - sigma(beta lr_c) + sigma(beta lr_r)
        apo_down      sigma(beta lr_c) + 1 - sigma(beta (lr_c - lr_r))
        discopop      -ls(u)(1 - m) + exp(-u) m,  m = sigma(u / discopop_tau)
        sigmoid_norm  -ls(beta (s_c/N_c - s_r/N_r))
        sft           nll_loss, for every pair: TRL's -mean(log p) over the chosen completions' tokens (unweighted,
                      shifted mask), which the sums cannot give in general (LD-DPO, empty prompts); required

    ``losses = (sum_k w_k l_k) * wpo_weights``; ``loss = mean(losses)`` (+ ``nll_weight * nll_loss`` when given
    and sft is not a loss type). Rewards ``beta * lr`` (summed) for every type. ``reference_free``: ref = 0.
    """
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    weights = [1.0] * len(types) if loss_weights is None else list(loss_weights)
    pc, pr = _up(policy_chosen_logps), _up(policy_rejected_logps)
    if reference_free:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    else:
        rc, rr = _up(ref_chosen_logps), _up(ref_rejected_logps)
    if f_divergence_type != "reverse_kl" and any(t not in _F_DIV_OK for t in types):
        raise ValueError(f"f_divergence_type={f_divergence_type!r} is not supported with loss_type {types}")
    clr, rlr = pc - rc, pr - rr
    cs = _scores(f_divergence_type, clr, f_alpha_divergence_coef, policy_chosen_logps.dtype)
    rs = _scores(f_divergence_type, rlr, f_alpha_divergence_coef, policy_chosen_logps.dtype)
    u = beta * (cs - rs)
    eps = label_smoothing
    nll = _up(nll_loss)
    if "sft" in types and nll is None:
        raise ValueError("loss_type 'sft' needs nll_loss (TRL 1.16's mean -log p over the chosen completions' "
                         "tokens)")
    total = torch.zeros_like(pc)
    for t, w in zip(types, weights):
        if t == "sigmoid":
            losses = -F.logsigmoid(u)
        elif t == "cdpo":
            losses = -F.logsigmoid(u) * (1 - eps) - F.logsigmoid(-u) * eps
        elif t == "hinge":
            losses = torch.relu(1 - u)
        elif t in ("ipo", "sigmoid_norm"):
            lc = chosen_lengths.to(pc.dtype).clamp(min=1.0)
            lr_ = rejected_lengths.to(pc.dtype).clamp(min=1.0)
            d = cs / lc - rs / lr_
            losses = (d - 1 / (2 * beta)) ** 2 if t == "ipo" else -F.logsigmoid(beta * d)
        elif t == "exo_pair":
            e = torch.tensor(eps, dtype=pc.dtype, device=pc.device)
            losses = torch.sigmoid(u) * (F.logsigmoid(u) - torch.log1p(-e)) + torch.sigmoid(-u) * (
                F.logsigmoid(-u) - torch.log(e))
        elif t == "nca_pair":
            losses = (-F.logsigmoid(beta * clr) - 0.5 * F.logsigmoid(-beta * clr)
                      - 0.5 * F.logsigmoid(-beta * rlr))
        elif t == "robust":
            losses = (-(1 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1 - 2 * eps)
        elif t == "bco_pair":
            delta = 0.0 if bco_delta is None else bco_delta
            losses = -F.logsigmoid(beta * clr - delta) - F.logsigmoid(-(beta * rlr - delta))
        elif t == "sppo_hard":
            losses = (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
        elif t in ("aot", "aot_unpaired"):
            if t == "aot":
                d = torch.sort(pc - pr).values - torch.sort(rc - rr).values
            else:
                d = torch.sort(clr).values - torch.sort(rlr).values
            losses = -F.logsigmoid(beta * d) * (1 - eps) - F.logsigmoid(-beta * d) * eps
        elif t == "apo_zero":
            losses = (1 - F.sigmoid(beta * clr)) + F.sigmoid(beta * rlr)
        elif t == "apo_down":
            losses = F.sigmoid(beta * clr) + (1 - F.sigmoid(beta * (clr - rlr)))
        elif t == "discopop":
            mod = torch.sigmoid(u / discopop_tau)
            losses = -F.logsigmoid(u) * (1 - mod) + torch.exp(-u) * mod
        elif t == "sft":
            losses = nll.expand_as(pc)
        else:
            raise ValueError(f"unknown loss_type {t!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
        total = total + w * losses
    if wpo_weights is not None:
        total = total * _up(wpo_weights).detach()
    out = _output(total, beta * clr.detach(), beta * rlr.detach(), pc, pr, None if "sft" in types else nll,
                  nll_weight)
    if "sft" in types:
        from dataclasses import replace

        out = replace(out, nll_loss=nll.detach())
    return out


def cpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             simpo_gamma=0.5, nll_loss=None, nll_weight=1.0, alpha=0.0) -> PreferenceLossOutput:
    """TRL's ``CPOTrainer.cpo_loss`` (no reference model), ``logits = pi_c - pi_r``:

        sigmoid   -(1 - eps) ls(beta logits) - eps ls(-beta logits)
        simpo     the same with logits - simpo_gamma / beta
        hinge     relu(1 - beta logits)
        ipo       (logits - 1 / (2 beta))^2
    AlphaPO (TRL 1.16 ``alpha != 0``): pi -> (1 - exp(pi)^(-alpha)) / alpha first.
    rewards = beta * pi (detached); loss = mean(losses) + nll_weight * nll_loss (TRL's ``cpo_alpha``).
    """
    pc0, pr0 = pc, pr = _up(policy_chosen_logps), _up(policy_rejected_logps)
    if alpha != 0:
        pc = (1 - torch.exp(pc).pow(-alpha)) / alpha
        pr = (1 - torch.exp(pr).pow(-alpha)) / alpha
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
    return _output(losses, beta * pc.detach(), beta * pr.detach(), pc0, pr0, _up(nll_loss), nll_weight)


def simpo_loss(policy_chosen_logps, policy_rejected_logps, *, beta=0.1, gamma=0.5, label_smoothing=0.0,
               nll_loss=None, nll_weight=1.0, alpha=0.0) -> PreferenceLossOutput:
    """SimPO as TRL's CPO with ``loss_type="simpo"`` on length-averaged log-probs:
    ``-(1 - eps) ls(beta (pi_c - pi_r) - gamma) - eps ls(-(beta (pi_c - pi_r) - gamma))``."""
    return cpo_loss(policy_chosen_logps, policy_rejected_logps, beta=beta, loss_type="simpo",
                    label_smoothing=label_smoothing, simpo_gamma=gamma, nll_loss=nll_loss, nll_weight=nll_weight,
                    alpha=alpha)


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


def _ld_weights(labels, ignore_index, ld_alpha):
    """LD-DPO (TRL 1.16): weight 1 on the first min(len_c, len_r) scored tokens of a pair, ld_alpha after."""
    valid = labels != ignore_index
    pos = valid.cumsum(1)
    cnt = valid.sum(1)
    n = labels.shape[0] // 2
    shared = torch.minimum(cnt[:n], cnt[n:]).repeat(2).unsqueeze(1)
    one = torch.ones((), dtype=torch.float64, device=labels.device)
    return torch.where(pos <= shared, one, float(ld_alpha) * one) * valid


def linear_preference_loss(hidden, weight, labels, *, bias=None, ref_chosen_logps=None, ref_rejected_logps=None,
                           ref_hidden=None, ref_weight=None, ref_bias=None, loss_type="sigmoid", beta=0.1,
                           label_smoothing=0.0, simpo_gamma=0.5, bco_delta=None, reference_free=False,
                           nll_weight=0.0, average_logps=False, ignore_index=-100, shift=False, temperature=1.0,
                           softcap=None, loss_weights=None, f_divergence_type="reverse_kl",
                           f_alpha_divergence_coef=0.5, discopop_tau=0.05, ld_alpha=None, use_weighting=False,
                           alpha=0.0, seq_lengths=None) -> PreferenceLossOutput:
    """Eager ``fused_linear_preference_loss``: full logits -> token log-probs -> sequence log-probs (sum, LD-weighted
    under ``ld_alpha``, or mean with ``average_logps``) -> the loss above. ``hidden [2B, T, D]`` holds the chosen
    then the rejected batch; the NLL (term and sft) is the mean of ``-logp`` over the chosen completions' tokens;
    WPO's weights come from the full logits (``log sum_v p_v^2 = lse(2s) - 2 lse(s)``). ``seq_lengths`` [2B]: the
    lengths ipo / sigmoid_norm divide by (default the valid-token counts). Nothing is defaulted here: pass
    ``nll_weight`` and ``average_logps`` explicitly."""
    from .cross_entropy import linear_token_logprobs, shift_labels, transform_logits

    if shift:
        labels = shift_labels(labels, ignore_index)
    n = hidden.shape[0] // 2
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    valid = labels != ignore_index
    cnt = valid.sum(1)
    tw = None if ld_alpha is None else _ld_weights(labels, ignore_index, ld_alpha)

    def seq_of(tok):
        s = tok.sum(-1) if tw is None else (tok * tw.to(tok.dtype)).sum(-1)
        return s / cnt.clamp(min=1).to(s.dtype) if average_logps else s

    kw = dict(ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    tok = linear_token_logprobs(hidden, weight, labels, bias=bias, **kw)
    seq = seq_of(tok)
    if ref_hidden is not None:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias if ref_bias is None else ref_bias
        with torch.no_grad():
            ref_tok = linear_token_logprobs(ref_hidden, ref_weight.detach(), labels,
                                            bias=None if ref_bias is None else ref_bias.detach(), **kw)
            ref_seq = seq_of(ref_tok)
        ref_chosen_logps, ref_rejected_logps = ref_seq[:n], ref_seq[n:]
    elif ref_chosen_logps is not None:
        ref_chosen_logps, ref_rejected_logps = ref_chosen_logps.detach(), ref_rejected_logps.detach()
    nll = None
    if nll_weight or "sft" in types:
        nll = -tok[:n].sum() / valid[:n].sum().clamp(min=1)
    pc, pr = seq[:n], seq[n:]
    if all(t in DPO_LOSS_TYPES for t in types):
        wpo = None
        if use_weighting:
            with torch.no_grad():
                s = transform_logits(F.linear(hidden, weight, bias), softcap=softcap, temperature=temperature)
                logden = torch.logsumexp(2 * s, -1) - 2 * torch.logsumexp(s, -1)
                w = torch.exp(((tok - logden) * valid).sum(-1) / cnt.clamp(min=1))
            wpo = w[:n] * w[n:]
        lengths = cnt if seq_lengths is None else seq_lengths
        out = dpo_loss(pc, pr, ref_chosen_logps, ref_rejected_logps, beta=beta, loss_type=types,
                       label_smoothing=label_smoothing, chosen_lengths=lengths[:n], rejected_lengths=lengths[n:],
                       bco_delta=bco_delta, reference_free=reference_free, nll_loss=nll, nll_weight=nll_weight,
                       loss_weights=loss_weights, f_divergence_type=f_divergence_type,
                       f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, wpo_weights=wpo)
        if "sft" in types and nll_weight:
            from dataclasses import replace

            out = replace(out, loss=out.loss + nll_weight * nll)
        return out
    loss_type = types[0]
    if loss_type == "orpo":
        return orpo_loss(pc, pr, beta=beta, nll_loss=nll, nll_weight=nll_weight)
    if loss_type in ("simpo", "cpo"):
        return cpo_loss(pc, pr, beta=beta, loss_type="simpo" if loss_type == "simpo" else "sigmoid",
                        label_smoothing=label_smoothing, simpo_gamma=simpo_gamma, nll_loss=nll,
                        nll_weight=nll_weight, alpha=alpha)
    raise ValueError(f"unknown loss_type {loss_type!r}")


def linear_kto_loss(hidden, weight, labels, desirable, *, bias=None, ref_logps=None, ref_hidden=None, ref_weight=None,
                    ref_bias=None, kl=None, kl_hidden=None, kl_labels=None, ref_kl_logps=None, ref_kl_hidden=None,
                    loss_type="kto", beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, ignore_index=-100,
                    shift=False, temperature=1.0, softcap=None, average_log_prob=False) -> KTOLossOutput:
    """Eager ``fused_linear_kto_loss``: summed (``average_log_prob``: averaged) sequence log-probs of the N
    examples from full logits, split by
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
    _, seq = _sequence_logps(hidden, weight, bias, labels, average_log_prob, *args)
    if ref_hidden is not None:
        with torch.no_grad():
            _, ref_logps = _sequence_logps(ref_hidden, rw, rb, labels, average_log_prob, *args)
    policy_kl = None
    if kl is None and kl_hidden is not None:
        with torch.no_grad():
            _, policy_kl = _sequence_logps(kl_hidden, weight.detach(), None if bias is None else bias.detach(),
                                           kl_labels, average_log_prob, *args)
            if ref_kl_hidden is not None:
                _, ref_kl_logps = _sequence_logps(ref_kl_hidden, rw, rb, kl_labels, average_log_prob, *args)
    return kto_loss(seq[desirable], seq[~desirable], ref_logps[desirable], ref_logps[~desirable],
                    policy_kl_logps=policy_kl, ref_kl_logps=ref_kl_logps, kl=kl, beta=beta,
                    desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, loss_type=loss_type)
