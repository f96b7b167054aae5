"""Triton row kernels over one chunk of logits ``z [rows, V]``: one program per row, a loop over V.

Pass 1 streams the row once for the online log-sum-exp (plus sum(s) for label smoothing, or E_p[s] for the
entropy); pass 2, when a gradient is wanted, streams it again and writes dL/dz in place of (or beside) z.
All math is in fp32 (fp64 for fp64 input) whatever the storage dtype. Row offsets are int64: rows x stride
passes 2^31 at Llama-3 vocabulary sizes. Rows whose label is ``ignore_index`` exit early (loss 0, zero grad).

The logit transform ``s = softcap * tanh(z / softcap) / temperature`` and its derivative
``ds/dz = (1 - tanh^2) / temperature`` are applied in-register; tanh is written with exp so that it exists in
every Triton version (3.6+) and in the interpreter.
"""

import triton
import triton.language as tl

from .scalars import fp32_pair


@triton.jit
def _transform(z, softcap, inv_temp, HAS_SOFTCAP: tl.constexpr):
    """Returns (s, t) with s the transformed logits and t = tanh(z / softcap) (0 without soft capping)."""
    if HAS_SOFTCAP:
        x = z / softcap
        e = tl.exp(-2.0 * tl.abs(x))
        t = (1.0 - e) / (1.0 + e)
        t = tl.where(x < 0, -t, t)
        s = softcap * t * inv_temp
    else:
        t = z * 0.0
        s = z * inv_temp
    return s, t


@triton.jit
def ce_rows_kernel(
    z_ptr, z_stride, grad_ptr, grad_stride, labels_ptr, scale_ptr, scale_stride, loss_ptr, lse_ptr,
    n_cols, ignore_index, label_smoothing_hi, label_smoothing_lo, z_loss_hi, z_loss_lo, softcap_hi, softcap_lo,
    inv_temp_hi, inv_temp_lo,
    HAS_SOFTCAP: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr,
):
    label_smoothing = fp32_pair(label_smoothing_hi, label_smoothing_lo, COMPUTE)
    z_loss = fp32_pair(z_loss_hi, z_loss_lo, COMPUTE)
    softcap = fp32_pair(softcap_hi, softcap_lo, COMPUTE)
    inv_temp = fp32_pair(inv_temp_hi, inv_temp_lo, COMPUTE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(loss_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WRITE_GRAD:
            g_row = grad_ptr + row * grad_stride
            for start in range(0, n_cols, BLOCK_V):
                offs = start + cols
                tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=COMPUTE).to(grad_ptr.dtype.element_ty),
                         mask=offs < n_cols)
        return
    # pass 1: online max / sum of exp, and the sum of s for label smoothing
    m = tl.full([], float("-inf"), dtype=COMPUTE)
    d = tl.zeros([], dtype=COMPUTE)
    s_sum = tl.zeros([], dtype=COMPUTE)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(COMPUTE)
        s, _ = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        d = d * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new), axis=0)
        s_sum += tl.sum(tl.where(mask, s, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    z_y = tl.load(z_row + label).to(COMPUTE)
    s_y, _ = _transform(z_y, softcap, inv_temp, HAS_SOFTCAP)
    loss = (1.0 - label_smoothing) * (lse - s_y) + label_smoothing * (lse - s_sum / n_cols) + z_loss * lse * lse
    tl.store(loss_ptr + row, loss)
    tl.store(lse_ptr + row, lse)
    if WRITE_GRAD:
        # pass 2: dL/dz = scale * (p (1 + 2 c lse) - eps/V - (1-eps) onehot) * ds/dz
        scale = tl.load(scale_ptr + row * scale_stride).to(COMPUTE)
        p_coef = scale * (1.0 + 2.0 * z_loss * lse)
        g_row = grad_ptr + row * grad_stride
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            z = tl.load(z_row + offs, mask=mask, other=0.0).to(COMPUTE)
            s, t = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
            g = p_coef * tl.exp(s - lse) - scale * (label_smoothing / n_cols)
            g = tl.where(offs == label, g - scale * (1.0 - label_smoothing), g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            g = g * inv_temp
            tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def logprob_rows_fwd_kernel(
    z_ptr, z_stride, targets_ptr, logp_ptr, lse_ptr, mean_s_ptr,
    n_cols, ignore_index, softcap_hi, softcap_lo, inv_temp_hi, inv_temp_lo,
    HAS_SOFTCAP: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr,
):
    softcap = fp32_pair(softcap_hi, softcap_lo, COMPUTE)
    inv_temp = fp32_pair(inv_temp_hi, inv_temp_lo, COMPUTE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    if target == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(lse_ptr + row, 0.0)
        if WANT_ENTROPY:
            tl.store(mean_s_ptr + row, 0.0)
        return
    m = tl.full([], float("-inf"), dtype=COMPUTE)
    d = tl.zeros([], dtype=COMPUTE)
    a = tl.zeros([], dtype=COMPUTE)  # sum exp(s - m) * s, rescaled with m, for E_p[s]
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(COMPUTE)
        s, _ = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
        s = tl.where(mask, s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=0))
        alpha = tl.exp(m - m_new)
        e = tl.exp(s - m_new)
        d = d * alpha + tl.sum(e, axis=0)
        if WANT_ENTROPY:  # masked lanes: e = 0 and s = -inf, so take s = 0 there to avoid 0 * inf
            a = a * alpha + tl.sum(e * tl.where(mask, s, 0.0), axis=0)
        m = m_new
    lse = m + tl.log(d)
    z_t = tl.load(z_row + target).to(COMPUTE)
    s_t, _ = _transform(z_t, softcap, inv_temp, HAS_SOFTCAP)
    tl.store(logp_ptr + row, s_t - lse)
    tl.store(lse_ptr + row, lse)
    if WANT_ENTROPY:
        tl.store(mean_s_ptr + row, a / d)


@triton.jit
def logprob_rows_bwd_kernel(
    z_ptr, z_stride, grad_ptr, grad_stride, targets_ptr, lse_ptr, mean_s_ptr, g_logp_ptr, g_ent_ptr,
    n_cols, ignore_index, softcap_hi, softcap_lo, inv_temp_hi, inv_temp_lo,
    HAS_SOFTCAP: tl.constexpr, HAS_ENTROPY_GRAD: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr,
):
    softcap = fp32_pair(softcap_hi, softcap_lo, COMPUTE)
    inv_temp = fp32_pair(inv_temp_hi, inv_temp_lo, COMPUTE)
    # dz = [g_logp onehot - p (g_logp + g_H (s - E_p[s]))] * ds/dz
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK_V)
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    lse = tl.load(lse_ptr + row).to(COMPUTE)
    g_logp = tl.where(valid, tl.load(g_logp_ptr + row).to(COMPUTE), 0.0)
    if HAS_ENTROPY_GRAD:
        g_ent = tl.where(valid, tl.load(g_ent_ptr + row).to(COMPUTE), 0.0)
        mean_s = tl.load(mean_s_ptr + row).to(COMPUTE)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(COMPUTE)
        s, t = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
        p = tl.exp(s - lse)
        if HAS_ENTROPY_GRAD:
            g = -p * (g_logp + g_ent * (s - mean_s))
        else:
            g = -p * g_logp
        g = tl.where(offs == target, g + g_logp, g)
        g = tl.where(valid, g, 0.0)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = g * inv_temp
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def block_grad_kernel(
    z_ptr, z_stride, grad_ptr, grad_stride, labels_ptr, lse_ptr, coef_ptr, n_cols, col0, ignore_index,
    softcap_hi, softcap_lo, inv_temp_hi, inv_temp_lo,
    HAS_SOFTCAP: tl.constexpr, HAS_B: tl.constexpr, BLOCK_V: tl.constexpr, COMPUTE: tl.constexpr,
):
    """d loss / d z over the columns [col0, col0 + n_cols) of the vocabulary, from each row's log-sum-exp (the
    compact-memory backward, ops/core/vocab_blocks.py). Per row, coefficients (A, B, M, C, D) at ``coef_ptr``
    (row-major [rows, 5]):  g = [p (A + B (s - M)) + C + D onehot(label)] * ds/dz,  p = exp(s - lse).
    Cross-entropy: A = a (1 + 2 c lse), B = 0, C = -a eps / V, D = -a (1 - eps); log-probs: A = -g_logp,
    B = -g_H, M = E_p[s], C = 0, D = g_logp. Rows whose label is ``ignore_index`` get a zero gradient."""
    softcap = fp32_pair(softcap_hi, softcap_lo, COMPUTE)
    inv_temp = fp32_pair(inv_temp_hi, inv_temp_lo, COMPUTE)
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * z_stride
    g_row = grad_ptr + row * grad_stride
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    valid = label != ignore_index
    lse = tl.load(lse_ptr + row).to(COMPUTE)
    c_a = tl.where(valid, tl.load(coef_ptr + row * 5).to(COMPUTE), 0.0)
    c_c = tl.where(valid, tl.load(coef_ptr + row * 5 + 3).to(COMPUTE), 0.0)
    c_d = tl.where(valid, tl.load(coef_ptr + row * 5 + 4).to(COMPUTE), 0.0)
    if HAS_B:
        c_b = tl.where(valid, tl.load(coef_ptr + row * 5 + 1).to(COMPUTE), 0.0)
        c_m = tl.load(coef_ptr + row * 5 + 2).to(COMPUTE)
    target = label - col0
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        z = tl.load(z_row + offs, mask=mask, other=0.0).to(COMPUTE)
        s, t = _transform(z, softcap, inv_temp, HAS_SOFTCAP)
        p = tl.exp(tl.where(valid, s - lse, float("-inf")))  # ignored rows: lse is 0, p would overflow
        if HAS_B:
            g = p * (c_a + c_b * (s - c_m)) + c_c
        else:
            g = p * c_a + c_c
        g = tl.where(offs == target, g + c_d, g)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        g = g * inv_temp
        tl.store(g_row + offs, g.to(grad_ptr.dtype.element_ty), mask=mask)
