"""Per-token log-probabilities (and entropies) of targets: the primitive under DPO, PPO and GRPO.

``linear_token_logprobs`` works from hidden states and the head without the [N, V] logits: forward keeps
only per-token log p, lse and E_p[s] (O(N)); backward recomputes each chunk of logits (4 GEMMs in all).
Ignored targets give log p = 0 and entropy = 0, and receive no gradient.

Where the valid rows' logits are small, forward keeps each chunk's logits when a gradient is wanted and backward
uses them instead of GEMM 1 again: 3 GEMMs, as eager, for at most half of eager's memory (eager keeps the logits
and their log-softmax). Small means at most ``KEEP_LOGITS_BYTES`` (64 MiB: e.g. 16k tokens of an 872-word vocabulary
in fp32, 4k of 8k) or, where the head's weight gradient is wanted, at most that gradient's fp32 buffer (V x D x 4
bytes, which backward allocates anyway): the valid rows number at most D (fp32 logits) or 2 D (bf16). On the H200
at N_valid = 6144, D = 4096, V = 128256 in bf16 that took the op from 0.88x to 0.68x eager's time (CE's own
cost) for 1.5 GiB more than the 3.0 GiB peak. The same numbers either way: the kept logits are the ones backward
would recompute.

Small shapes (``chunking.one_chunk``: every row fits one chunk, GEMMs below ``ONE_CHUNK_MAX_MACS``) run straight
through over all rows (masked ones get 0 from the row kernels): no ``nonzero``, gather or scatter, and forward
keeps that one chunk of logits when a gradient is wanted, so backward runs GEMMs 2 and 3 only (3 GEMMs in all,
as eager; the chunk is at most the chunked path's own, ``default_chunk_size``). On CPU with the native rows in
plain eager code, shapes up to ``small_head.SMALL_PATH_MAX_MACS`` (2^29, every row in one chunk) take
``small_head.SmallLinearTokenLogprobs``: the valid rows only, with no machinery between the GEMMs.
"""

from __future__ import annotations

import torch

from .. import reference
from ..types import compute_dtype
from .backends import get_block_rows, get_rows
from .backends.base import RowOptions
from .core import gemm, vocab_blocks
from .core.checks import check_float, check_head, check_labels, check_options
from .core.chunking import (
    ChunkLogits,
    RowPlan,
    default_chunk_size,
    one_chunk,
    put,
    take,
    want_sync_free,
)
from .core.dispatch import kernel_counts_bad_labels, resolve_backend
from .core.grad_mode import for_autograd
from .small_head import SmallLinearTokenLogprobs, takes_small_path


def _zeros_like_rows(g, n, cd, device):
    return g if g is not None else torch.zeros(n, dtype=cd, device=device)


def _head_grads_one_chunk(g, hidden2d, weight, need_dh, need_dw, need_db):
    """GEMMs 2 and 3 (and the bias sum) of the fast path, each written once: (dh, dW, db) in the parameters'
    dtypes."""
    cd = compute_dtype(hidden2d.dtype)
    if g.dtype != weight.dtype:
        g = g.to(weight.dtype)
    gh = gemm.input_grad(g, weight) if need_dh else None
    gw = gemm.weight_grad_result(gemm.weight_grad(g, hidden2d, cd), weight.dtype) if need_dw else None
    gb = g.sum(dim=0, dtype=cd).to(weight.dtype) if need_db else None
    return gh, gw, gb


KEEP_LOGITS_BYTES = 64 << 20  # the chunked path keeps the valid rows' logits for backward up to this size


def _keeps_logits(n_rows: int, weight: torch.Tensor, like: torch.Tensor, wants_weight_grad: bool) -> bool:
    """Whether forward keeps the ``n_rows`` valid rows' logits for backward (module docstring)."""
    budget = max(KEEP_LOGITS_BYTES, weight.numel() * 4 if wants_weight_grad else 0)
    return n_rows * weight.shape[0] * like.element_size() <= budget


class LinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden2d, weight, bias, targets1d, o: RowOptions, chunk: int, rows_impl, sync_free: bool,
                want_entropy: bool, block_rows):
        ctx.set_materialize_grads(False)
        cd = compute_dtype(hidden2d.dtype)
        n = hidden2d.shape[0]
        ctx.args = (o, chunk, rows_impl, sync_free, block_rows)  # block_rows: None unless memory="compact"
        small = block_rows is None and one_chunk(n, chunk, weight.shape[0], hidden2d.shape[1])
        if small:  # the fast path (module docstring)
            z = gemm.logits(hidden2d, weight, bias)
            logp, lse, mean_s = rows_impl.logprob_fwd(z, targets1d, o, want_entropy)
            entropy = None
            if want_entropy:  # the rows give lse for ignored rows too (sync-free rows): 0 there
                entropy = torch.where(targets1d != o.ignore_index, lse - mean_s,
                                      torch.zeros((), dtype=cd, device=lse.device))
            ctx.one_chunk = any(ctx.needs_input_grad[:3])
            if ctx.one_chunk:
                ctx.save_for_backward(hidden2d, weight, bias, targets1d, lse, mean_s, z)
            return (logp, entropy) if want_entropy else logp
        ctx.one_chunk = False
        plan = RowPlan(targets1d, o.ignore_index, chunk, sync_free)
        logp = torch.zeros(n, dtype=cd, device=hidden2d.device)
        lse = torch.zeros(n, dtype=cd, device=hidden2d.device)
        mean_s = torch.zeros(n, dtype=cd, device=hidden2d.device) if want_entropy else None
        # kept: each chunk's logits for backward (module docstring), in fresh buffers; else one reused buffer
        kept = [] if any(ctx.needs_input_grad[:3]) and block_rows is None and _keeps_logits(
            plan.n_process, weight, hidden2d, ctx.needs_input_grad[1]) else None
        logits = ChunkLogits(plan.n_process, plan.chunk, hidden2d, weight) if kept is None else None
        for rows in plan.chunks():
            h = take(hidden2d, rows)
            z = logits(h, weight, bias) if kept is None else gemm.logits(h, weight, bias)
            if kept is not None:
                kept.append(z)
            lp, ls, ms = rows_impl.logprob_fwd(z, take(targets1d, rows), o, want_entropy)
            put(logp, rows, lp)
            put(lse, rows, ls)
            if want_entropy:
                put(mean_s, rows, ms)
            del z  # dead unless kept: freed before the next chunk's GEMM 1 (one chunk alive, not two)
        entropy = lse - mean_s if want_entropy else None
        if want_entropy:
            entropy = torch.where(plan.valid, entropy, torch.zeros((), dtype=cd, device=entropy.device))
        ctx.keeps_logits = kept is not None
        ctx.save_for_backward(hidden2d, weight, bias, targets1d, lse, mean_s, *(kept or ()))
        return (logp, entropy) if want_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        hidden2d, weight, bias, targets1d, lse, mean_s, *kept = ctx.saved_tensors
        o, chunk, rows_impl, sync_free, block_rows = ctx.args
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_db = bias is not None and ctx.needs_input_grad[2]
        if g_logp is None and g_ent is None:
            return (None,) * 10
        cd = compute_dtype(hidden2d.dtype)
        n = hidden2d.shape[0]
        g_logp = _zeros_like_rows(g_logp, n, cd, hidden2d.device)
        if ctx.one_chunk:  # the fast path: the kept logits; a fresh gradient buffer keeps them for a 2nd backward
            z = kept[0]
            g = torch.empty_like(z)
            rows_impl.logprob_bwd(z, targets1d, lse, mean_s if g_ent is not None else None, g_logp, g_ent, o,
                                  grad_out=g)
            gh, gw, gb = _head_grads_one_chunk(g, hidden2d, weight, need_dh, need_dw, need_db)
            return gh, gw, gb, None, None, None, None, None, None, None
        plan = RowPlan(targets1d, o.ignore_index, chunk, sync_free)
        loop_w = block_rows is None  # compact: dW and db afterwards, one vocabulary block at a time
        gh = torch.zeros_like(hidden2d) if need_dh else None
        gw = (gemm.weight_grad_buffer(weight, hidden2d, cd, plan.rows_per_chunk, plan.n_process)
              if need_dw and loop_w else None)
        gb = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db and loop_w else None
        if gh is not None or gw is not None or gb is not None:
            _backward_loop(hidden2d, weight, bias, targets1d, lse, mean_s, g_logp, g_ent, o, plan, rows_impl,
                           gh, gw, gb, kept if ctx.keeps_logits else None)
        if not loop_w and (need_dw or need_db):
            coef, has_b = vocab_blocks.logprob_coefficients(g_logp, g_ent, mean_s)
            gw, gb = vocab_blocks.weight_grads(hidden2d, weight, bias, targets1d, lse, coef, has_b, plan,
                                               block_rows, o, need_dw, need_db)
        return (gh, gemm.weight_grad_result(gw, weight.dtype) if gw is not None else None,
                gb.to(weight.dtype) if gb is not None else None, None, None, None, None, None, None, None)


def _backward_loop(hidden2d, weight, bias, targets1d, lse, mean_s, g_logp, g_ent, o, plan, rows_impl, gh, gw, gb,
                   kept=None):
    """The chunk loop of backward: GEMM 1 again (or the logits forward ``kept``), the rows' gradient, then dX
    (GEMM 2), dW and db (GEMM 3)."""
    cd = compute_dtype(hidden2d.dtype)
    logits = ChunkLogits(plan.n_process, plan.chunk, hidden2d, weight) if kept is None else None
    for i, rows in enumerate(plan.chunks()):
        h = take(hidden2d, rows)
        z = logits(h, weight, bias) if kept is None else kept[i]
        g = z if kept is None else torch.empty_like(z)  # kept: a fresh buffer keeps them for a 2nd backward
        rows_impl.logprob_bwd(z, take(targets1d, rows), take(lse, rows),
                              take(mean_s, rows) if g_ent is not None else None,
                              take(g_logp, rows), take(g_ent, rows) if g_ent is not None else None, o,
                              grad_out=g)
        z = g
        if gh is not None:
            put(gh, rows, gemm.input_grad(z, weight))
        if gw is not None:
            gemm.accumulate_weight_grad(gw, z, h)
        if gb is not None:
            gb += z.sum(dim=0, dtype=cd)
        del z, g  # dead: freed before the next chunk's GEMM 1 (one chunk alive, not two)


class TokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits2d, targets1d, o: RowOptions, chunk: int, rows_impl, want_entropy: bool):
        ctx.set_materialize_grads(False)
        cd = compute_dtype(logits2d.dtype)
        n = logits2d.shape[0]
        logp = torch.zeros(n, dtype=cd, device=logits2d.device)
        lse = torch.zeros_like(logp)
        mean_s = torch.zeros_like(logp) if want_entropy else None
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            lp, ls, ms = rows_impl.logprob_fwd(logits2d[rows], targets1d[rows], o, want_entropy)
            logp[rows], lse[rows] = lp, ls
            if want_entropy:
                mean_s[rows] = ms
        entropy = None
        if want_entropy:
            valid = targets1d != o.ignore_index
            entropy = torch.where(valid, lse - mean_s, torch.zeros((), dtype=cd, device=lse.device))
        ctx.save_for_backward(logits2d, targets1d, lse, mean_s)
        ctx.args = (o, chunk, rows_impl)
        return (logp, entropy) if want_entropy else logp

    @staticmethod
    def backward(ctx, g_logp, g_ent=None):
        logits2d, targets1d, lse, mean_s = ctx.saved_tensors
        o, chunk, rows_impl = ctx.args
        if g_logp is None and g_ent is None:
            return (None,) * 6
        n = logits2d.shape[0]
        g_logp = _zeros_like_rows(g_logp, n, lse.dtype, lse.device)
        grad = torch.empty_like(logits2d)
        for start in range(0, n, chunk):
            rows = slice(start, min(start + chunk, n))
            rows_impl.logprob_bwd(logits2d[rows], targets1d[rows], lse[rows],
                                  mean_s[rows] if g_ent is not None else None, g_logp[rows],
                                  g_ent[rows] if g_ent is not None else None, o, grad_out=grad[rows])
        return grad, None, None, None, None, None


def _options(ignore_index, temperature, softcap):
    check_options(softcap=softcap, temperature=temperature)
    return RowOptions(ignore_index=ignore_index, softcap=None if softcap is None else float(softcap),
                      temperature=float(temperature))


def _reshape_out(out, shape, want_entropy):
    if want_entropy:
        return out[0].view(shape), out[1].view(shape)
    return out.view(shape)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    sync_free: bool | None = None,
    memory: str = "default",
    backend: str = "auto",
):
    """log p(target) per token from hidden states ``[..., D]`` and the head ``[V, D]``, never building logits.

    ``logp[t] = s[t, target[t]] - logsumexp(s[t])`` with ``s = softcap * tanh(z / softcap) / temperature``;
    0 where ``targets == ignore_index``. With ``return_entropy=True`` also returns the entropy
    ``H[t] = -sum_v p log p`` (0 where ignored). Differentiable w.r.t. hidden, weight and bias; backward
    recomputes the logits chunk by chunk, or reuses them where they are small (module docstring). Outputs are
    fp32 (fp64 for fp64 input), shaped like ``targets``.

    ``memory="compact"`` forms the weight gradient without the fp32 ``[V, D]`` accumulator of the default
    backward: one block of the vocabulary at a time from each row's saved log-sum-exp, summed in fp32 over all
    rows and written once in the weight's dtype (ops/core/vocab_blocks.py; see ``linear_cross_entropy``). Cost:
    one more GEMM over the logits in backward (5 in all instead of 4), and no small-shape fast path.
    """
    check_head(hidden, weight, bias)
    o = _options(ignore_index, temperature, softcap)
    check_options(chunk_size=chunk_size, memory=memory)
    name = resolve_backend(backend, hidden.device)
    check_labels("targets", targets, hidden.shape[:-1], weight.shape[0], ignore_index, hidden, "hidden",
                 check_range=not kernel_counts_bad_labels(name, hidden.device))
    if name == "reference":
        return reference.linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                                               temperature=temperature, softcap=softcap,
                                               return_entropy=return_entropy)
    chunk = chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype, hidden.shape[-1])
    hidden2d, weight, bias = for_autograd(hidden if hidden.dim() == 2 else hidden.reshape(-1, hidden.shape[-1]),
                                          weight, bias)
    targets1d = targets if targets.dim() == 1 else targets.reshape(-1)
    sync_free = want_sync_free(sync_free, hidden.device)
    if takes_small_path(name, hidden2d, weight, bias, targets1d, memory, sync_free, chunk):
        out = SmallLinearTokenLogprobs.apply(hidden2d, weight, bias, targets1d, o, bool(return_entropy))
    else:
        out = LinearTokenLogprobsFunction.apply(hidden2d, weight, bias, targets1d, o, chunk, get_rows(name), sync_free,
                                                bool(return_entropy),
                                                get_block_rows(name) if memory == "compact" else None)
    return _reshape_out(out, targets.shape, return_entropy)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: float | None = None,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    backend: str = "auto",
):
    """log p(target) per token from ``logits [..., V]`` (0 where ignored) [, entropy]; the same formulas as
    ``linear_token_logprobs``. Never builds a log-softmax of the whole logits; never synchronizes."""
    check_float("logits", logits)
    o = _options(ignore_index, temperature, softcap)
    check_options(chunk_size=chunk_size)
    if logits.dim() < 1:
        raise ValueError("logits must have at least one dimension [..., V]")
    check_labels("targets", targets, logits.shape[:-1], logits.shape[-1], ignore_index, logits, "logits")
    name = resolve_backend(backend, logits.device)
    if name == "reference":
        return reference.token_logprobs(logits, targets, ignore_index=ignore_index, temperature=temperature,
                                        softcap=softcap, return_entropy=return_entropy)
    v = logits.shape[-1]
    logits2d = logits.reshape(-1, v)
    if not logits2d.is_contiguous():
        logits2d = logits2d.contiguous()
    chunk = chunk_size or default_chunk_size(v, logits.device)
    (logits2d,) = for_autograd(logits2d)
    out = TokenLogprobsFunction.apply(logits2d, targets.reshape(-1), o, chunk, get_rows(name),
                                      bool(return_entropy))
    return _reshape_out(out, targets.shape, return_entropy)
