"""Scalar float arguments of the Triton kernels.

Triton passes a Python float to a kernel as fp32, so a float64 run would compute with, say, temperature 0.7
rounded to fp32 (seen on an H200: 8e-9 relative error against the float64 reference). Each float parameter
therefore travels as a pair (x_hi, x_lo) with x_hi = fp32(x) and x_lo = fp32(x - x_hi) (``ops.grpo.split_fp32``
makes it); ``fp32_pair`` rebuilds x_hi + x_lo in the compute dtype: x to ~2^-48 in fp64, exactly x_hi in fp32. No
device tensor is involved, so there is no host-to-device copy per launch.
"""

import triton
import triton.language as tl


@triton.jit
def fp32_pair(hi, lo, COMPUTE: tl.constexpr):
    return (tl.zeros([], dtype=COMPUTE) + hi) + lo
