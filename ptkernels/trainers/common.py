"""What the stages share between the data, the model and the fused losses."""

from __future__ import annotations

import inspect

import torch

from ..integrations.hf import causal_lm_hidden_states, output_head
from .config import TrainConfig
from .data import Row, load_rows, validate_rows
from .distributed import DistInfo


def load_data(cfg: TrainConfig, allowed: tuple[str, ...], info: DistInfo) -> tuple[list[Row], str]:
    """Every row of ``--data`` read and checked before anything else happens (a bad line fails the run before
    a model is loaded or an output written)."""
    rows = load_rows(cfg.data)
    fmt = validate_rows(rows, allowed)
    if info.is_main:
        print(f"ptk: {len(rows)} rows ({fmt}) from {cfg.data}")
    return rows, fmt


def encode_all(rows, encode, what: str, info: DistInfo) -> list:
    """``encode(row)`` for every row; rows it drops (``None``: too long with --truncation drop, or nothing to
    train on) are counted and reported."""
    out = [e for e in map(encode, rows) if e is not None]
    if info.is_main and len(out) < len(rows):
        print(f"ptk: {len(rows) - len(out)} of {len(rows)} {what} dropped (too long for --max-length with "
              f"--truncation drop, or nothing left to train on)")
    if not out:
        raise ValueError(f"no {what} left to train on after tokenization (check --max-length / --truncation)")
    return out


def head_inputs(model, hidden: torch.Tensor):
    """(hidden, weight, kwargs) for ptkernels' fused ops: the model's head (bias, softcap, temperature), in the
    autocast dtype when autocast is on (as the model's own nn.Linear head would run)."""
    head = output_head(model)
    weight, bias = head.weight, head.bias
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return hidden, weight, {"bias": bias, "softcap": head.softcap, "temperature": head.temperature}


def hidden_states(model, batch: dict, **model_kwargs) -> torch.Tensor:
    """The final hidden states of a (possibly packed) batch; no logits, no KV cache unless ``model_kwargs`` ask
    for one (see ``cache_argument``)."""
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return causal_lm_hidden_states(model, batch["input_ids"], **{"use_cache": False, **extra, **model_kwargs})


def cache_argument(model) -> str:
    """The name of the KV cache argument of ``model``'s forward (and field of its output): ``cache`` since
    transformers 5 renamed it, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def load_reference(cfg, info: DistInfo):
    """The frozen reference model: ``--ref-model``, or the initial policy (``--model``, the same seed for a
    preset), loaded before any ``--resume`` replaces the policy's weights; in eval mode on this process's device."""
    from .modeling import load_causal_lm

    name = cfg.ref_model or cfg.model
    ref, _ = load_causal_lm(name, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length)
    return ref.requires_grad_(False).to(info.device).eval()


def pairs_in(batch: dict) -> int:
    return batch["input_ids"].shape[0] // 2


def token_logps(model, batch: dict, backend: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) for t < T-1, 0 where the label is -100: ``[B, T-1]``, no logits.
    ``temperature``: of the distribution sampled from (the model's logits divided by it, as in generate)."""
    from ..ops.token_logprobs import linear_token_logprobs

    hidden, weight, head = head_inputs(model, hidden_states(model, batch))
    head["temperature"] *= temperature
    return linear_token_logprobs(hidden[:, :-1], weight, batch["labels"][:, 1:], backend=backend, **head)
