"""The shared math of the preference losses: the per-pair losses of every loss type, KTO's per-example losses and
reference point, argument checks and the output dataclass. Used by the losses on sequence log-probs
(ops/preference.py) and by the fused chunk loop (ops/fused_preference_loop.py). Notation in ops/preference.py.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..types import DPO_LOSS_TYPES, F_DIVERGENCE_LOSS_TYPES, F_DIVERGENCE_TYPES, PreferenceLossOutput, compute_dtype
from .core.checks import check_float

# Everything pair_losses understands: the DPO family (with a reference; reference-free they are CPO's losses),
# SimPO and ORPO (reference-free by definition).
PAIR_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo")
REFERENCE_FREE_TYPES = ("simpo", "orpo")
LENGTH_NORMALIZED_TYPES = ("ipo", "sigmoid_norm")  # divide each score by its completion length (clamped at 1)
BATCH_COUPLED_TYPES = ("aot", "aot_unpaired")  # sort over the batch: a pair's loss depends on the others
SMOOTHING_TYPES = ("robust", "exo_pair", "aot", "aot_unpaired", "cdpo")  # the types that read label_smoothing
_LN2 = math.log(2.0)
# dpo_loss's sft term is nll_loss, never derived from the sums (see its docstring)
SFT_NEEDS_NLL = ("loss_type 'sft' needs nll_loss: TRL 1.16's sft term is the mean of -log p over the chosen "
                 "completions' tokens, unweighted (no LD-DPO ld_alpha) and over TRL's shifted completion mask, which "
                 "the summed log-probs and lengths cannot give in general. Pass it as nll_loss (for plain sums over "
                 "n scored tokens each: nll_loss=-policy_chosen_logps.sum() / n.sum()), or use "
                 "fused_linear_preference_loss, which computes it")


@dataclass(frozen=True)
class DPOSpec:
    """A checked DPO-family configuration: the loss types with their weights (TRL's MPO) and their options."""

    loss_types: tuple
    loss_weights: tuple
    beta: float
    label_smoothing: float = 0.0
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    discopop_tau: float = 0.05
    bco_delta: float | None = None

    @property
    def length_normalized(self) -> bool:
        return any(t in LENGTH_NORMALIZED_TYPES for t in self.loss_types)

    @property
    def batch_coupled(self) -> bool:
        return any(t in BATCH_COUPLED_TYPES for t in self.loss_types)

    @property
    def sft_weight(self) -> float:
        return sum(w for t, w in zip(self.loss_types, self.loss_weights) if t == "sft")


def dpo_spec(loss_type, *, beta, label_smoothing=0.0, loss_weights=None, f_divergence_type="reverse_kl",
             f_alpha_divergence_coef=0.5, discopop_tau=0.05, bco_delta=None, use_weighting=False) -> DPOSpec:
    """Check a DPO-family configuration with TRL 1.16's rules (DPOConfig.__post_init__, DPOTrainer.__init__)."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    if not types:
        raise ValueError("loss_type is an empty list: give at least one loss type")
    for t in types:
        if t not in DPO_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {t!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    if loss_weights is None:
        weights = (1.0,) * len(types)
    else:
        weights = tuple(float(w) for w in loss_weights)
        if len(weights) != len(types):
            raise ValueError(f"loss_weights has {len(weights)} entries but loss_type has {len(types)} "
                             f"({', '.join(types)}): one weight per loss type")
    if not (isinstance(beta, (int, float)) and beta > 0):
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    eps = float(label_smoothing)
    if not 0.0 <= eps < 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
    if "robust" in types and not eps < 0.5:
        raise ValueError(f"loss_type='robust' needs label_smoothing < 0.5 (it divides by 1 - 2 eps), got {eps}")
    if "exo_pair" in types and eps == 0.0:
        raise ValueError("loss_type='exo_pair' needs label_smoothing > 0 (its loss has log(label_smoothing); "
                         "TRL 1.16 and Liger 0.8.5 raise too; the EXO paper uses 1e-3)")
    if eps > 0 and not any(t in SMOOTHING_TYPES for t in types):
        warnings.warn(f"label_smoothing={eps} is ignored by loss_type {', '.join(types)} (as in TRL 1.16, where "
                      f"only robust, exo_pair, aot and aot_unpaired read it); for conservative DPO (cDPO) use "
                      f"loss_type='cdpo'", UserWarning, stacklevel=3)
    if f_divergence_type not in F_DIVERGENCE_TYPES:
        raise ValueError(f"unknown f_divergence_type {f_divergence_type!r}; valid: {', '.join(F_DIVERGENCE_TYPES)}")
    if f_divergence_type != "reverse_kl":
        bad = [t for t in types if t not in F_DIVERGENCE_LOSS_TYPES]
        if bad:
            raise ValueError(f"f_divergence_type={f_divergence_type!r} has no generalization for loss_type "
                             f"{', '.join(bad)} (TRL 1.16 accepts it only with {', '.join(F_DIVERGENCE_LOSS_TYPES)})")
    if not discopop_tau > 0:
        raise ValueError(f"discopop_tau must be > 0, got {discopop_tau}")
    if use_weighting and any(t in BATCH_COUPLED_TYPES for t in types):
        raise NotImplementedError("use_weighting (WPO) is not defined for loss_type aot / aot_unpaired "
                                  "(TRL 1.16 raises NotImplementedError too)")
    return DPOSpec(types, weights, float(beta), eps, f_divergence_type, float(f_alpha_divergence_coef),
                   float(discopop_tau), None if bco_delta is None else bco_delta)


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


def f_divergence_scores(spec: DPOSpec, logratio: torch.Tensor, input_dtype: torch.dtype) -> torch.Tensor:
    """TRL 1.16's score f'(exp(lr)) of a log-ratio, with f'(t)'s constant term kept:
    reverse_kl lr; forward_kl 1 - exp(-lr); js_divergence log 2 + ls(lr); alpha_divergence
    (exp(clamp((a - 1) lr, max=C)) - 1) / (a - 1) (lr when |a - 1| < 1e-6), C = 11 for fp16 input, else 80."""
    kind = spec.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1.0 - torch.exp(-logratio)
    if kind == "js_divergence":
        return _LN2 + F.logsigmoid(logratio)
    a = spec.f_alpha_divergence_coef
    if abs(a - 1.0) < 1e-6:
        return logratio
    cap = 11.0 if input_dtype == torch.float16 else 80.0  # TRL: {fp16: 11, bf16: 80, fp32: 80} (fp64: 80 here)
    return (torch.exp(((a - 1.0) * logratio).clamp(max=cap)) - 1.0) / (a - 1.0)


def _smoothed_pair(d, beta, eps):
    return -F.logsigmoid(beta * d) * (1.0 - eps) - F.logsigmoid(-beta * d) * eps


def dpo_type_losses(t: str, spec: DPOSpec, pc, pr, rc, rr, sc, sr, lengths):
    """Per-pair loss of one DPO loss type (TRL 1.16 ``DPOTrainer._compute_loss``; sft excluded). ``sc``/``sr``
    are the f-divergence scores of the log-ratios; ``lengths`` (lc, lr) the completion lengths or None."""
    beta, eps = spec.beta, spec.label_smoothing
    clr, rlr = pc - rc, pr - rr
    u = beta * (sc - sr)
    if t == "sigmoid":
        return -F.logsigmoid(u)
    if t == "cdpo":
        return smoothed_sigmoid_loss(u, eps)
    if t == "hinge":
        return torch.relu(1.0 - u)
    if t in LENGTH_NORMALIZED_TYPES:
        if lengths is None:
            raise ValueError(f"loss_type={t!r} divides each score by its completion length (TRL 1.16): pass "
                             f"chosen_lengths and rejected_lengths")
        lc, lr = (x.clamp(min=1.0) for x in lengths)
        d = sc / lc - sr / lr
        if t == "ipo":
            return (d - 1.0 / (2.0 * beta)) ** 2
        return -F.logsigmoid(beta * d)
    if t == "exo_pair":
        return torch.sigmoid(u) * (F.logsigmoid(u) - math.log1p(-eps)) + torch.sigmoid(-u) * (
            F.logsigmoid(-u) - math.log(eps))
    if t == "robust":
        return (-(1.0 - eps) * F.logsigmoid(u) + eps * F.logsigmoid(-u)) / (1.0 - 2.0 * eps)
    if t == "nca_pair":
        return -F.logsigmoid(beta * clr) - 0.5 * F.logsigmoid(-beta * clr) - 0.5 * F.logsigmoid(-beta * rlr)
    if t == "bco_pair":
        delta = 0.0 if spec.bco_delta is None else spec.bco_delta
        return -F.logsigmoid(beta * clr - delta) - F.logsigmoid(delta - beta * rlr)
    if t == "sppo_hard":
        return (clr - 0.5 / beta) ** 2 + (rlr + 0.5 / beta) ** 2
    if t == "aot":
        return _smoothed_pair(torch.sort(pc - pr).values - torch.sort(rc - rr).values, beta, eps)
    if t == "aot_unpaired":
        return _smoothed_pair(torch.sort(clr).values - torch.sort(rlr).values, beta, eps)
    if t == "apo_zero":
        return torch.sigmoid(-beta * clr) + torch.sigmoid(beta * rlr)  # 1 - sigma(x) = sigma(-x)
    if t == "apo_down":
        return torch.sigmoid(beta * clr) + torch.sigmoid(-beta * (clr - rlr))
    if t == "discopop":
        mod = torch.sigmoid(u / spec.discopop_tau)
        return -F.logsigmoid(u) * (1.0 - mod) + torch.exp(-u) * mod
    raise ValueError(f"unknown loss_type {t!r}; valid: {', '.join(DPO_LOSS_TYPES)}")


def dpo_losses(spec: DPOSpec, pc, pr, rc, rr, *, lengths=None, nll=None, pair_weights=None,
               input_dtype=torch.float32):
    """The DPO family's per-pair loss ``sum_k w_k l_k`` (times WPO's ``pair_weights`` when given) and rewards.

    ``rc``/``rr`` None: reference-free (zeros). ``nll``: the sft term's value (the token-pooled NLL of the chosen
    completions, one scalar expanded to every pair; ``dpo_loss`` takes it from ``nll_loss`` only); None leaves sft
    out (the fused loop adds it itself).
    Rewards are ``beta * (pi - ref)`` of the given (summed, LD-weighted) log-probs for every loss type, as TRL 1.16
    logs them. Returns ``(losses, chosen_rewards, rejected_rewards)``.
    """
    if rc is None:
        rc, rr = torch.zeros_like(pc), torch.zeros_like(pr)
    sc = f_divergence_scores(spec, pc - rc, input_dtype)
    sr = f_divergence_scores(spec, pr - rr, input_dtype)
    total = torch.zeros_like(pc)
    for t, w in zip(spec.loss_types, spec.loss_weights):
        if t == "sft":
            if nll is None:
                continue
            term = nll.expand_as(pc)
        else:
            term = dpo_type_losses(t, spec, pc, pr, rc, rr, sc, sr, lengths)
        total = total + w * term
    if pair_weights is not None:
        total = total * pair_weights
    return total, (spec.beta * (pc - rc)).detach(), (spec.beta * (pr - rr)).detach()


def alphapo_rewards(logps: torch.Tensor, alpha: float) -> torch.Tensor:
    """AlphaPO's reward shape (TRL CPOTrainer, ``alpha != 0``): ``(1 - exp(pi)^(-alpha)) / alpha``."""
    return -torch.expm1(-alpha * logps) / alpha


def pair_losses(loss_type: str, pc, pr, rc, rr, *, beta: float, label_smoothing: float = 0.0,
                gamma: float = 0.0, alpha: float = 0.0, spec: DPOSpec | None = None, lengths=None, nll=None,
                pair_weights=None, input_dtype=torch.float32):
    """Per-pair losses and implicit rewards.

    ``loss_type``: "dpo" (the DPO family described by ``spec``), "simpo", "orpo", or a CPO type (sigmoid,
    hinge, ipo: reference-free, TRL's CPOTrainer with cDPO smoothing on sigmoid). ``gamma`` is SimPO's margin,
    ``alpha`` AlphaPO's (CPO/SimPO). Returns ``(losses, chosen_rewards, rejected_rewards, extras)``; rewards are
    detached; ``extras`` holds ORPO's ``log_odds`` and ``ratio = ls(log_odds)`` (else empty).
    """
    if loss_type == "dpo":
        losses, cw, rw = dpo_losses(spec, pc, pr, rc, rr, lengths=lengths, nll=nll, pair_weights=pair_weights,
                                    input_dtype=input_dtype)
        return losses, cw, rw, {}
    eps = float(label_smoothing)
    if loss_type == "orpo":
        log_odds = (pc - pr) - (log1mexp(pc) - log1mexp(pr))
        ratio = F.logsigmoid(log_odds)
        return -beta * ratio, (beta * pc).detach(), (beta * pr).detach(), {"log_odds": log_odds.detach(),
                                                                           "ratio": ratio.detach()}
    if alpha:
        pc, pr = alphapo_rewards(pc, alpha), alphapo_rewards(pr, alpha)
    logits = pc - pr
    if loss_type == "simpo":
        losses = smoothed_sigmoid_loss(beta * logits - gamma, eps)
    elif loss_type == "sigmoid":
        losses = smoothed_sigmoid_loss(beta * logits, eps)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return losses, (beta * pc).detach(), (beta * pr).detach(), {}


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
