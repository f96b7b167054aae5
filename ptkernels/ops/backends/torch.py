"""The torch backend: every family in plain PyTorch ops (any device). The spec the other backends match.

Interfaces and formulas: ptkernels/ops/backends/base.py.
"""

from __future__ import annotations

import math

import torch

from ...types import compute_dtype
from .base import GRPOParams, GRPORows, JSDRowOptions, RowOptions
from .torch_blocks import BLOCK_ROWS, chain_, transform_, work_buffer  # noqa: F401 (BLOCK_ROWS: a family)

# ------------------------------------------------------------------------------------------- logit rows


class TorchRows:
    """Row math in PyTorch ops. Works on any device; the CPU default until the native extension lands."""

    name = "torch"

    _work_buffer = staticmethod(work_buffer)
    _transform_ = staticmethod(transform_)
    _chain_ = staticmethod(chain_)

    @classmethod
    def _read_only_view(cls, z, o: RowOptions):
        """The transformed logits when no gradient is written: copy only if a transform or upcast needs it."""
        if o.softcap is None and o.temperature == 1.0:
            return z.to(compute_dtype(z.dtype))
        s = cls._work_buffer(z, None)
        cls._transform_(s, o)
        return s

    def ce(self, z, labels, o: RowOptions, *, want_grad=False, grad_scale=None, grad_out=None, scratch=False,
           all_valid=False):
        cd = compute_dtype(z.dtype)
        transformed = o.softcap is not None or o.temperature != 1.0
        s = z if z.dtype == cd else z.to(cd)
        if transformed and s is z and not scratch:
            s = s.clone()
        dtanh = self._transform_(s, o) if transformed else None
        # log_softmax is one fused pass; lse follows from any column: lse = s_0 - logp_0.
        logp = torch.log_softmax(s, dim=1)
        valid = labels != o.ignore_index
        y = torch.where(valid, labels, torch.zeros_like(labels)).long().unsqueeze(1)
        lse = s[:, 0] - logp[:, 0]
        eps = o.label_smoothing
        loss = -(1.0 - eps) * logp.gather(1, y).squeeze(1)
        if eps:
            loss = loss - eps * logp.mean(dim=1)
        if o.z_loss:
            loss = loss + o.z_loss * lse * lse
        zero = torch.zeros((), dtype=cd, device=z.device)
        loss = torch.where(valid, loss, zero)
        lse = torch.where(valid, lse, zero)
        if not want_grad:
            return loss, lse, None
        # g = a * [p (1 + 2 c lse) - eps/V - (1 - eps) onehot(y)], a = grad_scale * valid (per row)
        a = None if grad_scale is None else grad_scale.to(cd)
        if not all_valid:
            a = torch.where(valid, a if a is not None else torch.ones((), dtype=cd, device=z.device), zero)
        b = a if not o.z_loss else (1.0 + 2.0 * o.z_loss * lse) * (a if a is not None else 1.0)
        g = logp.exp_()
        if b is not None:
            g.mul_(b.unsqueeze(1))
        if eps:
            g.sub_((eps / s.shape[1]) * (a.unsqueeze(1) if a is not None else 1.0))
        onehot_coef = -(1.0 - eps) * (a if a is not None else torch.ones(g.shape[0], dtype=cd, device=z.device))
        g.scatter_add_(1, y, onehot_coef.unsqueeze(1))
        self._chain_(g, dtanh, o)
        if grad_out is not None:
            grad_out.copy_(g)
            return loss, lse, grad_out
        return loss, lse, g

    def logprob_fwd(self, z, targets, o: RowOptions, want_entropy: bool):
        s = self._read_only_view(z, o)
        valid = targets != o.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
        logp_all = torch.log_softmax(s, dim=1)  # one fused pass (logsumexp alone costs about twice as much)
        lse = s[:, 0] - logp_all[:, 0]
        zero = torch.zeros((), dtype=lse.dtype, device=lse.device)
        logp = torch.where(valid, logp_all.gather(1, y).squeeze(1), zero)
        lse = torch.where(valid, lse, zero)
        mean_s = None
        if want_entropy:  # E_p[s] = lse - H, H = -sum p log p
            entropy = -(logp_all.exp() * logp_all).sum(dim=1)
            mean_s = torch.where(valid, lse - entropy, zero)
        return logp, lse, mean_s

    def logprob_bwd(self, z, targets, lse, mean_s, g_logp, g_ent, o: RowOptions, grad_out):
        s = self._work_buffer(z, grad_out)
        dtanh = self._transform_(s, o)
        valid = targets != o.ignore_index
        y = torch.where(valid, targets, torch.zeros_like(targets)).long().unsqueeze(1)
        zero = torch.zeros((), dtype=s.dtype, device=s.device)
        g_logp = torch.where(valid, g_logp.to(s.dtype), zero)
        if g_ent is not None:
            g_ent = torch.where(valid, g_ent.to(s.dtype), zero)
            # -p * (g_logp + g_H (s - E[s])), built in place in s
            p = torch.exp(s - lse.unsqueeze(1))
            g = s.sub_(mean_s.unsqueeze(1)).mul_(g_ent.unsqueeze(1)).add_(g_logp.unsqueeze(1)).mul_(p).neg_()
        else:
            g = s.sub_(lse.unsqueeze(1)).exp_().mul_(-g_logp.unsqueeze(1))
        g.scatter_add_(1, y, g_logp.unsqueeze(1))
        self._chain_(g, dtanh, o)
        if grad_out is not g:
            grad_out.copy_(g)


TORCH_ROWS = TorchRows()
ROWS = TORCH_ROWS


# ------------------------------------------------------------------------------------------------- JSD rows


class TorchJSDRows:
    name = "torch"

    def jsd(self, zs, zt, labels, o: JSDRowOptions, *, want_grad=False, grad_scale=None, scratch=False):
        cd = compute_dtype(zs.dtype)
        s = zs.to(cd)
        t = zt.to(cd)
        if o.temperature != 1.0:
            s = s / o.temperature
            t = t / o.temperature
        log_q = torch.log_softmax(s, dim=1)
        log_p = torch.log_softmax(t, dim=1)
        del s, t
        q = log_q.exp()
        mode, beta = o.mode, o.beta
        if mode == 0:
            p = log_p.exp()
            loss = (p * (log_p - log_q)).sum(dim=1)
            g = q.sub_(p) if want_grad else None
        elif mode == 1:
            r = log_q.sub_(log_p)  # log q - log p
            loss = (q * r).sum(dim=1)
            g = r.sub_(loss.unsqueeze(1)).mul_(q) if want_grad else None
        else:
            log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log1p(-beta))
            kl_p = (log_p.exp() * (log_p - log_m)).sum(dim=1)
            d = log_q.sub_(log_m)  # log q - log m
            kl_q = (q * d).sum(dim=1)
            loss = beta * kl_p + (1.0 - beta) * kl_q
            g = d.sub_(kl_q.unsqueeze(1)).mul_(q).mul_(1.0 - beta) if want_grad else None
        zero = torch.zeros((), dtype=cd, device=zs.device)
        valid = None if labels is None else labels != o.ignore_index
        if valid is not None:
            loss = torch.where(valid, loss, zero)
        if not want_grad:
            return loss, None
        coef = torch.full((zs.shape[0],), 1.0 / o.temperature, dtype=cd, device=zs.device)
        if grad_scale is not None:
            coef = coef * grad_scale.to(cd)
        if valid is not None:
            coef = torch.where(valid, coef, zero)
        g.mul_(coef.unsqueeze(1))
        return loss, g


JSD_ROWS = TorchJSDRows()


# ------------------------------------------------------------------------------------------------ GRPO rows


def _ratio_term(w, a, p: GRPOParams, zero):
    """KIND 0 (clip), 2 (sapo) and 5 (unclipped ratio): (P, dP/dw, low, high) as functions of the log importance
    weight w."""
    r = torch.exp(w)
    if p.kind in (2, 5):
        never = torch.zeros(torch.broadcast_shapes(r.shape, a.shape), dtype=torch.bool, device=r.device)
        if p.kind == 5:
            return -a * r, -a * r, never, never
        tau = torch.where(a > 0, torch.full_like(a, p.tau_pos), torch.full_like(a, p.tau_neg))
        s = torch.sigmoid(tau * (r - 1.0))
        return -4.0 * s * a / tau, -4.0 * a * s * (1.0 - s) * r, never, never
    c1 = r.clamp(max=p.delta) if p.delta is not None else r
    c2 = r.clamp(p.lo, p.hi)
    t1, t2 = c1 * a, c2 * a
    dc1 = torch.where(r <= p.delta, r, zero) if p.delta is not None else r
    dc2 = torch.where((r >= p.lo) & (r <= p.hi), r, zero)
    dl = -a * torch.where(t1 < t2, dc1, torch.where(t2 < t1, dc2, 0.5 * (dc1 + dc2)))
    return -torch.minimum(t1, t2), dl, (c1 < p.lo) & (a < 0), (c1 > p.hi) & (a > 0)


def grpo_rows(logp, old, ref, mask, adv, norm, p: GRPOParams, want_grad: bool, pw=None) -> GRPORows:
    """The per-token terms on ``[R, C]`` rows in PyTorch ops (any device); formulas in ptkernels/kernels/grpo.py.
    ``adv``, ``norm`` and ``pw`` broadcast to ``[R, C]`` (``[R, 1]`` per row, ``[1, C]`` or ``[R, C]`` per
    token); everything in one compute dtype."""
    m = mask
    valid = m != 0
    dt = logp.dtype
    zero = torch.zeros((), dtype=dt, device=logp.device)
    pw = torch.ones((), dtype=dt, device=logp.device) if pw is None else pw
    pwm = torch.where(valid, pw * m, zero)
    lr = torch.where(valid, logp - old, zero)
    nm = norm * m
    low = high = None
    if p.seq_level:
        a = adv.expand(m.shape)[:, :1]
        len_ = m.sum(1, keepdim=True)
        len1 = len_.clamp(min=1.0)
        if p.kind == 4:  # GMPO: geometric mean of the clipped ratios, one term per row
            cl = lr.clamp(p.lo, p.hi)
            clipped = torch.where(a > 0, torch.minimum(lr, cl), torch.maximum(lr, cl))
            den = pwm.sum(1, keepdim=True).clamp(min=1.0)
            r = torch.exp((clipped * pwm).sum(1, keepdim=True) / den)
            row = -r * a
            # once per row, an empty one too: norm is GRPO's per-token 1 / (B max(L, 1))
            pol = torch.zeros_like(m)
            pol[:, :1] = norm.expand(m.shape)[:, :1] * len1 * row
            kept = torch.where(a > 0, lr <= p.hi, lr >= p.lo)
            dl = torch.where(kept, (len1 * row / den) * pw, zero)
        else:
            w = (lr * m).sum(1, keepdim=True) / len1
            r = torch.exp(w)
            if p.kind in (1, 3):
                coef = r.clamp(max=p.cap) if p.kind == 1 else torch.ones_like(r)
                pol = torch.where(valid, nm * pw * (-coef * a * logp), zero)
                dl = pw * (-coef * a)
                if p.kind == 1:
                    high = (r > p.cap) & (a > 0)
            else:
                l_seq, dl_seq, low, high = _ratio_term(w, a, p, zero)
                spwm = pwm.sum(1, keepdim=True)
                pol = torch.where(valid, nm * pw * l_seq, zero)
                dl = (dl_seq * spwm / len1).expand(m.shape)
    else:
        a = adv
        r = torch.exp(lr)
        if p.kind in (1, 3):
            coef = r.clamp(max=p.cap) if p.kind == 1 else torch.ones_like(r)
            l_tok, dl = -coef * a * logp, -coef * a
            if p.kind == 1:
                high = (r > p.cap) & (a > 0)
        else:
            l_tok, dl, low, high = _ratio_term(lr, a, p, zero)
        pol = torch.where(valid, nm * pw * l_tok, zero)
        dl = dl * pw
    if p.has_ref:
        x = torch.where(valid, ref - logp, zero)
        ex = torch.exp(x)
        k3 = ex - x - 1.0
        kr = k3 * r if p.bias_kl else k3
        kl = (m * kr).sum(1)
        pol = pol + torch.where(valid, nm * p.beta * kr, zero)
        if p.bias_kl and p.seq_level:
            dl = dl + p.beta * r * (1.0 - ex) + p.beta * r * (m * k3).sum(1, keepdim=True) / len1
        elif p.bias_kl:
            dl = dl + p.beta * r * (k3 + 1.0 - ex)
        else:
            dl = dl + p.beta * (1.0 - ex)
    else:
        kl = torch.zeros(m.shape[0], dtype=dt, device=logp.device)
    loss = pol.sum(1)
    never = torch.zeros(m.shape[0], dtype=dt, device=logp.device)
    if p.seq_level:
        low_r = low.squeeze(1).to(dt) if low is not None else never
        high_r = high.squeeze(1).to(dt) if high is not None else never
        region_r = low_r.logical_or(high_r).to(dt) if low is not None else high_r
    else:
        msum = lambda x: (x & valid).to(dt).mul(m).sum(1) if x is not None else never  # noqa: E731
        low_r, high_r = msum(low), msum(high)
        region_r = msum(low | high) if low is not None else high_r
    grad = torch.where(valid, nm * dl, zero) if want_grad else None
    return GRPORows(loss, kl, low_r, high_r, region_r, grad)


# ---------------------------------------------------------------------------------------- group advantages


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Bessel-corrected std of the non-NaN values (keepdim), NaN with fewer than 2 (TRL's ``nanstd``)."""
    if dim is None:
        x = x.reshape(-1)
        dim = 0
    valid = ~torch.isnan(x)
    cnt = valid.sum(dim, keepdim=True).to(x.dtype)
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    dev = torch.where(valid, x - mean, torch.zeros((), dtype=x.dtype, device=x.device))
    var = (dev * dev).sum(dim, keepdim=True) / (cnt - 1).clamp(min=1.0)
    return torch.where(cnt > 1, var.sqrt(), torch.full_like(var, math.nan))


def group_advantages(r, group_size: int, scale: str, eps: float):
    """GRPO advantages of ``r [N]`` (compute dtype, NaN = unscorable) in groups of ``group_size``; formulas in
    ops/grpo.py. NaN rewards stay out of the statistics (nanmean / Bessel nanstd) and get advantage 0."""
    grouped = r.view(-1, group_size)
    valid = ~torch.isnan(grouped)
    zero = torch.zeros((), dtype=r.dtype, device=r.device)
    mean = torch.nanmean(grouped, dim=1, keepdim=True)
    # All-equal groups: r - mean can be a rounding error away from 0; make it exactly 0.
    inf = torch.full((), math.inf, dtype=r.dtype, device=r.device)
    flat = (torch.where(valid, grouped, -inf).amax(dim=1, keepdim=True)
            == torch.where(valid, grouped, inf).amin(dim=1, keepdim=True))
    adv = torch.where(flat, zero, grouped - mean).reshape(-1)
    if scale != "none":
        std = (nanstd(grouped, 1).expand(-1, group_size) if scale == "group" else nanstd(r).expand(r.shape[0], 1))
        std = std.reshape(-1)
        adv = torch.where(adv == 0, adv, adv / std) if eps == 0 else adv / (std + eps)
    return torch.nan_to_num(adv, nan=0.0)


# ------------------------------------------------------------------------------------------------------ GAE


def gae(rewards, values, mask, gamma: float, lam: float):
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    valid = mask != 0
    r = torch.where(valid, rewards * mask, zero)
    v = torch.where(valid, values * mask, zero)
    b, t = v.shape
    adv = torch.empty_like(v)
    last = torch.zeros(b, dtype=v.dtype, device=v.device)
    next_v = torch.zeros(b, dtype=v.dtype, device=v.device)
    gl = gamma * lam
    for i in reversed(range(t)):
        last = r[:, i] + gamma * next_v - v[:, i] + gl * last
        adv[:, i] = last
        next_v = v[:, i]
    returns = torch.where(valid, (adv + v) * mask, zero)
    return torch.where(valid, adv * mask, zero), returns


# ------------------------------------------------------------------------------------------- segment sums


def _segment_sums(x2d, m2d, seg, n_seq, average):
    """(out [S], den [S]). Padded: x2d/m2d are [S, T], seg None. Packed: x2d/m2d are [total], seg [total]."""
    cd = compute_dtype(x2d.dtype)
    x = x2d.to(cd)
    m = None if m2d is None else m2d.to(cd)
    xm = x if m is None else x * m
    if seg is None:
        total = xm.sum(dim=-1)
        den = m.sum(dim=-1) if m is not None else torch.full((n_seq,), x.shape[-1], dtype=cd, device=x.device)
    else:
        total = torch.zeros(n_seq, dtype=cd, device=x.device).index_add_(0, seg, xm)
        w = m if m is not None else torch.ones_like(x)
        den = torch.zeros(n_seq, dtype=cd, device=x.device).index_add_(0, seg, w)
    if average:
        total = torch.where(den != 0, total / torch.where(den != 0, den, torch.ones_like(den)),
                            torch.zeros_like(total))
    return total, den


def _segment_sums_bwd(g, den, m2d, seg, shape, average, dtype):
    cd = g.dtype
    if average:
        g = torch.where(den != 0, g / torch.where(den != 0, den, torch.ones_like(den)), torch.zeros_like(g))
    per_tok = g.unsqueeze(-1).expand(shape) if seg is None else g.index_select(0, seg)
    if m2d is not None:
        per_tok = per_tok * m2d.to(cd)
    return per_tok.to(dtype).contiguous()


def sequence_fwd(x, mask, cu, seg, n_seq, seq_len, packed, average):
    """(out [S], den [S]). Padded: x, mask [S, T], seg None. Packed: x, mask [total], seg [total] (sequence ids)."""
    return _segment_sums(x, mask, seg, n_seq, average)


def sequence_bwd(g, den, mask, cu, seg, n_seq, seq_len, packed, average, shape, dtype):
    return _segment_sums_bwd(g, den, mask, seg, shape, average, dtype)
