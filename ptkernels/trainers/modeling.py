"""The model side of every stage: loading models and tokenizers, reading a causal LM's final hidden states and
output head for ptkernels' fused losses, the base class of the stages' loss modules, the next-token loss, and the
frozen reference model that DPO and KTO read the same way.

Models: a local Hugging Face folder, a Hub id (``Qwen/Qwen2.5-0.5B``: transformers downloads it when online and
reads its cache offline), or a built-in preset (random init, shipped tokenizer); a tokenizer with more tokens than
the model has embeddings is refused at load, naming both sizes.

Presets are small Llama-architecture models, so every stage runs on a laptop CPU with nothing downloaded:
    tiny    2 layers, d=64   (tests)
    small   4 layers, d=128  (the pipeline's quick preset)
    base    6 layers, d=256  (the pipeline's full preset)
Weights are kept in fp32 (the loop autocasts to bf16 on GPU); ``trust_remote_code`` is off unless asked for.
"""

from __future__ import annotations

import abc
import contextlib
import inspect
import os
import re
from typing import TYPE_CHECKING

import torch
from torch import nn

import ptkernels as ptk

from ..integrations.hf import causal_lm_hidden_states, output_head
from . import adapters
from .data.tiny_tokenizer import load_tiny_tokenizer
from .data.tokenization import token_count

if TYPE_CHECKING:
    from .engine.distributed import DistInfo


def quiet_transformers() -> None:
    """No per-file progress bars from save_pretrained / from_pretrained: the trainer has its own. Two notes of
    bitsandbytes (imported by PEFT where installed) dropped, see ``_BitsAndBytesNotes``."""
    import logging as std_logging

    from transformers.utils import logging

    logging.disable_progress_bar()
    for name in _BitsAndBytesNotes.LOGGERS:
        log = std_logging.getLogger(name)
        if not any(isinstance(f, _BitsAndBytesNotes) for f in log.filters):
            log.addFilter(_BitsAndBytesNotes())


class _BitsAndBytesNotes:
    """bitsandbytes' "Failed to load CPU gemm_4bit_forward from kernels-community" (at import, on CPUs with
    AVX512-BF16: an optional kernel it would fetch from the Hugging Face Hub, which ptk never wants; its own CPU
    kernel runs instead) and "inputs will be cast from float32 to float16" (on every 8-bit matmul with fp32 inputs:
    LLM.int8's design, said once in --load-in-8bit's help). Everything else it logs passes."""

    LOGGERS = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")
    DROPPED = ("Failed to load CPU gemm_4bit_forward", "inputs will be cast from")

    def filter(self, record) -> bool:
        text = record.getMessage()
        return not any(d in text for d in self.DROPPED)


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
    """A local folder, or a Hugging Face Hub id (``org/name``) that transformers' ``from_pretrained`` resolves
    (downloading it when online, from the local cache when offline)."""
    if os.path.isdir(name):
        return
    looks_local = name.startswith((".", "/", "~")) or os.sep + os.sep in name or name.count("/") > 1
    if not name or looks_local or not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", name):
        raise FileNotFoundError(f"--model: {name!r} is neither a preset ({', '.join(PRESETS)}), a local model "
                                "folder nor a Hugging Face Hub id (org/name)")


@contextlib.contextmanager
def _hub_errors(name: str):
    """transformers' errors for a Hub id it cannot get, as one clear message (offline and not cached, unknown id,
    gated repository)."""
    try:
        yield
    except OSError as e:
        if os.path.isdir(name):
            raise
        offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0") or \
            os.environ.get("TRANSFORMERS_OFFLINE", "") not in ("", "0")
        why = ("offline (HF_HUB_OFFLINE is set) and it is not in the local Hugging Face cache; run once online or "
               "pass a local folder" if offline else
               "not a local folder, and the Hugging Face Hub did not give it (check the id, your network, and "
               "`hf auth login` for gated models)")
        raise FileNotFoundError(f"--model: cannot load {name!r}: {why}. transformers said: "
                                f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def load_tokenizer(name: str, *, trust_remote_code: bool = False):
    """The preset's shipped tokenizer or the folder's; a missing pad token becomes the eos token."""
    if is_preset(name):
        tok = load_tiny_tokenizer()
    else:
        _check_folder(name)
        from transformers import AutoTokenizer

        with _hub_errors(name):
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


def load_causal_lm(name: str, *, seed: int = 0, trust_remote_code: bool = False, max_length: int = 1024,
                   **load_kwargs):
    """(model, tokenizer): a preset initialized from ``seed``, or a local folder's weights, in fp32. A folder
    holding a LoRA adapter (``ptk STAGE --lora``) gives its merged model (``load_merged_adapter``). ``load_kwargs`` go
    to ``from_pretrained`` (QLoRA's quantization config)."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    quiet_transformers()
    if not is_preset(name) and adapters.is_adapter_folder(name):
        return _load_adapter_folder(name, "CAUSAL_LM", max_length, **load_kwargs)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    if is_preset(name):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = LlamaForCausalLM(preset_config(name, tokenizer, max_length=max_length))
    else:
        with _hub_errors(name):
            model = AutoModelForCausalLM.from_pretrained(name, dtype=torch.float32,
                                                         trust_remote_code=trust_remote_code, **load_kwargs)
    check_vocab(model, tokenizer, name)
    _sync_special_tokens(model, tokenizer)
    return model, tokenizer


def check_vocab(model, tokenizer, name: str) -> None:
    """Every token id the tokenizer can produce must have an embedding row (a larger embedding, padded to a
    multiple of 64 as many models are, is fine); else training fails later with an opaque index error."""
    rows = model.get_input_embeddings().num_embeddings
    if len(tokenizer) > rows:
        raise ValueError(f"--model {name!r}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has "
                         f"only {rows} rows (vocab_size); they do not belong together (resize the embeddings with "
                         "model.resize_token_embeddings(len(tokenizer)) and save, or use the model's own tokenizer)")


def load_sequence_classifier(name: str, *, seed: int = 0, trust_remote_code: bool = False,
                             max_length: int = 1024, **load_kwargs):
    """(model, tokenizer): a one-output ``AutoModelForSequenceClassification`` (a reward model / critic). From a
    causal LM folder the score head is new (initialized from ``seed``); from a reward model folder it is loaded.
    A LoRA adapter folder gives its merged model."""
    from transformers import AutoModelForSequenceClassification, LlamaForSequenceClassification

    quiet_transformers()
    if not is_preset(name) and adapters.is_adapter_folder(name):
        return _load_adapter_folder(name, "SEQ_CLS", max_length, **load_kwargs)
    tokenizer = load_tokenizer(name, trust_remote_code=trust_remote_code)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if is_preset(name):
            config = preset_config(name, tokenizer, max_length=max_length)
            config.num_labels = 1
            model = LlamaForSequenceClassification(config)
        else:
            with _hub_errors(name):
                model = AutoModelForSequenceClassification.from_pretrained(
                    name, num_labels=1, dtype=torch.float32, trust_remote_code=trust_remote_code, **load_kwargs)
    check_vocab(model, tokenizer, name)
    _sync_special_tokens(model, tokenizer)
    return model, tokenizer


def _load_adapter_folder(name: str, task: str, max_length: int, **load_kwargs):
    """A stage's LoRA output as a plain model: its ``merged/`` folder when --merge-adapter wrote one, else the
    adapter merged into its base now. ``load_kwargs`` (QLoRA's quantization) need the merged folder: a model is
    quantized as it is read from a folder, not after merging in memory."""
    load = load_sequence_classifier if task == "SEQ_CLS" else load_causal_lm
    merged = os.path.join(name, adapters.MERGED)
    if os.path.isfile(os.path.join(merged, "config.json")):
        return load(merged, max_length=max_length, **load_kwargs)
    if load_kwargs:
        raise ValueError(f"{name} is a LoRA adapter folder without its merged model ({adapters.MERGED}/), and a "
                         f"quantized base (--load-in-4bit / --load-in-8bit) is read from a model folder: write it "
                         f"with `ptk merge {name}` (or train that stage with --merge-adapter), or drop the flag")
    return load_merged_adapter(name, task=task, max_length=max_length)


def load_merged_adapter(path: str, *, task: str | None = None, max_length: int = 1024):
    """(model, tokenizer): the adapter in ``path`` merged into its base (``merge_and_unload``): a plain model."""
    from peft import PeftModel

    base, seed, saved_task, trust = adapters.adapter_base(path)
    load = load_sequence_classifier if (task or saved_task) == "SEQ_CLS" else load_causal_lm
    model, _ = load(base, seed=seed, trust_remote_code=trust, max_length=max_length)
    model = PeftModel.from_pretrained(model, path).merge_and_unload()
    if adapters.head_trained(path) and getattr(model.config, "tie_word_embeddings", False):
        # the trained head copy is no longer the (frozen) embedding: keep them apart in the saved model
        model.config.tie_word_embeddings = False
    tokenizer = load_tokenizer(path if os.path.isfile(os.path.join(path, "tokenizer_config.json")) else base,
                               trust_remote_code=trust)
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
    """Hugging Face format: config.json, model.safetensors, generation_config.json and the tokenizer files; for a
    model with a LoRA adapter, the adapter in PEFT's format (adapter_config.json, adapter_model.safetensors)."""
    if adapters.is_adapted(model):
        adapters.save_adapter(model, path, state_dict)
        tokenizer.save_pretrained(path)
        return
    if state_dict is not None:
        # a copy (save_pretrained edits the dict it is given), without the tied copies of shared weights (a
        # gathered FSDP state holds them as separate tensors, which save_pretrained would write twice)
        tied = getattr(model, "_tied_weights_keys", None) or {}
        tied = set(tied) if getattr(model.config, "tie_word_embeddings", False) else set()
        state_dict = {k: v for k, v in state_dict.items() if k not in tied}
    model.save_pretrained(path, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(path)


# ------------------------------------------------------------------ hidden states and head, for the fused losses


def hidden_states(model, batch: dict, **model_kwargs) -> torch.Tensor:
    """The final hidden states of a (possibly packed) batch; no logits, no KV cache unless ``model_kwargs`` ask
    for one (see ``cache_argument``)."""
    extra = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    return causal_lm_hidden_states(model, batch["input_ids"], **{"use_cache": False, **extra, **model_kwargs})


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


def cache_argument(model) -> str:
    """The name of the KV cache argument of ``model``'s forward (and field of its output): ``cache`` since
    transformers 5 renamed it, ``past_key_values`` before."""
    if adapters.is_adapted(model):  # PEFT's forward passes **kwargs on: the signature of the model it adapts
        model = model.get_base_model()
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def token_logps(model, batch: dict, backend: str = "auto", temperature: float = 1.0) -> torch.Tensor:
    """log p(labels[t+1] | tokens <= t) for t < T-1, 0 where the label is -100: ``[B, T-1]``, no logits.
    ``temperature``: of the distribution sampled from (the model's logits divided by it, as in generate)."""
    hidden, weight, head = head_inputs(model, hidden_states(model, batch))
    head["temperature"] *= temperature
    return ptk.linear_token_logprobs(hidden[:, :-1], weight, batch["labels"][:, 1:], backend=backend, **head)



def packing_keeps_documents_apart(model) -> tuple[bool, float]:
    """Whether ``model`` keeps the documents of a packed row apart (``pack``: restarting position ids, no attention
    mask) and by how much a second document's log-probs move when packed behind a first: Transformers derives the
    block-diagonal mask from the position ids for most architectures, but not for all (OPT, Bloom, MPT, BioGPT,
    XGLM, hybrid state-space models: measured), so it is tried once on two short random documents."""
    vocab = model.get_input_embeddings().num_embeddings
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(0)
    first, second = (torch.randint(0, vocab, (n,), generator=gen).to(device) for n in (5, 6))
    positions = torch.cat([torch.arange(5), torch.arange(6)]).to(device)[None]
    was_training = model.training
    model.eval()  # no dropout in the comparison
    try:
        with torch.no_grad():
            packed = model(input_ids=torch.cat([first, second])[None], position_ids=positions, use_cache=False)
            alone = model(input_ids=second[None], use_cache=False)
    finally:
        model.train(was_training)
    moved = float((torch.log_softmax(packed.logits[0, 5:].float(), -1)
                   - torch.log_softmax(alone.logits[0].float(), -1)).abs().max())
    exact = next(model.parameters()).dtype in (torch.float32, torch.float64)
    return moved <= (1e-3 if exact else 5e-2), moved  # apart: rounding (< 1e-5 in fp32); not apart: 0.3-5


# ------------------------------------------------------------------------------------------------ loss modules


class TrainingModule(nn.Module, abc.ABC):
    """Base class of the stages' loss modules: ``self.model`` is the model that is trained and saved.

    ``forward(batch, norm)`` returns ``(loss, metrics)``: the sum of the micro-batch's per-item losses divided by
    ``norm``, and per-item metric sums (see ``engine/loop.py``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    @abc.abstractmethod
    def count(self, batch: dict) -> float:
        """The items of a micro-batch (see engine/loop.py)."""

    def saved_models(self) -> dict[str, str]:
        """Where each trained submodule goes: {sub-folder of the output ('' = the output itself): attribute}."""
        return {"": "model"}


class CausalLMLoss(TrainingModule):
    """The next-token loss of pretraining and SFT: ``ptkernels.linear_cross_entropy`` on the final hidden states,
    summed over the label tokens of the micro-batch and divided by the accumulated step's token count."""

    def __init__(self, model, backend: str = "auto"):
        super().__init__(model)
        self.backend = backend

    def count(self, batch: dict) -> float:
        return token_count(batch)

    def forward(self, batch: dict, norm: float):
        hidden, weight, head = head_inputs(self.model, hidden_states(self.model, batch))
        nll = ptk.linear_cross_entropy(hidden, weight, batch["labels"], shift=True, reduction="sum",
                                       backend=self.backend, **head)
        return nll / norm, {"nll": nll.detach()}


# ------------------------------------------------------------------------------------------- reference model


def load_reference(cfg, info: DistInfo, policy=None):
    """The frozen reference model: ``--ref-model``, or the initial policy (``--model``, the same seed for a
    preset), loaded before any ``--resume`` replaces the policy's weights; in eval mode on this process's device.
    With ``--lora`` and no ``--ref-model``: ``policy`` itself (its base, read inside ``reference_scope``)."""
    if policy is not None and shares_base(cfg, policy):
        return policy
    name = cfg.ref_model or cfg.model
    ref, _ = load_causal_lm(name, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code, max_length=cfg.max_length)
    return ref.requires_grad_(False).to(info.device).eval()


def shares_base(cfg, policy) -> bool:
    """The reference is the policy's own base (adapter disabled): LoRA without a separate ``--ref-model``."""
    return bool(getattr(cfg, "lora", False)) and not cfg.ref_model and adapters.is_adapted(policy)


def reference_scope(model):
    """The context the reference ``model`` is read in: its adapter disabled when it is the LoRA policy itself (the
    base under the adapter: exactly the initial policy's numbers); nothing for a separate model."""
    return adapters.adapter_disabled(model)


class ReferenceModel:
    """The frozen reference policy of DPO and KTO, read one way by both: its final hidden states and output head for
    a batch, without gradients. The fused losses take them live (``--ref-mode live``) or turn them into reference
    log-probs once before training (``--ref-mode precompute``). Not an ``nn.Module`` attribute of the loss module:
    it is neither trained, nor wrapped by DDP, nor saved."""

    def __init__(self, model):
        self.model = model  # a separate frozen model, or the LoRA policy read with its adapter disabled

    @classmethod
    def load(cls, cfg, info: DistInfo, policy=None) -> ReferenceModel:
        return cls(load_reference(cfg, info, policy))

    @torch.no_grad()
    def head_inputs(self, batch: dict):
        """(hidden, weight, head options) of ``batch`` under the reference model, as ``head_inputs`` gives them."""
        with reference_scope(self.model):
            return head_inputs(self.model, hidden_states(self.model, batch))

    def fused_inputs(self, batch: dict, prefix: str = "ref_") -> dict:
        """The reference's hidden states, weight and bias as the fused losses' ``ref_hidden`` / ``ref_weight`` /
        ``ref_bias`` arguments (``prefix`` + name)."""
        hidden, weight, head = self.head_inputs(batch)
        return {f"{prefix}hidden": hidden, f"{prefix}weight": weight, f"{prefix}bias": head["bias"]}

    @torch.no_grad()
    def summed_logps(self, batch: dict, backend: str = "auto") -> torch.Tensor:
        """``[B]``: each row's summed log-probs of its label tokens under the reference model."""
        with reference_scope(self.model):
            return token_logps(self.model, batch, backend).sum(-1)
