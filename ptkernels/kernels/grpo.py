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
KIND 5 unclipped ratio (kl_cov; its selected tokens' |logp - old| term is added outside): P = -A r; dP/dw = -A r
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
def _sapo_term(w, A, tau_pos, tau_neg):
    r = tl.exp(w)
    tau = tl.where(A > 0.0, tau_pos, tau_neg)
    s = tl.sigmoid(tau * (r - 1.0))
    never = (A < 0.0) & (A > 0.0)  # SAPO has no clip indicators
    return -4.0 * s * A / tau, -4.0 * A * s * (1.0 - s) * r, never, never


@triton.jit
def _unclipped_term(w, A):
    r = tl.exp(w)
    never = (A < 0.0) & (A > 0.0)  # no clip, no indicators
    return -A * r, -A * r, never, never


@triton.jit
def _ratio_term(w, A, lo, hi, delta, tau_pos, tau_neg, KIND: tl.constexpr, HAS_DELTA: tl.constexpr):
    """The policy term as a function of w (KIND 0, 2 and 5): (P, dP/dw, low, high)."""
    if KIND == 2:
        return _sapo_term(w, A, tau_pos, tau_neg)
    elif KIND == 5:
        return _unclipped_term(w, A)
    else:
        return _clip_surrogate(w, A, lo, hi, delta, HAS_DELTA)


@triton.jit
def _load_pw(pw_ptr, row, pw_stride_r, pw_stride_c, offs, inb, HAS_PW: tl.constexpr, BLOCK: tl.constexpr,
             COMPUTE: tl.constexpr):
    if HAS_PW:
        return tl.load(pw_ptr + row * pw_stride_r + offs * pw_stride_c, mask=inb, other=0.0).to(COMPUTE)
    else:
        return tl.zeros([BLOCK], dtype=COMPUTE) + 1.0


@triton.jit
def _sequence_sums(logp_ptr, old_ptr, ref_ptr, mask_ptr, pw_ptr, pw_stride_r, pw_stride_c, row, base, n_cols,
                   a_seq, lo, hi, HAS_REF: tl.constexpr, KIND: tl.constexpr, BIAS_KL: tl.constexpr,
                   HAS_PW: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """Pass 1 of a sequence row: sum m lr (GMPO: sum m pw clip(lr)), sum m, sum m pw and sum m k3."""
    cols = tl.arange(0, BLOCK)
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
        pw = _load_pw(pw_ptr, row, pw_stride_r, pw_stride_c, offs, inb, HAS_PW, BLOCK, COMPUTE)
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
    return sum_w, sum_m, sum_pwm, sum_k3


@triton.jit
def _sequence_policy(sum_w, sum_m, sum_pwm, a_seq, n_seq, lo, hi, delta, cap, tau_pos, tau_neg,
                     KIND: tl.constexpr, HAS_DELTA: tl.constexpr, COMPUTE: tl.constexpr):
    """A sequence row's ratio and its row-level terms: (loss, low, high, region, r, g, c) with g the row's
    d l / d w share of each token (KIND 0, 2, 4) and c cispo's detached coefficient."""
    len1 = tl.maximum(sum_m, 1.0)
    zero = tl.zeros([], dtype=COMPUTE)
    r_seq = tl.exp(sum_w / len1)
    if KIND == 4:
        den = tl.maximum(sum_pwm, 1.0)
        r_seq = tl.exp(sum_w / den)
        # -exp(w) A once per row (an empty row too, as TRL): norm is GRPO's 1 / (B max(L, 1)) per token
        out = (n_seq * len1 * (-r_seq * a_seq), zero, zero, zero, r_seq, len1 * (-r_seq * a_seq) / den, zero + 1.0)
    elif KIND == 1:
        high_s = zero + tl.where((r_seq > cap) & (a_seq > 0.0), 1.0, 0.0)
        out = (zero, zero, high_s, high_s, r_seq, zero, tl.minimum(r_seq, cap))
    elif KIND == 3:
        out = (zero, zero, zero, zero, r_seq, zero, zero + 1.0)
    else:
        l_seq, dl_seq, low_s, high_s = _ratio_term(sum_w / len1, a_seq, lo, hi, delta, tau_pos, tau_neg, KIND,
                                                   HAS_DELTA)
        out = (n_seq * sum_pwm * l_seq, zero + tl.where(low_s, 1.0, 0.0), zero + tl.where(high_s, 1.0, 0.0),
               zero + tl.where(low_s | high_s, 1.0, 0.0), r_seq, dl_seq * sum_pwm / len1, zero + 1.0)
    return out


@triton.jit
def _sequence_pass(logp_ptr, old_ptr, ref_ptr, mask_ptr, pw_ptr, pw_stride_r, pw_stride_c, row, base, n_cols, a_seq,
                   n_seq, lo, hi, delta, beta, cap, tau_pos, tau_neg, HAS_REF: tl.constexpr, HAS_DELTA: tl.constexpr,
                   KIND: tl.constexpr, BIAS_KL: tl.constexpr, HAS_PW: tl.constexpr, BLOCK: tl.constexpr,
                   COMPUTE: tl.constexpr):
    """Pass 1 of a sequence row: ``_sequence_policy``'s values and the bias-corrected KL's share of each token's
    gradient through the shared ratio (beta r K / max(L, 1), K = sum_s m_s k3_s)."""
    sum_w, sum_m, sum_pwm, sum_k3 = _sequence_sums(
        logp_ptr, old_ptr, ref_ptr, mask_ptr, pw_ptr, pw_stride_r, pw_stride_c, row, base, n_cols, a_seq, lo, hi,
        HAS_REF, KIND, BIAS_KL, HAS_PW, BLOCK, COMPUTE)
    l_row, low_row, high_row, region_row, r_seq, g_seq, c_seq = _sequence_policy(
        sum_w, sum_m, sum_pwm, a_seq, n_seq, lo, hi, delta, cap, tau_pos, tau_neg, KIND, HAS_DELTA, COMPUTE)
    g_kl_seq = tl.zeros([], dtype=COMPUTE)
    if HAS_REF and BIAS_KL and KIND != 4:
        g_kl_seq = beta * r_seq * sum_k3 / tl.maximum(sum_m, 1.0)
    return l_row, low_row, high_row, region_row, r_seq, g_seq, c_seq, g_kl_seq


@triton.jit
def _sequence_token_policy(lp, od, valid, m, pw, a_seq, n_seq, g_seq, c_seq, g_kl_seq, lo, hi,
                           KIND: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """Pass 2 of a sequence row, the policy part: (loss added, d l / d logp before the token KL)."""
    zero = tl.zeros([], dtype=COMPUTE)
    if KIND == 4:
        lr = tl.where(valid, lp - od, 0.0)
        kept = tl.where(a_seq > 0.0, lr <= hi, lr >= lo)
        return zero, tl.where(kept, g_seq * pw, 0.0)
    elif KIND == 1 or KIND == 3:
        loss = tl.sum(tl.where(valid, n_seq * m * pw * (-c_seq * a_seq * lp), 0.0), axis=0)
        return loss, pw * (-c_seq * a_seq) + g_kl_seq
    else:
        return zero, tl.zeros([BLOCK], dtype=COMPUTE) + g_seq + g_kl_seq


@triton.jit
def _token_policy(lp, od, valid, a, lo, hi, delta, cap, tau_pos, tau_neg, KIND: tl.constexpr,
                  HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr, COMPUTE: tl.constexpr):
    """A token row's policy term by loss type: (P, dP/dlogp, low, high, r)."""
    w = tl.where(valid, lp - od, 0.0)
    r = tl.exp(w)
    if KIND == 1:
        coef = tl.minimum(r, cap)
        never = (a < 0.0) & (a > 0.0)
        return -coef * a * lp, -coef * a, never, (r > cap) & (a > 0.0), r
    elif KIND == 3:
        never = (a < 0.0) & (a > 0.0)
        return -a * lp, -a + tl.zeros([BLOCK], dtype=COMPUTE), never, never, r
    else:
        l_tok, g, low_t, high_t = _ratio_term(w, a, lo, hi, delta, tau_pos, tau_neg, KIND, HAS_DELTA)
        return l_tok, g, low_t, high_t, r


@triton.jit
def _kl_term(ref_ptr, base, offs, inb, lp, valid, m, n, r, beta, SEQ_LEVEL: tl.constexpr, BIAS_KL: tl.constexpr,
             COMPUTE: tl.constexpr):
    """The k3 KL of a block: (kl added, loss added, d l / d logp added)."""
    rf = tl.load(ref_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
    x = tl.where(valid, rf - lp, 0.0)
    ex = tl.exp(x)
    k3 = ex - x - 1.0
    if BIAS_KL:
        if SEQ_LEVEL:
            g = beta * r * (1.0 - ex)
        else:
            g = beta * r * (k3 + 1.0 - ex)
        return (tl.sum(m * k3 * r, axis=0), tl.sum(tl.where(valid, n * m * beta * k3 * r, 0.0), axis=0), g)
    else:
        return (tl.sum(m * k3, axis=0), tl.sum(tl.where(valid, n * m * beta * k3, 0.0), axis=0),
                beta * (1.0 - ex))


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
    if SEQ_LEVEL:
        # pass 1: the sequence's (clipped, for GMPO) mean log-ratio, then its row-level term and d l / d w
        a_seq = tl.load(adv_ptr + row * adv_stride_r).to(COMPUTE)
        n_seq = tl.load(norm_ptr + row * norm_stride_r).to(COMPUTE)
        l_row, low_row, high_row, region_row, r_seq, g_seq, c_seq, g_kl_seq = _sequence_pass(
            logp_ptr, old_ptr, ref_ptr, mask_ptr, pw_ptr, pw_stride_r, pw_stride_c, row, base, n_cols, a_seq, n_seq,
            lo, hi, delta, beta, cap, tau_pos, tau_neg, HAS_REF, HAS_DELTA, KIND, BIAS_KL, HAS_PW, BLOCK, COMPUTE)
        loss_acc += l_row
        low_acc += low_row
        high_acc += high_row
        region_acc += region_row
    # pass 2 (the only one at the token level): per-token terms, KL, gradient
    for start in range(0, n_cols, BLOCK):
        offs = start + cols
        inb = offs < n_cols
        m = tl.load(mask_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        lp = tl.load(logp_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        od = tl.load(old_ptr + base + offs, mask=inb, other=0.0).to(COMPUTE)
        valid = m != 0.0
        pw = _load_pw(pw_ptr, row, pw_stride_r, pw_stride_c, offs, inb, HAS_PW, BLOCK, COMPUTE)
        if SEQ_LEVEL:
            n = n_seq
            r = tl.zeros([BLOCK], dtype=COMPUTE) + r_seq
            l_add, g = _sequence_token_policy(lp, od, valid, m, pw, a_seq, n_seq, g_seq, c_seq, g_kl_seq, lo, hi,
                                              KIND, BLOCK, COMPUTE)
            loss_acc += l_add
        else:
            a = tl.load(adv_ptr + row * adv_stride_r + offs * adv_stride_c, mask=inb, other=0.0).to(COMPUTE)
            n = tl.load(norm_ptr + row * norm_stride_r + offs * norm_stride_c, mask=inb, other=0.0).to(COMPUTE)
            l_tok, g, low_t, high_t, r = _token_policy(lp, od, valid, a, lo, hi, delta, cap, tau_pos, tau_neg,
                                                       KIND, HAS_DELTA, BLOCK, COMPUTE)
            g = g * pw
            low_acc += tl.sum(tl.where(low_t & valid, m, 0.0), axis=0)
            high_acc += tl.sum(tl.where(high_t & valid, m, 0.0), axis=0)
            region_acc += tl.sum(tl.where((low_t | high_t) & valid, m, 0.0), axis=0)
            loss_acc += tl.sum(tl.where(valid, n * m * pw * l_tok, 0.0), axis=0)
        if HAS_REF:
            kl_add, l_add, g_add = _kl_term(ref_ptr, base, offs, inb, lp, valid, m, n, r, beta, SEQ_LEVEL, BIAS_KL,
                                            COMPUTE)
            kl_acc += kl_add
            loss_acc += l_add
            g = g + g_add
        if WRITE_GRAD:
            tl.store(grad_ptr + base + offs, tl.where(valid, n * m * g, 0.0), mask=inb)
    tl.store(loss_ptr + row, loss_acc)
    tl.store(kl_ptr + row, kl_acc)
    tl.store(low_ptr + row, low_acc)
    tl.store(high_ptr + row, high_acc)
    tl.store(region_ptr + row, region_acc)
