"""Custom op of generalized advantage estimation (csrc/*/gae.*)."""

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


@torch.library.custom_op("ptkernels::gae", mutates_args=())
def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) [B, T] of contiguous rewards, values, mask (one float dtype); see ops/ppo.py."""
    check_tensor("rewards", rewards, rewards.device, dim=2)
    check_device("rewards", rewards)
    check_tensor("rewards", rewards, rewards.device, dtypes=VEC_DTYPES[rewards.device.type])
    for name, t in (("values", values), ("mask", mask)):
        check_tensor(name, t, rewards.device, dtypes=(rewards.dtype,))
        if tuple(t.shape) != tuple(rewards.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)} but rewards has shape {tuple(rewards.shape)}")
    for name, t in (("rewards", rewards), ("values", values), ("mask", mask)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous, got strides {t.stride()}")
    if not (0.0 <= gamma <= 1.0 and 0.0 <= lam <= 1.0):
        raise ValueError(f"gamma and lam must be in [0, 1], got {gamma}, {lam}")
    b, t = rewards.shape
    adv = torch.empty_like(rewards)
    ret = torch.empty_like(rewards)
    if b == 0 or t == 0:
        return adv, ret
    if rewards.device.type == "cuda":
        with torch.cuda.device(rewards.device):
            lib().cuda_gae(rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), adv.data_ptr(), ret.data_ptr(), b,
                           t, gamma, lam, cuda_stream(rewards))
        return adv, ret
    lib().cpu_gae(rewards.data_ptr(), values.data_ptr(), mask.data_ptr(), adv.data_ptr(), ret.data_ptr(), b, t,
                  gamma, lam, DTYPE_CODES[rewards.dtype], threads())
    return adv, ret


@gae.register_fake
def _(rewards, values, mask, gamma, lam):
    return torch.empty_like(rewards), torch.empty_like(rewards)

