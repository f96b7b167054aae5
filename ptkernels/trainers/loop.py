"""The training loop every stage shares: AdamW, warmup + cosine, gradient accumulation, clipping, logging,
atomic checkpoints, exact resume, Ctrl-C.

A stage hands over a ``TrainingModule``: an ``nn.Module`` whose ``forward(batch, norm)`` returns
``(loss, metrics)`` where ``loss`` is the *sum* of the per-item losses of the micro-batch divided by ``norm``,
and ``metrics`` maps names to per-item *sums* (detached tensors). An "item" is what the stage normalizes by:
a label token (pretrain, SFT), a pair (reward model, DPO family) or an example (KTO). ``norm`` is the item
count of the whole accumulated step over all processes divided by the number of processes, so after DDP's
gradient averaging every step's gradient is the mean over all its items, whatever the micro-batch split:
one process with batch 8 and two processes with batch 4 take the same steps.

Data order is a function of the step: the examples are shuffled once per epoch from ``seed`` and step ``s``
takes the next ``batch_size * grad_accum * world_size`` of that stream. So the data position in a checkpoint is
just the step, and ``--resume`` continues exactly as if the run had never stopped.
"""

from __future__ import annotations

import abc
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from . import checkpoint as ckpt
from .config import TrainConfig, to_dict
from .distributed import DistInfo, all_reduce_sum, barrier, gradient_sync, wrap


class TrainingModule(nn.Module, abc.ABC):
    """Base class of the stages' loss modules: ``self.model`` is the model that is trained and saved."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abc.abstractmethod
    def count(self, batch: dict) -> float:
        """The items of a micro-batch (see the module docstring)."""

    def saved_models(self) -> dict[str, str]:
        """Where each trained submodule goes: {sub-folder of the output ('' = the output itself): attribute}."""
        return {"": "model"}


class StepOrder:
    """Which examples each micro-batch of each step holds: a seeded shuffle per epoch, read as one stream."""

    def __init__(self, n: int, seed: int):
        if n == 0:
            raise ValueError("the training data set is empty after tokenization and truncation")
        self.n, self.seed, self._perms = n, seed, {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g)}
        return self._perms[epoch]

    def indices(self, start: int, count: int) -> list[int]:
        return [int(self._perm(p // self.n)[p % self.n]) for p in range(start, start + count)]


class Dataset:
    """A fixed data set (offline stages): encoded examples and the function that collates a list of them.

    The data source interface the loop uses (on-policy stages implement it with rollouts):
    ``micro_batches(step, cfg, info)`` this process's micro-batches of optimizer step ``step``;
    ``state_dict()`` / ``load_state_dict()`` what a checkpoint must keep to continue exactly (here nothing:
    the order is a function of the step); ``metrics()`` extra numbers to log for the last step.
    """

    def __init__(self, examples: list, collate: Callable[[list], dict], seed: int = 0):
        self.examples, self.collate = examples, collate
        self.order = StepOrder(len(examples), seed)

    def micro_batches(self, step: int, cfg: TrainConfig, info: DistInfo) -> list[dict]:
        first = step * cfg.batch_size * cfg.grad_accum * info.world_size
        out = []
        for a in range(cfg.grad_accum):
            offset = first + (a * info.world_size + info.rank) * cfg.batch_size
            out.append(self.collate([self.examples[i] for i in self.order.indices(offset, cfg.batch_size)]))
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def metrics(self) -> dict:
        return {}


def lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        span = max(1, cfg.max_steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


class _StopFlag:
    """Ctrl-C finishes the current step, saves a checkpoint and exits; a second Ctrl-C stops at once."""

    def __init__(self):
        self.raised = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)


class Interrupted(Exception):
    """Training stopped by Ctrl-C after saving a checkpoint (the CLI exits with 130)."""


@dataclass
class TrainResult:
    steps: int
    metrics: list[dict] = field(default_factory=list)
    output_dir: str = ""


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def _tokens_in(batch: dict) -> int:
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    ids = batch.get("input_ids")
    return 0 if ids is None else int(ids.numel())


class _MetricsLog:
    def __init__(self, cfg: TrainConfig, info: DistInfo, append: bool):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.enabled = info.is_main
        self.tb = None
        if self.enabled:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if not append and os.path.exists(self.path):
                os.remove(self.path)
            if cfg.tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter

                    self.tb = SummaryWriter(os.path.join(cfg.output_dir, "tensorboard"))
                except ImportError:
                    print("ptk: --tensorboard ignored: tensorboard is not installed")

    def write(self, row: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self):
        if self.tb is not None:
            self.tb.close()


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPU (and when asked for), fp32 otherwise; weights and optimizer state stay fp32."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def train(cfg: TrainConfig, module: TrainingModule, data: Dataset, tokenizer, info: DistInfo, *,
          stage: str, on_log: Callable[[dict], None] | None = None) -> TrainResult:
    """Runs ``cfg.max_steps`` optimizer steps of ``module`` on ``data`` and writes the outputs (see the module
    docstring). ``module.model`` holds its initial weights; with ``--resume`` the checkpoint's replace them."""
    resume_dir = ckpt.resolve_resume(cfg.output_dir, cfg.resume)
    if resume_dir is None and ckpt.holds_earlier_run(cfg.output_dir) and not cfg.overwrite:
        raise FileExistsError(f"--output-dir {cfg.output_dir!r} holds an earlier run: pass --resume to continue it "
                              f"or --overwrite to start over (its model stays until the new one is saved)")
    model = module.model
    saved = module.saved_models()
    if resume_dir is not None:
        for folder, attr in saved.items():
            ckpt.load_model_weights(getattr(module, attr), os.path.join(resume_dir, folder))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    module.to(info.device)
    module.train()
    trained = wrap(module, model, info, cfg.distributed)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.adam_betas), weight_decay=cfg.weight_decay,
                                  foreach=info.device.type == "cuda")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    start = 0
    if resume_dir is not None:
        state = ckpt.load_trainer_state(resume_dir)
        ckpt.load_optimizer_state(module, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        data.load_state_dict(state.get("data", {}))
        start = state["step"]
    else:
        torch.manual_seed(cfg.seed)

    log = _MetricsLog(cfg, info, append=resume_dir is not None)
    config = {"stage": stage, **to_dict(cfg)}
    history: list[dict] = []
    bar = None
    if cfg.progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"ptk {stage}", dynamic_ncols=True)

    def save(step: int, final: bool = False) -> None:
        module_state, optim_state = ckpt.gather_state(module, optimizer)  # a collective: every process
        if info.is_main:
            trainer_state = {"step": step, "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                             "rng": ckpt.rng_state(), "data": data.state_dict(), "world_size": info.world_size}
            models = {folder: (getattr(module, attr), ckpt.substate(module_state, attr))
                      for folder, attr in saved.items()}
            ckpt.save_checkpoint(cfg.output_dir, step, models, tokenizer, trainer_state, config, cfg.save_total_limit)
            if final:
                ckpt.save_final(cfg.output_dir, models, tokenizer, config)
        barrier(info)

    step = start
    t_last, tokens_since = time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while step < cfg.max_steps:
                # This process's micro-batches of the step, and the item count of the whole step over all.
                micro = data.micro_batches(step, cfg, info)
                local_items = sum(module.count(b) for b in micro)
                total_items = float(all_reduce_sum(torch.tensor([local_items], dtype=torch.float64), info)[0])
                norm = max(total_items, 1.0) / info.world_size

                # Kept on the device until the step's one reduction: no host sync per micro-batch.
                loss_sum, sums = torch.zeros((), dtype=torch.float64, device=info.device), {}
                for a, batch in enumerate(micro):
                    tokens_since += _tokens_in(batch)
                    batch = _to_device(batch, info.device)
                    with gradient_sync(trained, cfg.distributed, a == len(micro) - 1), autocast(cfg, info.device):
                        loss, metrics = trained(batch, norm)
                        loss.backward()
                    loss_sum += loss.detach().double()
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=info.device).detach().double()
                grad_norm = (torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm) if cfg.max_grad_norm > 0
                             else torch.zeros(()))
                if hasattr(grad_norm, "full_tensor"):  # FSDP2: a DTensor
                    grad_norm = grad_norm.full_tensor()
                # One reduction per step: the loss, every metric sum, the data source's own metrics (means per
                # process, e.g. a rollout's reward) and the stop flag.
                names = sorted(sums)
                source = data.metrics()
                source_names = sorted(source)
                host = torch.tensor([float(source[k]) for k in source_names] + [float(stop.raised)],
                                    dtype=torch.float64, device=info.device)
                packed = torch.cat([torch.stack([loss_sum, *[sums[k].reshape(()) for k in names]]), host])
                packed = all_reduce_sum(packed, info).cpu()
                loss_value = float(packed[0]) / info.world_size
                if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
                    raise FloatingPointError(f"ptk {stage}: the loss ({loss_value}) or gradient norm "
                                             f"({float(grad_norm)}) is not finite at step {step + 1}; stopping "
                                             f"without saving (the last checkpoint is kept)")
                lr = scheduler.get_last_lr()[0]
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1

                row = {"step": step, "loss": loss_value, "lr": lr,
                       "grad_norm": float(grad_norm), "items": total_items}
                row.update({k: float(packed[1 + i]) / max(total_items, 1.0) for i, k in enumerate(names)})
                row.update({k: float(packed[1 + len(names) + i]) / info.world_size
                            for i, k in enumerate(source_names)})
                if step % cfg.log_steps == 0 or step == cfg.max_steps:
                    now = time.perf_counter()
                    row["tokens_per_s"] = tokens_since * info.world_size / max(now - t_last, 1e-9)
                    t_last, tokens_since = now, 0
                    log.write(row)
                    if on_log is not None:
                        on_log(row)
                history.append(row)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss_value:.4f}")
                if float(packed[-1]) > 0:  # Ctrl-C on any process
                    save(step)
                    raise Interrupted(f"ptk {stage}: interrupted; checkpoint saved at step {step} in "
                                      f"{ckpt.checkpoint_dir(cfg.output_dir)} (continue with --resume)")
                if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                    save(step)
    finally:
        if bar is not None:
            bar.close()
        log.close()

    save(step, final=True)
    return TrainResult(steps=step, metrics=history, output_dir=cfg.output_dir)
