"""Prints what decides the CPU numerics and speed of this run: CPU model, the instruction sets that matter, and
which BLAS / oneDNN kernels PyTorch and ptkernels use here (one small fp32 GEMM through each, verbose)."""

import os
import platform
import subprocess
import sys


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def isa_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return "unknown"
    want = ("avx2", "fma", "avx512f", "avx512bw", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile",
            "amx_bf16", "amx_fp16")
    return " ".join(f for f in want if f in flags) or "none of avx2/avx512/amx"


# One GEMM through torch.mm (the BLAS of the wheel) and one through oneDNN (the op ptkernels' CPU fp32 route
# uses), each in a fresh process so that MKL_VERBOSE / ONEDNN_VERBOSE print the kernel each picked.
PROBE = """
import torch
a, b = torch.randn(64, 256), torch.randn(512, 256)
torch.mm(a, b.t())
torch.ops.mkldnn._linear_pointwise(a, b, None, "none", [], "")
"""


def verbose_lines() -> list[str]:
    env = dict(os.environ, MKL_VERBOSE="1", ONEDNN_VERBOSE="1", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=120)
    keep = [ln for ln in (out.stdout + out.stderr).splitlines()
            if ("SGEMM" in ln or "sgemm" in ln or ",exec," in ln or "info,cpu,isa" in ln
                or "info,cpu,runtime" in ln or "MKL_VERBOSE oneMKL" in ln or "MKL_VERBOSE Intel" in ln)]
    return keep or [f"(no verbose output; rc={out.returncode})"]


def main() -> None:
    import torch

    from ptkernels.ops.core import gemm

    print(f"CPU: {cpu_model()} | {os.cpu_count()} logical CPUs | ISA: {isa_flags()}")
    print(f"torch {torch.__version__} | ATen CPU capability: {torch.backends.cpu.get_cpu_capability()} | "
          f"threads: {torch.get_num_threads()}")
    blas = [ln.strip() for ln in torch.__config__.show().splitlines() if "Math Kernel" in ln or "MKL-DNN" in ln
            or "BLAS_INFO" in ln]
    print("BLAS / oneDNN in the wheel:", " | ".join(ln.split(",")[0] if "Build settings" in ln else ln for ln in blas))
    print(f"oneDNN enabled: {torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled} | "
          f"fp32 GEMMs of the fused ops on CPU: {gemm.cpu_gemm_choice()[0]} ({gemm.cpu_gemm_choice()[1]}; "
          f"PTK_CPU_GEMM={os.environ.get('PTK_CPU_GEMM', 'auto')})")
    cpu = gemm.cpu_info()
    chunk_rows, rows, dim = gemm.transposed_grad_bounds(cpu)
    chunk_rows = max(chunk_rows, gemm.ONEDNN_MIN_ROWS_FOR_WEIGHT_GRAD)
    print(f"CPU vendor {cpu.vendor or 'unknown'}, family {cpu.family} | oneDNN GEMM 3 into a transposed weight "
          f"gradient from {chunk_rows} rows per chunk and {rows} rows in all, "
          f"D {'any' if dim is None else f'<= {dim}'}")
    try:
        from ptkernels import _C
        print("ptkernels._C:", _C.build_info())
    except ImportError as e:
        print("ptkernels._C: not built:", e)
    for line in verbose_lines():
        print("  ", line[:200])


if __name__ == "__main__":
    main()
