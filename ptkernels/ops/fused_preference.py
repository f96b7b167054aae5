"""Fused preference losses from hidden states and the output head, never building the ``[tokens, V]`` logits.

``fused_linear_preference_loss`` (DPO family, SimPO, ORPO, CPO) and ``fused_linear_kto_loss`` (KTO). The loop
runs over chunks of GROUPS: a group is one chosen/rejected pair (paired losses) or one example (KTO), and a
chunk is k complete groups, i.e. all their valid (non-ignored) tokens, about ``chunk_size`` rows of logits:

    [ref]  z_ref = h_ref @ W_ref.T under no_grad -> per-token logp -> reference sequence log-probs
    z    = h_c @ W.T (+ b)                                GEMM 1: the chunk's logits, never the whole matrix
    row kernel: per-token logp and lse (ops/backends/torch.py: torch or Triton)
    segment sums (index_add_) -> sequence log-probs of the chunk's sequences (/ lengths when averaging)
    per-group losses and d loss / d sequence-logp on [2k] values (a tiny autograd graph over
        ops.preference.pair_losses: groups are independent and the batch mean's 1/B is known up front)
    per-token coefficient = d loss / d seq-logp of its sequence (+ the NLL term's -w / N_chosen on chosen tokens)
    row kernel ``logprob_bwd`` writes d loss / d z in place of z
    dh_c = dz @ W,  dW += dz.T @ h_c (fp32 accumulator)  GEMMs 2 and 3

so forward + backward cost 3 GEMMs (plus the reference model's forward GEMM) with the memory of one chunk;
backward only scales the precomputed gradients by the incoming scalar. Two cases take a second pass:
    * a loss that couples groups: bco_pair's reference point delta is the batch-mean reward, unknown until every
      sequence is scored. Without ``bco_delta`` a forward-only pass computes all sequence log-probs first
      (and caches the reference ones), then the main loop runs with delta fixed (4 GEMMs).
    * a single group with more valid tokens than ``chunk_size``: its rows are split into blocks; a forward pass
      keeps only the per-token lse, and the backward blocks recompute their logits (4 GEMMs for that group).
The default chunk size grows (up to 8x ``default_chunk_size`` on CUDA, 4x on CPU) so that the largest pair fits
whole.
Row selection uses one host-device synchronization per call (the per-sequence valid-token counts, so masked
prompt and padding rows skip every GEMM); ``sync_free=True`` walks all rows instead (no synchronization; masked
rows are skipped on the device inside the row kernels while their GEMM rows are still computed).
"""

from __future__ import annotations

import torch

from .. import reference
from ..reference import preference as reference_preference
from ..types import DPO_LOSS_TYPES, KTO_LOSS_TYPES, KTOLossOutput, PreferenceLossOutput, compute_dtype
from .backends import get_rows
from .backends.base import RowOptions
from .core import gemm
from .core.checks import check_head, check_labels, check_options, check_ref_head
from .core.chunking import default_chunk_size, want_sync_free
from .core.dispatch import resolve_backend
from .core.groups import Head, forward_sequence_logps
from .fused_preference_loop import FusedConfig, run
from .preference_math import (
    check_batch,
    check_loss_options,
    kto_reference_point,
    make_output,
)

FUSED_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo", "cpo")
_AVERAGED_BY_DEFAULT = ("ipo", "simpo", "orpo")  # TRL length-averages these (DPO ipo, CPO ipo/simpo, ORPO)
_NLL_BY_DEFAULT = ("orpo", "cpo")  # ORPO's SFT term and CPO's cpo_alpha both default to weight 1


class FusedLinearPreferenceFunction(torch.autograd.Function):
    """Returns (loss, *per-group results): only ``loss`` is differentiable; the gradients of hidden, weight and
    bias are formed in forward (fused_preference_loop.run) and backward scales them by the incoming gradient.
    The results are ``LoopResult``'s fields (logps and rewards flattened to two entries each, None when absent)."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels2d, ref_hidden2d, ref_weight, ref_bias, ref_given, desirable,
                z0, cfg: FusedConfig, rows_impl):
        ctx.set_materialize_grads(False)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ref_head = None if ref_hidden2d is None else Head(ref_hidden2d, ref_weight, ref_bias)
        out = run(cfg, Head(hidden2d, weight, bias), ref_head, ref_given, labels2d, desirable, z0, rows_impl, need)
        ctx.grads = out.grads
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        logps = (*out.logps, None)[:2]
        rewards = (*out.rewards, None)[:2]
        results = (out.losses, *logps, *rewards, out.log_odds, out.ratio, out.nll)
        ctx.mark_non_differentiable(*(t for t in results if t is not None))
        return (out.loss.clone(), *results)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype = ctx.dtypes
        if grad_out is None:
            return (None,) * 12
        gh = gh.mul_(grad_out).to(h_dtype) if gh is not None else None
        gw = gemm.weight_grad_result(gw.mul_(grad_out), w_dtype) if gw is not None else None
        gb = gb.mul_(grad_out).to(w_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ checks


def _check_sequences(hidden, weight, bias, labels, ignore_index):
    check_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [batch, T, D], got shape {tuple(hidden.shape)}")
    check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden")


def _grow_to(chunk_size, weight, hidden) -> int | None:
    """With the default chunk size, a chunk may grow so that one whole group (a pair's valid tokens) fits,
    keeping the 3-GEMM path: to 2x the default chunk on CUDA (about 2^29 logits: 4096 rows at V=128256), 4x on CPU
    (about 2^26 logits, 256 MiB in fp32: 2048 rows at V=32000). An explicit ``chunk_size`` is a hard limit."""
    if chunk_size is not None:
        return None
    base = default_chunk_size(weight.shape[0], hidden.device, hidden.dtype)
    return 2 * base if hidden.device.type == "cuda" else 4 * base


def _row_options(ignore_index, temperature, softcap, chunk_size):
    check_options(temperature=temperature, softcap=softcap, chunk_size=chunk_size)
    return RowOptions(ignore_index=ignore_index, softcap=None if softcap is None else float(softcap),
                      temperature=float(temperature))


# ------------------------------------------------------------------------------------------------ public


def fused_linear_preference_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    loss_type: str = "sigmoid",
    beta: float = 0.1,
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
    bco_delta: float | None = None,
    reference_free: bool = False,
    nll_weight: float | None = None,
    average_logps: bool | None = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    backend: str = "auto",
) -> PreferenceLossOutput:
    """A paired preference loss straight from the policy's final hidden states and output head, never
    building the logits (see the module docstring for the chunk loop: 3 GEMMs for forward + backward).

    Args:
        hidden: ``[2B, T, D]``, the chosen batch then the rejected batch (TRL's concatenated forward: pair i is
            rows i and B + i). ``labels``: ``[2B, T]``, ``ignore_index`` on prompt and padding tokens.
        weight, bias: the policy's head ``[V, D]`` (and ``[V]``); gradients flow to hidden, weight and bias.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs, precomputed (in the loss's units:
            averaged when the loss averages); constants. Or instead:
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states ``[2B, T, D_ref]`` and head
            (``ref_weight`` defaults to ``weight``, detached); scored under no_grad inside the same chunk loop.
        loss_type: the DPO family (``sigmoid``, ``ipo``, ``hinge``, ``robust``, ``exo_pair``, ``bco_pair``,
            ``apo_zero``, ``apo_down``; formulas in ``ptkernels.dpo_loss``), ``simpo`` (formula in
            ``simpo_loss``; ``simpo_gamma`` is TRL's gamma), ``orpo`` (``orpo_loss``) or ``cpo`` (CPO's sigmoid
            loss, ``cpo_loss``). ``reference_free=True`` runs a DPO-family loss with the reference log-probs at
            0, which gives CPO's ``hinge``/``ipo`` (and ``sigmoid`` = ``cpo``).
        beta, label_smoothing, bco_delta: as in ``dpo_loss`` (bco_pair without ``bco_delta`` uses the batch-mean
            reward: a forward-only pass first, 4 GEMMs).
        nll_weight: adds ``nll_weight * NLL``, the cross-entropy of the chosen completions' tokens (mean over
            them): RPO's ``rpo_alpha``, CPO's ``cpo_alpha``, ORPO's SFT term. Default: 1 for ``orpo`` and
            ``cpo``, else 0.
        average_logps: length-average the sequence log-probs (sum / valid tokens). Default as TRL: on for
            ``ipo``, ``simpo`` and ``orpo``, off otherwise.
        shift: Hugging Face's causal shift of the labels (position t scored against labels[t + 1]).
        temperature, softcap: the logit transform ``s = softcap * tanh(z / softcap) / temperature`` (both models).
        chunk_size: rows of logits per chunk, a hard limit (a pair larger than it is split over blocks and takes
            the 4-GEMM path). Default: ``ops.core.chunking.default_chunk_size``, grown up to 8x that (4x on CPU) so
            the largest pair fits whole (chunks always hold whole pairs when they can).
        sync_free: as in ``linear_cross_entropy``. backend: "auto", "reference", "torch", "triton", "native".

    Returns ``PreferenceLossOutput``: ``loss`` (differentiable scalar), and detached ``losses`` [B],
    ``chosen_rewards``/``rejected_rewards`` [B], ``reward_accuracy``, ``reward_margin``, the policy's
    ``chosen_logps``/``rejected_logps`` [B] as the loss saw them, ``nll_loss`` (when ``nll_weight``), and the
    ORPO metrics. fp32 (fp64 for fp64 input).
    """
    _check_sequences(hidden, weight, bias, labels, ignore_index)
    b2 = hidden.shape[0]
    if b2 == 0 or b2 % 2:
        raise ValueError(f"hidden has {b2} sequences: it must hold the chosen batch then the rejected batch "
                         f"(2B sequences, B >= 1), so an even, non-zero count")
    if loss_type not in FUSED_LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; valid: {', '.join(FUSED_LOSS_TYPES)}")
    kind = "sigmoid" if loss_type == "cpo" else loss_type
    check_loss_options(kind, FUSED_LOSS_TYPES, beta=beta, label_smoothing=label_smoothing)
    o = _row_options(ignore_index, temperature, softcap, chunk_size)
    n = b2 // 2
    needs_ref = loss_type in DPO_LOSS_TYPES and not reference_free
    given = ref_chosen_logps is not None or ref_rejected_logps is not None
    if not needs_ref:
        if given or ref_hidden is not None:
            why = "reference_free=True" if reference_free else f"loss_type={loss_type!r}"
            raise ValueError(f"{why} uses no reference model: drop ref_chosen_logps/ref_rejected_logps/ref_hidden")
    elif given and ref_hidden is not None:
        raise ValueError("pass the reference log-probs (ref_chosen_logps, ref_rejected_logps) or the reference "
                         "model's hidden states (ref_hidden), not both")
    elif not given and ref_hidden is None:
        raise ValueError(f"loss_type={loss_type!r} needs the reference model: pass ref_chosen_logps and "
                         f"ref_rejected_logps, or ref_hidden (and ref_weight), or reference_free=True")
    if given:
        if ref_chosen_logps is None or ref_rejected_logps is None:
            raise ValueError("pass both ref_chosen_logps and ref_rejected_logps")
        check_batch([("ref_chosen_logps", ref_chosen_logps), ("ref_rejected_logps", ref_rejected_logps)])
        if ref_chosen_logps.shape[0] != n:
            raise ValueError(f"ref_chosen_logps has {ref_chosen_logps.shape[0]} entries but hidden holds {n} pairs "
                             f"({b2} sequences)")
        if ref_chosen_logps.device != hidden.device:
            raise ValueError(f"ref_chosen_logps is on {ref_chosen_logps.device} but hidden is on {hidden.device}")
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    average = (loss_type in _AVERAGED_BY_DEFAULT) if average_logps is None else bool(average_logps)
    nll_w = (1.0 if loss_type in _NLL_BY_DEFAULT else 0.0) if nll_weight is None else float(nll_weight)
    if shift:
        labels = reference.shift_labels(labels, ignore_index)
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        return reference_preference.linear_preference_loss(
            hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
            loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, simpo_gamma=simpo_gamma,
            bco_delta=bco_delta, reference_free=reference_free, nll_weight=nll_w, average_logps=average,
            ignore_index=ignore_index, temperature=temperature, softcap=softcap)
    cfg = FusedConfig(kind=kind, paired=True, beta=float(beta), label_smoothing=float(label_smoothing),
                  gamma=float(simpo_gamma), bco_delta=None if bco_delta is None else float(bco_delta),
                  average=average, nll_weight=nll_w, o=o,
                  chunk=chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype),
                  sync_free=want_sync_free(sync_free, hidden.device), grow_to=_grow_to(chunk_size, weight, hidden))
    ref_given = None
    if given:
        cd = compute_dtype(hidden.dtype)
        ref_given = torch.cat([ref_chosen_logps.detach(), ref_rejected_logps.detach()]).to(cd)
    loss, losses, pc, pr, cw, rw, log_odds, ratio, nll = FusedLinearPreferenceFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, None if ref_hidden is None else
        ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, ref_given, None, None, cfg,
        get_rows(name))
    extras = {"log_odds": log_odds, "ratio": ratio} if log_odds is not None else None
    return make_output(losses, cw, rw, pc, pr, nll_loss=nll, nll_weight=nll_w, extras=extras, loss=loss)


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
    defaulting to the policy's head, detached). Sequence log-probs are sums over valid tokens (TRL's KTO).

    Returns ``KTOLossOutput`` (``loss`` differentiable; ``losses`` desirable first, as TRL; rewards; ``kl``).
    Synchronizes twice per call (the valid-token counts; the number of desirable examples, to split the outputs).
    """
    _check_sequences(hidden, weight, bias, labels, ignore_index)
    n = hidden.shape[0]
    if n == 0:
        raise ValueError("fused_linear_kto_loss needs at least one example (hidden is empty)")
    check_loss_options(loss_type, KTO_LOSS_TYPES, beta=beta)
    o = _row_options(ignore_index, temperature, softcap, chunk_size)
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
    if kl is None and kl_hidden is not None:
        if kl_labels is None:
            raise ValueError("kl_hidden needs kl_labels (the mismatched completions' labels)")
        _check_sequences(kl_hidden, weight, bias, kl_labels, ignore_index)
        if shift:
            kl_labels = reference.shift_labels(kl_labels, ignore_index)
        if (ref_kl_logps is None) == (ref_kl_hidden is None):
            raise ValueError("kl_hidden needs the reference side: ref_kl_logps [M] or ref_kl_hidden (exactly one)")
        with torch.no_grad():
            pol_kl = _sequence_logps(kl_hidden, weight.detach(), None if bias is None else bias.detach(),
                                     kl_labels, rows_impl, o, chunk, name)
            if ref_kl_hidden is not None:
                rkh, rkw, rkb = check_ref_head(kl_hidden, weight, bias, ref_kl_hidden, policy_ref_weight, ref_bias)
                ref_kl = _sequence_logps(rkh, rkw, rkb, kl_labels, rows_impl, o, chunk, name)
            else:
                check_batch([("ref_kl_logps", ref_kl_logps)])
                if ref_kl_logps.shape[0] != kl_hidden.shape[0]:
                    raise ValueError(f"ref_kl_logps has {ref_kl_logps.shape[0]} entries but kl_hidden holds "
                                     f"{kl_hidden.shape[0]} sequences")
                ref_kl = ref_kl_logps.to(cd)
        z0 = kto_reference_point(None, pol_kl, ref_kl, like=hidden)
    elif kl is not None and kl_hidden is not None:
        raise ValueError("pass kl or kl_hidden (with kl_labels), not both")
    else:
        z0 = kto_reference_point(kl, like=hidden)

    if name == "reference":
        return reference_preference.linear_kto_loss(
            hidden, weight, labels, desirable, bias=bias, ref_logps=ref_logps, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, kl=z0, loss_type=loss_type, beta=beta,
            desirable_weight=desirable_weight, undesirable_weight=undesirable_weight, ignore_index=ignore_index,
            temperature=temperature, softcap=softcap)
    cfg = FusedConfig(kind=loss_type, paired=False, beta=float(beta), desirable_weight=float(desirable_weight),
                  undesirable_weight=float(undesirable_weight), o=o, chunk=chunk, sync_free=False,
                  grow_to=_grow_to(chunk_size, weight, hidden))
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


def _sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk, name):
    """Summed log-probs ``[S]`` of ``hidden [S, T, D]`` under (weight, bias), forward only."""
    if name == "reference":
        tok = reference.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=o.ignore_index,
                                              temperature=o.temperature, softcap=o.softcap)
        return tok.sum(dim=-1)
    return forward_sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk)
