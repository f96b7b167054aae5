"""Checkpoints and final outputs, written so that a good one is never replaced by a bad or partial one.

A checkpoint is a Hugging Face model folder (``save_pretrained``, safetensors, tokenizer) plus
``trainer_state.pt`` (optimizer, scheduler, RNG states, step = the data position) in
``output_dir/checkpoints/step-NNNNNN``. It is written into a temporary folder beside it and renamed into place,
so a crash leaves either the old set of checkpoints or the new one. The final model goes to ``output_dir``
itself: written into ``output_dir/.final-tmp`` first, then each file renamed over the old one.
"""

from __future__ import annotations

import os
import random
import re
import shutil

import numpy as np
import torch
import yaml
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from .. import adapters
from ..modeling import save_pretrained

STATE_FILE = "trainer_state.pt"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def checkpoint_dir(output_dir: str) -> str:
    return os.path.join(output_dir, "checkpoints")


def list_checkpoints(output_dir: str) -> list[str]:
    """Finished checkpoints, oldest first (temporary folders are not listed)."""
    root = checkpoint_dir(output_dir)
    if not os.path.isdir(root):
        return []
    found = [(int(m.group(1)), n) for n in os.listdir(root) if (m := _STEP_DIR.match(n))
             and os.path.exists(os.path.join(root, n, STATE_FILE))]
    return [os.path.join(root, n) for _, n in sorted(found)]


def resolve_resume(output_dir: str, resume: str) -> str | None:
    """The checkpoint folder ``--resume`` names ('latest' or a path), or None when not resuming."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise FileNotFoundError(f"--resume latest: no checkpoint in {checkpoint_dir(output_dir)}")
        return found[-1]
    if not os.path.exists(os.path.join(resume, STATE_FILE)):
        raise FileNotFoundError(f"--resume: {resume!r} is not a checkpoint folder (no {STATE_FILE})")
    return resume


def rng_state() -> dict:
    # the legacy global numpy RNG is what user code and libraries draw from, so it is the one to restore
    state = {"python": random.getstate(), "numpy": np.random.get_state(),  # noqa: NPY002
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])  # noqa: NPY002
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def gather_state(module, optimizer, trainable_only: bool = False) -> tuple[dict, dict]:
    """Full (unsharded, CPU) state dicts of the training module and its optimizer; a collective under FSDP2:
    every rank calls it. ``trainable_only`` (LoRA: the frozen base is not saved) leaves the frozen weights out."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=trainable_only)
    return get_model_state_dict(module, options=options), get_optimizer_state_dict(module, optimizer, options=_FULL)


def substate(state: dict, attr: str) -> dict:
    """The entries of submodule ``attr`` in a module's state dict, with its prefix removed."""
    prefix = attr + "."
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def _save_models(models: dict, tokenizer, path: str) -> None:
    """``models``: {sub-folder ('' = path itself): (model, state dict)}, each saved in Hugging Face format."""
    for folder, (model, state) in models.items():
        save_pretrained(model, tokenizer, os.path.join(path, folder) if folder else path, state_dict=state)


def save_checkpoint(output_dir: str, step: int, models: dict, tokenizer, trainer_state: dict, config: dict,
                    keep: int) -> str:
    """Writes checkpoint ``step`` atomically (main process only) and prunes the oldest beyond ``keep``."""
    root = checkpoint_dir(output_dir)
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:06d}")
    tmp = os.path.join(root, f".tmp-step-{step:06d}")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_models(models, tokenizer, tmp)
    torch.save(trainer_state, os.path.join(tmp, STATE_FILE))
    _write_yaml(os.path.join(tmp, "run_config.yaml"), config)
    if os.path.exists(final):  # the same step written again (a resumed run): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_trainer_state(path: str) -> dict:
    # weights_only=False: the file holds RNG states (numpy arrays, tuples) written by this trainer itself
    return torch.load(os.path.join(path, STATE_FILE), map_location="cpu", weights_only=False)


def load_model_weights(model, path: str) -> None:
    """The checkpoint's weights into ``model`` (before any wrapping); tied weights are re-tied. A LoRA model
    loads its adapter (the checkpoint holds nothing else)."""
    from safetensors.torch import load_file

    if adapters.is_adapted(model):
        adapters.load_adapter_weights(model, path)
        return

    files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no .safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(os.path.join(path, f)))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if model.config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the model (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    model.tie_weights()


def load_optimizer_state(module, optimizer, state: dict) -> None:
    set_optimizer_state_dict(module, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save_final(output_dir: str, models: dict, tokenizer, config: dict) -> None:
    """The trained model(s) into ``output_dir``, each file renamed over its old version only once all are
    written."""
    tmp = os.path.join(output_dir, ".final-tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _save_models(models, tokenizer, tmp)
    _write_yaml(os.path.join(tmp, "run_config.yaml"), config)
    for root, _, files in os.walk(tmp):
        target = os.path.join(output_dir, os.path.relpath(root, tmp))
        os.makedirs(target, exist_ok=True)
        for name in files:
            os.replace(os.path.join(root, name), os.path.join(target, name))
    shutil.rmtree(tmp)


def _write_yaml(path: str, data: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=False)


def holds_earlier_run(output_dir: str) -> bool:
    return any(os.path.exists(os.path.join(output_dir, n)) for n in ("metrics.jsonl", "checkpoints", "config.json"))
