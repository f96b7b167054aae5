"""Triton kernel for the GRPO family's per-token loss: the policy term of every loss type, the k3 KL (optionally
bias-corrected), clip indicators, their per-row reductions and d loss / d logp, in one pass (two when a row's
terms need a whole-sequence quantity first: sequence-level ratios, GMPO, the bias-corrected KL at sequence level).

Layout: ``logp, old, ref, mask [R, C]`` contiguous, one program per row, a loop over C. A row is one sequence
(``grpo_loss``; the fused op when it chunks whole sequences) or one flat run of tokens (the fused op at the token
level). ``adv``, ``norm`` (the loss type's per-token weight 1 / normalizer) and ``pw`` (the policy term's
per-token weight: off-policy mask x entropy mask x sampler importance weight x VESPO's phi; 1 without HAS_PW) are
read with explicit (row, column) strides, so a per-sequence value is a column stride of 0.

Per token, w the log importance weight (token: logp - old; sequence: the row's masked mean), A the advantage,
r = exp(w), lo/hi the clip bounds, P the per-token policy term, then
    l = pw * P + beta * k3 * (r if BIAS_KL else 1),   k3 = exp(ref - logp) - (ref - logp) - 1
KIND 0 clip (grpo, bnpo, dr_grpo, dapo, luspo): c1 = min(r, delta); c2 = clamp(r, lo, hi); P = -min(c1 A, c2 A)
     dP/dw = -A * (dc1 if c1 A < c2 A, dc2 if c2 A < c1 A, (dc1 + dc2) / 2 on ties)   (PyTorch's rule for min)
KIND 1 cispo: P = -min(r, cap) A logp, the coefficient detached: dP/dlogp = -min(r, cap) A
KIND 2 sapo:  tau = tau_pos if A > 0 else tau_neg; s = sigmoid(tau (r - 1)); P = -4 s A / tau; dP/dw = -4 A s (1 - s) r
KIND 3 pg (vespo, its phi in pw): P = -A logp; dP/dlogp = -A
KIND 4 gmpo (sequence rows only): w = sum_t m pw clip_t / max(sum_t m pw, 1) with clip_t the log-ratio clipped into
     [lo, hi] on the side A favours (min for A > 0, max otherwise); P_row = -exp(w) A, counted once per row as
     norm * max(L, 1) * P_row (norm is GRPO's per-token 1 / (B max(L, 1)), which the KL term uses as is).
Sequence level: dw/dlogp_t = m_t / max(L, 1); the bias-corrected KL also flows through the shared r:
d/dlogp_t sum_s m_s k3_s r = m_t r (1 - exp(ref_t - logp_t)) + r K m_t / max(L, 1), K = sum_s m_s k3_s.
Outputs per row: loss = sum_t norm m l, kl = sum_t m k3 (x r when BIAS_KL, as TRL logs it), low/high/region =
sum_t m [indicator] (token level) or the row's indicator (sequence level); grad[t] = norm m dl/dlogp_t. Masked
tokens (m = 0) are never read into an exp, so garbage there (INVALID_LOGPROB, -inf) cannot make NaNs.

Each float parameter comes as an (x_hi, x_lo) fp32 pair (kernels/scalars.py).
"""

import triton
import triton.language as tl

from .scalars import fp32_pair


@triton.jit
def _clip_surrogate(w, A, lo, hi, delta, HAS_DELTA: tl.constexpr):
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
def _ratio_term(w, A, lo, hi, delta, tau_pos, tau_neg, KIND: tl.constexpr, HAS_DELTA: tl.constexpr):
    """The part of the policy term that is a function of w (KIND 0 and 2): (P, dP/dw, low, high)."""
    if KIND == 2:
        r = tl.exp(w)
        tau = tl.where(A > 0.0, tau_pos, tau_neg)
        s = tl.sigmoid(tau * (r - 1.0))
        loss = -4.0 * s * A / tau
        dloss = -4.0 * A * s * (1.0 - s) * r
        never = (A < 0.0) & (A > 0.0)  # SAPO has no clip indicators
        return loss, dloss, never, never
    else:
        return _clip_surrogate(w, A, lo, hi, delta, HAS_DELTA)


@triton.jit
def grpo_rows_kernel(
    logp_ptr, old_ptr, ref_ptr, mask_ptr, adv_ptr, adv_stride_r, adv_stride_c, norm_ptr, norm_stride_r,
    norm_stride_c, pw_ptr, pw_stride_r, pw_stride_c, grad_ptr, loss_ptr, kl_ptr, low_ptr, high_ptr, region_ptr,
    n_cols, lo_hi, lo_lo, hi_hi, hi_lo, delta_hi, delta_lo, beta_hi, beta_lo, cap_hi, cap_lo, tp_hi, tp_lo,
    tn_hi, tn_lo,
    HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr, SEQ_LEVEL: tl.constexpr, WRITE_GRAD: tl.constexpr,
    KIND: tl.constexpr, BIAS_KL: tl.constexpr, HAS_PW: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    cols = tl.arange(0, BLOCK)
    lo = fp32_pair(lo_hi, lo_lo, COMPUTE)
    hi = fp32_pair(hi_hi, hi_lo, COMPUTE)
    delta = fp32_pair(delta_hi, delta_lo, COMPUTE)
    beta = fp32_pair(beta_hi, beta_lo, COMPUTE)
    cap = fp32_pair(cap_hi, cap_lo, COMPUTE)
    tau_pos = fp32_pair(tp_hi, tp_lo, COMPUTE)
    tau_neg = fp32_pair(tn_hi, tn_lo, COMPUTE)
    loss_acc = tl.zeros([], dtype=COMPUTE)
    kl_acc = tl.zeros([], dtype=COMPUTE)
    low_acc = tl.zeros([], dtype=COMPUTE)
    high_acc = tl.zeros([], dtype=COMPUTE)
    region_acc = tl.zeros([], dtype=COMPUTE)
    # per-row values of the sequence level (defined on every path so the compiler sees one type)
    r_seq = tl.zeros([], dtype=COMPUTE) + 1.0
    g_seq = tl.zeros([], dtype=COMPUTE)
    g_kl_seq = tl.zeros([], dtype=COMPUTE)
    c_seq = tl.zeros([], dtype=COMPUTE) + 1.0
    n_seq = tl.zeros([], dtype=COMPUTE)
    a_seq = tl.zeros([], dtype=COMPUTE)
    len1 = tl.zeros([], dtype=COMPUTE) + 1.0
    if SEQ_LEVEL:
        # pass 1: the sequence's (clipped, for GMPO) mean log-ratio, then its row-level term and d l / d w
        a_seq = tl.load(adv_ptr + row * adv_stride_r).to(COMPUTE)
        n_seq = tl.load(norm_ptr + row * norm_stride_r).to(COMPUTE)
        sum_w = tl.zeros([], dtype=COMPUTE)
        sum_m = tl.zeros([], dtype=COMPUTE)
        sum_pwm = tl.zeros([], dtype=COMPUTE)
        sum_k3 = tl.zeros([], dtype=COMPUTE)
        for start in range(0, n_cols, BLOCK):
            offs = start + cols
            inb = offs < n_cols
            m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            valid = m != 0.0
            lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            if HAS_PW:
                pw = tl.load(pw_ptr + row * pw_stride_r + offs * pw_stride_c, mask=inb, other=0.0).to(COMPUTE)
            else:
                pw = tl.zeros([BLOCK], dtype=COMPUTE) + 1.0
            lr = tl.where(valid, lp - od, 0.0)
            if KIND == 4:
                cl = tl.minimum(tl.maximum(lr, lo), hi)
                lr = tl.where(a_seq > 0.0, tl.minimum(lr, cl), tl.maximum(lr, cl))
                sum_w += tl.sum(tl.where(valid, lr * m * pw, 0.0), axis=0)
            else:
                sum_w += tl.sum(tl.where(valid, lr * m, 0.0), axis=0)
            sum_m += tl.sum(m, axis=0)
            sum_pwm += tl.sum(tl.where(valid, m * pw, 0.0), axis=0)
            if HAS_REF and BIAS_KL:
                rf = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
                x = tl.where(valid, rf - lp, 0.0)
                sum_k3 += tl.sum(m * (tl.exp(x) - x - 1.0), axis=0)
        len1 = tl.maximum(sum_m, 1.0)
        if KIND == 4:
            den = tl.maximum(sum_pwm, 1.0)
            r_seq = tl.exp(sum_w / den)
            # -exp(w) A once per row (an empty row too, as TRL): norm is GRPO's 1 / (B max(L, 1)) per token
            loss_acc += n_seq * len1 * (-r_seq * a_seq)
            g_seq = len1 * (-r_seq * a_seq) / den  # times pw_t [not clipped]_t in pass 2
        else:
            w_seq = sum_w / len1
            r_seq = tl.exp(w_seq)
            if KIND == 1:
                c_seq = tl.minimum(r_seq, cap)
                high_s = (r_seq > cap) & (a_seq > 0.0)
                high_acc += tl.where(high_s, 1.0, 0.0)
                region_acc += tl.where(high_s, 1.0, 0.0)
            elif KIND == 0 or KIND == 2:
                l_seq, dl_seq, low_s, high_s = _ratio_term(w_seq, a_seq, lo, hi, delta, tau_pos, tau_neg, KIND,
                                                           HAS_DELTA)
                loss_acc += n_seq * sum_pwm * l_seq
                g_seq = dl_seq * sum_pwm / len1
                low_acc += tl.where(low_s, 1.0, 0.0)
                high_acc += tl.where(high_s, 1.0, 0.0)
                region_acc += tl.where(low_s | high_s, 1.0, 0.0)
            if HAS_REF and BIAS_KL:
                g_kl_seq = beta * r_seq * sum_k3 / len1
    # pass 2 (the only one at the token level): per-token terms, KL, gradient
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        inb = offs < n_cols
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        valid = m != 0.0
        if HAS_PW:
            pw = tl.load(pw_ptr + row * pw_stride_r + offs * pw_stride_c, mask=inb, other=0.0).to(COMPUTE)
        else:
            pw = tl.zeros([BLOCK], dtype=COMPUTE) + 1.0
        if SEQ_LEVEL:
            n = n_seq
            r = tl.zeros([BLOCK], dtype=COMPUTE) + r_seq
            if KIND == 4:
                od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
                lr = tl.where(valid, lp - od, 0.0)
                kept = tl.where(a_seq > 0.0, lr <= hi, lr >= lo)
                g = tl.where(kept, g_seq * pw, 0.0)
            elif KIND == 1 or KIND == 3:
                coef = c_seq if KIND == 1 else 1.0
                loss_acc += tl.sum(tl.where(valid, n * m * pw * (-coef * a_seq * lp), 0.0), axis=0)
                g = pw * (-coef * a_seq) + g_kl_seq
            else:
                g = tl.zeros([BLOCK], dtype=COMPUTE) + g_seq + g_kl_seq
        else:
            od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            a = tl.load(adv_ptr + row * adv_stride_r + offs * adv_stride_c, mask=inb, other=0.0).to(COMPUTE)
            n = tl.load(norm_ptr + row * norm_stride_r + offs * norm_stride_c, mask=inb, other=0.0).to(COMPUTE)
            w = tl.where(valid, lp - od, 0.0)
            r = tl.exp(w)
            if KIND == 1 or KIND == 3:
                if KIND == 1:
                    coef = tl.minimum(r, cap)
                    high_t = (r > cap) & (a > 0.0)
                    high_acc += tl.sum(tl.where(high_t & valid, m, 0.0), axis=0)
                    region_acc += tl.sum(tl.where(high_t & valid, m, 0.0), axis=0)
                else:
                    coef = tl.zeros([BLOCK], dtype=COMPUTE) + 1.0
                l_tok = -coef * a * lp
                g = -coef * a * pw
            else:
                l_tok, g, low_t, high_t = _ratio_term(w, a, lo, hi, delta, tau_pos, tau_neg, KIND, HAS_DELTA)
                g = g * pw
                low_acc += tl.sum(tl.where(low_t & valid, m, 0.0), axis=0)
                high_acc += tl.sum(tl.where(high_t & valid, m, 0.0), axis=0)
                region_acc += tl.sum(tl.where((low_t | high_t) & valid, m, 0.0), axis=0)
            loss_acc += tl.sum(tl.where(valid, n * m * pw * l_tok, 0.0), axis=0)
        if HAS_REF:
            rf = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
            x = tl.where(valid, rf - lp, 0.0)
            ex = tl.exp(x)
            k3 = ex - x - 1.0
            if BIAS_KL:
                kl_acc += tl.sum(m * k3 * r, axis=0)
                loss_acc += tl.sum(tl.where(valid, n * m * beta * k3 * r, 0.0), axis=0)
                if SEQ_LEVEL:
                    g = g + beta * r * (1.0 - ex)
                else:
                    g = g + beta * r * (k3 + 1.0 - ex)
            else:
                kl_acc += tl.sum(m * k3, axis=0)
                loss_acc += tl.sum(tl.where(valid, n * m * beta * k3, 0.0), axis=0)
                g = g + beta * (1.0 - ex)
        if WRITE_GRAD:
            tl.store(grad_ptr + base + offs, tl.where(valid, n * m * g, 0.0), mask=inb)
    tl.store(loss_ptr + row, loss_acc)
    tl.store(kl_ptr + row, kl_acc)
    tl.store(low_ptr + row, low_acc)
    tl.store(high_ptr + row, high_acc)
    tl.store(region_ptr + row, region_acc)
