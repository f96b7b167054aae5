"""Triton kernel for the GRPO surrogate: per-token clipped objective, k3 KL, clip indicators, their per-row
reductions and d loss / d logp, in one pass (two for sequence-level importance sampling).

Layout: ``logp, old, ref, mask [R, C]`` contiguous, one program per row, a loop over C. A row is one sequence
(``grpo_loss``; the fused op at importance_sampling_level="sequence") or one flat run of tokens (the fused op at
the token level, where every quantity is per token). ``adv`` and ``norm`` (the loss type's per-token weight
1 / normalizer) are read with explicit (row, column) strides, so a per-sequence value is a column stride of 0.

Per token, with w the log importance weight, A the advantage, lo = 1 - eps_low, hi = 1 + eps_high:
    r = exp(w);  c1 = min(r, delta) (delta optional);  c2 = clamp(r, lo, hi)
    l = -min(c1 A, c2 A) + beta k3,  k3 = exp(ref - logp) - (ref - logp) - 1
    dl/dw = -A * (dc1 if c1 A < c2 A, dc2 if c2 A < c1 A, (dc1 + dc2) / 2 on ties)   (PyTorch's rule for min)
    dc1 = r [r <= delta],  dc2 = r [lo <= r <= hi],  dk3/dlogp = 1 - exp(ref - logp)
Sequence level: w = sum_t m (logp - old) / max(L, 1), one w per row, and dw/dlogp_t = m_t / max(L, 1).
Outputs per row: loss = sum_t norm m l, kl = sum_t m k3, low/high/region = sum_t m [indicator] (token level)
or the row's indicator (sequence level); grad[t] = norm m dl/dlogp_t. Masked tokens (m = 0) are never read
into an exp, so garbage there (INVALID_LOGPROB, -inf) cannot make NaNs.

Each float parameter (lo, hi, delta, beta) comes as an (x_hi, x_lo) fp32 pair (kernels/scalars.py).
"""

import triton
import triton.language as tl

from .scalars import fp32_pair


@triton.jit
def _surrogate(w, A, lo, hi, delta, HAS_DELTA: tl.constexpr):
    r = tl.exp(w)
    if HAS_DELTA:
        c1 = tl.minimum(r, delta)
        dc1 = tl.where(r <= delta, r, 0.0)
    else:
        c1 = r
        dc1 = r
    c2 = tl.minimum(tl.maximum(r, lo), hi)
    dc2 = tl.where((r >= lo) & (r <= hi), r, 0.0)
    t1 = c1 * A
    t2 = c2 * A
    loss = -tl.minimum(t1, t2)
    d = tl.where(t1 < t2, dc1, tl.where(t2 < t1, dc2, 0.5 * (dc1 + dc2)))
    dloss = -A * d
    low = (c1 < lo) & (A < 0.0)
    high = (c1 > hi) & (A > 0.0)
    return loss, dloss, low, high


@triton.jit
def grpo_rows_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, adv_stride_r, adv_stride_c, norm_ptr, norm_stride_r,
    norm_stride_c, grad_ptr, loss_ptr, kl_ptr, low_ptr, high_ptr, region_ptr, n_cols,
    lo_hi, lo_lo, hi_hi, hi_lo, delta_hi, delta_lo, beta_hi, beta_lo,
    HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, SEQ_LEVEL: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    cols = tl.arange(0, BLOCK)
    lo = fp32_pair(lo_hi, lo_lo, COMPUTE)
    hi = fp32_pair(hi_hi, hi_lo, COMPUTE)
    delta = fp32_pair(delta_hi, delta_lo, COMPUTE)
    beta = fp32_pair(beta_hi, beta_lo, COMPUTE)
    loss_acc = tl.zeros([], dtype=COMPUTE)
    kl_acc = tl.zeros([], dtype=COMPUTE)
    low_acc = tl.zeros([], dtype=COMPUTE)
    high_acc = tl.zeros([], dtype=COMPUTE)
    region_acc = tl.zeros([], dtype=COMPUTE)
    if SEQ_LEVEL:
        # pass 1: the sequence's mean log-ratio, then its clipped objective and d l / d w
        sum_w = tl.zeros([], dtype=COMPUTE)
        sum_m = tl.zeros([], dtype=COMPUTE)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            inb = offs < n_cols
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            sum_w += tl.sum(tl.where(m != 0.0, (lp - od) * m, 0.0), axis=0)
            sum_m += tl.sum(m, axis=0)
        len1 = tl.maximum(sum_m, 1.0)
        a_seq = tl.load(adv_ptr + row * adv_stride_r).to(COMPUTE)
        n_seq = tl.load(norm_ptr + row * norm_stride_r).to(COMPUTE)
        l_seq, dl_seq, low_s, high_s = _surrogate(sum_w / len1, a_seq, lo, hi, delta, HAS_DELTA)
        g_seq = dl_seq * (sum_m / len1)
        loss_acc += n_seq * sum_m * l_seq
        low_acc += tl.where(low_s, 1.0, 0.0)
        high_acc += tl.where(high_s, 1.0, 0.0)
        region_acc += tl.where(low_s | high_s, 1.0, 0.0)
    # pass 2 (the only one at the token level): per-token terms, KL, gradient
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        inb = offs < n_cols
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        valid = m != 0.0
        if SEQ_LEVEL:
            n = n_seq
            g = tl.zeros([BLOCK], dtype=COMPUTE) + g_seq
        else:
            od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            a = tl.load(adv_ptr + row * adv_stride_r + offs * adv_stride_c, mask=inb, other=0.0).to(COMPUTE)
            n = tl.load(norm_ptr + row * norm_stride_r + offs * norm_stride_c, mask=inb, other=0.0).to(COMPUTE)
            w = tl.where(valid, lp - od, 0.0)
            l_tok, g, low_t, high_t = _surrogate(w, a, lo, hi, delta, HAS_DELTA)
            loss_acc += tl.sum(tl.where(valid, n * m * l_tok, 0.0), axis=0)
            low_acc += tl.sum(tl.where(low_t & valid, m, 0.0), axis=0)
            high_acc += tl.sum(tl.where(high_t & valid, m, 0.0), axis=0)
            region_acc += tl.sum(tl.where((low_t | high_t) & valid, m, 0.0), axis=0)
        if HAS_REF:
            rf = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            x = tl.where(valid, rf - lp, 0.0)
            ex = tl.exp(x)
            k3 = ex - x - 1.0
            kl_acc += tl.sum(m * k3, axis=0)
            loss_acc += tl.sum(n * m * beta * k3, axis=0)
            g = g + beta * (1.0 - ex)
        if WRITE_GRAD:
            tl.store(grad_ptr + base + offs, tl.where(valid, n * m * g, 0.0), mask=inb)
    tl.store(loss_ptr + row, loss_acc)
    tl.store(kl_ptr + row, kl_acc)
    tl.store(low_ptr + row, low_acc)
    tl.store(high_ptr + row, high_acc)
    tl.store(region_ptr + row, region_acc)
