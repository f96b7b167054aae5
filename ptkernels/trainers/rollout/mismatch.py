"""The sampler/trainer mismatch of a vLLM rollout: the sampler's per-token log-probs laid out as the training batch,
what the loss takes to correct for them, and the metrics that measure the mismatch from the trainer's side.

vLLM samples with its own kernels (and on a GPU often another precision), so its log p of a sampled token is not
exactly the trainer's. TRL 1.16 / verl correct the policy loss with an importance weight
``exp(logp_trainer_old - logp_sampler)``, truncated (TIS) or masked (MIS), per token or per sequence; the option
names here are TRL's (``--vllm-importance-sampling-*``). The weight itself is the loss op's business
(``sampler_logps=``); the metrics below need no op: mean |Δlogp| over completion tokens and the token-level
ratio's mean / max / fraction outside ``[clip_min, clip_max]``.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .vllm_engine import sampler_logps_tensor

__all__ = ["correction_enabled", "correction_kwargs", "mismatch_metrics", "sampler_logps_rows"]


def correction_enabled(cfg) -> bool:
    """The correction applies with the vLLM engine only (the built-in engines sample with the trainer's own
    forward: no sampler log-probs, identical numerics)."""
    return cfg.rollout_engine == "vllm" and cfg.vllm_importance_sampling_correction


def correction_kwargs(cfg, sampler_logps: torch.Tensor | None) -> dict:
    """The loss op's keyword arguments of the correction (empty when it is off or the rollout has no sampler
    log-probs)."""
    if sampler_logps is None or not correction_enabled(cfg):
        return {}
    return {"sampler_logps": sampler_logps, "vllm_importance_sampling_mode": cfg.vllm_importance_sampling_mode,
            "vllm_importance_sampling_clip_min": cfg.vllm_importance_sampling_clip_min or None,
            "vllm_importance_sampling_clip_max": cfg.vllm_importance_sampling_clip_max}


def sampler_logps_rows(rollout, rows: list[int], width: int) -> torch.Tensor | None:
    """``[len(rows), width]`` sampler log-probs of ``rollout``'s rows ``rows``, aligned with the training batch's
    per-token log-probs (``vllm_engine.sampler_logps_tensor``); None for a rollout without them (built-in engines)."""
    logps = getattr(rollout, "sampler_logps", None)
    if not logps:
        return None
    picked = SimpleNamespace(prompt_ids=[rollout.prompt_ids[i] for i in rows],
                             sampler_logps=[logps[i] for i in rows])
    return sampler_logps_tensor(picked, width)


@torch.no_grad()
def mismatch_metrics(trainer_logps: torch.Tensor, sampler_logps: torch.Tensor, mask: torch.Tensor,
                     clip_min: float, clip_max: float) -> dict[str, float]:
    """Per completion token (``mask``): mean |trainer - sampler| log-prob, and the importance ratio
    exp(trainer - sampler)'s mean, max and fraction outside ``[clip_min, clip_max]``."""
    m = mask.bool()
    if not bool(m.any()):  # the same keys on every process (the loop all-reduces them)
        return dict.fromkeys(("sampler_logp_abs_diff", "sampler_is_ratio_mean", "sampler_is_ratio_max",
                              "sampler_is_outside_fraction"), 0.0)
    diff = (trainer_logps.double() - sampler_logps.double())[m]
    ratio = diff.exp()
    outside = (ratio < clip_min) | (ratio > clip_max)
    return {"sampler_logp_abs_diff": diff.abs().mean().item(), "sampler_is_ratio_mean": ratio.mean().item(),
            "sampler_is_ratio_max": ratio.max().item(), "sampler_is_outside_fraction": outside.double().mean().item()}
