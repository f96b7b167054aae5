"""What the rest of the trainers need to know about a PEFT (LoRA) model without building one: is it adapted, its
base read with the adapter disabled, saving and loading its adapter, and what an adapter folder says about its base.
``lora.py`` builds the adapters (and imports ``modeling``); this module imports neither, so ``modeling`` and
``engine`` can use it."""

from __future__ import annotations

import contextlib
import json
import os

import yaml

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"  # where --merge-adapter / ptk merge put the merged model, inside the adapter folder


def is_adapted(model) -> bool:
    """A PEFT model (``get_peft_model`` / ``PeftModel.from_pretrained``)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block (every adapter bypassed); a no-op for a model without adapters."""
    if not is_adapted(model):
        yield model
        return
    with model.disable_adapter():
        yield model


def save_adapter(model, path: str, state_dict: dict | None = None) -> None:
    """The adapter (and ``modules_to_save`` copies) in PEFT's format; ``state_dict``: the model's full or
    trainable-only state (a gathered FSDP state), from which PEFT keeps the adapter's entries."""
    # save_embedding_layers=False: "auto" would look the base's config up online (nothing is downloaded here);
    # a trained head is saved anyway, as a modules_to_save entry
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True, save_embedding_layers=False)


def load_adapter_weights(model, path: str) -> None:
    """A checkpoint's adapter weights into ``model`` (a PEFT model, before any wrapping)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.exists(file):
        raise FileNotFoundError(f"{path}: no adapter_model.safetensors (was this checkpoint written with --lora?)")
    result = set_peft_model_state_dict(model, load_file(file))
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise ValueError(f"{path}: adapter weights do not match the model (unexpected {sorted(unexpected)[:5]})")


def is_adapter_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, ADAPTER_CONFIG)) and not os.path.isfile(os.path.join(path, "config.json"))


def adapter_base(path: str) -> tuple[str, int, str, bool]:
    """(base model, seed, task type, trust_remote_code) of the adapter saved in ``path``."""
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        config = json.load(f)
    base = config.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{path}/{ADAPTER_CONFIG} names no base model (base_model_name_or_path)")
    seed, trust = 0, False
    run = os.path.join(path, "run_config.yaml")
    if os.path.isfile(run):
        with open(run, encoding="utf-8") as f:
            saved = yaml.safe_load(f) or {}
        seed, trust = int(saved.get("seed", 0)), bool(saved.get("trust_remote_code", False))
    return base, seed, config.get("task_type") or "CAUSAL_LM", trust


def head_trained(path: str) -> bool:
    """Whether the adapter saved in ``path`` trained a copy of the output head (``--lora-modules-to-save lm_head``)."""
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        return _saves_head(json.load(f).get("modules_to_save"))


def _saves_head(modules_to_save) -> bool:
    return "lm_head" in (modules_to_save or [])


def merged_weights(model, full=lambda t: t):
    """(name, tensor) of an adapted model's weights as the plain model's state dict would have them, one at a time:
    each LoRA layer's base weight plus its update (``W + scaling * B @ A``, as ``merge_and_unload`` forms it), a
    ``modules_to_save`` module's trained copy under the module's own name, the adapter matrices and the frozen
    originals left out. Formed out of place: the model's base stays bit for bit what it was (the reference with
    the adapter disabled depends on it). ``full``: what makes a stored tensor whole (an FSDP2 shard's
    ``full_tensor``); it is called on every tensor in the same order on every process. For the vLLM engine's
    weight sync (it loads the merged model: no adapter support needed there)."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model()
    adapter = model.active_adapter
    layers = {name: m for name, m in base.named_modules() if isinstance(m, LoraLayer)}
    for name, tensor in base.state_dict().items():
        if ".lora_" in name or ".original_module." in name:
            continue
        owner, sep, leaf = name.partition(".base_layer.")
        tensor = full(tensor).detach()
        if sep and leaf == "weight" and owner in layers and adapter in layers[owner].lora_A:
            tensor = tensor + _lora_delta(layers[owner], adapter, full).to(tensor.dtype)
        yield name.replace(".base_layer.", ".").replace(f".modules_to_save.{adapter}.", "."), tensor


def _lora_delta(layer, adapter: str, full):
    if getattr(layer, "use_dora", {}).get(adapter, False):
        raise NotImplementedError("merging a DoRA adapter for weight sync is not supported (ptk trains plain LoRA)")
    a = full(layer.lora_A[adapter].weight).detach()
    b = full(layer.lora_B[adapter].weight).detach()
    delta = (b @ a) * layer.scaling[adapter]
    return delta.T if getattr(layer, "fan_in_fan_out", False) else delta


def trains_head(model) -> bool:
    """``head_trained`` of an adapted model in memory."""
    return _saves_head(getattr(model.peft_config[model.active_adapter], "modules_to_save", None))


def merged_model(model, weights=None):
    """The plain Hugging Face model an adapted one merges to, for saving (``save_pretrained``): built on the meta
    device, without a second copy of the unmerged weights, then given ``weights`` ((name, tensor) pairs, default
    ``merged_weights(model)``); buffers outside the state dict (rotary tables) stay on the meta device, so it is
    not for running. A trained head copy unties the head from the embeddings, as PEFT's ``merge_and_unload``
    does."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(model.get_base_model().config)
    if trains_head(model):
        config.tie_word_embeddings = False
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config)
    plain.load_state_dict(dict(merged_weights(model) if weights is None else weights), assign=True)
    plain.tie_weights()
    return plain
