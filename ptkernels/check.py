"""`ptk check`: a one-minute tour of what the fused loss buys on this machine.

Runs linear cross-entropy forward + backward at a small LLM-head size twice, eagerly (full logits) and fused,
on every usable fast backend, and prints the loss agreement, the time and the memory each one needed.
"""

from __future__ import annotations

import argparse
import resource
import subprocess
import sys

import torch

_CASE = r"""
import sys, time, torch, torch.nn.functional as F
import ptkernels as ptk
n, d, v, impl, device = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
g = torch.Generator().manual_seed(0)
h = torch.randn(n, d, generator=g).to(device).requires_grad_()
w = (torch.randn(v, d, generator=g) * d ** -0.5).to(device).requires_grad_()
y = torch.randint(0, v, (n,), generator=g)
y[torch.rand(n, generator=g) < 0.25] = -100
y = y.to(device)
def rss_kib():
    with open("/proc/self/status") as f:
        return {k: int(x.split()[0]) for k, x in (l.split(":", 1) for l in f) if k in ("VmRSS", "VmHWM")}
if device == "cpu":
    open("/proc/self/clear_refs", "w").write("5")
    base = rss_kib()["VmRSS"]
else:
    torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats(); base = torch.cuda.memory_allocated()
t = time.perf_counter()
if impl == "eager":
    loss = F.cross_entropy(F.linear(h, w), y)
else:
    loss = ptk.linear_cross_entropy(h, w, y, backend=impl)
loss.backward()
if device == "cuda":
    torch.cuda.synchronize()
dt = time.perf_counter() - t
peak = (rss_kib()["VmHWM"] - base) * 1024 if device == "cpu" else torch.cuda.max_memory_allocated() - base
print(f"{loss.item():.6f} {dt:.4f} {peak}")
"""


def _run_case(n, d, v, impl, device):
    out = subprocess.run([sys.executable, "-c", _CASE, str(n), str(d), str(v), impl, device],
                         capture_output=True, text=True, check=True)
    loss, dt, peak = out.stdout.split()
    return float(loss), float(dt), int(peak)


def _why_unusable(backend: str, device: str) -> str | None:
    """The public API's own answer: asking for a backend that cannot run raises RuntimeError saying why."""
    import ptkernels as ptk

    h, w = torch.zeros(1, 8, device=device), torch.zeros(4, 8, device=device)
    try:
        ptk.linear_cross_entropy(h, w, torch.zeros(1, dtype=torch.long, device=device), backend=backend)
    except RuntimeError as e:
        return str(e).split("not usable here: ", 1)[-1]
    return None


def backend_summary(device: str) -> str:
    """Which backend ``backend="auto"`` uses on ``device`` and, for each fast backend that cannot run, why (a
    native build that failed during ``pip install`` is otherwise invisible: pip hides the compiler's warning)."""
    import ptkernels as ptk

    usable = ptk.backends(device)
    auto = ("triton" if device.startswith("cuda") and "triton" in usable else
            "native" if device == "cpu" and "native" in usable else "torch")
    lines = [f"backend='auto' on {device} uses: {auto}"]
    for name in ("native", "triton"):
        if name in usable:
            continue
        why = _why_unusable(name, device) or "not usable here"
        hint = (" To build it: pip install pybind11 ninja && python setup.py build_ext --inplace (errors shown), "
                "or PTK_REQUIRE_NATIVE=1 pip install -v -e ." if name == "native" else "")
        lines.append(f"  {name} is not used: {why}.{hint}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="ptk check", description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args(argv)
    import ptkernels as ptk

    usable = [b for b in ptk.backends(a.device) if b not in ("reference",)]
    if a.device == "cpu":
        usable = [b for b in usable if b != "triton"]  # the interpreter is for tests only
    print(f"ptkernels {ptk.__version__} | torch {torch.__version__} | device {a.device} | "
          f"usable backends: {', '.join(ptk.backends(a.device))}")
    print(backend_summary(a.device))
    if a.device == "cpu":
        lib, why = ptk.cpu_gemm()
        print(f"fp32 CPU GEMMs of the fused ops: {lib} ({why}; PTK_CPU_GEMM=auto|blas|onednn overrides)")
    print(f"linear cross-entropy fwd+bwd, N={a.tokens} (25% masked), D={a.hidden}, V={a.vocab}, fp32; "
          f"each case in a fresh process\n")
    print(f"{'implementation':<16}{'loss':>12}{'time (s)':>12}{'peak mem (MiB)':>18}")
    eager = None
    for impl in ["eager", *usable]:
        loss, dt, peak = _run_case(a.tokens, a.hidden, a.vocab, impl, a.device)
        eager = eager or (loss, dt, peak)
        extra = "" if impl == "eager" else f"   ({dt / eager[1]:.2f}x time, {peak / max(eager[2], 1):.2f}x memory)"
        print(f"{impl:<16}{loss:>12.6f}{dt:>12.3f}{peak / 2**20:>18.1f}{extra}")
    print(f"\nmax rss of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0
