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
  ``prepare_model_for_kbit_training``. On CUDA, and on CPU through bitsandbytes' CPU backend (>= 0.50): without
  bitsandbytes (or with an older one on CPU) it is a clear error, never a silent full-precision run.
- **Outputs**: ``output_dir`` holds the adapter in PEFT's format (``adapter_config.json``,
  ``adapter_model.safetensors``; ``PeftModel.from_pretrained(base, output_dir)``), checkpoints hold the adapter
  and the optimizer state only; ``--merge-adapter`` (or ``ptk merge``) also writes ``output_dir/merged``, a full
  model for ``AutoModelForCausalLM.from_pretrained``. The adapter records its base (``base_model_name_or_path``: a
  folder's absolute path, or a preset's name, whose seed ``run_config.yaml`` holds), so a later stage can take the
  adapter folder as ``--model``: the base is loaded, the adapter merged into it.
"""

from __future__ import annotations

import os

import torch

from . import adapters
from .adapters import adapter_disabled, is_adapted  # noqa: F401  (re-exported: lora.is_adapted, ...)
from .modeling import is_preset, load_causal_lm, load_merged_adapter, load_sequence_classifier, save_pretrained


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


# bitsandbytes runs Linear4bit / Linear8bitLt on CPU tensors through its CPU backend; tested here with 0.50.2
BNB_CPU_MIN_VERSION = "0.50"


def check_quantization(cfg) -> dict:
    """``from_pretrained`` keyword arguments for ``--load-in-4bit`` / ``--load-in-8bit`` (empty without them), or a
    clear error where bitsandbytes cannot run them. On CUDA the quantized layers compute in bf16 (or fp32 with
    ``--precision fp32``); on CPU, through bitsandbytes' CPU backend (>= 0.50), in fp32 (bf16 with
    ``--precision bf16``)."""
    if not (cfg.load_in_4bit or cfg.load_in_8bit):
        return {}
    flag = "--load-in-4bit" if cfg.load_in_4bit else "--load-in-8bit"
    try:
        import bitsandbytes
    except ImportError as e:
        raise RuntimeError(f"{flag} (QLoRA) needs bitsandbytes: pip install 'bitsandbytes>={BNB_CPU_MIN_VERSION}' "
                           f"(or drop {flag} to train the LoRA adapter on a full-precision base)") from e
    if is_preset(cfg.model):
        raise ValueError(f"{flag} needs a model folder (--model), not the built-in preset {cfg.model!r}")
    from packaging.version import Version

    cuda = torch.cuda.is_available()
    if not cuda and Version(bitsandbytes.__version__) < Version(BNB_CPU_MIN_VERSION):
        need = BNB_CPU_MIN_VERSION
        raise RuntimeError(f"{flag} without a CUDA GPU needs bitsandbytes >= {need} (its CPU backend); this one "
                           f"is {bitsandbytes.__version__}: pip install -U 'bitsandbytes>={need}'")
    from transformers import BitsAndBytesConfig

    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    compute = torch.bfloat16 if bf16 else torch.float32
    if cfg.load_in_4bit:
        q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    else:
        q = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": q, "device_map": {"": torch.cuda.current_device() if cuda else "cpu"}}


def add_adapter(model, cfg, *, task: str = "CAUSAL_LM"):
    """``model`` with a new LoRA adapter (``get_peft_model``): only the adapter (and ``--lora-modules-to-save``)
    trains. Its ``base_model_name_or_path`` is where the base comes from, so the saved adapter finds it."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        _keep_cpu_4bit_weights_trainable(model)
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


def _keep_cpu_4bit_weights_trainable(model) -> None:
    """bitsandbytes' 4-bit layers on a CPU with AVX512-BF16 repack their weight in place for an inference kernel on
    the first forward in eval mode without grad (a rollout), after which every forward, training ones too, takes
    that kernel, which passes no gradient to the input (the LoRA layers below would stop learning) and needs
    output sizes divisible by 32. A trained model keeps the training layout."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def base_name(model: str) -> str:
    """The base a saved adapter records: a folder's absolute path, or the preset's name."""
    return model if is_preset(model) else os.path.abspath(model)


def load_policy(cfg, *, task: str = "CAUSAL_LM", name: str | None = None, seed: int | None = None):
    """(model, tokenizer) of the model a stage trains: ``load_causal_lm`` (``task`` 'SEQ_CLS':
    ``load_sequence_classifier``) of ``name`` (default ``--model``), with a LoRA adapter when ``--lora``."""
    name = cfg.model if name is None else name
    load = load_sequence_classifier if task == "SEQ_CLS" else load_causal_lm
    quant = check_quantization(cfg) if cfg.lora else {}
    model, tokenizer = load(name, seed=cfg.seed if seed is None else seed, trust_remote_code=cfg.trust_remote_code,
                            max_length=cfg.max_length, **quant)
    if cfg.lora:
        options = cfg if name == cfg.model else _with_model(cfg, name)
        model = add_adapter(model, options, task=task)
    if getattr(cfg, "disable_dropout", False):
        disable_dropout(model)
    return model, tokenizer


def disable_dropout(model: torch.nn.Module) -> None:
    """Every dropout of ``model`` off, LoRA's own too (called after the adapter, as TRL does): ``nn.Dropout``
    modules (TRL's ``disable_dropout_in_model``) and the attention dropout Llama-style attention modules apply
    as a function (``attention_dropout``), which that misses."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
        if isinstance(getattr(module, "attention_dropout", None), float):
            module.attention_dropout = 0.0


def _with_model(cfg, name: str):
    import dataclasses

    return dataclasses.replace(cfg, model=name)


# ------------------------------------------------------------------------------------------------ saving / merging


def merge_adapter_folder(path: str, out: str | None = None) -> str:
    """Writes the merged full model of the adapter in ``path`` to ``out`` (default ``path/merged``): Hugging Face
    format, loadable with ``AutoModelForCausalLM`` (or ``AutoModelForSequenceClassification``) ``.from_pretrained``."""
    if not adapters.is_adapter_folder(path):
        raise FileNotFoundError(f"{path!r} holds no LoRA adapter ({adapters.ADAPTER_CONFIG})")
    out = out or os.path.join(path, adapters.MERGED)
    model, tokenizer = load_merged_adapter(path)
    if model.config.tie_word_embeddings is False and hasattr(model, "lm_head"):
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    save_pretrained(model, tokenizer, out)
    return out


def build_merge_parser():
    import argparse

    parser = argparse.ArgumentParser(prog="ptk merge", description="merge a LoRA adapter written by ptk STAGE "
                                     "--lora into its base model and save the full model",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("adapter", nargs="?", default=None, help="the adapter folder (a stage's output_dir)")
    parser.add_argument("--output-dir", default=None, help="where the merged model goes (default: ADAPTER/merged)")
    return parser


def main_merge(argv: list[str]) -> int:
    """``ptk merge ADAPTER_DIR [--output-dir DIR] [--config merge.yaml]``."""
    from .engine.config import parse_args_with_config

    args = parse_args_with_config(build_merge_parser(), argv)
    if not args.adapter:
        raise ValueError("ptk merge: name the adapter folder (ptk merge ADAPTER_DIR, or 'adapter:' in --config)")
    print(f"ptk merge: {merge_adapter_folder(args.adapter, args.output_dir)}")
    return 0
