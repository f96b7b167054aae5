"""Resume is exact or refuses.

A checkpoint records the run's *identity*: what gives the step counter and the data order their meaning (the
number of processes, the global batch, the seed, the data files and a hash of their content, and the options
that decide which examples exist or how rollouts are cut), and the models it starts from (``--model``: a LoRA
checkpoint holds only the adapter, so the frozen base comes from it; the reference and reward models): a name
or path, and for a local folder a fingerprint of its weights. Resuming with any of them changed would continue a
different run under the old one's step numbers, so it refuses with an error naming each difference, unless
``--allow-config-change`` is given.

Hyperparameters that may change on resume (``--lr``, ``--max-steps``, the schedule, AdamW's settings, clipping) are
applied from the resumed step on, printed, and recorded in the checkpoint's ``trainer_state`` (``changes``); the
checkpoint's ``run_config.yaml`` then holds the values in force.
"""

from __future__ import annotations

import hashlib
import os

from .validate import flag

# options whose change alters the meaning of the step counter or the data order
IDENTITY_OPTIONS = ("seed", "max_length", "truncation", "packing", "max_prompt_length", "prompts_per_step",
                    "num_generations", "num_iterations", "generation_batch_size", "dynamic_sampling", "ptx_batch_size")
DATA_OPTIONS = ("data", "ptx_data")
MODEL_OPTIONS = ("model", "ref_model", "reward_model")
FINGERPRINT_BYTES = 1 << 20  # read from each end of each weight file
# options that may change on resume: applied from the resumed step on
CHANGEABLE = ("lr", "max_steps", "warmup_steps", "min_lr_ratio", "weight_decay", "adam_betas", "max_grad_norm")


def file_hash(path: str) -> str:
    """sha256 of a file, or of every file of a folder (names and contents, in sorted order)."""
    h = hashlib.sha256()
    files = [path] if os.path.isfile(path) else sorted(
        os.path.join(r, n) for r, _, names in os.walk(path) for n in names)
    for p in files:
        h.update(os.path.relpath(p, path).encode() if p != path else b"")
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def model_fingerprint(path: str) -> str:
    """sha256 over each weight file of a model folder (its top level, where the model loads from; not a run's
    checkpoints/): its name, size and first and last MiB (different weights differ there; reading whole
    multi-GB files at every start would not pay)."""
    h = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if not name.endswith((".safetensors", ".bin", ".pt", ".gguf")) or not os.path.isfile(full):
            continue
        size = os.path.getsize(full)
        h.update(f"{name}:{size}:".encode())
        with open(full, "rb") as f:
            h.update(f.read(FINGERPRINT_BYTES))
            f.seek(max(size - FINGERPRINT_BYTES, 0))
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def _model_identity(value: str):
    if os.path.isdir(value):
        return {"path": os.path.abspath(value), "sha256": model_fingerprint(value)}
    return value  # a preset or a Hub id: its name


def identity(cfg, world_size: int) -> dict:
    out = {"world_size": world_size, "global_batch": cfg.batch_size * cfg.grad_accum * world_size}
    for name in IDENTITY_OPTIONS:
        if hasattr(cfg, name):
            out[name] = getattr(cfg, name)
    for name in DATA_OPTIONS:
        path = getattr(cfg, name, "")
        if path and os.path.exists(path):
            out[name] = {"path": os.path.abspath(path), "sha256": file_hash(path)}
    for name in MODEL_OPTIONS:
        value = getattr(cfg, name, "")
        if isinstance(value, str) and value:
            out[name] = _model_identity(value)
    return out


def _show(name: str, value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value['path']} (sha256 {value['sha256'][:12]})"
    return repr(value)


def differences(saved: dict, now: dict) -> list[str]:
    out = []
    for name in sorted(set(saved) | set(now)):
        if name in MODEL_OPTIONS and name not in saved and "world_size" in saved and "model" not in saved:
            continue  # a checkpoint written before the models were part of the identity
        a, b = saved.get(name), now.get(name)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and a.get("sha256") == b.get("sha256"):
            continue  # the same content at another path
        label = {"world_size": "the number of processes", "global_batch": "the global batch (batch size x "
                 "grad accum x processes)"}.get(name, flag(name))
        if isinstance(a, dict) and isinstance(b, dict) and a.get("path") == b.get("path"):
            out.append(f"{label}: the content of {a['path']} changed since the checkpoint")
        else:
            out.append(f"{label}: {_show(name, a)} in the checkpoint, {_show(name, b)} now")
    return out


def check_identity(saved: dict | None, now: dict, checkpoint: str, allow: bool, report=print) -> None:
    """Refuse (or, with ``allow``, warn) when the run's identity differs from the checkpoint's."""
    if not saved:
        return  # a checkpoint from before identities were recorded
    diff = differences(saved, now)
    if not diff:
        return
    text = "; ".join(diff)
    if allow:
        report(f"ptk: warning: resuming {checkpoint} with a changed run (--allow-config-change): {text}")
        return
    raise ValueError(f"--resume: {checkpoint} was written by a different run setup, so its step counter and data "
                     f"order would not mean the same: {text}. Restore the original settings, start over with "
                     f"--overwrite, or pass --allow-config-change to continue anyway")


def changed_hyperparameters(saved_config: dict | None, cfg) -> dict:
    """{option: (old, new)} for the options that may change on resume and did."""
    if not saved_config:
        return {}
    out = {}
    for name in CHANGEABLE:
        if name in saved_config and hasattr(cfg, name):
            old, new = saved_config[name], getattr(cfg, name)
            old = tuple(old) if isinstance(old, list) else old
            if old != new:
                out[name] = (old, new)
    return out


def apply_hyperparameters(optimizer, scheduler, cfg, lr_at) -> None:
    """The config's AdamW settings and peak lr over those a loaded optimizer / scheduler state brought back;
    the current lr recomputed from the (new) schedule at the resumed step."""
    for group in optimizer.param_groups:
        group["initial_lr"] = cfg.lr
        group["weight_decay"] = cfg.weight_decay
        group["betas"] = tuple(cfg.adam_betas)
    scheduler.base_lrs = [cfg.lr for _ in optimizer.param_groups]
    lrs = [cfg.lr * lr_at(scheduler.last_epoch) for _ in optimizer.param_groups]
    for group, lr in zip(optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
