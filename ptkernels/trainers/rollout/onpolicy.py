"""The data source of the on-policy stages (PPO and GRPO): micro-batches made from rollouts of the current policy.

``OnPolicySource`` implements the loop's data source interface (``engine.loop.Dataset``): every
``steps_per_rollout`` optimizer steps it samples this process's prompts (a seeded order, like the offline stages'
data), has a ``RolloutEngine`` complete them, and hands the stage's ``make_rollout`` the result to score and cut
into micro-batches. The current rollout is part of the checkpoint, so a resumed run continues exactly.
"""

from __future__ import annotations

import zlib
from types import SimpleNamespace

import torch

from ..data.rows import Row, load_data
from ..data.tokenization import collate, encode_prompt
from ..engine.config import OnPolicyConfig
from ..engine.distributed import DistInfo
from ..engine.loop import Dataset, StepOrder
from .engines import make_engine
from .sampling import RolloutEngine, SamplingConfig
from .scoring import sequence_token_logps

PTX = "ptx_"  # prefix of the keys of the --ptx-data micro-batch carried by a step's first micro-batch


def rollout_seed(seed: int, index: int, rank: int) -> int:
    """A distinct, reproducible sampling seed per (run seed, rollout, process)."""
    return zlib.crc32(f"{seed}:{index}:{rank}".encode()) & 0x7FFFFFFF


def split_rows(batch: dict, size: int) -> list[dict]:
    """A batch of rows cut into micro-batches of ``size`` rows."""
    n = batch["input_ids"].shape[0]
    return [{k: v[i:i + size] for k, v in batch.items()} for i in range(0, n, size)]


def split_parts(batch: dict, parts: int) -> list[dict]:
    """A batch of rows cut into ``parts`` micro-batches of nearly equal size (consecutive rows, none empty)."""
    n = batch["input_ids"].shape[0]
    bounds = [n * k // parts for k in range(parts + 1)]
    return [{k: v[a:b] for k, v in batch.items()} for a, b in zip(bounds, bounds[1:])]


class OnPolicySource:
    """A data source (see loop.Dataset) whose micro-batches come from rollouts of the current policy, one new
    rollout every ``steps_per_rollout`` optimizer steps; the current one is kept in checkpoints so a resumed run
    continues exactly."""

    steps_per_rollout = 1

    def __init__(self, rows: list[Row], prompts: list[list[int]], policy, tokenizer, cfg: OnPolicyConfig,
                 info: DistInfo, engine: RolloutEngine | None = None):
        self.rows, self.prompts, self.policy, self.tokenizer = rows, prompts, policy, tokenizer
        self.cfg, self.info = cfg, info
        self.order = StepOrder(len(rows), cfg.seed)
        # Any sampler with rollout.RolloutEngine's generate() (e.g. a vLLM engine fed the policy's weights); by
        # default a built-in one on the policy itself, which always samples from the current weights.
        self.engine = engine or make_engine(cfg.rollout_engine, policy, tokenizer)
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature,
                                       top_p=cfg.top_p, do_sample=True, batch_size=cfg.generation_batch_size)
        self.index, self.batches, self._metrics = -1, [], {}
        self.ptx: Dataset | None = None  # SFT examples whose loss joins the policy's (PPO-ptx), see add_ptx

    def micro_batches(self, step: int, cfg, info: DistInfo) -> list[dict]:
        index = step // self.steps_per_rollout
        if index != self.index:
            self.batches, self._metrics = self.make_rollout(index)
            self.index = index
        batches = self.select(step % self.steps_per_rollout)
        if self.ptx is None:
            return batches
        # The step's SFT rows ride on its first micro-batch (a function of the step, so a resume is exact).
        ptx = self.ptx.micro_batches(step, self.ptx_cfg, info)[0]
        return [{**batches[0], **{PTX + k: v for k, v in ptx.items()}}, *batches[1:]]

    def add_ptx(self, examples: list, pad_token_id: int, batch_size: int) -> None:
        """Each step also trains on ``batch_size`` of ``examples`` (next-token loss), in their own seeded order."""
        self.ptx = Dataset(examples, lambda ex: collate(ex, pad_token_id), self.cfg.seed)
        self.ptx_cfg = SimpleNamespace(batch_size=batch_size, grad_accum=1)

    def select(self, k: int) -> list[dict]:
        return self.batches

    def sample(self, index: int, repeat: int, factor: int = 1):
        """This process's prompts of rollout ``index`` (each ``repeat`` times, adjacent) and their completions;
        ``factor`` times as many prompts (for dynamic sampling)."""
        p, info = self.cfg.prompts_per_step * factor, self.info
        picked = self.order.indices((index * info.world_size + info.rank) * p, p)
        rows = [self.rows[i] for i in picked for _ in range(repeat)]
        prompts = [self.prompts[i] for i in picked for _ in range(repeat)]
        out = self.engine.generate(prompts, self.sampling, seed=rollout_seed(self.cfg.seed, index, info.rank))
        return rows, prompts, out

    def logps(self, model, batch: dict) -> torch.Tensor:
        return sequence_token_logps(model, batch, backend=self.cfg.backend, chunk_rows=self.cfg.batch_size,
                                    temperature=self.cfg.temperature).cpu()

    def state_dict(self) -> dict:
        return {"index": self.index, "batches": self.batches, "metrics": self._metrics}

    def load_state_dict(self, state: dict) -> None:
        if state:
            self.index, self.batches, self._metrics = state["index"], state["batches"], state["metrics"]

    def metrics(self) -> dict:
        return self._metrics


def load_prompts(cfg: OnPolicyConfig, tokenizer, info: DistInfo, fmt=("prompt_only",)):
    rows, _ = load_data(cfg, fmt, info)
    prompts = [encode_prompt(r, tokenizer, max_prompt_length=cfg.max_prompt_length) for r in rows]
    return rows, prompts
