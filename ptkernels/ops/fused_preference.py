"""Fused preference losses from hidden states and the output head, never building the ``[tokens, V]`` logits.

``fused_linear_preference_loss`` (DPO family, SimPO, ORPO, CPO) here and ``fused_linear_kto_loss`` (KTO) in
ops/fused_kto.py, which shares the checks and the autograd function below. The loop
runs over chunks of GROUPS: a group is one chosen/rejected pair (paired losses) or one example (KTO), and a
chunk is k complete groups, i.e. all their valid (non-ignored) tokens, about ``chunk_size`` rows of logits:

    [ref]  z_ref = h_ref @ W_ref.T under no_grad -> per-token logp -> reference sequence log-probs
    z    = h_c @ W.T (+ b)                                GEMM 1: the chunk's logits, never the whole matrix
    row kernel: per-token logp and lse (ops/backends/torch.py: torch or Triton)
    segment sums (index_add_) -> sequence log-probs of the chunk's sequences (/ lengths when averaging)
    per-group losses and d loss / d sequence-logp on [2k] values (a tiny autograd graph over
        ops.preference.pair_losses: groups are independent and the batch mean's 1/B is known up front)
    per-token coefficient = d loss / d seq-logp of its sequence (x the token's LD-DPO weight), + the NLL / sft
        term's -w / N_chosen on chosen tokens
    row kernel ``logprob_bwd`` writes d loss / d z in place of z
    dh_c = dz @ W,  dW += dz.T @ h_c (fp32 accumulator)  GEMMs 2 and 3

so forward + backward cost 3 GEMMs (plus the reference model's forward GEMM) with the memory of one chunk;
backward only scales the precomputed gradients by the incoming scalar. Two cases take a second pass:
    * a loss that couples groups: aot / aot_unpaired sort the batch's log-ratios, and WPO-weighted sft multiplies
      the batch's NLL by each pair's weight, so a pair's gradient is unknown until every sequence is scored. A
      forward-only pass computes all sequence log-probs first (and caches the reference ones), then the main loop
      forms the gradients from the whole batch's loss (4 GEMMs).
    * a single group with more valid tokens than ``chunk_size``: its rows are split into blocks; a forward pass
      keeps only the per-token lse, and the backward blocks recompute their logits (4 GEMMs for that group).
The default chunk size grows (up to 8x ``default_chunk_size`` on CUDA, 4x on CPU) so that the largest pair fits
whole.
``memory="compact"`` drops GEMM 3 (and the fp32 ``[V, D]`` accumulator) from the loop, which keeps each scored
token's lse and per-token coefficient (d loss / d logp) instead; backward forms dW and db from them one block of
the vocabulary at a time (ops/core/vocab_blocks.py: GEMM 1 again and GEMM 3), so one more GEMM in all.
Row selection uses one host-device synchronization per call (the per-sequence valid-token counts, so masked
prompt and padding rows skip every GEMM); ``sync_free=True`` walks all rows instead (no synchronization; masked
rows are skipped on the device inside the row kernels while their GEMM rows are still computed).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .. import reference
from ..reference import preference as reference_preference
from ..types import DPO_LOSS_TYPES, PreferenceLossOutput, compute_dtype
from .backends import get_block_rows, get_rows
from .backends.base import RowOptions
from .core import gemm, vocab_blocks
from .core.checks import check_head, check_labels, check_options, check_ref_head
from .core.chunking import default_chunk_size, want_sync_free
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd
from .core.groups import Head
from .fused_preference_loop import FusedConfig, run
from .linear_cross_entropy import linear_cross_entropy
from .preference_math import (
    check_batch,
    check_loss_options,
    dpo_spec,
    make_output,
)

FUSED_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo", "cpo")
_AVERAGED_BY_DEFAULT = ("simpo", "orpo")  # TRL 1.16 length-averages these log-probs (CPO simpo, ORPO)
_NLL_BY_DEFAULT = ("orpo", "cpo")  # ORPO's SFT term and CPO's cpo_alpha both default to weight 1


class FusedLinearPreferenceFunction(torch.autograd.Function):
    """Returns (loss, *per-group results): only ``loss`` is differentiable; the gradients of hidden, weight and
    bias are formed in forward (fused_preference_loop.run) and backward scales them by the incoming gradient.
    The results are ``LoopResult``'s fields (logps and rewards flattened to two entries each, None when absent).

    ``memory="compact"`` (``cfg.block_rows`` set): forward forms only d hidden and keeps each token's lse and
    d loss / d logp; backward forms dW and db from them one vocabulary block at a time (ops/core/vocab_blocks.py),
    the incoming gradient folded into the per-token coefficients, so dW is rounded to the weight's dtype once."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels2d, ref_hidden2d, ref_weight, ref_bias, ref_given, desirable,
                z0, cfg: FusedConfig, rows_impl, seq_lengths=None):
        ctx.set_materialize_grads(False)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ref_head = None if ref_hidden2d is None else Head(ref_hidden2d, ref_weight, ref_bias)
        out = run(cfg, Head(hidden2d, weight, bias), ref_head, ref_given, labels2d, desirable, z0, rows_impl, need,
                  seq_lengths)
        ctx.grads = out.grads
        ctx.token_rows = out.token_rows
        ctx.weight_pass = (cfg, need)
        if out.token_rows is not None:
            ctx.save_for_backward(hidden2d, weight, bias, labels2d)
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        logps = (*out.logps, None)[:2]
        rewards = (*out.rewards, None)[:2]
        results = (out.losses, *logps, *rewards, out.log_odds, out.ratio, out.nll)
        ctx.mark_non_differentiable(*(t for t in results if t is not None))
        return (out.loss.clone(), *results)

    @staticmethod
    def backward(ctx, grad_out, *unused):
        gh, gw, gb = ctx.grads
        token_rows, ctx.grads, ctx.token_rows = ctx.token_rows, None, None
        h_dtype, w_dtype = ctx.dtypes
        if grad_out is None:
            return (None,) * 13
        gh = gh.mul_(grad_out).to(h_dtype) if gh is not None else None
        if token_rows is not None:  # compact memory: the vocabulary-block weight pass, grad_out in its coefficients
            hidden2d, weight, bias, labels2d = ctx.saved_tensors
            cfg, need = ctx.weight_pass
            lse, g_logp, plan = token_rows
            coef, has_b = vocab_blocks.logprob_coefficients(g_logp.mul_(grad_out.to(g_logp.dtype)), None, None)
            gw, gb = vocab_blocks.weight_grads(hidden2d, weight, bias, labels2d.reshape(-1), lse, coef, has_b, plan,
                                               cfg.block_rows, cfg.o, need[1], need[2])
            return gh, gw, gb.to(w_dtype) if gb is not None else None, *(None,) * 10
        gw = gemm.weight_grad_result(gw.mul_(grad_out), w_dtype) if gw is not None else None
        gb = gb.mul_(grad_out).to(w_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ checks


def check_sequences(hidden, weight, bias, labels, ignore_index):
    check_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [batch, T, D], got shape {tuple(hidden.shape)}")
    check_labels("labels", labels, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden")


def grow_to(chunk_size, weight, hidden) -> int | None:
    """With the default chunk size, a chunk may grow so that one whole group (a pair's valid tokens) fits,
    keeping the 3-GEMM path: to 2x the default chunk on CUDA (about 2^29 logits: 4096 rows at V=128256), 4x on CPU
    (about 2^26 logits, 256 MiB in fp32: 2048 rows at V=32000). An explicit ``chunk_size`` is a hard limit."""
    if chunk_size is not None:
        return None
    base = default_chunk_size(weight.shape[0], hidden.device, hidden.dtype)
    return 2 * base if hidden.device.type == "cuda" else 4 * base


def row_options(ignore_index, temperature, softcap, chunk_size, memory="default"):
    check_options(temperature=temperature, softcap=softcap, chunk_size=chunk_size, memory=memory)
    return RowOptions(ignore_index=ignore_index, softcap=None if softcap is None else float(softcap),
                      temperature=float(temperature))


def _resolve_loss_type(loss_type, *, beta, label_smoothing, loss_weights, f_divergence_type,
                       f_alpha_divergence_coef, discopop_tau, bco_delta, use_weighting, ld_alpha, alpha):
    """(types, kind, DPO spec or None, loss_type) of a ``loss_type`` string or list, its options checked: kind
    "dpo" for DPO-family types (a list too), else the fused op's own (``cpo`` runs as "sigmoid")."""
    types = (loss_type,) if isinstance(loss_type, str) else tuple(loss_type)
    spec = None
    if all(t in DPO_LOSS_TYPES for t in types):
        spec = dpo_spec(types, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
                        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                        discopop_tau=discopop_tau, bco_delta=None if bco_delta is None else float(bco_delta),
                        use_weighting=use_weighting)
        kind = "dpo"
    elif len(types) == 1 and types[0] in FUSED_LOSS_TYPES:
        loss_type = types[0]
        kind = "sigmoid" if loss_type == "cpo" else loss_type
        check_loss_options(kind, FUSED_LOSS_TYPES, beta=beta, label_smoothing=label_smoothing)
        if ld_alpha is not None or use_weighting:
            raise ValueError(f"ld_alpha and use_weighting are DPO options; loss_type={loss_type!r} takes neither")
    else:
        bad = [t for t in types if t not in FUSED_LOSS_TYPES]
        raise ValueError(f"unknown loss_type {(bad or types)[0]!r}; valid: {', '.join(FUSED_LOSS_TYPES)} "
                         f"(a list may combine DPO-family types only)")
    if alpha and kind not in ("simpo", "sigmoid"):
        raise ValueError(f"alpha (AlphaPO) applies to loss_type 'simpo' and 'cpo', not {loss_type!r}")
    if ld_alpha is not None and not 0.0 <= float(ld_alpha) <= 1.0:
        raise ValueError(f"ld_alpha must be in [0, 1] (TRL's DPOConfig), got {ld_alpha}")
    return types, kind, spec, loss_type


def _check_pairs(needs_ref, reference_free, loss_type, ref_chosen_logps, ref_rejected_logps, ref_hidden, hidden):
    """2B sequences in ``hidden``, and exactly one reference side when the loss needs one (none otherwise);
    returns the given reference log-probs, chosen then rejected ``[2B]`` in the compute dtype, or None."""
    b2 = hidden.shape[0]
    if b2 == 0 or b2 % 2:
        raise ValueError(f"hidden has {b2} sequences: it must hold the chosen batch then the rejected batch "
                         f"(2B sequences, B >= 1), so an even, non-zero count")
    n = b2 // 2
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
        return torch.cat([ref_chosen_logps.detach(), ref_rejected_logps.detach()]).to(compute_dtype(hidden.dtype))
    return None


def _external_nll(nll_target, nll_w, hidden, weight, bias, labels, ignore_index, softcap, temperature, shift,
                  chunk_size, sync_free, backend, memory):
    """The NLL term over ``nll_target``'s chosen rows (a fused cross-entropy), or None without one."""
    if nll_target is None:
        return None
    b2 = hidden.shape[0]
    n = b2 // 2
    if tuple(nll_target.shape) not in ((b2, labels.shape[1]), (n, labels.shape[1])):
        raise ValueError(f"nll_target has shape {tuple(nll_target.shape)} but labels has shape "
                         f"{tuple(labels.shape)}: give [2B, T] or [B, T] (the chosen rows)")
    check_labels("nll_target", nll_target, nll_target.shape, weight.shape[0], ignore_index, hidden, "hidden")
    if not nll_w:
        return None
    return linear_cross_entropy(hidden[:n], weight, nll_target[:n], bias=bias, ignore_index=ignore_index,
                                softcap=softcap, temperature=temperature, shift=shift, chunk_size=chunk_size,
                                sync_free=sync_free, memory=memory, backend=backend)


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
    loss_type: str | list[str] = "sigmoid",
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
    memory: str = "default",
    backend: str = "auto",
    loss_weights: list[float] | None = None,
    f_divergence_type: str = "reverse_kl",
    f_alpha_divergence_coef: float = 0.5,
    discopop_tau: float = 0.05,
    ld_alpha: float | None = None,
    use_weighting: bool = False,
    alpha: float = 0.0,
    nll_target: torch.Tensor | None = None,
) -> PreferenceLossOutput:
    """A paired preference loss straight from the policy's final hidden states and output head, never
    building the logits (see the module docstring for the chunk loop: 3 GEMMs for forward + backward).

    Args:
        hidden: ``[2B, T, D]``, the chosen batch then the rejected batch (TRL's concatenated forward: pair i is
            rows i and B + i). ``labels``: ``[2B, T]``, ``ignore_index`` on prompt and padding tokens.
        weight, bias: the policy's head ``[V, D]`` (and ``[V]``); gradients flow to hidden, weight and bias.
        ref_chosen_logps, ref_rejected_logps: ``[B]`` reference log-probs, precomputed (in the loss's units:
            summed, LD-weighted under ``ld_alpha``, averaged only with ``average_logps``); constants. Or instead:
        ref_hidden, ref_weight, ref_bias: the reference model's hidden states ``[2B, T, D_ref]`` and head
            (``ref_weight`` defaults to ``weight``, detached); scored under no_grad inside the same chunk loop.
        loss_type: a DPO-family type of TRL 1.16 (``sigmoid``, ``hinge``, ``ipo``, ``exo_pair``, ``nca_pair``,
            ``robust``, ``bco_pair``, ``sppo_hard``, ``aot``, ``aot_unpaired``, ``apo_zero``, ``apo_down``,
            ``discopop``, ``sigmoid_norm``, ``sft``) or ptkernels' ``cdpo``, formulas in ``ptkernels.dpo_loss``;
            or a list of them with ``loss_weights`` (TRL's MPO); or ``simpo`` (``simpo_loss``; ``simpo_gamma``
            is TRL's gamma), ``orpo`` (``orpo_loss``) or ``cpo`` (CPO's sigmoid with cDPO smoothing,
            ``cpo_loss``). ``reference_free=True`` runs a DPO-family loss with the reference log-probs at 0.
        beta, label_smoothing, bco_delta, loss_weights, f_divergence_type, f_alpha_divergence_coef,
            discopop_tau: as in ``dpo_loss`` (TRL 1.16's names and rules). ``ipo`` and ``sigmoid_norm`` divide by
            the completion lengths: with ``shift=True`` the non-ignored labels before the shift (TRL 1.16's
            unshifted ``completion_mask.sum()``, so an empty prompt counts the unscored first token as TRL does);
            with pre-shifted labels the scored-token counts (equal to TRL's unless the prompt is empty).
        ld_alpha: LD-DPO (TRL's ``ld_alpha``): each sequence log-prob (policy and computed reference) is
            ``sum(first min(len_c, len_r) scored tokens) + ld_alpha * sum(the rest)``; rewards and logps too.
        use_weighting: WPO (TRL's ``use_weighting``): every pair's loss times ``w_c * w_r``, ``w = exp(mean over
            scored tokens of (logp - log sum_v p_v^2))``, detached (one extra logsumexp pass over each chunk).
        alpha: AlphaPO's reward shape for ``simpo`` / ``cpo`` (TRL ``CPOConfig.alpha``).
        nll_weight: adds ``nll_weight * NLL``, the token-pooled cross-entropy of the chosen rows: CPO's
            ``cpo_alpha``, ORPO's SFT term, Liger's ``compute_nll_loss``/``alpha``. Default: 1 for ``orpo`` and
            ``cpo``, else 0. (TRL 1.16's RPO is ``loss_type=["sigmoid", "sft"]``.)
        nll_target: Liger 0.8.5's ``nll_target``: ``[2B, T]`` (or ``[B, T]``) labels the NLL term is taken over
            instead of ``labels`` (its chosen half; divisor = its non-ignored count). TRL 1.16's ORPO takes the
            NLL over prompt + completion: pass the input ids with only padding set to ``ignore_index``. Costs one
            fused cross-entropy over the chosen rows besides the loop.
        average_logps: length-average the sequence log-probs (sum / valid tokens). Default as TRL: on for
            ``simpo`` and ``orpo``, off otherwise (``ipo`` divides inside the loss).
        shift: Hugging Face's causal shift of the labels (position t scored against labels[t + 1]).
        temperature, softcap: the logit transform ``s = softcap * tanh(z / softcap) / temperature`` (both models).
        chunk_size: rows of logits per chunk, a hard limit (a pair larger than it is split over blocks and takes
            the 4-GEMM path). Default: ``ops.core.chunking.default_chunk_size``, grown up to 8x that (4x on CPU) so
            the largest pair fits whole (chunks always hold whole pairs when they can).
        sync_free: as in ``linear_cross_entropy``. backend: "auto", "reference", "torch", "triton", "native".
        memory: "default" or "compact" (as in ``linear_cross_entropy``). The default loop adds each chunk's
            ``dz.T @ h`` into an fp32 ``[V, D]`` accumulator beside the gradient (for bf16 weights 2x the size of
            dW). "compact" never allocates it: the loop forms the loss and d hidden and keeps each scored token's
            log-sum-exp and d loss / d logp (O(tokens)); backward then forms dW (and db) one block of the
            vocabulary at a time, each block summed in fp32 over all scored tokens and written once in the
            weight's dtype (ops/core/vocab_blocks.py). Same numerics rule; the cost is one more GEMM over the
            logits (4 instead of 3; 5 on the paths that take 4). The NLL over ``nll_target`` runs
            ``linear_cross_entropy`` with the same ``memory``; the reference backend ignores it.

    ``aot`` / ``aot_unpaired`` (a sort over the batch) and ``sft`` under ``use_weighting`` couple the pairs: a
    forward-only pass scores every sequence first (4 GEMMs). Every other type costs what ``sigmoid`` costs.

    Returns ``PreferenceLossOutput``: ``loss`` (differentiable scalar), and detached ``losses`` [B],
    ``chosen_rewards``/``rejected_rewards`` [B] (``beta * (pi - ref)`` of the summed log-probs for every DPO type,
    as TRL 1.16 logs them), ``reward_accuracy``, ``reward_margin``, the policy's ``chosen_logps``/
    ``rejected_logps`` [B] as the loss saw them, ``nll_loss`` (with an NLL term or sft), and the ORPO metrics.
    fp32 (fp64 for fp64 input).
    """
    check_sequences(hidden, weight, bias, labels, ignore_index)
    types, kind, spec, loss_type = _resolve_loss_type(
        loss_type, beta=beta, label_smoothing=label_smoothing, loss_weights=loss_weights,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        discopop_tau=discopop_tau, bco_delta=bco_delta, use_weighting=use_weighting, ld_alpha=ld_alpha, alpha=alpha)
    o = row_options(ignore_index, temperature, softcap, chunk_size, memory)
    ref_given = _check_pairs(kind == "dpo" and not reference_free, reference_free, loss_type, ref_chosen_logps,
                             ref_rejected_logps, ref_hidden, hidden)
    if ref_hidden is not None:
        ref_hidden, ref_weight, ref_bias = check_ref_head(hidden, weight, bias, ref_hidden, ref_weight, ref_bias)
    average = (kind in _AVERAGED_BY_DEFAULT) if average_logps is None else bool(average_logps)
    nll_w = (1.0 if loss_type in _NLL_BY_DEFAULT else 0.0) if nll_weight is None else float(nll_weight)
    ext_nll = _external_nll(nll_target, nll_w, hidden, weight, bias, labels, ignore_index, softcap, temperature,
                            shift, chunk_size, sync_free, backend, memory)
    seq_lengths = (labels != ignore_index).sum(dim=1) if shift else None  # TRL's unshifted completion_mask.sum()
    if shift:
        labels = reference.shift_labels(labels, ignore_index)
    loop_nll_w = 0.0 if ext_nll is not None or nll_target is not None else nll_w
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        out = reference_preference.linear_preference_loss(
            hidden, weight, labels, bias=bias, ref_chosen_logps=ref_chosen_logps,
            ref_rejected_logps=ref_rejected_logps, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
            loss_type=list(types) if kind == "dpo" else loss_type, beta=beta, label_smoothing=label_smoothing,
            simpo_gamma=simpo_gamma, bco_delta=bco_delta, reference_free=reference_free, nll_weight=loop_nll_w,
            average_logps=average, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
            loss_weights=loss_weights, f_divergence_type=f_divergence_type,
            f_alpha_divergence_coef=f_alpha_divergence_coef, discopop_tau=discopop_tau, ld_alpha=ld_alpha,
            use_weighting=use_weighting, alpha=alpha, seq_lengths=seq_lengths)
        return _with_external_nll(out, ext_nll, nll_w)
    cfg = FusedConfig(kind=kind, paired=True, beta=float(beta), spec=spec, label_smoothing=float(label_smoothing),
                      gamma=float(simpo_gamma), alpha=float(alpha), average=average, nll_weight=loop_nll_w,
                      ld_alpha=None if ld_alpha is None else float(ld_alpha), use_weighting=bool(use_weighting),
                      input_dtype=hidden.dtype, o=o,
                      chunk=chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype),
                      sync_free=want_sync_free(sync_free, hidden.device), grow_to=grow_to(chunk_size, weight, hidden),
                      block_rows=get_block_rows(name) if memory == "compact" else None)
    heads = for_autograd(hidden.reshape(-1, hidden.shape[-1]), weight, bias, None if ref_hidden is None else
                         ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias)
    loss, losses, pc, pr, cw, rw, log_odds, ratio, nll = FusedLinearPreferenceFunction.apply(
        *heads[:3], labels, *heads[3:], ref_given, None, None, cfg, get_rows(name), seq_lengths)
    extras = {"log_odds": log_odds, "ratio": ratio} if log_odds is not None else None
    out = make_output(losses, cw, rw, pc, pr, nll_loss=nll, nll_weight=nll_w, extras=extras, loss=loss)
    return _with_external_nll(out, ext_nll, nll_w)


def _with_external_nll(out: PreferenceLossOutput, nll, weight: float) -> PreferenceLossOutput:
    """Adds the NLL over ``nll_target`` (computed by the fused cross-entropy) to the loop's loss."""
    if nll is None:
        return out
    return replace(out, loss=out.loss + weight * nll, nll_loss=nll.detach())
