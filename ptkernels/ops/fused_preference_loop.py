"""The chunk loop of the fused preference losses (ops/fused_preference.py): per-group losses and the gradients
of the policy's head, formed in one pass over chunks of whole groups (ops/core/groups.py).

Per chunk: the reference log-probs of its sequences (given, or scored under no_grad through the reference head),
the policy's sequence log-probs (GEMM 1 + forward row function), the per-group losses and d loss / d sequence
log-prob on ``[2k]`` values (a tiny autograd graph over ``ops.preference.pair_losses`` or the KTO losses: groups
are independent and the batch mean's 1/B is known up front), then the per-token gradient in place of the logits
and GEMMs 2 and 3. aot / aot_unpaired (a sort over the batch) and WPO-weighted sft couple the groups: a forward-only
pass computes every sequence log-prob first (and caches the reference ones), the whole batch's loss and its
gradient per sequence, then the main loop forms the head's gradients (4 GEMMs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..types import compute_dtype
from .backends.base import RowOptions
from .core import gemm
from .core.chunking import RowPlan
from .core.groups import GroupLayout, Head, backward_blocks, sequence_sums
from .preference_math import DPOSpec, kto_example_losses, pair_losses


@dataclass(frozen=True)
class FusedConfig:
    kind: str  # "dpo" (the family in ``spec``), "simpo", "orpo", "sigmoid" (CPO), or a KTO loss type
    paired: bool
    beta: float
    spec: DPOSpec | None = None
    label_smoothing: float = 0.0
    gamma: float = 0.0
    alpha: float = 0.0  # AlphaPO (simpo / CPO)
    average: bool = False
    nll_weight: float = 0.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    ld_alpha: float | None = None
    use_weighting: bool = False
    input_dtype: torch.dtype = torch.float32
    o: RowOptions = RowOptions()
    chunk: int = 1024
    sync_free: bool = False
    grow_to: int | None = None  # default chunk size: may grow to this many rows so that one group fits whole
    block_rows: object = None  # memory="compact": the backend's block gradient (backends/base.py: grad_block)

    @property
    def sft_weight(self) -> float:
        return self.spec.sft_weight if self.spec is not None else 0.0

    @property
    def coupled(self) -> bool:
        """The loss of a pair depends on other pairs: aot's sort over the batch, or WPO-weighted sft (the batch's
        NLL times each pair's weight). Then a forward-only pass scores every sequence first (4 GEMMs)."""
        return self.spec is not None and (self.spec.batch_coupled or (self.use_weighting and self.sft_weight != 0))


class LoopResult(NamedTuple):
    """Per-group results (detached) and the loss; ``grads`` (d loss / d hidden, weight, bias) for backward."""

    loss: torch.Tensor
    losses: torch.Tensor  # [n_groups]
    logps: tuple  # (chosen, rejected) [n_groups] each, or (examples,) for KTO
    rewards: tuple  # same layout as logps
    log_odds: torch.Tensor | None  # ORPO only
    ratio: torch.Tensor | None  # ORPO only
    nll: torch.Tensor | None  # the NLL of the chosen completions, when an NLL term or sft is present
    grads: tuple
    # memory="compact" with a weight or bias gradient: (lse [S * T], d loss / d logp [S * T], RowPlan of the
    # scored rows) for the vocabulary-block weight pass in backward (ops/core/vocab_blocks.py); else None
    token_rows: tuple | None = None


def ld_token_weights(labels2d: torch.Tensor, ignore_index: int, ld_alpha: float) -> torch.Tensor:
    """LD-DPO's per-token weights ``[S * T]`` (TRL 1.16 ``DPOTrainer._compute_loss``): 1 on a pair's first
    ``min(len_c, len_r)`` scored completion tokens, ``ld_alpha`` on the longer completion's tail, 0 elsewhere."""
    valid = labels2d != ignore_index
    pos = valid.cumsum(dim=1)
    cnt = valid.sum(dim=1)
    n = labels2d.shape[0] // 2
    shared = torch.minimum(cnt[:n], cnt[n:]).repeat(2).unsqueeze(1)
    w = torch.where(pos <= shared, torch.ones((), dtype=torch.float64, device=labels2d.device),
                    torch.full((), float(ld_alpha), dtype=torch.float64, device=labels2d.device))
    return (w * valid).reshape(-1)


def group_math(cfg: FusedConfig, seq, raw, cnt, lens, ref, k, inv_n, need_grad, z0, desirable, wpo, n_chosen):
    """Losses of k groups and d (sum of losses * inv_n) / d seq (and / d raw). ``seq`` [n_seg] are the (LD-weighted)
    sums over tokens, ``raw`` the unweighted ones when the sft term is computed here (coupled path), else None."""
    with torch.enable_grad():
        leaf = seq.detach().requires_grad_(need_grad)
        raw_leaf = None if raw is None else raw.detach().requires_grad_(need_grad)
        v = leaf / cnt.clamp(min=1).to(leaf.dtype) if cfg.average else leaf
        extras = {}
        if cfg.paired:
            rc, rr = (None, None) if ref is None else (ref[:k], ref[k:])
            if cfg.kind == "dpo":
                nll = None if raw_leaf is None else -raw_leaf[:k].sum() / n_chosen
                lengths = (lens[:k].to(v.dtype), lens[k:].to(v.dtype))
                pw = None if wpo is None else wpo[:k] * wpo[k:]
                losses, cw, rw, extras = pair_losses("dpo", v[:k], v[k:], rc, rr, beta=cfg.beta, spec=cfg.spec,
                                                     lengths=lengths, nll=nll, pair_weights=pw,
                                                     input_dtype=cfg.input_dtype)
            else:
                losses, cw, rw, extras = pair_losses(cfg.kind, v[:k], v[k:], rc, rr, beta=cfg.beta,
                                                     label_smoothing=cfg.label_smoothing, gamma=cfg.gamma,
                                                     alpha=cfg.alpha)
            logps = (v[:k].detach(), v[k:].detach())
            rewards = (cw, rw)
        else:
            r = v - ref
            losses = kto_example_losses(cfg.kind, r, desirable, z0, cfg.beta, cfg.desirable_weight,
                                        cfg.undesirable_weight)
            logps = (v.detach(),)
            rewards = ((cfg.beta * r).detach(),)
        d = d_raw = None
        if need_grad:
            leaves = [leaf] if raw_leaf is None else [leaf, raw_leaf]
            total = losses.sum() * inv_n
            grads = (torch.autograd.grad(total, leaves, allow_unused=True) if total.requires_grad
                     else (None,) * len(leaves))  # e.g. sft alone: its gradient is the loop's NLL term
            d = grads[0] if grads[0] is not None else torch.zeros_like(leaf)
            if raw_leaf is not None:
                d_raw = grads[1] if grads[1] is not None else torch.zeros_like(raw_leaf)
    return losses.detach(), logps, rewards, extras, d, d_raw


class ReferenceLogps:
    """The reference log-probs of a chunk's sequences, in the loss's units (averaged when the loss averages,
    LD-weighted under ``ld_alpha``): from the given ``[S]`` values, or scored through the reference head under
    no_grad, or None (reference-free)."""

    def __init__(self, cfg: FusedConfig, layout: GroupLayout, ref_head: Head | None, ref_given, labels1d,
                 rows_impl, token_weights1d):
        self.cfg, self.layout, self.ref_head, self.cache = cfg, layout, ref_head, ref_given
        self.labels1d, self.rows_impl, self.tw = labels1d, rows_impl, token_weights1d

    def __call__(self, g0: int, g1: int):
        if self.cache is not None:
            return gather(self.layout, self.cache, g0, g1)
        if self.ref_head is None:
            return None
        with torch.no_grad():
            seq, _ = sequence_sums(self.ref_head, self.layout, g0, g1, self.labels1d, self.rows_impl, self.cfg.o,
                                   keep=False, token_weights1d=self.tw)
        return averaged(self.cfg, self.layout, seq, g0, g1)


def gather(layout: GroupLayout, values, g0: int, g1: int):
    """The entries of a per-sequence ``[S]`` tensor for the chunk's sequences, in the chunk's segment order."""
    return torch.cat([values[s0:s1] for s0, s1 in layout.seq_ranges(g0, g1)])


def scatter(layout: GroupLayout, dst, src, g0: int, g1: int):
    i = 0
    for s0, s1 in layout.seq_ranges(g0, g1):
        dst[s0:s1] = src[i:i + s1 - s0]
        i += s1 - s0


def averaged(cfg: FusedConfig, layout: GroupLayout, seq, g0: int, g1: int):
    return seq / layout.chunk_counts(g0, g1).clamp(min=1).to(seq.dtype) if cfg.average else seq


def _head_grad_buffers(policy: Head, need, compact: bool):
    """(dh, dW, db) buffers of the loop; compact memory forms dW and db after it (no [V, D] accumulator)."""
    hidden2d, weight = policy.hidden2d, policy.weight
    cd = compute_dtype(hidden2d.dtype)
    need_dh, need_dw, need_db = need
    need_dw, need_db = need_dw and not compact, need_db and not compact
    return (torch.zeros_like(hidden2d) if need_dh else None,
            gemm.weight_grad_buffer(weight, hidden2d, cd) if need_dw else None,
            torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db else None)


def _wpo_weights(extra, cnt):
    """WPO's per-sequence weight ``exp(sum_t aligned / clamp(count, 1))`` (detached; may exceed 1)."""
    sums = extra.get("wpo_sums")
    return None if sums is None else torch.exp(sums / cnt.clamp(min=1).to(sums.dtype))


class _ChunkLoop:
    """The state of one ``run``: the group layout, the per-group output buffers, the NLL sum and the head's
    gradient buffers. ``run`` calls its steps in order: setup (here), the coupled forward-only pass when the loss
    couples groups, the per-chunk body, the finish."""

    def __init__(self, cfg: FusedConfig, policy: Head, ref_head: Head | None, ref_given, labels2d, desirable, z0,
                 rows_impl, need: tuple[bool, bool, bool], seq_lengths):
        self.cfg, self.policy, self.desirable, self.z0, self.rows_impl = cfg, policy, desirable, z0, rows_impl
        o = cfg.o
        self.need_grad = any(need)
        self.layout = layout = GroupLayout(labels2d, o.ignore_index, cfg.paired, cfg.chunk, cfg.sync_free,
                                           cfg.grow_to)
        self.labels1d = labels2d.reshape(-1)
        self.cd = cd = compute_dtype(policy.hidden2d.dtype)
        self.dev = dev = policy.hidden2d.device
        self.n = n = layout.n_groups
        self.inv_n = 1.0 / max(n, 1)
        self.tw = None
        if cfg.paired and cfg.ld_alpha is not None:
            self.tw = ld_token_weights(labels2d, o.ignore_index, cfg.ld_alpha).to(cd)
        self.ref = ReferenceLogps(cfg, layout, ref_head, ref_given, self.labels1d, rows_impl, self.tw)
        self.lens_all = layout.counts if seq_lengths is None else seq_lengths
        compact = cfg.block_rows is not None
        self.grads = _head_grad_buffers(policy, need, compact)
        self.token_rows = None  # compact memory: each scored token's lse and d loss / d logp, for the weight pass
        if compact and (need[1] or need[2]):
            self.token_rows = (self.zeros(policy.hidden2d.shape[0]), self.zeros(policy.hidden2d.shape[0]))
        self.losses = self.zeros()
        self.logps = tuple(self.zeros() for _ in range(2 if cfg.paired else 1))
        self.rewards = tuple(self.zeros() for _ in self.logps)
        self.log_odds, self.ratio = (self.zeros(), self.zeros()) if cfg.kind == "orpo" else (None, None)
        self.n_chosen = layout.counts[:n].sum().clamp(min=1).to(cd) if cfg.paired else None
        self.sft_w = sft_w = cfg.sft_weight
        # the NLL of the chosen tokens (the nll_weight term and, outside the coupled path, the sft loss type): its
        # gradient on each chosen token is the constant -(weight) / n_chosen, known up front
        self.nll_w_loop = cfg.nll_weight + (0.0 if cfg.coupled else sft_w) if cfg.paired else 0.0
        self.with_nll = cfg.paired and (cfg.nll_weight != 0 or sft_w != 0)
        self.nll_sum = torch.zeros((), dtype=cd, device=dev)
        self.want_extra = {"wpo": cfg.use_weighting}
        self.d_all = self.d_raw_all = None

    def zeros(self, m=None):
        return torch.zeros(self.n if m is None else m, dtype=self.cd, device=self.dev)

    def score_whole_batch(self) -> None:
        """The coupled path: a forward-only pass over every sequence, then the whole batch's loss and its
        gradients per sequence (``d_all``, ``d_raw_all``), read back per chunk by ``chunk``."""
        cfg, layout, o, n = self.cfg, self.layout, self.cfg.o, self.n
        s_all, raw_all, wpo_all, ref_all = self.zeros(2 * n), self.zeros(2 * n), self.zeros(2 * n), self.zeros(2 * n)
        has_ref = True
        for g0, g1 in layout.chunks():
            rref = self.ref(g0, g1)
            extra = dict(self.want_extra)
            with torch.no_grad():
                seq, _ = sequence_sums(self.policy, layout, g0, g1, self.labels1d, self.rows_impl, o, keep=False,
                                       token_weights1d=self.tw, extra=extra)
            cnt = layout.chunk_counts(g0, g1)
            scatter(layout, s_all, seq, g0, g1)
            scatter(layout, raw_all, extra["raw"], g0, g1)
            w = _wpo_weights(extra, cnt)
            if w is not None:
                scatter(layout, wpo_all, w, g0, g1)
            if rref is None:
                has_ref = False
            else:
                scatter(layout, ref_all, rref, g0, g1)
        if has_ref:
            self.ref.cache = ref_all
        l_all, lp_all, rw_all, extras, self.d_all, self.d_raw_all = group_math(
            cfg, s_all, raw_all if self.sft_w else None, layout.counts, self.lens_all, ref_all if has_ref else None,
            n, self.inv_n, self.need_grad, self.z0, None, wpo_all if cfg.use_weighting else None, self.n_chosen)
        self.losses.copy_(l_all)
        for i in range(2):
            self.logps[i].copy_(lp_all[i])
            self.rewards[i].copy_(rw_all[i])
        if self.with_nll:
            self.nll_sum = -raw_all[:n].sum()

    def chunk(self, g0: int, g1: int) -> None:
        """One chunk of groups: GEMM 1 and the sequence sums, the groups' losses and d loss / d sequence-logp (or,
        on the coupled path, those of the whole batch), then the per-token gradient and GEMMs 2 and 3."""
        cfg, layout, o, need_grad = self.cfg, self.layout, self.cfg.o, self.need_grad
        k = g1 - g0
        rref = None if cfg.coupled else self.ref(g0, g1)
        extra = dict(self.want_extra)
        seq, kept = sequence_sums(self.policy, layout, g0, g1, self.labels1d, self.rows_impl, o, keep=need_grad,
                                  token_weights1d=self.tw, extra=extra)
        cnt = layout.chunk_counts(g0, g1)
        if cfg.coupled:
            d = gather(layout, self.d_all, g0, g1)
            d_raw = None if self.d_raw_all is None else gather(layout, self.d_raw_all, g0, g1)
        else:
            lens = gather(layout, self.lens_all, g0, g1) if cfg.paired else None
            l_c, lp_c, rw_c, extras, d, d_raw = group_math(
                cfg, seq, None, cnt, lens, rref, k, self.inv_n, need_grad, self.z0,
                None if self.desirable is None else self.desirable[g0:g1], _wpo_weights(extra, cnt), self.n_chosen)
            self.losses[g0:g1] = l_c
            for i in range(len(self.logps)):
                self.logps[i][g0:g1] = lp_c[i]
                self.rewards[i][g0:g1] = rw_c[i]
            if self.log_odds is not None:
                self.log_odds[g0:g1] = extras["log_odds"]
                self.ratio[g0:g1] = extras["ratio"]
            if self.with_nll:
                self.nll_sum -= extra["raw"][:k].sum()
        if need_grad:
            if self.nll_w_loop:
                d_raw = torch.zeros_like(d) if d_raw is None else d_raw.clone()
                d_raw[:k] -= self.nll_w_loop / self.n_chosen
            backward_blocks(self.policy, kept, d, self.rows_impl, o, self.grads, token_weights1d=self.tw,
                            g_raw=d_raw, token_rows=self.token_rows)
        del kept

    def finish(self) -> LoopResult:
        """The chosen completions' NLL, the sft term on every pair, and the batch mean with the NLL term."""
        cfg, losses = self.cfg, self.losses
        nll = self.nll_sum / self.n_chosen if self.with_nll else None
        if nll is not None and self.sft_w and not cfg.coupled:
            losses += self.sft_w * nll  # sft: the same NLL for every pair (TRL expands it to the batch)
        loss = losses.sum() * self.inv_n
        if nll is not None and cfg.nll_weight:
            loss = loss + cfg.nll_weight * nll
        token_rows = None
        if self.token_rows is not None:
            plan = RowPlan.of_rows(self.layout.index, self.token_rows[0].shape[0], cfg.chunk)
            token_rows = (*self.token_rows, plan)
        return LoopResult(loss, losses, self.logps, self.rewards, self.log_odds, self.ratio, nll, self.grads,
                          token_rows)


def run(cfg: FusedConfig, policy: Head, ref_head: Head | None, ref_given, labels2d, desirable, z0, rows_impl,
        need: tuple[bool, bool, bool], seq_lengths=None) -> LoopResult:
    """The chunk loop: per-group results, the loss and the gradients of (hidden, weight, bias) per ``need``.

    ``seq_lengths`` [S]: the completion lengths ipo / sigmoid_norm divide by (default: the scored-token counts)."""
    loop = _ChunkLoop(cfg, policy, ref_head, ref_given, labels2d, desirable, z0, rows_impl, need, seq_lengths)
    if cfg.coupled:  # forward-only pass over every sequence, then the whole batch's loss and its gradients
        loop.score_whole_batch()
    for g0, g1 in loop.layout.chunks():
        if cfg.coupled and not loop.need_grad:
            break
        loop.chunk(g0, g1)
    return loop.finish()
