"""One process or many: the same trainer under ``torchrun --nproc_per_node N`` uses torch.distributed.

DDP by default; ``--distributed fsdp`` shards with FSDP2 (``fully_shard`` on every decoder layer, then the whole
training module). Backend: NCCL on GPUs, gloo on CPU. The training module's ``forward`` computes the loss
itself, so FSDP2 has the output head unsharded while the fused loss reads its weight.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed() -> DistInfo:
    """Joins the process group when started by torchrun (WORLD_SIZE > 1); picks this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world <= 1:
        return DistInfo(device=device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown(info: DistInfo) -> None:
    """Leaves the process group. On a normal exit every process first meets at a barrier: gloo aborts the process
    ("terminate called without an active exception") when one rank tears its group down while a peer's last
    collective (FSDP2's final reduce-scatter, the checkpoint's gathers) is still in flight. On an error there is
    no barrier, since the failed peers would never arrive."""
    if not (info.enabled and dist.is_initialized()):
        return
    if sys.exc_info()[0] is None:
        dist.barrier()
    dist.destroy_process_group()


def wrap(module: nn.Module, model: nn.Module, info: DistInfo, mode: str) -> nn.Module:
    """``module`` (whose forward computes the loss of ``model``) for data-parallel training."""
    if not info.enabled:
        return module
    if mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [info.device.index] if info.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=ids)
    if mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in _decoder_layers(model):
            fully_shard(layer)
        fully_shard(module)
        return module
    raise ValueError(f"--distributed must be 'ddp' or 'fsdp', got {mode!r}")


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    if hasattr(model, "peft_config") and hasattr(model, "get_base_model"):  # LoRA: the adapted model inside PEFT's
        model = model.get_base_model()
    base = getattr(model, "base_model", model)
    layers = getattr(base, "layers", None)
    return list(layers) if layers is not None else []


@contextlib.contextmanager
def gradient_sync(module: nn.Module, mode: str, enabled: bool):
    """Gradient all-reduce only on the last micro-batch of an accumulated step."""
    if enabled:
        yield
    elif hasattr(module, "no_sync"):  # DDP
        with module.no_sync():
            yield
    elif hasattr(module, "set_requires_gradient_sync"):  # FSDP2
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """The sum over processes of a float64 tensor (moved to the communication device and back)."""
    if not info.enabled:
        return values
    t = values.to(info.device)
    dist.all_reduce(t)
    return t.cpu()


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()
