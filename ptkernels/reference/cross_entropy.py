"""Eager definitions of cross-entropy and token log-probs: the spec and the test oracle.

Everything here materializes the full ``[N, V]`` logits on purpose. These functions are short so that the
formulas can be read off them; every fused path in ``ptkernels.ops`` is tested against them in float64.

Logit transform, applied in this order to the raw logits ``z = hidden @ weight.T + bias``:
    softcap:      s = softcap * tanh(z / softcap)      (Gemma 2's final-logit soft capping)
    temperature:  s = s / temperature
Cross-entropy per token (label smoothing eps, z-loss coefficient c, lse = logsumexp(s)):
    loss = (1 - eps) * (lse - s[y]) + eps * (lse - mean(s)) + c * lse**2
"""

from __future__ import annotations

import torch

from ..types import compute_dtype


def transform_logits(logits: torch.Tensor, softcap: float | None = None, temperature: float = 1.0):
    """Upcast to fp32 (fp64 stays fp64), then soft-cap, then divide by the temperature."""
    s = logits.to(compute_dtype(logits.dtype))
    if softcap is not None:
        s = softcap * torch.tanh(s / softcap)
    if temperature != 1.0:
        s = s / temperature
    return s


def shift_labels(labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Hugging Face's causal shift, applied to the labels: position t is scored against labels[t + 1]."""
    pad = torch.full_like(labels[..., :1], ignore_index)
    return torch.cat([labels[..., 1:], pad], dim=-1)


def reduce_losses(per_token: torch.Tensor, valid: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "none":
        return per_token
    if reduction == "sum":
        return per_token.sum()
    return per_token.sum() / valid.sum().clamp(min=1)


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Cross-entropy from logits ``[..., V]`` and labels ``[...]``; see the module docstring for the formula."""
    s = transform_logits(logits, softcap, temperature)
    valid = labels != ignore_index
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    lse = torch.logsumexp(s, dim=-1)
    nll = lse - s.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    loss = (1.0 - label_smoothing) * nll
    if label_smoothing:
        loss = loss + label_smoothing * (lse - s.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    loss = torch.where(valid, loss, torch.zeros_like(loss))
    return reduce_losses(loss, valid, reduction)


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    shift: bool = False,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, labels)``, with ``shift`` applied to the labels."""
    if shift:
        labels = shift_labels(labels, ignore_index)
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return cross_entropy(
        logits, labels, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing,
        z_loss=z_loss, softcap=softcap, temperature=temperature,
    )


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
):
    """log p(target) per token (0 where ``targets == ignore_index``) [, entropy -sum p log p per token]."""
    s = transform_logits(logits, softcap, temperature)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    logp_all = torch.log_softmax(s, dim=-1)
    logp = logp_all.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = torch.where(valid, logp, torch.zeros_like(logp))
    if not return_entropy:
        return logp
    entropy = -(logp_all.exp() * logp_all).sum(dim=-1)
    entropy = torch.where(valid, entropy, torch.zeros_like(entropy))
    return logp, entropy


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
):
    """``token_logprobs(hidden @ weight.T + bias, targets)``."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    return token_logprobs(
        logits, targets, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
        return_entropy=return_entropy,
    )
