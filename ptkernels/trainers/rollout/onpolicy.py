"""The data source of the on-policy stages (PPO and GRPO): micro-batches made from rollouts of the current policy.

``OnPolicySource`` implements the loop's data source interface (``engine.loop.Dataset``): every
``steps_per_rollout`` optimizer steps it samples this process's prompts (a seeded order, like the offline stages'
data), has a ``RolloutEngine`` complete them, and hands the stage's ``make_rollout`` the result to score and cut
into micro-batches. The current rollout is part of the checkpoint, so a resumed run continues exactly.

An engine with its own copy of the weights (``--rollout-engine vllm``: ``sync_weights``) gets the policy's current
weights pushed into it before every rollout but the first of a fresh run (it was built from the initial policy),
i.e. after every ``steps_per_rollout`` optimizer steps, on every process; a resumed run syncs before its first.
"""

from __future__ import annotations

import os
import time
import zlib
from types import SimpleNamespace

import torch

from ..data.rows import Row
from ..data.tokenization import collate
from ..engine.config import OnPolicyConfig
from ..engine.distributed import DistInfo
from ..engine.loop import Dataset, StepOrder
from .engines import make_engine
from .sampling import RolloutEngine, SamplingConfig
from .scoring import sequence_token_logps

# Seconds a step spent on its rollout, logged beside the rollout's metrics (0 on a step that reuses one): pushing
# the weights into an engine that keeps its own copy, sampling, and all of make_rollout (sampling, rewards, the
# old / reference / sampler log-prob passes). The step's total is the loop's step_s; training is the rest.
TIME_METRICS = ("time_sync_s", "time_generate_s", "time_rollout_s")
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
        self._times = dict.fromkeys(TIME_METRICS, 0.0)
        self.engine_is_current = True  # an engine with its own weights was built from the initial policy
        self.ptx: Dataset | None = None  # SFT examples whose loss joins the policy's (PPO-ptx), see add_ptx

    def micro_batches(self, step: int, cfg, info: DistInfo) -> list[dict]:
        index = step // self.steps_per_rollout
        self._times = dict.fromkeys(TIME_METRICS, 0.0)  # a step that reuses a rollout spends nothing on one
        if index != self.index:
            sync = getattr(self.engine, "sync_weights", None)
            if sync is not None and not self.engine_is_current:
                t0 = time.perf_counter()
                sync(self.policy)  # the weights of the steps since the last rollout (or of the resumed checkpoint)
                self._times["time_sync_s"] = time.perf_counter() - t0
            self.engine_is_current = False
            t0 = time.perf_counter()
            self.batches, self._metrics = self.make_rollout(index)
            self._times["time_rollout_s"] = time.perf_counter() - t0
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
        t0 = time.perf_counter()
        out = self.engine.generate(prompts, self.sampling, seed=rollout_seed(self.cfg.seed, index, info.rank))
        self._times["time_generate_s"] += time.perf_counter() - t0
        return rows, prompts, out

    def logps(self, model, batch: dict) -> torch.Tensor:
        return sequence_token_logps(model, batch, backend=self.cfg.backend, chunk_rows=self.cfg.batch_size,
                                    temperature=self.cfg.temperature).cpu()

    def state_dict(self) -> dict:
        return {"index": self.index, "batches": self.batches, "metrics": self._metrics}

    def load_state_dict(self, state: dict) -> None:
        self.engine_is_current = False  # resumed: the policy holds the checkpoint's weights
        if state:
            self.index, self.batches, self._metrics = state["index"], state["batches"], state["metrics"]

    def metrics(self) -> dict:
        return {**self._metrics, **self._times}


def check_rollout_options(cfg: OnPolicyConfig) -> None:
    """What ``--rollout-engine vllm`` needs, checked before any model is loaded; each error names its option."""
    if cfg.rollout_engine != "vllm":
        if cfg.vllm_server:
            raise ValueError("--vllm-server is used with --rollout-engine vllm only")
        return
    if cfg.load_in_4bit or cfg.load_in_8bit:
        flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
        raise ValueError(f"--rollout-engine vllm does not take {flag}: the engine is fed the policy's merged "
                         f"full-precision weights, which a quantized base no longer has; use --rollout-engine "
                         f"kv_cache (or LoRA on a full-precision base)")
    if cfg.max_prompt_length + cfg.max_new_tokens > cfg.max_length:
        raise ValueError(f"--max-length {cfg.max_length} is the vLLM engine's max_model_len and must hold a prompt "
                         f"(--max-prompt-length {cfg.max_prompt_length}) plus a completion (--max-new-tokens "
                         f"{cfg.max_new_tokens}): raise --max-length or lower the others")
    if not cfg.vllm_server:
        from .vllm_engine import require_vllm

        require_vllm()  # the server mode needs no vLLM on the trainer's side


def _start_folder(model: str, policy) -> bool:
    """Whether the vLLM engine can load ``--model``'s folder as the policy's start (else it is built from the
    loaded policy, saved): not an adapter folder (the start is its merged model), and, for a LoRA policy, not one
    whose tied head gets a trained copy (the engine must be built untied). A fresh adapter adds nothing (B = 0),
    so a LoRA policy's base folder is its start."""
    from ..adapters import is_adapted, is_adapter_folder, trains_head
    from .vllm_engine import unwrap_ddp

    if not os.path.isdir(model) or is_adapter_folder(model):
        return False
    policy = unwrap_ddp(policy)
    return not (is_adapted(policy) and trains_head(policy) and policy.get_base_model().config.tie_word_embeddings)


def build_rollout_engine(cfg: OnPolicyConfig, policy, tokenizer, info: DistInfo) -> RolloutEngine | None:
    """The rollout engine a stage's data source samples with: None for the built-in engines (the source makes
    them on the policy), else the vLLM engine, built once before training. In this process it loads the policy's
    folder (``--model``; a preset is saved to a temporary folder first); with ``--vllm-server`` it is a client of
    this process's server (one per process)."""
    if cfg.rollout_engine != "vllm":
        return None
    if cfg.vllm_server:
        servers = [s.strip() for s in cfg.vllm_server.split(",") if s.strip()]
        if len(servers) != info.world_size:
            raise ValueError(f"--vllm-server: {len(servers)} server(s) for {info.world_size} process(es); give one "
                             f"HOST:PORT per process, comma-separated")
        return make_engine("vllm", policy, tokenizer, server=servers[info.rank])
    return make_engine("vllm", policy, tokenizer, model_dir=cfg.model if _start_folder(cfg.model, policy) else None,
                       max_model_len=cfg.max_length, seed=cfg.seed,
                       gpu_memory_utilization=cfg.vllm_gpu_memory_utilization)
