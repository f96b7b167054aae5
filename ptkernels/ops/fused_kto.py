"""KTO straight from hidden states and the output head, never building the ``[tokens, V]`` logits.

``fused_linear_kto_loss`` runs the chunk loop of ops/fused_preference.py (see its module docstring) with one
example per group; its shared checks and autograd function live there.
"""

from __future__ import annotations

import torch

from .. import reference
from ..reference import preference as reference_preference
from ..types import KTO_LOSS_TYPES, KTOLossOutput, compute_dtype
from .backends import get_block_rows, get_rows
from .core.checks import check_ref_head
from .core.chunking import default_chunk_size
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd
from .core.groups import forward_sequence_logps
from .fused_preference import FusedLinearPreferenceFunction, check_sequences, grow_to, row_options
from .fused_preference_loop import FusedConfig
from .preference_math import check_batch, check_loss_options, kto_reference_point


def fused_linear_kto_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    desirable: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    kl: float | torch.Tensor | None = None,
    kl_hidden: torch.Tensor | None = None,
    kl_labels: torch.Tensor | None = None,
    ref_kl_logps: torch.Tensor | None = None,
    ref_kl_hidden: torch.Tensor | None = None,
    loss_type: str = "kto",
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    backend: str = "auto",
    average_log_prob: bool = False,
    memory: str = "default",
) -> KTOLossOutput:
    """KTO (TRL's ``KTOTrainer``) straight from hidden states and the head, never building the logits.

    KTO is unpaired: ``hidden [N, T, D]`` / ``labels [N, T]`` hold N (prompt, completion) examples and
    ``desirable [N]`` (bool) marks the desirable ones. The per-example losses (``ptkernels.kto_loss``) are
    independent once the reference point z0 is fixed, so the same 3-GEMM chunk loop applies, one example per
    group. z0 (detached, clamped at 0) comes from, in order: ``kl`` given; or the mismatched completions
    ``kl_hidden [M, T', D]`` / ``kl_labels [M, T']`` scored by the policy head under no_grad (TRL computes
    them under no_grad too) minus their reference log-probs (``ref_kl_logps [M]``, or ``ref_kl_hidden``
    through the reference head): z0 = clamp(mean(pi_KL - ref_KL), min=0), a forward-only pass; else 0.
    Reference log-probs of the examples: ``ref_logps [N]`` or ``ref_hidden`` (+ ``ref_weight``/``ref_bias``,
    defaulting to the policy's head, detached). Sequence log-probs are sums over valid tokens, as TRL 1.16's KTO
    (which has no averaging option); ``average_log_prob=True`` divides every sequence log-prob (examples, reference,
    and the KL completions) by its valid-token count: Liger 0.8.5's ``average_log_prob`` option, not TRL's.

    ``memory="compact"``: the weight gradient without the fp32 ``[V, D]`` accumulator, one vocabulary block at a
    time in backward from each scored token's saved lse and coefficient (see ``fused_linear_preference_loss``);
    one more GEMM over the logits.

    Returns ``KTOLossOutput`` (``loss`` differentiable; ``losses`` desirable first, as TRL; rewards; ``kl``).
    Synchronizes twice per call (the valid-token counts; the number of desirable examples, to split the outputs).
    """
    check_sequences(hidden, weight, bias, labels, ignore_index)
    n = hidden.shape[0]
    if n == 0:
        raise ValueError("fused_linear_kto_loss needs at least one example (hidden is empty)")
    check_loss_options(loss_type, KTO_LOSS_TYPES, beta=beta)
    o = row_options(ignore_index, temperature, softcap, chunk_size, memory)
    _check_examples(desirable, ref_logps, ref_hidden, hidden)
    policy_ref_weight = ref_weight
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    if shift:
        labels = reference.shift_labels(labels, ignore_index)
    name = resolve_backend(backend, hidden.device)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype)
    cd = compute_dtype(hidden.dtype)
    rows_impl = get_rows("torch" if name == "reference" else name)

    # z0: the KL reference point (a forward-only pass over the mismatched completions when they are given)
    z0 = _reference_point(kl, kl_hidden, kl_labels, ref_kl_logps, ref_kl_hidden, hidden, weight, bias,
                          policy_ref_weight, ref_bias, shift, average_log_prob, rows_impl, o, chunk, name)

    if name == "reference":
        return reference_preference.linear_kto_loss(
            hidden, weight, labels, desirable, bias=bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, kl=z0, loss_type=loss_type, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap, average_log_prob=average_log_prob)
    cfg = FusedConfig(kind=loss_type, paired=False, beta=float(beta), average=bool(average_log_prob),
                      desirable_weight=float(desirable_weight),
                      undesirable_weight=float(undesirable_weight), o=o, chunk=chunk, sync_free=False,
                      grow_to=grow_to(chunk_size, weight, hidden),
                      block_rows=get_block_rows(name) if memory == "compact" else None)
    hidden, weight, bias, ref_hidden, ref_weight, ref_bias = for_autograd(hidden, weight, bias, ref_hidden,
                                                                          ref_weight, ref_bias)
    loss, losses, _, _, rewards, *_ = FusedLinearPreferenceFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, None if ref_hidden is None else
        ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias,
        None if ref_logps is None else ref_logps.detach().to(cd), desirable, z0, cfg, rows_impl)
    # TRL's order: desirable examples first (a stable permutation; no synchronization)
    order = torch.argsort((~desirable).to(torch.uint8), stable=True)
    n_desirable = int(desirable.sum())  # a second (tiny) synchronization: the split sizes of the output
    losses = losses.index_select(0, order)
    rewards = rewards.index_select(0, order)
    return KTOLossOutput(loss=loss, losses=losses, chosen_rewards=rewards[:n_desirable],
                         rejected_rewards=rewards[n_desirable:], kl=z0)


def _check_examples(desirable, ref_logps, ref_hidden, hidden) -> None:
    """``desirable [N]`` bool and exactly one reference side for the N examples of ``hidden``."""
    n = hidden.shape[0]
    if not isinstance(desirable, torch.Tensor) or desirable.dtype != torch.bool:
        raise TypeError("desirable must be a bool tensor [N] (True for desirable examples)")
    if tuple(desirable.shape) != (n,) or desirable.device != hidden.device:
        raise ValueError(f"desirable has shape {tuple(desirable.shape)} on {desirable.device} but hidden implies "
                         f"({n},) on {hidden.device}")
    if (ref_logps is None) == (ref_hidden is None):
        raise ValueError("pass the reference log-probs ref_logps [N] or the reference hidden states ref_hidden "
                         "(exactly one)")
    if ref_logps is not None:
        check_batch([("ref_logps", ref_logps)])
        if ref_logps.shape[0] != n or ref_logps.device != hidden.device:
            raise ValueError(f"ref_logps has shape {tuple(ref_logps.shape)} on {ref_logps.device} but hidden "
                             f"implies ({n},) on {hidden.device}")


def _reference_point(kl, kl_hidden, kl_labels, ref_kl_logps, ref_kl_hidden, hidden, weight, bias, ref_weight,
                     ref_bias, shift, average_log_prob, rows_impl, o, chunk, name):
    """KTO's z0 (detached, clamped at 0): ``kl`` given, or from the mismatched completions (``kl_hidden``,
    ``kl_labels``) scored by the policy head under no_grad minus their reference log-probs, or 0."""
    if kl is not None and kl_hidden is not None:
        raise ValueError("pass kl or kl_hidden (with kl_labels), not both")
    if kl_hidden is None:
        return kto_reference_point(kl, like=hidden)
    ignore_index = o.ignore_index
    if kl_labels is None:
        raise ValueError("kl_hidden needs kl_labels (the mismatched completions' labels)")
    check_sequences(kl_hidden, weight, bias, kl_labels, ignore_index)
    if shift:
        kl_labels = reference.shift_labels(kl_labels, ignore_index)
    if (ref_kl_logps is None) == (ref_kl_hidden is None):
        raise ValueError("kl_hidden needs the reference side: ref_kl_logps [M] or ref_kl_hidden (exactly one)")
    cd = compute_dtype(hidden.dtype)
    with torch.no_grad():
        kl_len = (kl_labels != ignore_index).sum(dim=1).clamp(min=1).to(cd) if average_log_prob else 1.0
        pol_kl = _sequence_logps(kl_hidden, weight.detach(), None if bias is None else bias.detach(),
                                 kl_labels, rows_impl, o, chunk, name) / kl_len
        if ref_kl_hidden is not None:
            rkh, rkw, rkb = check_ref_head(kl_hidden, weight, bias, ref_kl_hidden, ref_weight, ref_bias)
            ref_kl = _sequence_logps(rkh, rkw, rkb, kl_labels, rows_impl, o, chunk, name) / kl_len
        else:
            check_batch([("ref_kl_logps", ref_kl_logps)])
            if ref_kl_logps.shape[0] != kl_hidden.shape[0]:
                raise ValueError(f"ref_kl_logps has {ref_kl_logps.shape[0]} entries but kl_hidden holds "
                                 f"{kl_hidden.shape[0]} sequences")
            ref_kl = ref_kl_logps.to(cd)
    return kto_reference_point(None, pol_kl, ref_kl, like=hidden)


def _sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk, name):
    """Summed log-probs ``[S]`` of ``hidden [S, T, D]`` under (weight, bias), forward only."""
    if name == "reference":
        tok = reference.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=o.ignore_index,
                                              temperature=o.temperature, softcap=o.softcap)
        return tok.sum(dim=-1)
    return forward_sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk)
