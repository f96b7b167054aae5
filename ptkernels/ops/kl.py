"""Per-token KL penalty estimators between the policy and a reference policy."""

from __future__ import annotations

import torch

from ..types import KL_ESTIMATORS, compute_dtype
from .core.checks import check_float, check_same


def kl_penalty(logps: torch.Tensor, ref_logps: torch.Tensor, *, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled tokens (any equal shapes).

    With d = logps - ref_logps (Schulman, "Approximating KL divergence")::

        k1 = d                                   unbiased, can be negative
        k2 = d^2 / 2                             biased, low variance
        k3 = exp(-d) + d - 1 = exp(ref - logp) - (ref - logp) - 1     unbiased, >= 0 (GRPO's choice)

    Elementwise, differentiable w.r.t. both inputs (autograd). fp32 (fp64 for fp64 input). Masked positions
    are the caller's business (multiply by the mask, or pass equal values there).
    """
    check_float("logps", logps)
    check_float("ref_logps", ref_logps)
    if tuple(logps.shape) != tuple(ref_logps.shape):
        raise ValueError(f"logps has shape {tuple(logps.shape)} but ref_logps has shape "
                         f"{tuple(ref_logps.shape)}; they must match")
    check_same("logps", logps, "ref_logps", ref_logps, dtype=False)
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(KL_ESTIMATORS)}; got {estimator!r}")
    cd = compute_dtype(logps.dtype) if logps.dtype == torch.float64 else compute_dtype(ref_logps.dtype)
    d = logps.to(cd) - ref_logps.to(cd)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * d * d
    return torch.expm1(-d) + d
