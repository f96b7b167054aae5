"""Fused linear GRPO: the GRPO loss from hidden states and the output head, never building the [B*T, V] logits.

Why the gradient is ready after the forward pass: every input of the per-token loss derivative d loss / d logp_t
is known before the loop (advantages, old and reference log-probs, the mask and so the loss type's normalizer)
except logp itself, and logp_t needs only its own row of logits. GSPO's sequence-level ratio (and GMPO, VESPO's
phi, the off-policy mask, sequence-level sampler correction) needs the log-probs of one whole sequence, so then a
chunk holds whole sequences. The loop:

    z    = h_c @ W.T (+ b)                         GEMM 1, one chunk of logits [c, V]
    logp, lse (, E_p[s])  = logprob_fwd(z)         row kernels (ptkernels/ops/backends/torch.py), c values each
    l, dl/dlogp = GRPO surrogate on the chunk      ptkernels/kernels/grpo.py (or PyTorch ops)
    dz   = logprob_bwd(z, dl/dlogp, dl/dH)         written in place of z
    dh_c = dz @ W;  dW += dz.T @ h_c               GEMMs 2 and 3
so three GEMMs in all, as eager PyTorch, and one chunk of logits in memory. Backward only scales the
precomputed gradients by the incoming scalar. ``memory="compact"`` drops GEMM 3 and its fp32 ``[V, D]``
accumulator from the loop, which keeps each token's lse and d loss / d logp (and d loss / d H) instead; backward
forms dW and db from them one vocabulary block at a time (ops/core/vocab_blocks.py: GEMM 1 again and GEMM 3).
Masked tokens (prompt padding, completion padding) are skipped before any GEMM.

Chunks. Token level: ``chunk_size`` completion tokens at a time, across sequence boundaries. Sequence level:
consecutive whole sequences whose completion tokens fit in ``chunk_size`` (at least one sequence per chunk).
Finding the completion tokens is the one host-device synchronization of a call; ``sync_free=True`` walks all
B*T rows in fixed chunks instead (masked rows get zero gradients on the device; their GEMM rows still run).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..reference import rl as ref_rl
from ..types import COV_LOSS_TYPES, GRPOOutput, compute_dtype
from . import backends
from .backends import get_block_rows, get_rows
from .backends.base import GRPOParams, RowOptions
from .core import gemm, vocab_blocks
from .core.checks import check_head, check_labels, check_options
from .core.chunking import ChunkLogits, RowPlan, apply_head_grads, default_chunk_size, take, want_sync_free
from .core.dispatch import resolve_backend
from .core.grad_mode import for_autograd
from .grpo_checks import check_advantages, check_loss_options, check_mask, check_token_floats, loss_options
from .grpo_cov import add_kl_cov, cov_selection, policy_token_weight, selected_fraction
from .grpo_terms import finish_metrics, make_output, row_normalizers, top_entropy_mask
from .grpo_weights import WeightOptions, finish_is_metrics, is_partials, policy_weights
from .token_logprobs import linear_token_logprobs

IGNORE = -100


def _sequence_chunks(valid2d: torch.Tensor, chunk: int, sync_free: bool):
    """(b0, b1, rows) for chunks of whole sequences b0..b1-1; rows is a slice of all their B*T rows
    (sync-free) or the index tensor of their completion tokens."""
    b, t = valid2d.shape
    if sync_free:
        per = max(1, chunk // max(t, 1))
        return [(b0, min(b0 + per, b), slice(b0 * t, min(b0 + per, b) * t)) for b0 in range(0, b, per)]
    valid_cpu = valid2d.cpu()  # the one synchronization of the call
    counts = valid_cpu.sum(1).tolist()
    index = valid_cpu.reshape(-1).nonzero().squeeze(1).to(valid2d.device, non_blocking=True)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    chunks, b0 = [], 0
    while b0 < b:
        b1 = b0 + 1
        while b1 < b and offsets[b1 + 1] - offsets[b0] <= chunk:
            b1 += 1
        chunks.append((b0, b1, index[offsets[b0]:offsets[b1]]))
        b0 = b1
    return chunks


def _row_ids(rows, device) -> torch.Tensor:
    if isinstance(rows, slice):
        return torch.arange(rows.start, rows.stop, device=device)
    return rows


@dataclass
class _TokenInputs:
    """The per-token constants of the loss, flat ``[B*T]`` in the compute dtype (None when not given), and the
    per-sequence ``adv``, ``norm`` ``[B]``: what each chunk's loss takes its slice of. ``emask`` is the
    top-entropy mask (the entropy bonus's tokens), ``tokw`` the policy term's 0/1 token weight (``emask`` times
    Clip-Cov's ``1 - sel``), ``sel`` KL-Cov's selected tokens (with ``kl_cov_coef``)."""

    t: int
    mask: torch.Tensor
    old: torch.Tensor | None
    ref: torch.Tensor | None
    sampler: torch.Tensor | None
    emask: torch.Tensor | None
    adv: torch.Tensor
    norm: torch.Tensor
    tokw: torch.Tensor | None = None
    sel: torch.Tensor | None = None
    kl_cov_coef: float = 0.0


def _sequence_chunk_loss(x: _TokenInputs, lp, rows, b0, b1, p, wo, acc, grpo_rows, any_grad):
    """The loss rows of a chunk of whole sequences b0..b1-1 (its log-probs ``lp`` at ``rows``): (GRPORows,
    d loss / d logp at ``rows`` or None)."""
    t, dev = x.t, lp.device
    nb, span = b1 - b0, slice(b0 * t, b1 * t)
    if isinstance(rows, slice):
        lp2, loc = lp.view(nb, t), None
    else:
        loc = rows - b0 * t
        lp2 = torch.zeros(nb * t, dtype=lp.dtype, device=dev).index_copy_(0, loc, lp).view(nb, t)
    old2 = x.old[span].view(nb, t) if x.old is not None else lp2
    ref2 = x.ref[span].view(nb, t) if x.ref is not None else None
    m2 = x.mask[span].view(nb, t)
    pw = None
    if wo.any or x.tokw is not None:
        pw = policy_weights(lp2, old2, x.adv[b0:b1, None], m2, wo,
                            sampler=x.sampler[span].view(nb, t) if x.sampler is not None else None,
                            emask=x.tokw[span].view(nb, t) if x.tokw is not None else None, acc=acc)
    out = grpo_rows(lp2, old2, ref2, m2, x.adv[b0:b1, None], x.norm[b0:b1, None], p, any_grad, pw=pw)
    if x.sel is not None:  # KL-Cov, when a sequence-wide weight (OPSM, sequence IS) chunks whole sequences
        out = add_kl_cov(out, lp2, old2, m2, x.norm[b0:b1, None], pw, x.sel[span].view(nb, t), x.kl_cov_coef,
                         any_grad)
    if not any_grad:
        return out, None
    return out, out.grad.reshape(-1) if loc is None else out.grad.reshape(-1).index_select(0, loc)


def _token_chunk_loss(x: _TokenInputs, lp, rows, p, wo, acc, grpo_rows, any_grad):
    """The loss of a flat run of tokens (one row): (GRPORows, d loss / d logp or None)."""
    seq = _row_ids(rows, lp.device) // x.t
    m = take(x.mask, rows)
    old_r = take(x.old, rows) if x.old is not None else lp
    ref_r = take(x.ref, rows)[None] if x.ref is not None else None
    pw = None
    if wo.any or x.tokw is not None:  # token-local weights only here (sequence-wide ones chunk whole sequences)
        pw = policy_weights(lp[None], old_r[None], x.adv[seq][None], m[None], wo,
                            sampler=take(x.sampler, rows)[None] if x.sampler is not None else None,
                            emask=take(x.tokw, rows)[None] if x.tokw is not None else None, acc=acc)
    norm = x.norm[seq][None]
    out = grpo_rows(lp[None], old_r[None], ref_r, m[None], x.adv[seq][None], norm, p, any_grad, pw=pw)
    if x.sel is not None:  # KL-Cov (token level only)
        out = add_kl_cov(out, lp[None], old_r[None], m[None], norm, pw, take(x.sel, rows)[None], x.kl_cov_coef,
                         any_grad)
    return out, out.grad[0] if any_grad else None


class FusedLinearGRPOFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, x: _TokenInputs, p: GRPOParams, o: RowOptions, chunk: int,
                rows_impl, grpo_rows, sync_free: bool, entropy_coef: float, want_entropy: bool, wo: WeightOptions,
                block_rows=None):
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        any_grad = need_dh or need_dw or need_db
        cd = compute_dtype(hidden2d.dtype)
        dev = hidden2d.device
        n = hidden2d.shape[0]
        b = n // x.t if x.t else 0
        # memory="compact" (block_rows set): dW and db in backward, one vocabulary block at a time, from each
        # token's lse and d loss / d logp (and d loss / d H, E_p[s] with an entropy bonus) kept here
        weight_pass = block_rows is not None and (need_dw or need_db)
        gh = torch.zeros_like(hidden2d) if need_dh else None
        gw = gemm.weight_grad_buffer(weight, hidden2d, cd) if need_dw and block_rows is None else None
        gb = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db and block_rows is None else None
        keep = vocab_blocks.TokenRows(n, cd, dev, want_entropy and entropy_coef != 0.0) if weight_pass else None
        sums = torch.zeros(6, dtype=cd, device=dev)  # loss, kl, low, high, region, sum m * entropy
        acc = is_partials(cd, dev) if wo.is_mode is not None else None
        # the entropy bonus is a token mean over its tokens (TRL 1.16), whatever the loss type's normalizer
        eff1d = x.mask if x.emask is None else x.mask * x.emask
        ent_den = eff1d.sum().clamp(min=1.0)
        if p.seq_level or wo.sequence_wide:
            chunks = _sequence_chunks(x.mask.view(b, x.t) != 0, chunk, sync_free)
        else:
            chunks = [(None, None, rows) for rows in RowPlan(targets1d, IGNORE, chunk, sync_free).chunks()]

        logits = ChunkLogits(n, chunk, hidden2d, weight)  # a chunk of whole sequences may exceed it: then fresh
        for b0, b1, rows in chunks:
            h = take(hidden2d, rows)
            z = logits(h, weight, bias)
            tg = take(targets1d, rows)
            lp, lse, mean_s = rows_impl.logprob_fwd(z, tg, o, want_entropy)
            if b0 is not None:
                out, g_logp = _sequence_chunk_loss(x, lp, rows, b0, b1, p, wo, acc, grpo_rows, any_grad)
            else:
                out, g_logp = _token_chunk_loss(x, lp, rows, p, wo, acc, grpo_rows, any_grad)
            sums[:5] += torch.stack([out.loss.sum(), out.kl.sum(), out.low.sum(), out.high.sum(),
                                     out.region.sum()])
            g_ent = None
            if want_entropy:
                ent = lse - mean_s  # 0 at ignored rows
                sums[5] += (take(x.mask, rows) * ent).sum()
                if entropy_coef != 0.0:
                    w_ent = take(eff1d, rows) / ent_den
                    sums[0] -= entropy_coef * (w_ent * ent).sum()
                    g_ent = -entropy_coef * w_ent
            if keep is not None:
                keep.put(rows, lse, g_logp, g_ent, mean_s)
            if gh is not None or gw is not None or gb is not None:
                rows_impl.logprob_bwd(z, tg, lse, mean_s if g_ent is not None else None, g_logp, g_ent, o,
                                      grad_out=z)
                apply_head_grads(z, h, weight, rows, 1.0, gh, gw, gb)
            del z

        n_tokens = x.mask.sum()
        kl, region, low, high = finish_metrics(sums[1], sums[2], sums[3], sums[4], n_tokens, b, p.seq_level)
        ctx.grads = (gh, gw, gb) if any_grad else None
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        ctx.keep = None if keep is None else (keep, keep.plan(chunk), block_rows, o, need_dw, need_db)
        if keep is not None:
            ctx.save_for_backward(hidden2d, weight, bias, targets1d)
        metrics = (kl, region, low, high, sums[5] / n_tokens.clamp(min=1.0))
        if acc is not None:
            metrics = metrics + finish_is_metrics(acc)
        ctx.mark_non_differentiable(*metrics)
        return (sums[0].clone(), *metrics)

    @staticmethod
    def backward(ctx, g_loss, *unused):
        if ctx.grads is None or g_loss is None:
            return (None,) * 15
        gh, gw, gb = ctx.grads
        keep, ctx.grads, ctx.keep = ctx.keep, None, None
        h_dtype, w_dtype = ctx.dtypes
        gh = gh.mul_(g_loss.to(gh.dtype)).to(h_dtype) if gh is not None else None
        if keep is not None:  # compact memory: the vocabulary-block weight pass, g_loss in its coefficients
            rows, plan, block_rows, o, need_dw, need_db = keep
            hidden2d, weight, bias, targets1d = ctx.saved_tensors
            coef, has_b = rows.coefficients(g_loss)
            gw, gb = vocab_blocks.weight_grads(hidden2d, weight, bias, targets1d, rows.lse, coef, has_b, plan,
                                               block_rows, o, need_dw, need_db)
            return (gh, gw, gb.to(w_dtype) if gb is not None else None) + (None,) * 12
        gw = gemm.weight_grad_result(gw.mul_(g_loss.to(gw.dtype)), w_dtype) if gw is not None else None
        gb = gb.mul_(g_loss.to(gb.dtype)).to(w_dtype) if gb is not None else None
        return (gh, gw, gb) + (None,) * 12


def _completion_targets(hidden, weight, bias, completion_ids, completion_mask):
    """Checks the head and the completions; the ``[B, T]`` targets (``IGNORE`` where the mask is 0)."""
    check_head(hidden, weight, bias)
    if hidden.dim() != 3:
        raise ValueError(f"hidden must be 3-D [B, T, D], got shape {tuple(hidden.shape)}")
    b, t, _ = hidden.shape
    check_mask("completion_mask", completion_mask, (b, t), hidden, "hidden")
    valid = completion_mask != 0
    if not isinstance(completion_ids, torch.Tensor):
        raise TypeError(f"completion_ids must be a torch.Tensor, got {type(completion_ids).__name__}")
    if tuple(completion_ids.shape) != (b, t):
        raise ValueError(f"completion_ids has shape {tuple(completion_ids.shape)} but hidden implies {(b, t)}")
    # Only completion tokens are scored: ids under mask 0 (padding) may be anything.
    targets = torch.where(valid.to(completion_ids.device), completion_ids,
                          torch.full((), IGNORE, dtype=completion_ids.dtype, device=completion_ids.device))
    check_labels("completion_ids", targets, (b, t), weight.shape[0], IGNORE, hidden, "hidden")
    return targets


def _batch_masks(hidden, weight, bias, targets, m, old, adv, options: dict, chunk_size, sync_free, name):
    """The per-token masks that need every token's current log-prob or entropy before the loss, from one no-grad
    forward pass of ``linear_token_logprobs`` (one more logits GEMM and log-prob row pass): the top-entropy mask
    (``top_entropy_quantile`` < 1, a global quantile) and Clip-Cov / KL-Cov's selection (a global covariance).
    Returns ``(emask, sel)``, flat ``[B*T]`` or None when no option needs them."""
    q = options["top_entropy_quantile"]
    if q >= 1.0 and options["loss_type"] not in COV_LOSS_TYPES:
        return None, None
    with torch.no_grad():
        res = linear_token_logprobs(hidden.detach(), weight.detach(), targets, bias=bias, ignore_index=IGNORE,
                                    temperature=options["temperature"], return_entropy=q < 1.0,
                                    chunk_size=chunk_size, sync_free=sync_free, backend=name)
        lp, ent = res if q < 1.0 else (res, None)
        lp = lp.to(m.dtype)
        sel = cov_selection(options, lp, lp if old is None else old.view(m.shape), adv, m)
    emask = top_entropy_mask(ent, m, q).reshape(-1) if q < 1.0 else None
    return emask, None if sel is None else sel.reshape(-1)


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    advantages: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    old_logps: torch.Tensor | None = None,
    ref_logps: torch.Tensor | None = None,
    beta: float = 0.0,
    epsilon_low: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    loss_type: str = "dapo",
    importance_sampling_level: str = "token",
    temperature: float = 1.0,
    entropy_coef: float = 0.0,
    max_completion_length: int | None = None,
    num_items_in_batch=None,
    return_entropy: bool = False,
    bias_corrected_kl: bool = True,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    sampler_logps: torch.Tensor | None = None,
    vllm_importance_sampling_mode: str = "sequence_mask",
    vllm_importance_sampling_clip_min: float | None = None,
    vllm_importance_sampling_clip_max: float | None = 3.0,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    kl_cov_coef: float = 0.1,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    memory: str = "default",
    backend: str = "auto",
) -> GRPOOutput:
    """GRPO-family loss of a policy head on completions, from hidden states, without the ``[B*T, V]`` logits.

    Alignment: ``hidden[b, t]`` is the final hidden state at the position that predicts ``completion_ids[b, t]``,
    i.e. for a causal LM run on ``prompt + completion`` (length P + T) it is ``last_hidden_state[:, P-1 : P+T-1]``
    (TRL's ``last_hidden_state[:, :-1][:, -logits_to_keep:]``). Per token,
    ``logp[b, t] = log_softmax((hidden[b, t] @ weight.T + bias) / temperature)[completion_ids[b, t]]``,
    ``H[b, t]`` the entropy of the same tempered distribution, and the loss is
    ``grpo_loss(logp, old_logps, advantages, completion_mask, entropies=H, ...)``: every loss type and option of
    ``ptkernels.grpo_loss`` (TRL 1.16.0's ``GRPOTrainer._compute_loss``), including the entropy bonus
    ``loss -= entropy_coef * sum(H m e) / max(sum(m e), 1)`` (TRL 1.16: a token mean for every loss type but gmpo,
    which refuses it, e the top-entropy mask or 1). ``old_logps=None`` uses the detached current log-probs (TRL with
    num_iterations=1: ratio 1). ``ref_logps`` is required when ``beta != 0``.

    Cost: three GEMMs (logits, d hidden, d weight) for every loss type and option, except
    ``top_entropy_quantile < 1``, whose global entropy quantile needs the entropies before the loss, and
    ``loss_type="clip_cov"`` / ``"kl_cov"`` (verl's Clip-Cov / KL-Cov, see ``grpo_loss``), whose token selection
    needs every token's current log-prob (a batch-wide covariance, then a random subset or a top-k): one more
    forward GEMM and log-prob row pass (a no-grad pass of ``linear_token_logprobs``, shared when both are on),
    from which the selection is made exactly as verl makes it from the detached log-probs; the chunk loop then
    applies it (Clip-Cov's cut as a policy weight, KL-Cov's ``kl_cov_coef * |logp - old|`` on the selected
    tokens). ``generator`` drives Clip-Cov's random choice (``torch.randperm``; None: the global CPU RNG).
    Sequence-level ratios, GMPO, VESPO, the off-policy mask and sequence-level sampler correction chunk whole
    sequences.

    Args:
        hidden ``[B, T, D]``, weight ``[V, D]``, bias ``[V]`` (optional): the policy's last hidden states and head.
        completion_ids ``[B, T]`` ints in [0, V) where the mask is set; completion_mask ``[B, T]`` bool/int/float.
        advantages ``[B]``; old_logps, ref_logps, sampler_logps ``[B, T]`` (constants: no gradient flows into them).
        return_entropy: compute the mean entropy (``output.entropy``) even without an entropy bonus.
        chunk_size: completion tokens per chunk (default: ``ops.core.chunking.default_chunk_size(V)``, at least T);
            a chunk of whole sequences still holds at least one sequence.
        sync_free, backend: as ``linear_cross_entropy``.
        memory: "default" or "compact" (as ``linear_cross_entropy``). The default loop adds each chunk's
            ``dz.T @ h`` into an fp32 ``[V, D]`` accumulator beside the gradient (for bf16 weights 2x the size of
            dW). "compact" never allocates it: the loop forms the loss and d hidden and keeps each completion
            token's lse and d loss / d logp (with an entropy bonus also d loss / d H and E_p[s]: O(tokens));
            backward forms dW (and db) one block of the vocabulary at a time, each block summed in fp32 over all
            tokens and written once in the weight's dtype (ops/core/vocab_blocks.py). Same numerics rule; one
            more GEMM over the logits (4 instead of 3). The reference backend ignores it.

    Returns ``GRPOOutput`` (``loss`` differentiable w.r.t. hidden, weight and bias; metrics detached;
    ``entropy`` set when computed; the mismatch metrics with ``sampler_logps``). fp32 (fp64 for fp64 input).
    """
    options = loss_options(locals())  # the loss's keyword options by name, as the reference takes them
    targets = _completion_targets(hidden, weight, bias, completion_ids, completion_mask)
    b, t, _ = hidden.shape
    check_advantages(advantages, b, hidden, "hidden")
    check_token_floats((b, t), hidden, "hidden", old_logps=old_logps, ref_logps=ref_logps, sampler_logps=sampler_logps)
    check_options(temperature=temperature, chunk_size=chunk_size, memory=memory)
    p, wo = check_loss_options(options, ref_logps=ref_logps, sampler_logps=sampler_logps)
    want_entropy = bool(return_entropy) or entropy_coef != 0.0
    name = resolve_backend(backend, hidden.device)
    if name == "reference":
        return ref_rl.linear_grpo_loss(
            hidden, weight, completion_ids.masked_fill(completion_mask == 0, 0), completion_mask, advantages,
            bias=bias, old_logps=old_logps, ref_logps=ref_logps, sampler_logps=sampler_logps, temperature=temperature,
            return_entropy=return_entropy, **options)
    cd = compute_dtype(hidden.dtype)
    mask1d = completion_mask.detach().to(cd).reshape(-1)
    flat = (lambda x_: x_.detach().to(cd).reshape(-1) if x_ is not None else None)  # noqa: E731
    x = _TokenInputs(t, mask1d, flat(old_logps), flat(ref_logps), flat(sampler_logps), None,
                     advantages.detach().to(cd),
                     row_normalizers(mask1d.view(b, t), loss_type, max_completion_length, num_items_in_batch))
    x.emask, sel = _batch_masks(hidden, weight, bias, targets, mask1d.view(b, t), x.old, x.adv,
                                dict(options, temperature=temperature), chunk_size, sync_free, name)
    x.tokw = policy_token_weight(x.emask, sel, loss_type)
    x.sel, x.kl_cov_coef = (sel, float(kl_cov_coef)) if loss_type == "kl_cov" else (None, 0.0)
    # Default: the shared chunk size, but at least one whole sequence (the sequence level needs it; at the
    # token level, GEMMs on more rows per chunk ran faster on CPU in the GRPO benchmark).
    chunk = chunk_size or max(default_chunk_size(weight.shape[0], hidden.device, hidden.dtype), t)
    outs = FusedLinearGRPOFunction.apply(
        *for_autograd(hidden.reshape(b * t, -1), weight, bias), targets.reshape(-1), x, p,
        RowOptions(ignore_index=IGNORE, temperature=float(temperature)), chunk, get_rows(name),
        backends.get(name, "grpo_rows"), want_sync_free(sync_free, hidden.device), float(entropy_coef), want_entropy,
        wo, get_block_rows(name) if memory == "compact" else None)
    loss, kl, region, low, high, entropy = outs[:6]
    return make_output(loss, kl, region, low, high, entropy if want_entropy else None,
                       outs[6:] if wo.is_mode is not None else None, selected_fraction(sel, mask1d))
