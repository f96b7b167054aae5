"""Fused preference losses from hidden states and the output head, never building the ``[tokens, V]`` logits.

``fused_linear_preference_loss`` (DPO family, SimPO, ORPO, CPO) and ``fused_linear_kto_loss`` (KTO). The loop
runs over chunks of GROUPS: a group is one chosen/rejected pair (paired losses) or one example (KTO), and a
chunk is k complete groups, i.e. all their valid (non-ignored) tokens, about ``chunk_size`` rows of logits:

    [ref]  z_ref = h_ref @ W_ref.T under no_grad -> per-token logp -> reference sequence log-probs
    z    = h_c @ W.T (+ b)                                GEMM 1: the chunk's logits, never the whole matrix
    row kernel: per-token logp and lse (ops/logit_rows.py: torch or Triton)
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

from dataclasses import dataclass

import torch

from .. import reference
from ..reference import preference as reference_preference
from . import gemm
from .checks import check_float, check_head, check_labels, check_options
from .chunking import default_chunk_size, take, want_sync_free
from .dispatch import resolve_backend
from .linear_cross_entropy import apply_head_grads
from .logit_rows import RowOptions, compute_dtype, get_rows
from .preference import (
    DPO_LOSS_TYPES,
    KTO_LOSS_TYPES,
    KTOLossOutput,
    PreferenceLossOutput,
    bco_batch_delta,
    check_batch,
    check_loss_options,
    kto_example_losses,
    kto_reference_point,
    make_output,
    pair_losses,
)

FUSED_LOSS_TYPES = DPO_LOSS_TYPES + ("simpo", "orpo", "cpo")
_AVERAGED_BY_DEFAULT = ("ipo", "simpo", "orpo")  # TRL length-averages these (DPO ipo, CPO ipo/simpo, ORPO)
_NLL_BY_DEFAULT = ("orpo", "cpo")  # ORPO's SFT term and CPO's cpo_alpha both default to weight 1


@dataclass(frozen=True)
class _Config:
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


# ------------------------------------------------------------------------------------------------ layout


class _Layout:
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


class _Head:
    """One model's hidden states ``[S * T, D]`` and head (weight, bias)."""

    def __init__(self, hidden2d, weight, bias):
        self.hidden2d, self.weight, self.bias = hidden2d, weight, bias


def _sequence_sums(head: _Head, layout: _Layout, g0, g1, labels1d, rows_impl, o, keep: bool):
    """Forward over the chunk's rows: (sequence sums [n_seg], kept blocks for backward)."""
    rows, segs, n_seg = layout.rows(g0, g1)
    blocks = layout.blocks(rows, segs)
    cd = compute_dtype(head.hidden2d.dtype)
    seq = torch.zeros(n_seg, dtype=cd, device=head.hidden2d.device)
    kept = []
    single = len(blocks) == 1
    for r, sg in blocks:
        h = take(head.hidden2d, r)
        z = gemm.logits(h, head.weight, head.bias)
        y = take(labels1d, r)
        lp, lse, _ = rows_impl.logprob_fwd(z, y, o, False)
        seq.index_add_(0, sg, lp.to(cd))
        if keep:  # one block keeps its logits for the in-place gradient; several keep only lse (recompute)
            kept.append((r, sg, y, h if single else None, z if single else None, lse))
        del z
    return seq, kept


def _backward_blocks(head: _Head, kept, g_seg, rows_impl, o, grads):
    gh, gw, gb = grads
    for r, sg, y, h, z, lse in kept:
        if z is None:  # a group split over several blocks: recompute its logits (GEMM 1 again)
            h = take(head.hidden2d, r)
            z = gemm.logits(h, head.weight, head.bias)
        rows_impl.logprob_bwd(z, y, lse, None, g_seg.index_select(0, sg), None, o, grad_out=z)
        apply_head_grads(z, h, head.weight, r, 1.0, gh, gw, gb)


# ---------------------------------------------------------------------------------------------- the loop


def _group_math(cfg: _Config, seq, cnt, ref, k, inv_n, need_grad, delta, z0, desirable):
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


def _run(cfg: _Config, policy: _Head, ref_head: _Head | None, ref_given, labels2d, desirable, z0, rows_impl,
         need: tuple[bool, bool, bool]):
    """The chunk loop; returns a dict of per-group results, the loss and the precomputed gradients."""
    o = cfg.o
    need_dh, need_dw, need_db = need
    need_grad = need_dh or need_dw or need_db
    layout = _Layout(labels2d, o.ignore_index, cfg.paired, cfg.chunk, cfg.sync_free, cfg.grow_to)
    labels1d = labels2d.reshape(-1)
    hidden2d, weight = policy.hidden2d, policy.weight
    cd = compute_dtype(hidden2d.dtype)
    dev = hidden2d.device
    n = layout.n_groups
    inv_n = 1.0 / max(n, 1)

    # reference log-probs, in the loss's units (averaged when the loss averages)
    ref_cache = None if ref_given is None else ref_given

    def chunk_ref(g0, g1):
        if ref_cache is not None:
            return torch.cat([ref_cache[s0:s1] for s0, s1 in layout.seq_ranges(g0, g1)])
        if ref_head is None:
            return None
        with torch.no_grad():
            seq, _ = _sequence_sums(ref_head, layout, g0, g1, labels1d, rows_impl, o, keep=False)
        if cfg.average:
            seq = seq / layout.chunk_counts(g0, g1).clamp(min=1).to(seq.dtype)
        return seq

    delta = None
    if cfg.paired and cfg.kind == "bco_pair":
        if cfg.bco_delta is not None:
            delta = torch.tensor(cfg.bco_delta, dtype=cd, device=dev)
        else:  # pass 1 (forward only): every sequence log-prob, for the batch-mean reward delta
            pol_all = torch.zeros(2 * n, dtype=cd, device=dev)
            ref_all = torch.zeros(2 * n, dtype=cd, device=dev)
            for g0, g1 in layout.chunks():
                rref = chunk_ref(g0, g1)
                with torch.no_grad():
                    seq, _ = _sequence_sums(policy, layout, g0, g1, labels1d, rows_impl, o, keep=False)
                if cfg.average:
                    seq = seq / layout.chunk_counts(g0, g1).clamp(min=1).to(seq.dtype)
                k = g1 - g0
                if rref is None:  # reference-free
                    rref = torch.zeros_like(seq)
                for dst in ((pol_all, seq), (ref_all, rref)):
                    dst[0][g0:g1] = dst[1][:k]
                    dst[0][n + g0:n + g1] = dst[1][k:]
            delta = bco_batch_delta(cfg.beta * (pol_all[:n] - ref_all[:n]), cfg.beta * (pol_all[n:] - ref_all[n:]))
            ref_cache = ref_all

    gh = torch.zeros_like(hidden2d) if need_dh else None
    gw = gemm.weight_grad_buffer(weight, hidden2d, cd) if need_dw else None
    gb = torch.zeros(weight.shape[0], dtype=cd, device=weight.device) if need_db else None

    losses = torch.zeros(n, dtype=cd, device=dev)
    n_out = 2 if cfg.paired else 1
    logps = [torch.zeros(n, dtype=cd, device=dev) for _ in range(n_out)]
    rewards = [torch.zeros(n, dtype=cd, device=dev) for _ in range(n_out)]
    log_odds = torch.zeros(n, dtype=cd, device=dev) if cfg.kind == "orpo" else None
    ratio = torch.zeros(n, dtype=cd, device=dev) if cfg.kind == "orpo" else None
    nll_sum = torch.zeros((), dtype=cd, device=dev)
    nll_coef = None
    if cfg.paired and cfg.nll_weight:
        n_chosen = layout.counts[:n].sum().clamp(min=1).to(cd)
        nll_coef = -cfg.nll_weight / n_chosen  # d (w * nll) / d logp of each chosen token

    for g0, g1 in layout.chunks():
        k = g1 - g0
        rref = chunk_ref(g0, g1)
        seq, kept = _sequence_sums(policy, layout, g0, g1, labels1d, rows_impl, o, keep=need_grad)
        cnt = layout.chunk_counts(g0, g1)
        l_c, lp_c, rw_c, extras, d = _group_math(cfg, seq, cnt, rref, k, inv_n, need_grad, delta, z0,
                                                 None if desirable is None else desirable[g0:g1])
        losses[g0:g1] = l_c
        for i in range(n_out):
            logps[i][g0:g1] = lp_c[i]
            rewards[i][g0:g1] = rw_c[i]
        if log_odds is not None:
            log_odds[g0:g1] = extras["log_odds"]
            ratio[g0:g1] = extras["ratio"]
        if cfg.paired and cfg.nll_weight:
            nll_sum -= seq[:k].sum()
        if need_grad:
            if nll_coef is not None:
                d = d.clone()
                d[:k] += nll_coef
            _backward_blocks(policy, kept, d, rows_impl, o, (gh, gw, gb))
        del kept

    nll = None
    loss = losses.sum() * inv_n
    if cfg.paired and cfg.nll_weight:
        nll = nll_sum / layout.counts[:n].sum().clamp(min=1).to(cd)
        loss = loss + cfg.nll_weight * nll
    return {"loss": loss, "losses": losses, "logps": logps, "rewards": rewards, "log_odds": log_odds,
            "ratio": ratio, "nll": nll, "grads": (gh, gw, gb), "delta": delta}


class FusedLinearPreferenceFunction(torch.autograd.Function):
    """Returns (loss, results dict holder); gradients of hidden/weight/bias are computed in forward."""

    @staticmethod
    def forward(ctx, hidden2d, weight, bias, labels2d, ref_hidden2d, ref_weight, ref_bias, ref_given, desirable,
                z0, cfg: _Config, rows_impl, box: dict):
        ctx.set_materialize_grads(False)
        need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], bias is not None and ctx.needs_input_grad[2])
        ref_head = None if ref_hidden2d is None else _Head(ref_hidden2d, ref_weight, ref_bias)
        out = _run(cfg, _Head(hidden2d, weight, bias), ref_head, ref_given, labels2d, desirable, z0, rows_impl,
                   need)
        ctx.grads = out.pop("grads")
        ctx.dtypes = (hidden2d.dtype, weight.dtype)
        box.update(out)
        return out["loss"].clone()

    @staticmethod
    def backward(ctx, grad_out):
        gh, gw, gb = ctx.grads
        ctx.grads = None
        h_dtype, w_dtype = ctx.dtypes
        if grad_out is None:
            return (None,) * 13
        gh = gh.mul_(grad_out).to(h_dtype) if gh is not None else None
        gw = gemm.weight_grad_result(gw.mul_(grad_out), w_dtype) if gw is not None else None
        gb = gb.mul_(grad_out).to(w_dtype) if gb is not None else None
        return gh, gw, gb, None, None, None, None, None, None, None, None, None, None


# ------------------------------------------------------------------------------------------------ checks


def _check_ref_head(ref_hidden, ref_weight, ref_bias, hidden, weight, bias):
    """Reference head defaults: ``ref_weight``/``ref_bias`` fall back to the policy's (detached)."""
    check_float("ref_hidden", ref_hidden)
    if tuple(ref_hidden.shape[:-1]) != tuple(hidden.shape[:-1]):
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but hidden has shape "
                         f"{tuple(hidden.shape)}: they must agree on every dimension but the last")
    if ref_weight is None:
        ref_weight = weight.detach()
        if ref_bias is None and bias is not None:
            ref_bias = bias.detach()
    check_float("ref_weight", ref_weight)
    if ref_weight.dim() != 2 or ref_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"ref_weight has shape {tuple(ref_weight.shape)} but weight has shape "
                         f"{tuple(weight.shape)}: the reference head needs the same vocabulary V")
    if ref_hidden.shape[-1] != ref_weight.shape[1]:
        raise ValueError(f"ref_hidden has shape {tuple(ref_hidden.shape)} but ref_weight has shape "
                         f"{tuple(ref_weight.shape)}: ref_hidden's last dim must equal ref_weight's D")
    for name, t in (("ref_hidden", ref_hidden), ("ref_weight", ref_weight)):
        if t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if ref_hidden.dtype != ref_weight.dtype:
        raise TypeError(f"ref_hidden has dtype {ref_hidden.dtype} but ref_weight has dtype {ref_weight.dtype}")
    if ref_bias is not None:
        check_float("ref_bias", ref_bias)
        if tuple(ref_bias.shape) != (ref_weight.shape[0],) or ref_bias.device != ref_weight.device:
            raise ValueError(f"ref_bias has shape {tuple(ref_bias.shape)} on {ref_bias.device} but ref_weight "
                             f"implies ({ref_weight.shape[0]},) on {ref_weight.device}")
        ref_bias = ref_bias.detach().to(ref_weight.dtype)
    return ref_hidden.detach(), ref_weight.detach(), ref_bias


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
            the 4-GEMM path). Default: ``ops.chunking.default_chunk_size``, grown up to 8x that (4x on CPU) so
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
        ref_hidden, ref_weight, ref_bias = _check_ref_head(ref_hidden, ref_weight, ref_bias, hidden, weight, bias)
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
    cfg = _Config(kind=kind, paired=True, beta=float(beta), label_smoothing=float(label_smoothing),
                  gamma=float(simpo_gamma), bco_delta=None if bco_delta is None else float(bco_delta),
                  average=average, nll_weight=nll_w, o=o,
                  chunk=chunk_size or default_chunk_size(weight.shape[0], hidden.device, hidden.dtype),
                  sync_free=want_sync_free(sync_free, hidden.device), grow_to=_grow_to(chunk_size, weight, hidden))
    ref_given = None
    if given:
        cd = compute_dtype(hidden.dtype)
        ref_given = torch.cat([ref_chosen_logps.detach(), ref_rejected_logps.detach()]).to(cd)
    box: dict = {}
    loss = FusedLinearPreferenceFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, None if ref_hidden is None else
        ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias, ref_given, None, None, cfg,
        get_rows(name), box)
    pc, pr = box["logps"]
    cw, rw = box["rewards"]
    extras = {"log_odds": box["log_odds"], "ratio": box["ratio"]} if box["log_odds"] is not None else None
    return make_output(box["losses"], cw, rw, pc, pr, nll_loss=box["nll"], nll_weight=nll_w, extras=extras,
                       loss=loss)


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
        ref_hidden, ref_weight, ref_bias = _check_ref_head(ref_hidden, ref_weight, ref_bias, hidden, weight, bias)
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
            pol_kl = _forward_sequence_logps(kl_hidden, weight.detach(), None if bias is None else bias.detach(),
                                             kl_labels, rows_impl, o, chunk, name)
            if ref_kl_hidden is not None:
                rkh, rkw, rkb = _check_ref_head(ref_kl_hidden, policy_ref_weight, ref_bias, kl_hidden, weight, bias)
                ref_kl = _forward_sequence_logps(rkh, rkw, rkb, kl_labels, rows_impl, o, chunk, name)
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
    cfg = _Config(kind=loss_type, paired=False, beta=float(beta), desirable_weight=float(desirable_weight),
                  undesirable_weight=float(undesirable_weight), o=o, chunk=chunk, sync_free=False,
                  grow_to=_grow_to(chunk_size, weight, hidden))
    box: dict = {}
    loss = FusedLinearPreferenceFunction.apply(
        hidden.reshape(-1, hidden.shape[-1]), weight, bias, labels, None if ref_hidden is None else
        ref_hidden.reshape(-1, ref_hidden.shape[-1]), ref_weight, ref_bias,
        None if ref_logps is None else ref_logps.detach().to(cd), desirable, z0, cfg, rows_impl, box)
    # TRL's order: desirable examples first (a stable permutation; no synchronization)
    order = torch.argsort((~desirable).to(torch.uint8), stable=True)
    n_desirable = int(desirable.sum())  # a second (tiny) synchronization: the split sizes of the output
    losses = box["losses"].index_select(0, order)
    rewards = box["rewards"][0].index_select(0, order)
    return KTOLossOutput(loss=loss, losses=losses, chosen_rewards=rewards[:n_desirable],
                         rejected_rewards=rewards[n_desirable:], kl=z0)


def _forward_sequence_logps(hidden, weight, bias, labels, rows_impl, o, chunk, name):
    """Summed log-probs ``[S]`` of ``hidden [S, T, D]`` under (weight, bias), forward only, chunked."""
    if name == "reference":
        tok = reference.linear_token_logprobs(hidden, weight, labels, bias=bias, ignore_index=o.ignore_index,
                                              temperature=o.temperature, softcap=o.softcap)
        return tok.sum(dim=-1)
    layout = _Layout(labels, o.ignore_index, False, chunk, False)
    head = _Head(hidden.reshape(-1, hidden.shape[-1]), weight, bias)
    out = torch.zeros(hidden.shape[0], dtype=compute_dtype(hidden.dtype), device=hidden.device)
    labels1d = labels.reshape(-1)
    for g0, g1 in layout.chunks():
        seq, _ = _sequence_sums(head, layout, g0, g1, labels1d, rows_impl, o, keep=False)
        out[g0:g1] = seq
    return out
