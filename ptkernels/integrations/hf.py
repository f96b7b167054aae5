"""Hugging Face causal LMs without logits: final hidden states + output head -> ptkernels' fused losses.

A Hugging Face ``*ForCausalLM`` computes ``logits = post(lm_head(h))`` and then the loss from the full
``[B, T, V]`` logits. Here the model runs as usual up to its head, the head's input ``h`` is recorded, and the
head itself returns no logits: its ``forward`` (an instance attribute, so the class, other instances and any hooks
are untouched) is swapped for one returning a zero-width ``[B, T, 0]`` tensor, on which the model's own
post-processing costs nothing. The loss is then ``linear_cross_entropy(h, head.weight, labels, ...)``.

    head = output_head(model)                       # weight, bias, softcap, temperature
    hidden = causal_lm_hidden_states(model, input_ids, attention_mask)
    loss = causal_lm_loss(model, input_ids, labels, attention_mask)   # == model(..., labels=labels).loss
    loss_fn = patch_model_for_fused_loss(model)     # Trainer(..., compute_loss_func=loss_fn); loss_fn.remove()

What a model does to the logits after its head (Gemma's softcap, Cohere's and Granite's logit scales, ...) is
read from its config (``_post_processing``) and checked once per model: the first forward's head returns a
small probe row instead of nothing, and the model's output must equal the probe transformed as ptkernels would
transform it. A model doing anything else raises instead of training on a wrong loss.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.linear_cross_entropy import linear_cross_entropy

__all__ = [
    "FusedCausalLMLoss",
    "OutputHead",
    "causal_lm_hidden_states",
    "causal_lm_loss",
    "output_head",
    "patch_model_for_fused_loss",
]


@dataclass(frozen=True)
class OutputHead:
    """A causal LM's output head as ptkernels' fused ops take it.

    The model's logits are ``softcap * tanh(z / softcap) / temperature`` with ``z = hidden @ weight.T + bias``
    (no tanh when ``softcap`` is None). ``weight`` is the parameter itself (the embedding when tied), so
    gradients reach the model. Pass ``**head.kwargs()`` to ``linear_cross_entropy`` or ``linear_token_logprobs``.
    """

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None
    temperature: float = 1.0

    def kwargs(self) -> dict:
        return {"bias": self.bias, "softcap": self.softcap, "temperature": self.temperature}

    def transform(self, z: torch.Tensor) -> torch.Tensor:
        """The post-processing applied to ``z = hidden @ weight.T + bias``, in ptkernels' order."""
        if self.softcap is not None:
            z = self.softcap * torch.tanh(z / self.softcap)
        return z / self.temperature


# Logit scales by model_type prefix: (config attribute, how forward applies it to the head's output z). Found by
# reading every *ForCausalLM / *ForConditionalGeneration forward in transformers 5.x; a model doing something
# else fails the probe check (see _HeadCapture) instead of training on a wrong loss.
_SCALES = (
    ("granite", "logits_scaling", "divide"),  # Granite, GraniteMoe*, Granite vision: z / logits_scaling
    ("cohere", "logit_scale", "multiply"),  # Cohere, Cohere2, Cohere2Moe, CohereCompass
    ("hyperclovax", "logits_scaling", "multiply"),  # Granite's attribute name, used the other way round
    ("falcon_h1", "lm_head_multiplier", "multiply"),
    ("muse_", "output_multiplier", "multiply"),  # the only one with a softcap too: softcap(z * m)
)
# Softcaps c * tanh(z / c): Gemma 2/3/3n/4, PaliGemma, VaultGemma, NanoChat, Inkling2, ... / RecurrentGemma / xLSTM.
_SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _post_processing(model) -> tuple[float | None, float]:
    """(softcap, temperature) such that the model's logits are softcap * tanh(z / softcap) / temperature."""
    text = _text_config(model)
    softcap = next((float(v) for a in _SOFTCAPS if (v := getattr(text, a, None)) is not None), None)
    m = 1.0  # the model computes softcap(m * z), or m * z without a softcap
    for prefix, attr, use in _SCALES:
        if model.config.model_type.startswith(prefix) and getattr(text, attr, None) is not None:
            m = float(getattr(text, attr))
            m = 1.0 / m if use == "divide" else m
            break
    # c * tanh(m z / c) = m * (c/m) * tanh(z / (c/m)): in ptkernels' order, a softcap of c/m, then z / (1/m).
    return (None if softcap is None else softcap / m), 1.0 / m


def _head_module(model) -> nn.Linear:
    get = getattr(model, "get_output_embeddings", None)
    module = get() if callable(get) else None
    if module is None:
        raise TypeError(
            f"{type(model).__name__} has no output head (get_output_embeddings() is None): pass the "
            f"*ForCausalLM model (e.g. from AutoModelForCausalLM), not its base model"
        )
    module = _active_head(module)
    # A subclass that overrides forward (quantized layers, adapters) does not compute hidden @ weight.T + bias.
    if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
        raise TypeError(
            f"{type(model).__name__}'s output head is a {type(module).__name__}, not a plain nn.Linear; "
            f"ptkernels can only fuse a linear head"
        )
    return module


def _active_head(module: nn.Module) -> nn.Module:
    """The module that computes a PEFT-wrapped head's output: with ``modules_to_save=["lm_head"]`` PEFT wraps the
    head in a ``ModulesToSaveWrapper`` holding the frozen original and a trained copy per adapter; the copy of the
    active adapter runs, or the original while the adapters are disabled (``disable_adapter()``)."""
    copies = getattr(module, "modules_to_save", None)
    if not isinstance(copies, nn.ModuleDict) or not hasattr(module, "original_module"):
        return module
    active = getattr(module, "active_adapters", None) or []
    if module.disable_adapters or not active:
        return module.original_module
    if len(active) != 1 or active[0] not in copies:
        raise TypeError(f"a PEFT-wrapped output head with adapters {list(active)} active: ptkernels fuses one head")
    return copies[active[0]]


def output_head(model) -> OutputHead:
    """The output head of a Hugging Face causal LM: weight, bias, and its final-logit softcap / scale.

    Raises TypeError for a model without a plain ``nn.Linear`` head. The softcap and scale come from the config;
    ``causal_lm_hidden_states``, ``causal_lm_loss`` and ``patch_model_for_fused_loss`` also check them against
    the model's own forward the first time they run it.
    """
    module = _head_module(model)
    weight, bias = module.weight, module.bias
    # Inkling pads the vocabulary rows of its head and slices the padding off the logits.
    unpadded = getattr(_text_config(model), "unpadded_vocab_size", None)
    if unpadded is not None and unpadded < weight.shape[0]:
        weight, bias = weight[:unpadded], None if bias is None else bias[:unpadded]
    softcap, temperature = _post_processing(model)
    return OutputHead(weight=weight, bias=bias, softcap=softcap, temperature=temperature)


# Values the head returns on a model's first forward, in place of logits. Exact in fp16/bf16, signed (a scale
# shows), and some far beyond any practical softcap (a softcap shows).
_PROBE = (-64.0, -3.0, -0.5, 0.25, 2.0, 48.0)
_CHECKED: weakref.WeakSet = weakref.WeakSet()  # models whose post-processing passed the probe check


class _HeadCapture:
    """Swaps the head's forward for one that records its input and computes no logits (see the module doc)."""

    def __init__(self, model):
        self.model = model
        self.module = _head_module(model)
        self.hidden: torch.Tensor | None = None
        self._probe_dtype: torch.dtype | None = None
        self._saved = None  # the head's own instance-level forward, if it had one
        self._installed = False

    def install(self) -> None:
        current = vars(self.module).get("forward")
        if isinstance(getattr(current, "__self__", None), _HeadCapture):
            raise RuntimeError(f"{type(self.model).__name__}'s output head is already patched by ptkernels; "
                               f"remove that patch first")
        # accelerate's device hooks live in the same instance attribute: keep it to put back on remove().
        self._saved = current
        self.module.forward = self._forward
        self._installed = True

    def remove(self) -> None:
        if not self._installed:
            return
        if self._saved is None:
            del self.module.forward
        else:
            self.module.forward = self._saved
        self._installed, self.hidden = False, None

    def __enter__(self):
        self.install()
        return self

    def __exit__(self, *exc):
        self.remove()

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        self.hidden = x
        # The head with zero vocabulary rows: [..., 0], and still in the autograd graph of the weight, so
        # DDP(find_unused_parameters=True) (Trainer's default) counts the head as used in the forward.
        out = F.linear(x, self.module.weight[:0])
        if self.model in _CHECKED:
            return out
        self._probe_dtype = x.dtype
        return out.sum(-1, keepdim=True) + x.new_tensor(_PROBE)

    def take(self, outputs) -> torch.Tensor:
        """The head's input from the last forward; on a model's first forward, checks its post-processing."""
        hidden, self.hidden = self.hidden, None
        if hidden is None:
            raise RuntimeError(
                f"{type(self.model).__name__}'s forward did not call its output head module, so its hidden "
                f"states cannot be captured (or they were already taken for this forward)"
            )
        if self.model not in _CHECKED:
            _check_probe(self.model, _logits_of(outputs), self._probe_dtype)
            _CHECKED.add(self.model)
        return hidden


def _logits_of(outputs):
    if isinstance(outputs, dict):
        return outputs.get("logits")
    return outputs[0] if isinstance(outputs, (tuple, list)) else getattr(outputs, "logits", None)


def _check_probe(model, logits, dtype) -> None:
    head = output_head(model)
    expected = head.transform(torch.tensor(_PROBE, dtype=torch.float64))
    name = type(model).__name__
    if not torch.is_tensor(logits) or logits.shape[-1] != len(_PROBE):
        raise ValueError(f"{name}: cannot check what its forward does to the logits (got {type(logits).__name__}"
                         f" of shape {getattr(logits, 'shape', None)} for a head output of width {len(_PROBE)})")
    got = logits.detach().reshape(-1, len(_PROBE)).double().cpu()
    tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    if got.numel() and not torch.allclose(got, expected.expand_as(got), rtol=tol, atol=tol):
        raise ValueError(
            f"{name} changes its logits after the output head in a way ptkernels does not reproduce: with "
            f"softcap={head.softcap} and temperature={head.temperature} (read from its config) the head output "
            f"{list(_PROBE)} becomes {[round(v, 4) for v in expected.tolist()]}, but the model gives "
            f"{[round(v, 4) for v in got[0].tolist()]}. Compute this model's loss from its logits instead."
        )


def _run(model, inputs: dict):
    with _HeadCapture(model) as capture:
        outputs = model(**inputs)
        return capture.take(outputs), outputs


def causal_lm_hidden_states(model, input_ids=None, attention_mask=None, **model_kwargs) -> torch.Tensor:
    """The final hidden states ``[B, T, D]`` exactly as the model's output head receives them; no logits.

    ``model_kwargs`` go to the model (``position_ids``, ``inputs_embeds``, ``pixel_values``, ...). Use with
    ``output_head(model)`` and ``ptkernels.linear_cross_entropy`` / ``linear_token_logprobs``.
    """
    hidden, _ = _run(model, {"input_ids": input_ids, "attention_mask": attention_mask, **model_kwargs})
    return hidden


def _hf_causal_loss(model, hidden, outputs, labels, *, shift_labels=None, num_items_in_batch=None,
                    **options) -> torch.Tensor:
    """Transformers' ForCausalLMLoss (+ the MoE router loss it adds) from hidden states, via the fused op."""
    if labels is None and shift_labels is None:
        raise ValueError("labels are required for the loss (got None)")
    head = output_head(model)
    weight, bias = head.weight, head.bias
    hidden = hidden.to(weight.device)  # with device_map the last layer and the head can sit on two devices
    device = hidden.device.type
    if torch.is_autocast_enabled(device):  # the model's nn.Linear head would run in the autocast dtype
        dtype = torch.get_autocast_dtype(device)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    # Transformers shifts `labels` itself; `shift_labels` (padding-free / context-parallel collators) are used
    # as given. num_items_in_batch: the sum over this batch divided by the tokens of the whole accumulated step.
    target = labels if shift_labels is None else shift_labels
    loss = linear_cross_entropy(
        hidden, weight, target.to(hidden.device), bias=bias, softcap=head.softcap,
        temperature=head.temperature, shift=shift_labels is None,
        reduction="mean" if num_items_in_batch is None else "sum", **options)
    if num_items_in_batch is not None:
        loss = loss / (num_items_in_batch.to(loss.device) if torch.is_tensor(num_items_in_batch)
                       else num_items_in_batch)
    # MoE models with output_router_logits return their load-balancing loss and add it to the labels loss.
    aux = outputs.get("aux_loss") if isinstance(outputs, dict) else None
    if aux is not None:
        coef = getattr(model, "router_aux_loss_coef", None)
        coef = getattr(_text_config(model), "router_aux_loss_coef", 0.0) if coef is None else coef
        loss = loss + coef * aux.to(loss.device)
    return loss


def causal_lm_loss(model, input_ids=None, labels=None, attention_mask=None, *, num_items_in_batch=None,
                   ignore_index: int = -100, label_smoothing: float = 0.0, z_loss: float = 0.0,
                   chunk_size: int | None = None, backend: str = "auto", **model_kwargs) -> torch.Tensor:
    """``model(input_ids, attention_mask=..., labels=labels).loss`` without building the logits.

    The same loss as Transformers: labels shifted (position t predicts ``labels[t + 1]``), ``ignore_index``
    tokens skipped, the mean over the rest, or with ``num_items_in_batch`` their sum divided by it (Trainer's
    gradient-accumulation-correct loss); plus ``router_aux_loss_coef * aux_loss`` for MoE models that return
    one. Pre-shifted ``shift_labels=`` may replace ``labels``. Other ``model_kwargs`` go to the model.
    """
    shift_labels = model_kwargs.pop("shift_labels", None)
    hidden, outputs = _run(model, {"input_ids": input_ids, "attention_mask": attention_mask, **model_kwargs})
    return _hf_causal_loss(model, hidden, outputs, labels, shift_labels=shift_labels,
                           num_items_in_batch=num_items_in_batch, ignore_index=ignore_index,
                           label_smoothing=label_smoothing, z_loss=z_loss, chunk_size=chunk_size, backend=backend)


class FusedCausalLMLoss:
    """A ``compute_loss_func`` for ``transformers.Trainer``; made by ``patch_model_for_fused_loss``.

    While it is in place the model's head returns ``[B, T, 0]`` "logits", so ``generate()`` and anything else
    that needs logits do not work: call ``remove()`` first (or use it as a context manager).
    """

    def __init__(self, model, **options):
        self.model = model
        self.options = options
        self._capture = _HeadCapture(model)
        self._capture.install()
        # The two usual mistakes with a patched model fail with the fix in the message instead of a shape error:
        # model(..., labels=...) computing its own loss from the empty logits (Trainer without compute_loss_func
        # passes the labels to the model), and generate() reading the empty logits.
        self._saved = {k: vars(model)[k] for k in ("_loss_function", "generate") if k in vars(model)}
        model._loss_function = self._own_loss_called
        model.generate = self._generate_called

    def _own_loss_called(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self.model).__name__} is patched by ptkernels.integrations.patch_model_for_fused_loss: its head "
            "returns no logits, so model(..., labels=...) cannot compute its own loss. Give the loss function to "
            "Trainer as compute_loss_func=loss_fn (Trainer then keeps the labels from the model), or call "
            "ptkernels.integrations.causal_lm_loss(model, input_ids, labels, attention_mask) yourself")

    def _generate_called(self, *args, **kwargs):
        raise RuntimeError(
            f"{type(self.model).__name__} is patched by ptkernels.integrations.patch_model_for_fused_loss: its head "
            "returns no logits, so generate() cannot run. Call loss_fn.remove() first (or use the patch as a "
            "context manager: `with patch_model_for_fused_loss(model) as loss_fn: ...`)")

    def __call__(self, outputs, labels, num_items_in_batch=None) -> torch.Tensor:
        # Trainer pops `labels` from the batch, runs model(**batch) (our head records its input), then calls this.
        hidden = self._capture.take(outputs)
        return _hf_causal_loss(self.model, hidden, outputs, labels, num_items_in_batch=num_items_in_batch,
                               **self.options)

    def remove(self) -> None:
        """Puts the model's head back as it was; safe to call more than once."""
        self._capture.remove()
        for key in ("_loss_function", "generate"):
            if vars(self.model).get(key) in (self._own_loss_called, self._generate_called):
                if key in self._saved:
                    setattr(self.model, key, self._saved[key])
                else:
                    delattr(self.model, key)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def patch_model_for_fused_loss(model, *, ignore_index: int = -100, label_smoothing: float = 0.0,
                               z_loss: float = 0.0, chunk_size: int | None = None,
                               backend: str = "auto") -> FusedCausalLMLoss:
    """Makes ``model`` return no logits and gives the ``compute_loss_func`` that computes its loss without them.

        loss_fn = patch_model_for_fused_loss(model)
        Trainer(model=model, args=args, train_dataset=ds, compute_loss_func=loss_fn).train()
        loss_fn.remove()   # before model.generate()

    The loss equals the model's own (see ``causal_lm_loss``). ``Trainer.evaluate()`` reports it too, but a
    ``compute_metrics`` would get empty logits (``prediction_loss_only=True`` skips gathering them). The patch
    is per model instance: with ``nn.DataParallel`` (several GPUs in one process) the replicas would share it,
    so use DDP (torchrun) instead.
    """
    return FusedCausalLMLoss(model, ignore_index=ignore_index, label_smoothing=label_smoothing, z_loss=z_loss,
                             chunk_size=chunk_size, backend=backend)
