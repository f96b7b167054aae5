"""Triton kernels for per-sequence sums of token log-probs: one program per sequence, a loop over its tokens.

Padded batches ``[S, T]`` (row ``s`` at ``s * row_stride``; logp, mask and grad share one contiguous layout) and padding-free packed batches (sequence ``s`` is
``[cu_seqlens[s], cu_seqlens[s + 1])`` of a flat ``[total]`` tensor) share the kernels through the ``PACKED``
constexpr. Optional mask weights ``m`` (0/1 from a bool mask, or any float weights). Forward:

    out[s] = sum_t m[t] logp[t]            (AVERAGE: divided by den[s] = sum_t m[t]; 0 when den[s] == 0)

Backward is a broadcast: ``dlogp[t] = g[s] * m[t]`` (``/ den[s]`` when AVERAGE). All math in fp32 (fp64 for fp64
input); offsets are int64.
"""

import triton
import triton.language as tl


@triton.jit
def _div(a, b, COMPUTE: tl.constexpr):
    """a / b rounded as IEEE division, as PyTorch divides: Triton's fp32 ``/`` on a GPU is the approximate
    div.full.f32 (up to 2 ulp), which made the gradient of a mean differ from ``mask / count`` (seen on an H200)."""
    if COMPUTE == tl.float32:
        return tl.math.div_rn(a, b)
    else:
        return a / b


@triton.jit
def _bounds(cu_ptr, s, row_stride, seq_len, PACKED: tl.constexpr):
    """(start, end) of sequence ``s`` in element offsets of the flat storage."""
    if PACKED:
        start = tl.load(cu_ptr + s).to(tl.int64)
        end = tl.load(cu_ptr + s + 1).to(tl.int64)
    else:
        start = s * row_stride
        end = start + seq_len
    return start, end


@triton.jit
def sequence_logprobs_fwd_kernel(
    logp_ptr, mask_ptr, cu_ptr, out_ptr, den_ptr, row_stride, seq_len,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    s = tl.program_id(0).to(tl.int64)
    start, end = _bounds(cu_ptr, s, row_stride, seq_len, PACKED)
    cols = tl.arange(0, BLOCK_T)
    acc = tl.zeros([BLOCK_T], dtype=COMPUTE)
    den = tl.zeros([BLOCK_T], dtype=COMPUTE)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + cols
        inside = offs < end
        x = tl.load(logp_ptr + offs, mask=inside, other=0.0).to(COMPUTE)
        if HAS_MASK:
            w = tl.load(mask_ptr + offs, mask=inside, other=0).to(COMPUTE)
        else:
            w = tl.where(inside, 1.0, 0.0).to(COMPUTE)
        acc += x * w
        den += w
    total = tl.sum(acc, axis=0)
    d = tl.sum(den, axis=0)
    if AVERAGE:
        total = tl.where(d != 0.0, _div(total, tl.where(d != 0.0, d, 1.0), COMPUTE), 0.0)
    tl.store(out_ptr + s, total)
    tl.store(den_ptr + s, d)


@triton.jit
def sequence_logprobs_bwd_kernel(
    grad_ptr, g_ptr, den_ptr, mask_ptr, cu_ptr, row_stride, seq_len,
    HAS_MASK: tl.constexpr, PACKED: tl.constexpr, AVERAGE: tl.constexpr, BLOCK_T: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    # grad, logp and the mask share one contiguous layout (the launcher makes them so)
    s = tl.program_id(0).to(tl.int64)
    start, end = _bounds(cu_ptr, s, row_stride, seq_len, PACKED)
    g = tl.load(g_ptr + s).to(COMPUTE)
    if AVERAGE:
        d = tl.load(den_ptr + s).to(COMPUTE)
        g = tl.where(d != 0.0, _div(g, tl.where(d != 0.0, d, 1.0), COMPUTE), 0.0)
    cols = tl.arange(0, BLOCK_T)
    for t0 in range(start, end, BLOCK_T):
        offs = t0 + cols
        inside = offs < end
        if HAS_MASK:
            w = tl.load(mask_ptr + offs, mask=inside, other=0).to(COMPUTE)
            val = g * w
        else:
            val = tl.zeros([BLOCK_T], dtype=COMPUTE) + g
        tl.store(grad_ptr + offs, val.to(grad_ptr.dtype.element_ty), mask=inside)
