"""Custom op of GRPO's group-relative advantages (csrc/*/group_advantages.*)."""

from __future__ import annotations

import torch

from .common import (
    DTYPE_CODES,
    VEC_DTYPES,
    check_device,
    check_tensor,
    cuda_stream,
    lib,
    threads,
)


@torch.library.custom_op("ptkernels::group_advantages", mutates_args=())
def group_advantages(rewards: torch.Tensor, group_size: int, scale_mode: int, eps: float) -> torch.Tensor:
    """GRPO advantages of contiguous ``rewards [N]``; scale_mode 0 "group", 1 "batch", 2 "none" (ops/grpo.py)."""
    check_tensor("rewards", rewards, rewards.device, dim=1)
    check_device("rewards", rewards)
    check_tensor("rewards", rewards, rewards.device, dtypes=VEC_DTYPES[rewards.device.type])
    if not rewards.is_contiguous():
        raise ValueError(f"rewards must be contiguous, got stride {rewards.stride()}")
    n = rewards.shape[0]
    if group_size <= 0 or n % group_size != 0:
        raise ValueError(f"group_size={group_size} must be positive and divide the number of rewards {n}")
    if scale_mode not in (0, 1, 2):
        raise ValueError(f"scale_mode must be 0 (group), 1 (batch) or 2 (none), got {scale_mode}")
    if not eps >= 0.0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    out = torch.empty_like(rewards)
    if n == 0:
        return out
    if rewards.device.type == "cuda":
        with torch.cuda.device(rewards.device):
            lib().cuda_group_advantages(rewards.data_ptr(), out.data_ptr(), n, group_size, scale_mode, eps,
                                        cuda_stream(rewards))
        return out
    lib().cpu_group_advantages(rewards.data_ptr(), out.data_ptr(), n, group_size, scale_mode, eps,
                               DTYPE_CODES[rewards.dtype], threads())
    return out


@group_advantages.register_fake
def _(rewards, group_size, scale_mode, eps):
    return torch.empty_like(rewards)
