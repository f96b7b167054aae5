"""Loading models and tokenizers: a local Hugging Face folder, or a built-in preset (random init, shipped tokenizer).

Presets are small Llama-architecture models, so every stage runs on a laptop CPU with nothing downloaded:
    tiny    2 layers, d=64   (tests)
    small   4 layers, d=128  (the pipeline's quick preset)
    base    6 layers, d=256  (the pipeline's full preset)
Weights are kept in fp32 (the loop autocasts to bf16 on GPU); ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import os

import torch

from .tokenizer import load_tiny_tokenizer


def quiet_transformers() -> None:
    """No per-file progress bars from save_pretrained / from_pretrained: the trainer has its own."""
    from transformers.utils import logging

    logging.disable_progress_bar()

PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    "small": dict(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2),
    "base": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=6, num_attention_heads=8,
                 num_key_value_heads=4),
}


def is_preset(name: str) -> bool:
    return name in PRESETS


def _check_folder(name: str) -> None:
    if not os.path.isdir(name):
        raise FileNotFoundError(f"--model: {name!r} is neither a preset ({', '.join(PRESETS)}) nor a local "
                                f"Hugging Face model folder (nothing is downloaded)")


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The preset's shipped tokenizer or the folder's; a missing pad token becomes the eos token."""
    if is_preset(name):
        tok = load_tiny_tokenizer()
    else:
        _check_folder(name)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def preset_config(name: str, tokenizer, *, max_length: int = 1024):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=max(1024, max_length),
                       tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                       rope_theta=10000.0, **PRESETS[name])


def load_causal_lm(name: str, *, seed: int = 0, trust_remote_code: bool = False, max_length: int = 1024):
    """(model, tokenizer): a preset initialized from ``seed``, or a local folder's weights, in fp32."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    quiet_transformers()
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    if is_preset(name):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(preset_config(name, tokenizer, max_length=max_length))
    else:
        model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                     trust_remote_code=trust_remote_code)
    _sync_special_tokens(model, tokenizer)
    return model, tokenizer


def load_sequence_classifier(name: str, *, seed: int = 0, trust_remote_code: bool = False,
                             max_length: int = 1024):
    """(model, tokenizer): a one-output ``AutoModelForSequenceClassification`` (a reward model / critic). From a
    causal LM folder the score head is new (initialized from ``seed``); from a reward model folder it is loaded."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    quiet_transformers()
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_preset(name):
            config = preset_config(name, tokenizer, max_length=max_length)
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            model = AutoModelForSequenceClassification.from_pretrained(
                name, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code)
    _sync_special_tokens(model, tokenizer)
    return model, tokenizer


def _sync_special_tokens(model, tokenizer) -> None:
    """The pad token must be known to the model (sequence classifiers find the last token through it) and
    generation must stop at the tokenizer's eos."""
    model.config.pad_token_id = tokenizer.pad_token_id
    gen = getattr(model, "generation_config", None)
    if gen is not None:
        gen.pad_token_id = tokenizer.pad_token_id
        gen.eos_token_id = tokenizer.eos_token_id


def save_pretrained(model, tokenizer, path: str, state_dict: dict | None = None) -> None:
    """Hugging Face format: config.json, model.safetensors, generation_config.json and the tokenizer files."""
    if state_dict is not None:
        # a copy (save_pretrained edits the dict it is given), without the tied copies of shared weights (a
        # gathered FSDP state holds them as separate tensors, which save_pretrained would write twice)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        tied = set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)
