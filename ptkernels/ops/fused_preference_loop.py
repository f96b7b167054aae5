"""The chunk loop of the fused preference losses (ops/fused_preference.py): per-group losses and the gradients
of the policy's head, formed in one pass over chunks of whole groups (ops/core/groups.py).

Per chunk: the reference log-probs of its sequences (given, or scored under no_grad through the reference head),
the policy's sequence log-probs (GEMM 1 + forward row function), the per-group losses and d loss / d sequence
log-prob on ``[2k]`` values (a tiny autograd graph over ``ops.preference.pair_losses`` or the KTO losses: groups
are independent and the batch mean's 1/B is known up front), then the per-token gradient in place of the logits
and GEMMs 2 and 3. bco_pair without ``bco_delta`` couples groups through the batch-mean reward: a forward-only
pass computes every sequence log-prob first (and caches the reference ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..types import compute_dtype
from .backends.base import RowOptions
from .core import gemm
from .core.groups import GroupLayout, Head, backward_blocks, sequence_sums
from .preference_math import bco_batch_delta, kto_example_losses, pair_losses


@dataclass(frozen=True)
class FusedConfig:
    kind: str  # a pair_losses loss type, or a KTO loss type
    paired: bool
    beta: float
    label_smoothing: float = 0.0
    gamma: float = 0.0
    bco_delta: float | None = None
    average: bool = False
    nll_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    o: RowOptions = RowOptions()
    chunk: int = 1024
    sync_free: bool = False
    grow_to: int | None = None  # default chunk size: may grow to this many rows so that one group fits whole


class LoopResult(NamedTuple):
    """Per-group results (detached) and the loss; ``grads`` (d loss / d hidden, weight, bias) for backward."""

    loss: torch.Tensor
    losses: torch.Tensor  # [n_groups]
    logps: tuple  # (chosen, rejected) [n_groups] each, or (examples,) for KTO
    rewards: tuple  # same layout as logps
    log_odds: torch.Tensor | None  # ORPO only
    ratio: torch.Tensor | None  # ORPO only
    nll: torch.Tensor | None  # the NLL term, when nll_weight
    grads: tuple


def group_math(cfg: FusedConfig, seq, cnt, ref, k, inv_n, need_grad, delta, z0, desirable):
    """Losses of k groups and d (sum of losses * inv_n) / d seq. ``seq`` [n_seg] are sums over tokens."""
    with torch.enable_grad():
        leaf = seq.detach().requires_grad_(need_grad)
        v = leaf / cnt.clamp(min=1).to(leaf.dtype) if cfg.average else leaf
        extras = {}
        if cfg.paired:
            rc, rr = (None, None) if ref is None else (ref[:k], ref[k:])
            losses, cw, rw, extras = pair_losses(cfg.kind, v[:k], v[k:], rc, rr, beta=cfg.beta,
                                                 label_smoothing=cfg.label_smoothing, gamma=cfg.gamma, delta=delta)
            logps = (v[:k].detach(), v[k:].detach())
            rewards = (cw, rw)
        else:
            r = v - ref
            losses = kto_example_losses(cfg.kind, r, desirable, z0, cfg.beta, cfg.desirable_weight,
                                        cfg.undesirable_weight)
            logps = (v.detach(),)
            rewards = ((cfg.beta * r).detach(),)
        d = None
        if need_grad:
            (d,) = torch.autograd.grad(losses.sum() * inv_n, leaf, allow_unused=True)
            if d is None:
                d = torch.zeros_like(leaf)
    return losses.detach(), logps, rewards, extras, d


class ReferenceLogps:
    """The reference log-probs of a chunk's sequences, in the loss's units (averaged when the loss averages):
    from the given ``[S]`` values, or scored through the reference head under no_grad, or None (reference-free)."""

    def __init__(self, cfg: FusedConfig, layout: GroupLayout, ref_head: Head | None, ref_given, labels1d,
                 rows_impl):
        self.cfg, self.layout, self.ref_head, self.cache = cfg, layout, ref_head, ref_given
        self.labels1d, self.rows_impl = labels1d, rows_impl

    def __call__(self, g0: int, g1: int):
        if self.cache is not None:
            return torch.cat([self.cache[s0:s1] for s0, s1 in self.layout.seq_ranges(g0, g1)])
        if self.ref_head is None:
            return None
        with torch.no_grad():
            seq, _ = sequence_sums(self.ref_head, self.layout, g0, g1, self.labels1d, self.rows_impl, self.cfg.o,
                                   keep=False)
        return averaged(self.cfg, self.layout, seq, g0, g1)


def averaged(cfg: FusedConfig, layout: GroupLayout, seq, g0: int, g1: int):
    return seq / layout.chunk_counts(g0, g1).clamp(min=1).to(seq.dtype) if cfg.average else seq


def batch_delta(cfg: FusedConfig, policy: Head, layout: GroupLayout, labels1d, rows_impl, ref: ReferenceLogps):
    """bco_pair's reference point: ``bco_delta`` when given, else the batch-mean reward from a forward-only pass
    over every sequence (the reference log-probs it scores are cached in ``ref``); None for other losses."""
    if not (cfg.paired and cfg.kind == "bco_pair"):
        return None
    cd = compute_dtype(policy.hidden2d.dtype)
    dev = policy.hidden2d.device
    if cfg.bco_delta is not None:
        return torch.tensor(cfg.bco_delta, dtype=cd, device=dev)
    n = layout.n_groups
    pol_all = torch.zeros(2 * n, dtype=cd, device=dev)
    ref_all = torch.zeros(2 * n, dtype=cd, device=dev)
    for g0, g1 in layout.chunks():
        rref = ref(g0, g1)
        with torch.no_grad():
            seq, _ = sequence_sums(policy, layout, g0, g1, labels1d, rows_impl, cfg.o, keep=False)
        seq = averaged(cfg, layout, seq, g0, g1)
        k = g1 - g0
        if rref is None:  # reference-free
            rref = torch.zeros_like(seq)
        for dst, src in ((pol_all, seq), (ref_all, rref)):
            dst[g0:g1] = src[:k]
            dst[n + g0:n + g1] = src[k:]
    ref.cache = ref_all
    return bco_batch_delta(cfg.beta * (pol_all[:n] - ref_all[:n]), cfg.beta * (pol_all[n:] - ref_all[n:]))


def _head_grad_buffers(policy: Head, need):
    hidden2d, weight = policy.hidden2d, policy.weight
    cd = compute_dtype(hidden2d.dtype)
    need_dh, need_dw, need_db = need
    return (torch.zeros_like(hidden2d) if need_dh else None,
            gemm.weight_grad_buffer(weight, hidden2d, cd) if need_dw else None,
            torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db else None)


def run(cfg: FusedConfig, policy: Head, ref_head: Head | None, ref_given, labels2d, desirable, z0, rows_impl,
        need: tuple[bool, bool, bool]) -> LoopResult:
    """The chunk loop: per-group results, the loss and the gradients of (hidden, weight, bias) per ``need``."""
    o = cfg.o
    need_grad = any(need)
    layout = GroupLayout(labels2d, o.ignore_index, cfg.paired, cfg.chunk, cfg.sync_free, cfg.grow_to)
    labels1d = labels2d.reshape(-1)
    cd = compute_dtype(policy.hidden2d.dtype)
    dev = policy.hidden2d.device
    n = layout.n_groups
    inv_n = 1.0 / max(n, 1)
    ref = ReferenceLogps(cfg, layout, ref_head, ref_given, labels1d, rows_impl)
    delta = batch_delta(cfg, policy, layout, labels1d, rows_impl, ref)
    grads = _head_grad_buffers(policy, need)

    def zeros():
        return torch.zeros(n, dtype=cd, device=dev)

    losses = zeros()
    logps = tuple(zeros() for _ in range(2 if cfg.paired else 1))
    rewards = tuple(zeros() for _ in logps)
    log_odds, ratio = (zeros(), zeros()) if cfg.kind == "orpo" else (None, None)
    with_nll = cfg.paired and bool(cfg.nll_weight)
    nll_sum = torch.zeros((), dtype=cd, device=dev)
    n_chosen = layout.counts[:n].sum().clamp(min=1).to(cd)
    nll_coef = -cfg.nll_weight / n_chosen if with_nll else None  # d (w * nll) / d logp of each chosen token

    for g0, g1 in layout.chunks():
        k = g1 - g0
        rref = ref(g0, g1)
        seq, kept = sequence_sums(policy, layout, g0, g1, labels1d, rows_impl, o, keep=need_grad)
        cnt = layout.chunk_counts(g0, g1)
        l_c, lp_c, rw_c, extras, d = group_math(cfg, seq, cnt, rref, k, inv_n, need_grad, delta, z0,
                                                None if desirable is None else desirable[g0:g1])
        losses[g0:g1] = l_c
        for i in range(len(logps)):
            logps[i][g0:g1] = lp_c[i]
            rewards[i][g0:g1] = rw_c[i]
        if log_odds is not None:
            log_odds[g0:g1] = extras["log_odds"]
            ratio[g0:g1] = extras["ratio"]
        if with_nll:
            nll_sum -= seq[:k].sum()
        if need_grad:
            if nll_coef is not None:
                d = d.clone()
                d[:k] += nll_coef
            backward_blocks(policy, kept, d, rows_impl, o, grads)
        del kept

    loss = losses.sum() * inv_n
    nll = nll_sum / n_chosen if with_nll else None
    if nll is not None:
        loss = loss + cfg.nll_weight * nll
    return LoopResult(loss, losses, logps, rewards, log_odds, ratio, nll, grads)
