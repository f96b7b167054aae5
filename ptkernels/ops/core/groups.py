"""The chunk loop over GROUPS of sequences, for the sequence-level fused losses (ops/fused_preference.py).

A group is one chosen/rejected pair (paired losses) or one example (KTO); a chunk is k complete groups, i.e. all
their valid (non-ignored) tokens, about ``chunk`` rows of logits. ``sequence_sums`` runs GEMM 1 and the forward
row function over a chunk and sums per-token log-probs into its sequences; ``backward_blocks`` turns per-sequence
gradients into d loss / d logits in place (the row function's backward) and applies GEMMs 2 and 3. A group with
more valid tokens than ``chunk`` is split into blocks that keep only their lse and recompute their logits.
"""

from __future__ import annotations

import torch

from ...types import compute_dtype
from . import gemm
from .chunking import apply_head_grads, take


class GroupLayout:
    """Sequences ``[S, T]`` flattened to rows; groups of sequences (pairs ``(g, G + g)``, or single ones)."""

    def __init__(self, labels2d: torch.Tensor, ignore_index: int, paired: bool, chunk: int, sync_free: bool,
                 grow_to: int | None = None):
        s, t = labels2d.shape
        self.t, self.paired, self.chunk = t, paired, chunk
        self.n_groups = s // 2 if paired else s
        valid = labels2d != ignore_index
        self.counts = valid.sum(dim=1)  # [S] on the device
        self.device = labels2d.device
        if sync_free:
            self.counts_host = self.index = self.offs = None
            largest = (2 if paired else 1) * t
        else:
            self.counts_host = self.counts.tolist()  # the one synchronization of the call
            offs = [0]
            for c in self.counts_host:
                offs.append(offs[-1] + c)
            self.offs = offs
            # nonzero_static: the size is known from the counts, so no second synchronization
            self.index = torch.nonzero_static(valid.reshape(-1), size=offs[-1]).squeeze(1)
            g = self.n_groups
            largest = max((self.counts_host[i] + (self.counts_host[g + i] if paired else 0) for i in range(g)),
                          default=0)
        if grow_to is not None:  # default chunk: grow it (up to grow_to) so the largest group fits whole
            self.chunk = max(self.chunk, min(largest, grow_to))

    def seq_ranges(self, g0: int, g1: int):
        if self.paired:
            return [(g0, g1), (self.n_groups + g0, self.n_groups + g1)]
        return [(g0, g1)]

    def chunks(self):
        """Yields (g0, g1): consecutive groups whose rows fit ``chunk`` (at least one group each)."""
        per_group_seqs = 2 if self.paired else 1
        if self.counts_host is None:
            k = max(1, self.chunk // max(per_group_seqs * self.t, 1))
            for g0 in range(0, self.n_groups, k):
                yield g0, min(g0 + k, self.n_groups)
            return
        g0, rows = 0, 0
        for g in range(self.n_groups):
            n = self.counts_host[g] + (self.counts_host[self.n_groups + g] if self.paired else 0)
            if g > g0 and rows + n > self.chunk:
                yield g0, g
                g0, rows = g, 0
            rows += n
        if self.n_groups:
            yield g0, self.n_groups

    def rows(self, g0: int, g1: int):
        """(row index [n], segment id [n], n_segments): a segment is one sequence of the chunk, chosen first."""
        rows, segs, base = [], [], 0
        for s0, s1 in self.seq_ranges(g0, g1):
            if self.index is None:
                r = torch.arange(s0 * self.t, s1 * self.t, device=self.device)
            else:
                r = self.index[self.offs[s0]:self.offs[s1]]
            rows.append(r)
            segs.append(torch.div(r, self.t, rounding_mode="floor") - s0 + base)
            base += s1 - s0
        return torch.cat(rows), torch.cat(segs), base

    def chunk_counts(self, g0: int, g1: int) -> torch.Tensor:
        return torch.cat([self.counts[s0:s1] for s0, s1 in self.seq_ranges(g0, g1)])

    def blocks(self, rows: torch.Tensor, segs: torch.Tensor):
        n = rows.shape[0]
        if n <= self.chunk:
            return [(rows, segs)] if n else []
        return [(rows[i:i + self.chunk], segs[i:i + self.chunk]) for i in range(0, n, self.chunk)]


class Head:
    """One model's hidden states ``[S * T, D]`` and head (weight, bias)."""

    def __init__(self, hidden2d, weight, bias):
        self.hidden2d, self.weight, self.bias = hidden2d, weight, bias


def log_sum_sq_probs(z: torch.Tensor, lse: torch.Tensor, o) -> torch.Tensor:
    """``log sum_v p_v^2 = lse(2 s) - 2 lse(s)`` per row of a chunk of logits (WPO's normalizer), no gradient;
    ``s`` the transformed logits (softcap, temperature), ``lse`` their log-sum-exp from the row function."""
    with torch.no_grad():
        s = z.to(lse.dtype)
        if o.softcap is not None:
            s = o.softcap * torch.tanh(s / o.softcap)
        if o.temperature != 1.0:
            s = s / o.temperature
        return torch.logsumexp(2.0 * s, dim=-1) - 2.0 * lse


def sequence_sums(head: Head, layout: GroupLayout, g0, g1, labels1d, rows_impl, o, keep: bool,
                  token_weights1d=None, extra: dict | None = None):
    """Forward over the chunk's rows: (sequence sums [n_seg], kept blocks for backward).

    ``token_weights1d`` [S * T] weights each token's log-prob in the sum (LD-DPO); ``extra`` (a dict) receives
    ``raw`` (the unweighted sums, when weighted) and, when it holds ``wpo=True``, ``wpo``: the per-sequence sums of
    ``logp - log sum_v p_v^2`` (WPO's aligned log-probs)."""
    rows, segs, n_seg = layout.rows(g0, g1)
    blocks = layout.blocks(rows, segs)
    cd = compute_dtype(head.hidden2d.dtype)
    dev = head.hidden2d.device
    seq = torch.zeros(n_seg, dtype=cd, device=dev)
    raw = torch.zeros(n_seg, dtype=cd, device=dev) if token_weights1d is not None else None
    want_wpo = extra is not None and extra.get("wpo", False)
    wpo = torch.zeros(n_seg, dtype=cd, device=dev) if want_wpo else None
    kept = []
    single = len(blocks) == 1
    for r, sg in blocks:
        h = take(head.hidden2d, r)
        z = gemm.logits(h, head.weight, head.bias)
        y = take(labels1d, r)
        lp, lse, _ = rows_impl.logprob_fwd(z, y, o, False)
        lp = lp.to(cd)
        if raw is not None:
            raw.index_add_(0, sg, lp)
            seq.index_add_(0, sg, lp * take(token_weights1d, r).to(cd))
        else:
            seq.index_add_(0, sg, lp)
        if wpo is not None:
            aligned = lp - log_sum_sq_probs(z, lse.to(cd), o)
            wpo.index_add_(0, sg, torch.where(y != o.ignore_index, aligned, torch.zeros_like(aligned)))
        if keep:  # one block keeps its logits for the in-place gradient; several keep only lse (recompute)
            kept.append((r, sg, y, h if single else None, z if single else None, lse))
        del z
    if extra is not None:
        extra["raw"] = seq if raw is None else raw
        extra["wpo_sums"] = wpo
    return seq, kept


def backward_blocks(head: Head, kept, g_seg, rows_impl, o, grads, token_weights1d=None, g_raw=None,
                    token_rows=None):
    """d loss / d logp of each token = ``g_seg[its sequence] * token weight (+ g_raw[its sequence])``.

    ``token_rows`` ``(lse [S * T], g_logp [S * T])`` (compact memory, ops/core/vocab_blocks.py): each token's
    log-sum-exp and d loss / d logp are written there for the weight pass after the loop; ``grads`` then holds
    no dW / db buffer, and without a hidden-state gradient no logits are touched here at all."""
    gh, gw, gb = grads
    for r, sg, y, h, z, lse in kept:
        g = g_seg.index_select(0, sg)
        if token_weights1d is not None:
            g = g * take(token_weights1d, r).to(g.dtype)
        if g_raw is not None:
            g = g + g_raw.index_select(0, sg)
        if token_rows is not None:
            token_rows[0].index_copy_(0, r, lse.to(token_rows[0].dtype))
            token_rows[1].index_copy_(0, r, g.to(token_rows[1].dtype))
        if gh is None and gw is None and gb is None:
            continue
        if z is None:  # a group split over several blocks: recompute its logits (GEMM 1 again)
            h = take(head.hidden2d, r)
            z = gemm.logits(h, head.weight, head.bias)
        rows_impl.logprob_bwd(z, y, lse, None, g, None, o, grad_out=z)
        apply_head_grads(z, h, head.weight, r, 1.0, gh, gw, gb)


def forward_sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk):
    """Summed log-probs ``[S]`` of ``hidden [S, T, D]`` under (weight, bias), forward only, chunked."""
    layout = GroupLayout(labels, o.ignore_index, False, chunk, False)
    head = Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    out = torch.zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
    labels1d = labels.reshape(-1)
    for g0, g1 in layout.chunks():
        seq, _ = sequence_sums(head, layout, g0, g1, labels1d, rows_impl, o, keep=False)
        out[g0:g1] = seq
    return out
