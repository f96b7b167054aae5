"""LoRA and QLoRA through PEFT: the adapter every stage trains with ``--lora``, the reference model for free, and the
adapter's outputs (PEFT format, merged model).

    model, tokenizer = load_policy(cfg)              # load_causal_lm, then get_peft_model when cfg.lora
    with adapter_disabled(model): ...                # the base model: the reference of DPO / KTO / PPO / GRPO
    merge_adapter_folder("runs/sft", "runs/sft/merged")   # what --merge-adapter and ``ptk merge`` write

- **What trains**: LoRA matrices on ``--lora-target-modules`` (default: the attention and MLP projections;
  ``all-linear`` is PEFT's every linear layer but the output head). The output head stays frozen, so the fused
  losses read its weight as without LoRA; ``--lora-modules-to-save lm_head`` trains a full copy of it (PEFT's
  ``ModulesToSaveWrapper``) and the fused losses read that copy (``integrations.hf.output_head`` resolves the
  wrapper). A reward model / critic trains its new ``score`` head by default (PEFT's SEQ_CLS task).
- **Reference for free**: the frozen base under the adapter is the initial policy, so the reference log-probs come
  from the same model inside ``disable_adapter()`` (the LoRA branches and saved copies bypassed: exactly the base
  model's numbers), never from a second copy.
- **QLoRA**: ``--load-in-4bit`` / ``--load-in-8bit`` load the frozen base through bitsandbytes and run PEFT's
  ``prepare_model_for_kbit_training``. Only on CUDA: on a machine without a GPU (or without bitsandbytes) it is a
  clear error, never a silent full-precision run.
- **Outputs**: ``output_dir`` holds the adapter in PEFT's format (``adapter_config.json``,
  ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, output_dir)``), checkpoints hold the adapter
  and the optimizer state only; ``--merge-adapter`` (or ``ptk merge``) also writes ``output_dir/merged``, a full
  model for ``AutoModelForCausalLM.from_pretrained``. The adapter records its base (``base_model_name_or_path``: a
  folder's absolute path, or a preset's name, whose seed ``run_config.yaml`` holds), so a later stage can take the
  adapter folder as ``--model``: the base is loaded, the adapter merged into it.
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
import yaml

ADAPTER_CONFIG = "adapter_config.json"
MERGED = "merged"


def is_adapted(model) -> bool:
    """A PEFT model (``get_peft_model`` / ``PeftModel.from_pretrained``)."""
    return hasattr(model, "peft_config") and hasattr(model, "disable_adapter")


def target_modules(spec: str):
    """``--lora-target-modules`` as PEFT takes it: 'all-linear' as is, else the list of names."""
    spec = spec.strip()
    if spec == "all-linear":
        return spec
    names = [n.strip() for n in spec.split(",") if n.strip()]
    heads = sorted({"lm_head", "score"} & set(names))
    if heads:
        raise ValueError(f"--lora-target-modules: {heads} is the output head; ptkernels' fused losses read the head "
                         f"as one weight matrix, so train it in full with --lora-modules-to-save {heads[0]}")
    return names


def lora_config(cfg, *, task: str = "CAUSAL_LM"):
    """PEFT's ``LoraConfig`` for the run's options; ``task``: 'CAUSAL_LM' or 'SEQ_CLS' (reward model, critic)."""
    from peft import LoraConfig

    save = [n.strip() for n in cfg.lora_modules_to_save.split(",") if n.strip()] or None
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=target_modules(cfg.lora_target_modules), modules_to_save=save,
                      bias="none", task_type=task)


def check_quantization(cfg) -> dict:
    """``from_pretrained`` keyword arguments for ``--load-in-4bit`` / ``--load-in-8bit`` (empty without them), or a
    clear error where bitsandbytes cannot run them."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
    if not torch.cuda.is_available():
        raise RuntimeError(f"{flag} (QLoRA) needs a CUDA GPU: bitsandbytes' quantized layers are not used on CPU "
                           f"by ptk (drop {flag} to train the LoRA adapter on a full-precision base)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as e:
        raise RuntimeError(f"{flag} needs bitsandbytes: pip install bitsandbytes") from e
    from .modeling import is_preset

    if is_preset(cfg.model):
        raise ValueError(f"{flag} needs a model folder (--model), not the built-in preset {cfg.model!r}")
    from transformers import BitsAndBytesConfig

    if cfg.load_in_4bit:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device()}}


def add_adapter(model, cfg, *, task: str = "CAUSAL_LM"):
    """``model`` with a new LoRA adapter (``get_peft_model``): only the adapter (and ``--lora-modules-to-save``)
    trains. Its ``base_model_name_or_path`` is where the base comes from, so the saved adapter finds it."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing)
    elif cfg.gradient_checkpointing:
        model.enable_input_require_grads()  # the frozen embeddings' output must carry grad into the checkpoints
    try:
        # the adapter's random init (lora_A) from --seed: the same on every process and in every run
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            peft_model = get_peft_model(model, lora_config(cfg, task=task))
    except ValueError as e:
        raise ValueError(f"--lora-target-modules {cfg.lora_target_modules!r} / --lora-modules-to-save "
                         f"{cfg.lora_modules_to_save!r}: {e}") from e
    # get_peft_model records the model's name_or_path (empty for a preset): where the base really comes from
    for config in peft_model.peft_config.values():
        config.base_model_name_or_path = base_name(cfg.model)
    return peft_model


def base_name(model: str) -> str:
    """The base a saved adapter records: a folder's absolute path, or the preset's name."""
    from .modeling import is_preset

    return model if is_preset(model) else os.path.abspath(model)


def load_policy(cfg, *, task: str = "CAUSAL_LM", name: str | None = None, seed: int | None = None):
    """(model, tokenizer) of the model a stage trains: ``load_causal_lm`` (``task`` 'SEQ_CLS':
    ``load_sequence_classifier``) of ``name`` (default ``--model``), with a LoRA adapter when ``--lora``."""
    from .modeling import load_causal_lm, load_sequence_classifier

    name = cfg.model if name is None else name
    load = load_sequence_classifier if task == "SEQ_CLS" else load_causal_lm
    quant = check_quantization(cfg) if cfg.lora else {}
    model, tokenizer = load(name, seed=cfg.seed if seed is None else seed, trust_remote_code=cfg.trust_remote_code,
                            max_length=cfg.max_length, **quant)
    if cfg.lora:
        options = cfg if name == cfg.model else _with_model(cfg, name)
        model = add_adapter(model, options, task=task)
    return model, tokenizer


def _with_model(cfg, name: str):
    import dataclasses

    return dataclasses.replace(cfg, model=name)


@contextlib.contextmanager
def adapter_disabled(model):
    """The base model inside the block (every adapter bypassed); a no-op for a model without adapters."""
    if not is_adapted(model):
        yield model
        return
    with model.disable_adapter():
        yield model


# ------------------------------------------------------------------------------------------------ saving / merging


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


def _base_of(path: str) -> tuple[str, int, str, bool]:
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


def load_merged(path: str, *, task: str | None = None, max_length: int = 1024):
    """(model, tokenizer): the adapter in ``path`` merged into its base (``merge_and_unload``): a plain model."""
    from peft import PeftModel

    from .modeling import load_causal_lm, load_sequence_classifier, load_tokenizer

    base, seed, saved_task, trust = _base_of(path)
    task = task or saved_task
    load = load_sequence_classifier if task == "SEQ_CLS" else load_causal_lm
    model, _ = load(base, seed=seed, trust_remote_code=trust, max_length=max_length)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if _head_trained(path) and getattr(model.config, "tie_word_embeddings", False):
        # the trained head copy is no longer the (frozen) embedding: keep them apart in the saved model
        model.config.tie_word_embeddings = False
    return model, load_tokenizer(path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base,
                                 trust_remote_code=trust)


def _head_trained(path: str) -> bool:
    with open(os.path.join(path, ADAPTER_CONFIG), encoding="utf-8") as f:
        saved = json.load(f).get("modules_to_save") or []
    return "lm_head" in saved


def merge_adapter_folder(path: str, out: str | None = None) -> str:
    """Writes the merged full model of the adapter in ``path`` to ``out`` (default ``path/merged``): Hugging Face
    format, loadable with ``AutoModelForCausalLM`` (or ``AutoModelForSequenceClassification``) ``.from_pretrained``."""
    from .modeling import save_pretrained

    if not is_adapter_folder(path):
        raise FileNotFoundError(f"{path!r} holds no LoRA adapter ({ADAPTER_CONFIG})")
    out = out or os.path.join(path, MERGED)
    model, tokenizer = load_merged(path)
    if model.config.tie_word_embeddings is False and hasattr(model, "lm_head"):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_pretrained(model, tokenizer, out)
    return out


def main_merge(argv: list[str]) -> int:
    """``ptk merge ADAPTER_DIR [--output-dir DIR]``."""
    import argparse

    parser = argparse.ArgumentParser(prog="ptk merge", description="merge a LoRA adapter written by ptk STAGE "
                                     "--lora into its base model and save the full model")
    parser.add_argument("adapter", help="the adapter folder (a stage's output_dir)")
    parser.add_argument("--output-dir", default=None, help="where the merged model goes (default: ADAPTER/merged)")
    args = parser.parse_args(argv)
    print(f"ptk merge: {merge_adapter_folder(args.adapter, args.output_dir)}")
    return 0
