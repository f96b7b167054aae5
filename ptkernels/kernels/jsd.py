"""Triton row kernel for the generalized JSD between a student and a teacher chunk of logits.

One program per row; it streams the two rows ``zs [V]`` (student) and ``zt [V]`` (teacher) in blocks of
``BLOCK_V`` columns. With ``s = zs / T``, ``t = zt / T``, ``log q = s - lse(s)``, ``log p = t - lse(t)``:

    MODE 0  (beta = 0)   loss = KL(p || q) = E_p[t - s] - lse(t) + lse(s)       dL/ds = q - p
    MODE 1  (beta = 1)   loss = KL(q || p) = E_q[s - t] - lse(s) + lse(t)       dL/ds = q (log q - log p - loss)
    MODE 2  (0 < beta < 1), log m = log(beta p + (1 - beta) q):
                         loss = beta KL(p || m) + (1 - beta) KL(q || m)
                         dL/ds = (1 - beta) q (log q - log m - KL(q || m))
    dL/dz = dL/ds / T, times the row's gradient scale.

Pass 1 computes both online log-sum-exps (and, in modes 0 and 1, the online expectation that gives the loss).
Mode 2 needs both log-sum-exps before log m exists, so a pass 2 sums the two KL terms. The last pass writes
the gradient (it needs KL(q || m), a sum over the row, so it cannot share a pass with it): 2 passes in modes
0/1 and 3 in mode 2 when a gradient is wanted, one fewer without. The gradient may be written in place of
``zs``: each block is read before it is overwritten, by the same program. fp32 math (fp64 for fp64 input)
whatever the storage dtype; int64 row offsets. No log(0): modes 0 and 1 never form log m, and mode 2 only
runs for 0 < beta < 1. Rows whose label is ``ignore_index`` give loss 0 and a zero gradient.
"""

import triton
import triton.language as tl

from .scalars import fp32_pair


@triton.jit
def _log_mix(log_p, log_q, log_beta, log_1m_beta):
    """log(beta p + (1 - beta) q) from log p and log q, stably."""
    a = log_p + log_beta
    b = log_q + log_1m_beta
    hi = tl.maximum(a, b)
    lo = tl.minimum(a, b)
    return hi + tl.log(1.0 + tl.exp(lo - hi))


@triton.jit
def jsd_rows_kernel(
    zs_ptr, zs_stride, zt_ptr, zt_stride, grad_ptr, grad_stride, labels_ptr, scale_ptr, scale_stride, loss_ptr,
    n_cols, ignore_index, beta_hi, beta_lo, inv_temp_hi, inv_temp_lo,
    MODE: tl.constexpr, HAS_LABELS: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    inv_temp = fp32_pair(inv_temp_hi, inv_temp_lo, COMPUTE)  # float arguments: kernels/scalars.py
    row = tl.program_id(0).to(tl.int64)
    zs_row = zs_ptr + row * zs_stride
    zt_row = zt_ptr + row * zt_stride
    cols = tl.arange(0, BLOCK_V)
    if HAS_LABELS:
        label = tl.load(labels_ptr + row).to(tl.int64)
        if label == ignore_index:
            tl.store(loss_ptr + row, 0.0)
            if WRITE_GRAD:
                g_row = grad_ptr + row * grad_stride
                for start in range(0, n_cols, BLOCK_V):
                    offs = start + cols
                    tl.store(g_row + offs, tl.zeros([BLOCK_V], dtype=COMPUTE).to(grad_ptr.dtype.element_ty),
                             mask=offs < n_cols)
            return
    # pass 1: online log-sum-exps of s and t; modes 0/1 also the online expectation that gives the loss
    m_s = tl.full([], float("-inf"), dtype=COMPUTE)
    m_t = tl.full([], float("-inf"), dtype=COMPUTE)
    d_s = tl.zeros([], dtype=COMPUTE)
    d_t = tl.zeros([], dtype=COMPUTE)
    acc = tl.zeros([], dtype=COMPUTE)  # MODE 0: sum e^(t-m_t) (t-s); MODE 1: sum e^(s-m_s) (s-t)
    for start in range(0, n_cols, BLOCK_V):
        offs = start + cols
        mask = offs < n_cols
        s = tl.load(zs_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
        t = tl.load(zt_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
        s_new = tl.maximum(m_s, tl.max(tl.where(mask, s, float("-inf")), axis=0))
        t_new = tl.maximum(m_t, tl.max(tl.where(mask, t, float("-inf")), axis=0))
        e_s = tl.where(mask, tl.exp(s - s_new), 0.0)
        e_t = tl.where(mask, tl.exp(t - t_new), 0.0)
        alpha_s = tl.exp(m_s - s_new)
        alpha_t = tl.exp(m_t - t_new)
        d_s = d_s * alpha_s + tl.sum(e_s, axis=0)
        d_t = d_t * alpha_t + tl.sum(e_t, axis=0)
        if MODE == 0:
            acc = acc * alpha_t + tl.sum(e_t * (t - s), axis=0)
        if MODE == 1:
            acc = acc * alpha_s + tl.sum(e_s * (s - t), axis=0)
        m_s = s_new
        m_t = t_new
    # log q = (s - m_s) - log d_s: never round s - lse at the magnitude of the logits themselves
    ld_s = tl.log(d_s)
    ld_t = tl.log(d_t)
    if MODE == 2:  # 0 < beta < 1 here: both logs are finite
        # its logs in the compute dtype keep beta + (1 - beta) = 1, so m = p when p = q
        beta_c = fp32_pair(beta_hi, beta_lo, COMPUTE)
        log_beta = tl.log(beta_c)
        log_1m_beta = tl.log(1.0 - beta_c)
    kl_q = tl.zeros([], dtype=COMPUTE)
    if MODE == 0:
        loss = acc / d_t - (m_t - m_s) - (ld_t - ld_s)
    elif MODE == 1:
        loss = acc / d_s - (m_s - m_t) - (ld_s - ld_t)
    else:
        # pass 2: KL(p || m) and KL(q || m), term by term
        kl_p = tl.zeros([], dtype=COMPUTE)
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(zs_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
            t = tl.load(zt_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
            log_q = (s - m_s) - ld_s
            log_p = (t - m_t) - ld_t
            log_m = _log_mix(log_p, log_q, log_beta, log_1m_beta)
            kl_p += tl.sum(tl.where(mask, tl.exp(log_p) * (log_p - log_m), 0.0), axis=0)
            kl_q += tl.sum(tl.where(mask, tl.exp(log_q) * (log_q - log_m), 0.0), axis=0)
        loss = beta_c * kl_p + (1.0 - beta_c) * kl_q
    tl.store(loss_ptr + row, loss)
    if WRITE_GRAD:
        # last pass: dL/dz = scale / T * dL/ds
        coef = tl.load(scale_ptr + row * scale_stride).to(COMPUTE) * inv_temp
        if MODE == 2:
            coef = coef * (1.0 - beta_c)
        g_row = grad_ptr + row * grad_stride
        for start in range(0, n_cols, BLOCK_V):
            offs = start + cols
            mask = offs < n_cols
            s = tl.load(zs_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
            t = tl.load(zt_row + offs, mask=mask, other=0.0).to(COMPUTE) * inv_temp
            log_q = (s - m_s) - ld_s
            log_p = (t - m_t) - ld_t
            q = tl.exp(log_q)
            if MODE == 0:
                g = q - tl.exp(log_p)
            elif MODE == 1:
                g = q * (log_q - log_p - loss)
            else:
                g = q * (log_q - _log_mix(log_p, log_q, log_beta, log_1m_beta) - kl_q)
            tl.store(g_row + offs, (coef * g).to(grad_ptr.dtype.element_ty), mask=mask)
