"""Triton kernel for generalized advantage estimation: a reverse scan over time, one program per sequence.

Rows are sequences of ``[B, T]`` contiguous tensors. With r, v the rewards and values times the mask (so the
value after a sequence's last valid token is 0: right padding gives no bootstrap)::

    delta_t = r_t + gamma * v_{t+1} - v_t,     A_t = delta_t + gamma * lam * A_{t+1},     A_T = v_T = 0
    advantages = A * m,   returns = (A + v) * m

The recursion is inherently sequential in t; the loop carries A_{t+1} and v_{t+1} in registers. gamma and
gamma * lam come as (hi, lo) fp32 pairs (kernels/scalars.py). Masked entries are never used unmasked, so garbage
there (NaN, inf) cannot leak.
"""

import triton
import triton.language as tl

from .scalars import fp32_pair


@triton.jit
def gae_kernel(rewards_ptr, values_ptr, mask_ptr, adv_ptr, ret_ptr, n_cols, gamma_hi, gamma_lo, gl_hi, gl_lo,
               COMPUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = row * n_cols
    gamma = fp32_pair(gamma_hi, gamma_lo, COMPUTE)
    gl = fp32_pair(gl_hi, gl_lo, COMPUTE)  # gamma * lam
    last = tl.zeros([], dtype=COMPUTE)
    next_v = tl.zeros([], dtype=COMPUTE)
    for i in range(0, n_cols):
        t = n_cols - 1 - i
        m = tl.load(mask_ptr + base + t).to(COMPUTE)
        valid = m != 0.0
        r = tl.where(valid, tl.load(rewards_ptr + base + t).to(COMPUTE), 0.0) * m
        v = tl.where(valid, tl.load(values_ptr + base + t).to(COMPUTE), 0.0) * m
        last = r + gamma * next_v - v + gl * last
        tl.store(adv_ptr + base + t, tl.where(valid, last * m, 0.0))
        tl.store(ret_ptr + base + t, tl.where(valid, (last + v) * m, 0.0))
        next_v = v
