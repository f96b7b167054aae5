"""@triton.jit kernels only, one family per file (rows, jsd, grpo, gae, sequence; scalars is their shared fp32
pair helper). Launchers live in ptkernels/ops/backends/triton.py."""
