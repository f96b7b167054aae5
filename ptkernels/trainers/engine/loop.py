"""The training loop every stage shares: AdamW, warmup + cosine, gradient accumulation, clipping, logging,
atomic checkpoints, exact resume, Ctrl-C.

A stage hands over a ``TrainingModule`` (``modeling.py``): an ``nn.Module`` whose ``forward(batch, norm)`` returns
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

import dataclasses
import json
import math
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .. import adapters
from ..lora import merge_adapter_folder
from . import checkpoint as ckpt
from . import resume as resume_mod
from .config import TrainConfig, run_config_dict
from .distributed import DistInfo, all_reduce_sum, barrier, gradient_sync, wrap

if TYPE_CHECKING:
    from ..modeling import TrainingModule


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


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGUSR1") if hasattr(signal, n))


class _StopFlag:
    """Ctrl-C, SIGTERM (what SLURM, Kubernetes and preemptible clouds send) and SIGUSR1 (SLURM's warning signal)
    finish the current step, save a checkpoint and exit; a second signal stops at once. Under torchrun every
    process gets the signal (torchrun passes SIGTERM on to its workers) and the flag rides on the step's one
    all-reduce, so all processes stop after the same step."""

    def __init__(self):
        self.raised = False
        self.signum = None
        self._old = {}

    def __enter__(self):
        for sig in STOP_SIGNALS:
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                break
        return self

    def _handle(self, signum, frame):
        if self.raised:
            raise KeyboardInterrupt
        self.raised, self.signum = True, signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


class Interrupted(Exception):
    """Training stopped by a signal (Ctrl-C, SIGTERM, SIGUSR1) after saving a checkpoint; the CLI exits with
    128 + the signal number (130 for Ctrl-C)."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)


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
    """``metrics.jsonl``: one row per logged step. A resumed run first cuts the file back to the resumed step, so
    no step appears twice; a fresh run starts it empty (an overwritten run's file was moved aside)."""

    def __init__(self, cfg: TrainConfig, info: DistInfo, resumed_step: int | None):
        self.path = os.path.join(cfg.output_dir, "metrics.jsonl")
        self.enabled = info.is_main
        self.tb = None
        if self.enabled:
            os.makedirs(cfg.output_dir, exist_ok=True)
            if resumed_step is None:
                if os.path.exists(self.path):
                    os.remove(self.path)
            else:
                truncate_metrics(self.path, resumed_step)
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


def truncate_metrics(path: str, step: int) -> None:
    """Keeps the rows of steps <= ``step`` (and drops a torn last line from a crash mid-write)."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def autocast(cfg: TrainConfig, device: torch.device):
    """bf16 autocast on GPU (and when asked for), fp32 otherwise; weights and optimizer state stay fp32."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


class Trainer:
    """One run of the loop: the wrapped module, its optimizer and schedule, the data source, and where it saves.
    ``start()`` builds it (resuming from a checkpoint when asked), ``step()`` is one optimizer step."""

    def __init__(self, cfg: TrainConfig, module: TrainingModule, data: Dataset, tokenizer, info: DistInfo,
                 stage: str):
        self.cfg, self.module, self.data, self.tokenizer, self.info = cfg, module, data, tokenizer, info
        self.stage = stage
        self.saved = module.saved_models()
        self.config = run_config_dict(cfg, stage)
        # for save_before_failure: the last step saved, whether a step's update is under way, the RNGs at its start
        self.last_saved, self.updating, self.saving, self.step_rng = 0, False, False, None

    def start(self) -> int:
        """Loads a checkpoint's weights when resuming (the current run's latest complete one: a damaged one is
        reported and the one before used), refuses a resume whose run setup changed, wraps the module (DDP /
        FSDP2), builds AdamW and the schedule and restores their state and the RNGs (or seeds them and starts a
        new run id); returns the step to start from."""
        cfg, module, info = self.cfg, self.module, self.info
        say = print if info.is_main else (lambda *a, **k: None)
        self.lock = ckpt.lock_output_dir(cfg.output_dir) if info.is_main else None
        ckpt.preflight(cfg.output_dir, cfg.resume, cfg.overwrite)
        resume_dir = ckpt.resolve_resume(cfg.output_dir, cfg.resume, report=say)
        self.identity = resume_mod.identity(cfg, info.world_size)
        barrier(info)  # every process has looked at the output folder before the main one changes it
        state = None
        if resume_dir is not None:
            state = ckpt.load_trainer_state(resume_dir)
            resume_mod.check_identity(state.get("identity"), self.identity, resume_dir,
                                      getattr(cfg, "allow_config_change", False), report=say)
            for folder, attr in self.saved.items():
                ckpt.load_model_weights(getattr(module, attr), os.path.join(resume_dir, folder))
        if cfg.gradient_checkpointing:
            module.model.gradient_checkpointing_enable()
        module.to(info.device)
        module.train()
        self.trained = wrap(module, module.model, info, cfg.distributed)
        self.params = [p for p in module.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.adam_betas),
                                           weight_decay=cfg.weight_decay, foreach=info.device.type == "cuda")
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self.resumed = resume_dir is not None
        self.changes: list[dict] = []
        if resume_dir is None:
            if info.is_main:
                self.run_id = ckpt.start_new_run(cfg.output_dir, self.stage)
            barrier(info)
            self.run_id = ckpt.current_run_id(cfg.output_dir)
            self.needs_discard = True
            torch.manual_seed(cfg.seed)
            return 0
        self.run_id = state.get("run_id") or ckpt.new_run_id()
        self.needs_discard = False
        barrier(info)  # every process has read run.json before the main one may rewrite it
        if info.is_main and ckpt.current_run_id(cfg.output_dir) != self.run_id:
            # resumed from a folder elsewhere (preflight: into an empty folder, or --overwrite moves one aside)
            ckpt.start_new_run(cfg.output_dir, self.stage, run_id=self.run_id)
            self.needs_discard = True
        elif info.is_main:
            aside = ckpt.set_aside_later_checkpoints(cfg.output_dir, resume_dir)
            if aside:
                say(f"ptk {self.stage}: resuming an earlier checkpoint: the later ones moved to {aside}")
        ckpt.load_optimizer_state(module, self.optimizer, state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        ckpt.set_rng_state(state["rng"])
        self.data.load_state_dict(state.get("data", {}))
        self.changes = list(state.get("changes", []))
        changed = resume_mod.changed_hyperparameters(state.get("config"), cfg)
        if changed:
            resume_mod.apply_hyperparameters(self.optimizer, self.scheduler, cfg, lr_lambda(cfg))
            self.changes.append({"step": state["step"], **{k: [v[0], v[1]] for k, v in changed.items()}})
        shown = "".join(f"; {resume_mod.flag(k)} {v[0]!r} -> {v[1]!r} (applied)" for k, v in changed.items())
        say(f"ptk {self.stage}: resuming from step {state['step']} ({resume_dir}){shown}")
        return state["step"]

    def release(self) -> None:
        """Lets another run use the output folder (``lock_output_dir``)."""
        if getattr(self, "lock", None) is not None:
            os.close(self.lock)
            self.lock = None

    def step(self, step: int, stop: _StopFlag) -> tuple[dict, int, bool]:
        """Optimizer step ``step``: every micro-batch's forward and backward, clipping, one reduction over the
        processes, the update. Returns the logged row, the tokens seen here and whether any process asked to stop."""
        self.step_rng = ckpt.rng_state() if self.info.world_size == 1 else None
        micro = self.data.micro_batches(step, self.cfg, self.info)
        # The item count of the whole step over all processes normalizes every micro-batch's loss.
        local_items = sum(self.module.count(b) for b in micro)
        total_items = float(all_reduce_sum(torch.tensor([local_items], dtype=torch.float64), self.info)[0])
        norm = max(total_items, 1.0) / self.info.world_size
        loss_sum, sums, tokens = self.accumulate(micro, norm)
        grad_norm = self.clip_gradients()
        names, source_names, packed = self.reduce(loss_sum, sums, stop.raised)
        loss_value = float(packed[0]) / self.info.world_size
        if not math.isfinite(loss_value) or not math.isfinite(float(grad_norm)):
            raise FloatingPointError(f"ptk {self.stage}: the loss ({loss_value}) or gradient norm "
                                     f"({float(grad_norm)}) is not finite at step {step + 1}; stopping "
                                     f"without saving (the last checkpoint is kept)")
        lr = self.scheduler.get_last_lr()[0]
        self.updating = True  # from here until the step is counted the state is neither step nor step + 1
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        row = {"step": step + 1, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm), "items": total_items}
        row.update({k: float(packed[1 + i]) / max(total_items, 1.0) for i, k in enumerate(names)})
        row.update({k: float(packed[1 + len(names) + i]) / self.info.world_size for i, k in enumerate(source_names)})
        self.updating = False  # the caller counts the step next
        return row, tokens, float(packed[-1]) > 0

    def save_before_failure(self, step: int, error: Exception) -> None:
        """Keeps the ``step`` steps done when a step fails (a reward function that raised, a generation error, an
        evaluation that failed): outside an update the model, the optimizer and the data source hold exactly step
        ``step``'s state, saved as its checkpoint with the RNGs of the step's start. Not after a non-finite loss
        (the weights may be its cause), a full disk or a failed save, during an update, or with several processes
        (the others may be waiting inside a collective)."""
        if (self.updating or self.saving or step <= self.last_saved or self.info.world_size > 1
                or isinstance(error, (FloatingPointError, ckpt.DiskFullError))):
            return
        try:
            self.save(step, rng=self.step_rng)
        except Exception as e:  # the original error is what the user needs to see
            print(f"ptk {self.stage}: could not save step {step} after the failure: {type(e).__name__}: {e}")
            return
        print(f"ptk {self.stage}: step {step + 1} failed ({type(error).__name__}); the {step} step{'s' * (step > 1)} "
              f"done {'are' if step > 1 else 'is'} saved in {ckpt.checkpoint_dir(self.cfg.output_dir)} (continue with "
              "--resume once it is fixed)")

    def accumulate(self, micro: list[dict], norm: float):
        """Forward and backward of each micro-batch (gradients synchronized on the last one); the loss and metric
        sums stay on the device until the step's one reduction: no host sync per micro-batch."""
        info = self.info
        loss_sum, sums, tokens = torch.zeros((), dtype=torch.float64, device=info.device), {}, 0
        for a, batch in enumerate(micro):
            tokens += _tokens_in(batch)
            batch = _to_device(batch, info.device)
            last = a == len(micro) - 1
            with gradient_sync(self.trained, self.cfg.distributed, last), autocast(self.cfg, info.device):
                loss, metrics = self.trained(batch, norm)
                loss.backward()
            loss_sum += loss.detach().double()
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + torch.as_tensor(v, device=info.device).detach().double()
        return loss_sum, sums, tokens

    def clip_gradients(self) -> torch.Tensor:
        """The gradient norm, clipped to ``max_grad_norm`` (0: not clipped, but still measured: it is what the
        step's non-finite check sees, so a NaN gradient with a finite loss stops the run before a save)."""
        max_norm = self.cfg.max_grad_norm
        if max_norm > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
        else:
            grads = [p.grad for p in self.params if p.grad is not None]
            grad_norm = _total_norm(grads) if grads else torch.zeros(())
        return grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP2: a DTensor

    def reduce(self, loss_sum: torch.Tensor, sums: dict, stop_requested: bool):
        """One all-reduce per step: the loss, every metric sum, the data source's own metrics (means per process,
        e.g. a rollout's reward) and the stop flag. Returns the metric names, the source's names and the sums."""
        names = sorted(sums)
        source = self.data.metrics()
        source_names = sorted(source)
        host = torch.tensor([float(source[k]) for k in source_names] + [float(stop_requested)],
                            dtype=torch.float64, device=self.info.device)
        packed = torch.cat([torch.stack([loss_sum, *[sums[k].reshape(()) for k in names]]), host])
        return names, source_names, all_reduce_sum(packed, self.info).cpu()

    def save(self, step: int, final: bool = False, rng: dict | None = None) -> None:
        """A checkpoint of ``step`` (and with ``final`` the output folder's model); a collective: every process.
        The main process writes; whether it succeeded is shared with all, so a full disk stops every process with
        the same error instead of leaving the others waiting. ``rng``: the RNG states to record (default: now)."""
        self.saving = True
        try:
            self._save(step, final, rng)
            self.last_saved = step
        finally:
            self.saving = False

    def _save(self, step: int, final: bool, rng: dict | None) -> None:
        # LoRA (every saved model adapted): the checkpoint holds the adapter, so the frozen base is not gathered
        adapter_only = all(adapters.is_adapted(getattr(self.module, attr)) for attr in self.saved.values())
        module_state, optim_state = ckpt.gather_state(self.module, self.optimizer, trainable_only=adapter_only)
        error = None
        if self.info.is_main:
            trainer_state = {"step": step, "optimizer": optim_state, "scheduler": self.scheduler.state_dict(),
                             "rng": rng or ckpt.rng_state(), "data": self.data.state_dict(),
                             "world_size": self.info.world_size, "run_id": self.run_id, "identity": self.identity,
                             "config": self.config, "changes": self.changes}
            models = {folder: (getattr(self.module, attr), ckpt.substate(module_state, attr))
                      for folder, attr in self.saved.items()}
            try:
                ckpt.save_checkpoint(self.cfg.output_dir, step, models, self.tokenizer, trainer_state,
                                     self.config, self.cfg.save_total_limit)
                if self.needs_discard:  # the new run has a complete checkpoint: the overwritten one may go
                    ckpt.discard_overwritten(self.cfg.output_dir)
                    self.needs_discard = False
                if final:
                    ckpt.save_final(self.cfg.output_dir, models, self.tokenizer, self.config)
                    if getattr(self.cfg, "merge_adapter", False):
                        for folder, (model, _) in models.items():
                            if adapters.is_adapted(model):
                                merge_adapter_folder(os.path.join(self.cfg.output_dir, folder))
            except ckpt.DiskFullError as e:
                error = e
        failed = float(all_reduce_sum(torch.tensor([float(error is not None)], dtype=torch.float64), self.info)[0])
        if error is not None:
            raise error
        if failed:
            raise ckpt.DiskFullError(28, f"the main process could not save step {step} (no space left on device)")

def _total_norm(grads: list[torch.Tensor]) -> torch.Tensor:
    """The 2-norm of all gradients together, as ``clip_grad_norm_`` measures it (``get_total_norm`` from PyTorch
    2.6 on, the same formula before)."""
    if hasattr(torch.nn.utils, "get_total_norm"):
        return torch.nn.utils.get_total_norm(grads)
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.detach()) for g in grads]))


def _progress_bar(cfg: TrainConfig, info: DistInfo, start: int, stage: str):
    """tqdm on the main process; in a log file (stderr not a terminal) one plain line every 30 s at most, not a
    carriage-return animation."""
    if not (cfg.progress and info.is_main):
        return None
    import sys

    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=cfg.max_steps, initial=start, desc=f"ptk {stage}", dynamic_ncols=tty, ascii=not tty,
                mininterval=0.1 if tty else 30.0, ncols=None if tty else 100)


def _summary(stage: str, cfg: TrainConfig, start: int, step: int, history: list[dict], seconds: float) -> str:
    last = history[-1] if history else {}
    shown = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "reward", "accuracy") if isinstance(last.get(k), float))
    return (f"ptk {stage}: done: steps {start}..{step} in {seconds:.1f} s" + (f"; final {shown}" if shown else "")
            + f"\n  model:       {cfg.output_dir}\n  checkpoints: {ckpt.checkpoint_dir(cfg.output_dir)}"
            f"\n  metrics:     {os.path.join(cfg.output_dir, 'metrics.jsonl')}")


def steps_for_epochs(cfg: TrainConfig, data, info: DistInfo) -> int:
    """Optimizer steps for ``cfg.num_epochs`` passes over the data: rows over the rows each step takes on all
    processes; for an on-policy source, whole rollouts (each takes ``prompts_per_step`` prompts per process and
    lasts ``steps_per_rollout`` steps)."""
    if hasattr(data, "rows") and hasattr(data, "steps_per_rollout"):
        per = cfg.prompts_per_step * info.world_size * (2 if getattr(cfg, "dynamic_sampling", False) else 1)
        return max(1, math.ceil(cfg.num_epochs * len(data.rows) / per)) * data.steps_per_rollout
    per = cfg.batch_size * cfg.grad_accum * info.world_size
    return max(1, math.ceil(cfg.num_epochs * len(data.examples) / per))


def train(cfg: TrainConfig, module: TrainingModule, data: Dataset, tokenizer, info: DistInfo, *,
          stage: str, on_log: Callable[[dict], None] | None = None,
          evaluate: Callable[[], dict] | None = None, eval_steps: int = 0) -> TrainResult:
    """Runs ``cfg.max_steps`` optimizer steps of ``module`` on ``data`` and writes the outputs (see the module
    docstring). ``module.model`` holds its initial weights; with ``--resume`` the checkpoint's replace them.
    ``evaluate`` (every ``eval_steps`` steps and at the last one, on the main process): its metrics join that
    step's row of metrics.jsonl as ``eval_<name>``."""
    if getattr(cfg, "num_epochs", 0) > 0:
        cfg = dataclasses.replace(cfg, max_steps=steps_for_epochs(cfg, data, info))
        if info.is_main:
            print(f"ptk {stage}: --num-epochs {cfg.num_epochs:g} is {cfg.max_steps} steps")
    t_start = time.perf_counter()
    trainer = Trainer(cfg, module, data, tokenizer, info, stage)
    try:
        step = start = trainer.last_saved = trainer.start()
    except BaseException:
        trainer.release()
        raise
    log = _MetricsLog(cfg, info, resumed_step=step if trainer.resumed else None)
    bar = _progress_bar(cfg, info, step, stage)
    history: list[dict] = []
    t_last, tokens_since = time.perf_counter(), 0
    try:
        with _StopFlag() as stop:
            while step < cfg.max_steps:
                t_step = time.perf_counter()
                try:
                    row, tokens, stopped = trainer.step(step, stop)
                    row["step_s"] = time.perf_counter() - t_step
                    step, tokens_since = step + 1, tokens_since + tokens
                    if evaluate is not None and eval_steps and (step % eval_steps == 0 or step == cfg.max_steps):
                        row.update({f"eval_{k}": v for k, v in evaluate().items()})
                except Exception as e:
                    trainer.save_before_failure(step, e)
                    raise
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
                    bar.set_postfix(loss=f"{row['loss']:.4f}", refresh=False)
                if stopped:  # a stop signal on any process
                    trainer.save(step)
                    signum = stop.signum or signal.SIGINT
                    name = "" if signum == signal.SIGINT else f" ({signal.Signals(signum).name})"
                    raise Interrupted(f"ptk {stage}: interrupted{name}; checkpoint saved at step {step} in "
                                      f"{ckpt.checkpoint_dir(cfg.output_dir)} (continue with --resume)", signum)
                if cfg.save_steps and step % cfg.save_steps == 0 and step < cfg.max_steps:
                    trainer.save(step)
        trainer.save(step, final=True)
    finally:
        if bar is not None:
            bar.close()
        log.close()
        trainer.release()
    if info.is_main:
        print(_summary(stage, cfg, start, step, history, time.perf_counter() - t_start))
    return TrainResult(steps=step, metrics=history, output_dir=cfg.output_dir)
