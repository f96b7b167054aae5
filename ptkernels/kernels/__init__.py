"""@triton.jit kernels only, one family per file. Launchers live in ptkernels/ops/."""
