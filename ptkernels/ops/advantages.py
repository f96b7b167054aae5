"""Advantage estimators beside GRPO's ``group_advantages``: RLOO (TRL 1.16.0's ``RLOOTrainer``), REINFORCE++ and
ReMax (verl's ``compute_reinforce_plus_plus_outcome_advantage`` / ``compute_remax_outcome_advantage``).

O(N) or O(B T) elementwise work: PyTorch ops on every backend (no kernel of their own); ``backend="reference"``
runs the float64 oracle's eager code (``ptkernels.reference.rl``). Not differentiable; fp32 (fp64 for fp64
input). Dr. GRPO's advantages are ``group_advantages(..., scale="none")``.
"""

from __future__ import annotations

import torch

from ..reference import rl as ref_rl
from ..types import compute_dtype
from .core.checks import check_float, check_same
from .core.dispatch import resolve_backend

__all__ = ["reinforce_plus_plus_advantages", "remax_advantages", "rloo_advantages"]


def _check_tokens(token_rewards: torch.Tensor, mask: torch.Tensor) -> None:
    check_float("token_rewards", token_rewards)
    if token_rewards.dim() != 2:
        raise ValueError(f"token_rewards must be 2-D [B, T], got shape {tuple(token_rewards.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(token_rewards.shape):
        raise ValueError(f"mask must be a tensor of the shape of token_rewards {tuple(token_rewards.shape)}")
    check_same("mask", mask, "token_rewards", token_rewards, dtype=False)


def rloo_advantages(rewards: torch.Tensor, *, group_size: int, normalize_advantages: bool = False,
                    eps: float = 1e-4, kl: torch.Tensor | None = None, beta: float = 0.0, backend: str = "auto"):
    """RLOO advantages, TRL 1.16.0's ``RLOOTrainer._generate_and_score_completions``, of ``rewards [N]`` in
    consecutive groups of ``group_size`` (NaN = unscorable)::

        r = rewards - beta * kl                 kl [N]: each sequence's summed k1, sum_t (old - ref) m (TRL's)
        A_i = r_i - (nansum_g(r) - r_i) / (count_g - 1)      the mean of the scorable siblings
        normalize_advantages: A = (A - nanmean(A)) / (nanstd(A) + eps)      over the batch
        A = nan_to_num(A, 0)

    TRL's defaults: ``beta=0.05`` in ``RLOOConfig`` (0 here: pass it with ``kl``), ``normalize_advantages=False``.
    A group of one gives 0 (no sibling; TRL divides by 0 and maps the NaN to 0).
    """
    check_float("rewards", rewards)
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be 1-D [N], got shape {tuple(rewards.shape)}")
    if not isinstance(group_size, int) or group_size <= 0 or rewards.shape[0] % group_size:
        raise ValueError(f"group_size must be a positive int dividing N={rewards.shape[0]}, got {group_size!r}")
    if kl is not None:
        check_float("kl", kl)
        if tuple(kl.shape) != tuple(rewards.shape):
            raise ValueError(f"kl has shape {tuple(kl.shape)} but rewards has shape {tuple(rewards.shape)}")
    elif beta != 0.0:
        raise ValueError("beta != 0 needs kl (each sequence's summed old - ref log-prob)")
    cd = compute_dtype(rewards.dtype)
    r = rewards.detach().to(cd)
    k = kl.detach().to(cd) if kl is not None else None
    if resolve_backend(backend, rewards.device) == "reference":
        return ref_rl.rloo_advantages(r, group_size=group_size, normalize_advantages=normalize_advantages, eps=eps,
                                      kl=k, beta=beta)
    with torch.no_grad():
        if k is not None and beta != 0.0:
            r = r - beta * k
        grouped = r.view(-1, group_size)
        cnt = (~torch.isnan(grouped)).sum(1, keepdim=True).to(cd)
        base = (torch.nansum(grouped, 1, keepdim=True) - grouped) / (cnt - 1)
        a = (grouped - base).reshape(-1)
        if normalize_advantages:
            from .backends.torch import nanstd

            a = (a - torch.nanmean(a)) / (nanstd(a).reshape(()) + eps)
        return torch.nan_to_num(a, nan=0.0, posinf=0.0, neginf=0.0)


def reinforce_plus_plus_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, *, gamma: float = 1.0,
                                   kl: torch.Tensor | None = None, kl_coef: float = 0.001, backend: str = "auto"):
    """REINFORCE++ (verl's ``compute_reinforce_plus_plus_outcome_advantage``, with ``apply_kl_penalty``'s
    token-level KL in the reward when ``kl`` is given) → ``(advantages, returns)``, ``[B, T]``::

        r_t = token_rewards_t - kl_coef * kl_t * m_t      kl: e.g. k1 = old - ref per token (verl's "kl")
        G_t = r_t + gamma * G_{t+1}                        the running return reset to 0 where m_t = 0
        A   = (G - mu) * rsqrt(var + 1e-8) * m              global batch whitening over every valid token:
              mu = sum(G m) / (sum m + 1e-8), var = sum((G - mu)^2 m) / (sum m + 1e-8) * n / (n - 1), n = sum m

    ``token_rewards [B, T]``: the score on each sequence's last valid token (0 elsewhere), as verl lays it out.
    verl's defaults: gamma 1.0, kl_coef 0.001 (``kl_ctrl.kl_coef``). Needs at least 2 valid tokens.
    """
    _check_tokens(token_rewards, mask)
    if kl is not None:
        check_float("kl", kl)
        if tuple(kl.shape) != tuple(token_rewards.shape):
            raise ValueError(f"kl has shape {tuple(kl.shape)} but token_rewards has shape "
                             f"{tuple(token_rewards.shape)}")
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    cd = compute_dtype(token_rewards.dtype)
    tr = token_rewards.detach().to(cd)
    m = mask.detach().to(cd)
    k = kl.detach().to(cd) if kl is not None else None
    if resolve_backend(backend, token_rewards.device) == "reference":
        return ref_rl.reinforce_pp_advantages(tr, m, gamma=gamma, kl=k, kl_coef=kl_coef)
    with torch.no_grad():
        r = tr if k is None else tr - kl_coef * k * m
        returns = torch.empty_like(r)
        running = torch.zeros(r.shape[0], dtype=cd, device=r.device)
        for t in reversed(range(r.shape[1])):
            running = r[:, t] + gamma * running
            returns[:, t] = running
            running = running * m[:, t]
        n = m.sum()
        mu = (returns * m).sum() / (n + 1e-8)
        var = ((returns - mu) ** 2 * m).sum() / (n + 1e-8) * (n / (n - 1))
        return (returns - mu) * torch.rsqrt(var + 1e-8) * m, returns


def remax_advantages(token_rewards: torch.Tensor, mask: torch.Tensor, baseline: torch.Tensor, *,
                     backend: str = "auto"):
    """ReMax (verl's ``compute_remax_outcome_advantage``) → ``(advantages, returns)``, ``[B, T]``::

        returns_t = sum_{s >= t} token_rewards_s m_s          (reverse cumulative sum)
        A_t       = returns_t - baseline_b m_t

    ``baseline [B]``: the reward of one greedy (``do_sample=False``) rollout of each sequence's prompt, which
    the caller generates and scores. No whitening (as verl).
    """
    _check_tokens(token_rewards, mask)
    check_float("baseline", baseline)
    if tuple(baseline.shape) != (token_rewards.shape[0],):
        raise ValueError(f"baseline has shape {tuple(baseline.shape)} but token_rewards implies "
                         f"({token_rewards.shape[0]},): one greedy-rollout reward per sequence")
    cd = compute_dtype(token_rewards.dtype)
    tr, m, b = token_rewards.detach().to(cd), mask.detach().to(cd), baseline.detach().to(cd)
    if resolve_backend(backend, token_rewards.device) == "reference":
        return ref_rl.remax_advantages(tr, m, b)
    with torch.no_grad():
        returns = (tr * m).flip(-1).cumsum(-1).flip(-1)
        return returns - b.unsqueeze(1) * m, returns


