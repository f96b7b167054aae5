"""Every CUDA source under csrc/cuda compiles for sm_80 and sm_90 with this machine's nvcc, cleanly, without spills.

No GPU is needed (compile only, nothing runs). Each ``*.cu`` file is compiled once per module, in parallel, with

    nvcc -c -std=c++17 -O3 -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90
         -Xptxas -v -Werror all-warnings -Xcompiler -Wall,-Wextra,-fPIC

and the tests read the shared results: no error and no warning (host or device), every kernel present for both
architectures, at most 255 registers, and no local memory: ``ptxas -v`` must report a 0-byte stack frame and 0
bytes of spill stores/loads for every function. Where a ``cuobjdump`` is found (the CUDA toolkit's or the one in
Triton's wheel) the objects are cross-checked with ``--dump-resource-usage`` (REG, STACK, LOCAL) and the SASS is
searched for local loads/stores (LDL/STL). A canary that must use local memory proves the checks are not vacuous.
The C ABI header is compiled as plain C++ (no CUDA headers) and linked against the objects, so a definition that
drifts from a declaration fails here.

nvcc is taken from $CUDA_HOME/bin, /usr/local/cuda/bin, then PATH; the tests skip only where none exists.
``python tests/ops/backends/test_cuda_compile.py`` prints the per-kernel register/spill table as markdown.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
CUDA_DIR = REPO / "csrc" / "cuda"
HEADER = CUDA_DIR / "ptk_cuda.h"
SOURCES = sorted(CUDA_DIR.glob("*.cu"))
ARCHS = (80, 90)
GENCODE = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
NVCC_FLAGS = ["-c", "-std=c++17", "-O3", *GENCODE, "-Xptxas", "-v", "-Werror", "all-warnings",
              "-Xcompiler", "-Wall,-Wextra,-fPIC", f"-I{CUDA_DIR}"]
COMPILE_TIMEOUT_S = 600

# Kernels each source must define (instantiations per architecture); a new .cu file gets the generic checks only.
EXPECTED = {
    "rows.cu": {"ce_rows_kernel": 12},  # {fp32, fp16, bf16} x softcap x gradient
    "group_advantages.cu": {"group_kernel": 1, "batch_scale_kernel": 1},
    "gae.cu": {"gae_kernel": 1},
    "sequence.cu": {"segment_sums_kernel": 2},  # with and without a mask
}
ABI = ("ce_rows", "group_advantages", "gae", "segment_sums")

CANARY = r"""
// Must use local memory: a dynamically indexed array (stack frame), and more live values than -maxrregcount allows.
__global__ void local_array_canary(float* out, const int* idx) {
  float a[64];
  for (int i = 0; i < 64; ++i) a[i] = out[i];
  a[idx[0] & 63] += 1.f;  // a store at a run-time index: the array cannot live in registers
  out[threadIdx.x] = a[idx[threadIdx.x] & 63];
}
__global__ void register_spill_canary(float* out) {
  float v[48];
#pragma unroll
  for (int i = 0; i < 48; ++i) v[i] = out[i * blockDim.x + threadIdx.x];
  float s = 0.f;
#pragma unroll
  for (int i = 0; i < 48; ++i) s += v[i] * v[47 - i];
#pragma unroll
  for (int i = 0; i < 48; ++i) out[i * blockDim.x + threadIdx.x] = v[i] / s;
}
"""
CANARY_FLAGS = ["-maxrregcount=24"]  # the lowest count ptxas accepts for sm_80 / sm_90

ABI_CALLER = r"""
#include "ptk_cuda.h"
int main() {
  // Calls every ABI function with the header's exact types (never run: only compiled and linked).
  int rc = 0;
  rc |= ptk::cuda::ce_rows(nullptr, 0, nullptr, 0, 0, nullptr, nullptr, 0, nullptr, nullptr, 0, 0, -100, 0.f, 0.f,
                           0.f, 1.f, nullptr);
  rc |= ptk::cuda::group_advantages(nullptr, nullptr, 0, 1, 0, 1e-4f, nullptr);
  rc |= ptk::cuda::gae(nullptr, nullptr, nullptr, nullptr, nullptr, 0, 0, 1.f, 0.95f, nullptr);
  rc |= ptk::cuda::segment_sums(nullptr, nullptr, nullptr, nullptr, 0, 0, nullptr);
  return rc;
}
"""


# ------------------------------------------------------------------------------------------------ toolchain


def _executable(path: Path) -> str | None:
    return str(path) if path.is_file() and os.access(path, os.X_OK) else None


def find_nvcc() -> str | None:
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (found := _executable(Path(root) / "bin" / "nvcc")):
            return found
    return shutil.which("nvcc")


def find_cuobjdump(nvcc: str | None) -> str | None:
    """The toolkit's cuobjdump (beside nvcc, even through a wrapper script), else the one in Triton's wheel."""
    dirs = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    candidates = [Path(d) / "bin" / "cuobjdump" for d in dirs if d]
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent / "cuobjdump")
    if which := shutil.which("cuobjdump"):
        candidates.append(Path(which))
    spec = importlib.util.find_spec("triton")  # located without importing triton
    if spec is not None and spec.origin:
        candidates.append(Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump")
    for c in candidates:
        if found := _executable(c):
            return found
    return None


def find_host_cxx() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (found := shutil.which(name)):
            return found
    return None


NVCC = find_nvcc()
CUOBJDUMP = find_cuobjdump(NVCC)
HOST_CXX = find_host_cxx()

pytestmark = pytest.mark.skipif(NVCC is None, reason="nvcc not found ($CUDA_HOME/bin, /usr/local/cuda/bin, PATH)")


# ----------------------------------------------------------------------------------------------- parsing


@dataclass
class Usage:
    """One function on one architecture, as ptxas -v reports it."""

    name: str
    arch: int
    entry: bool = False
    regs: int | None = None
    stack: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0

    def spills(self) -> bool:
        return bool(self.stack or self.spill_stores or self.spill_loads)


_RE_ENTRY = re.compile(r"Compiling entry function '([^']+)' for 'sm_(\d+)'")
_RE_FUNC = re.compile(r"Function properties for (\S+)")
_RE_STACK = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_RE_USED = re.compile(r"Used (\d+) registers")
_RE_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(text: str) -> dict[tuple[str, int], Usage]:
    """``ptxas -v`` output (through nvcc, several architectures) -> {(function, arch): Usage}. Functions that are
    not entries (non-inlined device functions) are reported too: a stack frame there is local memory as well."""
    out: dict[tuple[str, int], Usage] = {}
    arch = None
    current: Usage | None = None
    for line in text.splitlines():
        if m := _RE_ENTRY.search(line):
            arch = int(m.group(2))
            current = out.setdefault((m.group(1), arch), Usage(m.group(1), arch))
            current.entry = True
        elif (m := _RE_FUNC.search(line)) and arch is not None:
            current = out.setdefault((m.group(1), arch), Usage(m.group(1), arch))
        elif (m := _RE_STACK.search(line)) and current is not None:
            current.stack, current.spill_stores, current.spill_loads = map(int, m.groups())
        elif (m := _RE_USED.search(line)) and current is not None:
            current.regs = int(m.group(1))
            if s := _RE_SMEM.search(line):
                current.smem = int(s.group(1))
    return out


def parse_resource_usage(text: str) -> dict[tuple[str, int], dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` -> {(function, arch): {"REG": n, "STACK": n, "LOCAL": n, ...}}."""
    out: dict[tuple[str, int], dict[str, int]] = {}
    arch = None
    func = None
    for line in text.splitlines():
        if m := re.match(r"\s*arch = sm_(\d+)", line):
            arch = int(m.group(1))
        elif m := re.match(r"\s*Function (\S+):\s*$", line):
            func = m.group(1)
        elif func is not None and arch is not None and "REG:" in line:
            out[(func, arch)] = {k: int(v) for k, v in re.findall(r"([A-Z]+(?:\[\d+\])?):(\d+)", line)}
            func = None
    return out


def count_local_memory_instructions(sass: str) -> int:
    return len(re.findall(r"\b(?:LDL|STL)(?:\.[A-Z0-9]+)*\s", sass))


def short_name(mangled: str, demangled: dict[str, str]) -> str:
    """``ptk::cuda::(anonymous namespace)::ce_rows_kernel<float, true, false>(...)`` -> ``ce_rows_kernel<float,
    true, false>``."""
    name = demangled.get(mangled, mangled)
    name = re.sub(r"^void ", "", name.replace("(anonymous namespace)::", ""))  # c++filt prints a template's type
    depth, cut = 0, len(name)
    for i, ch in enumerate(name):  # drop the argument list: the first '(' outside template brackets
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0:
            cut = i
            break
    name = name[:cut]
    return name.rsplit("::", 1)[-1] if "<" not in name else re.sub(r"^(?:\w+::)+", "", name)


def base_name(short: str) -> str:
    return short.split("<", 1)[0]


def demangle(names) -> dict[str, str]:
    names = sorted(set(names))
    cxxfilt = shutil.which("c++filt")
    if not names or cxxfilt is None:
        return {}
    res = subprocess.run([cxxfilt], input="\n".join(names), capture_output=True, text=True, check=False)
    lines = res.stdout.splitlines()
    return dict(zip(names, lines)) if res.returncode == 0 and len(lines) == len(names) else {}


# ----------------------------------------------------------------------------------------------- compiling


@dataclass
class Compiled:
    source: str
    obj: Path
    returncode: int
    log: str
    seconds: float
    usage: dict[tuple[str, int], Usage] = field(default_factory=dict)

    def warnings(self) -> list[str]:
        return [ln for ln in self.log.splitlines() if re.search(r"warning", ln, re.IGNORECASE)
                and not ln.lstrip().startswith("ptxas info")]

    def entries(self) -> list[Usage]:
        return [u for u in self.usage.values() if u.entry]


def _nvcc(src: Path, obj: Path, extra=()) -> Compiled:
    import time

    t0 = time.perf_counter()
    try:
        res = subprocess.run([NVCC, *NVCC_FLAGS, *extra, str(src), "-o", str(obj)], capture_output=True, text=True,
                             timeout=COMPILE_TIMEOUT_S, check=False)
        rc, log = res.returncode, res.stdout + res.stderr
    except subprocess.TimeoutExpired as e:
        rc, log = -1, f"nvcc timed out after {COMPILE_TIMEOUT_S}s: {e}"
    out = Compiled(src.name, obj, rc, log, time.perf_counter() - t0)
    out.usage = parse_ptxas(log)
    return out


def compile_all(workdir: Path) -> tuple[dict[str, Compiled], Compiled]:
    canary_src = workdir / "spill_canary.cu"
    canary_src.write_text(CANARY)
    jobs = [(src, workdir / (src.stem + ".o"), ()) for src in SOURCES]
    jobs.append((canary_src, workdir / "spill_canary.o", CANARY_FLAGS))
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:  # nvcc runs in subprocesses: threads suffice
        # the largest source first, so that it does not start last
        order = sorted(jobs, key=lambda j: -j[0].stat().st_size)
        futures = {j[0].name: pool.submit(_nvcc, *j) for j in order}
        results = {name: f.result() for name, f in futures.items()}
    canary = results.pop(canary_src.name)
    return results, canary


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="ptk-cuda-") as d:
        yield Path(d)


@pytest.fixture(scope="module")
def compiled(workdir):
    results, canary = compile_all(workdir)
    return {"sources": results, "canary": canary}


@pytest.fixture(scope="module")
def names(compiled):
    every = [u.name for c in compiled["sources"].values() for u in c.usage.values()]
    return demangle(every)


def _cuobjdump(obj: Path, *flags: str) -> str:
    res = subprocess.run([CUOBJDUMP, *flags, str(obj)], capture_output=True, text=True, timeout=120, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"cuobjdump {' '.join(flags)} failed on {obj.name}: {res.stderr.strip()[:500]}")
    return res.stdout


# -------------------------------------------------------------------------------------------------- tests


def test_sources_present():
    assert SOURCES, f"no .cu file under {CUDA_DIR}"
    assert HEADER.is_file(), f"missing {HEADER}"
    for name in EXPECTED:
        assert (CUDA_DIR / name).is_file(), f"missing csrc/cuda/{name}"


@pytest.mark.parametrize("src", [s.name for s in SOURCES])
def test_compiles_without_warnings(compiled, src):
    c = compiled["sources"][src]
    assert c.returncode == 0, f"nvcc failed on {src} (rc {c.returncode}):\n{c.log[-6000:]}"
    assert not c.warnings(), f"warnings compiling {src}:\n" + "\n".join(c.warnings())
    assert c.obj.is_file() and c.obj.stat().st_size > 0


@pytest.mark.parametrize("src", [s.name for s in SOURCES])
def test_kernels_fit_registers_without_spills(compiled, names, src):
    c = compiled["sources"][src]
    assert c.returncode == 0, f"{src} does not compile"
    entries = c.entries()
    assert entries, f"ptxas reported no entry function for {src}:\n{c.log[-3000:]}"
    for arch in ARCHS:
        per_arch = [u for u in entries if u.arch == arch]
        counts: dict[str, int] = {}
        for u in per_arch:
            counts[base_name(short_name(u.name, names))] = counts.get(base_name(short_name(u.name, names)), 0) + 1
        if src in EXPECTED:
            assert counts == EXPECTED[src], f"{src} sm_{arch}: kernels {counts}, expected {EXPECTED[src]}"
        else:
            assert per_arch, f"{src}: no kernel for sm_{arch}"
    for u in c.usage.values():
        what = f"{short_name(u.name, names)} sm_{u.arch}"
        if u.entry:
            assert u.regs is not None and 0 < u.regs <= 255, f"{what}: registers {u.regs}"
        assert not u.spills(), (f"{what} uses local memory: stack {u.stack} B, spill stores {u.spill_stores} B, "
                                f"spill loads {u.spill_loads} B")


@pytest.mark.skipif(CUOBJDUMP is None, reason="no cuobjdump (CUDA toolkit or Triton wheel) for the cross-check")
@pytest.mark.parametrize("src", [s.name for s in SOURCES])
def test_cuobjdump_agrees_no_local_memory(compiled, names, src):
    c = compiled["sources"][src]
    assert c.returncode == 0, f"{src} does not compile"
    usage = parse_resource_usage(_cuobjdump(c.obj, "--dump-resource-usage"))
    for u in c.entries():
        what = f"{short_name(u.name, names)} sm_{u.arch}"
        r = usage.get((u.name, u.arch))
        assert r is not None, f"{what} missing from cuobjdump's resource usage"
        assert r.get("REG") == u.regs, f"{what}: cuobjdump REG {r.get('REG')} != ptxas {u.regs}"
        assert r.get("STACK", 0) == 0 and r.get("LOCAL", 0) == 0, f"{what}: {r}"
    for arch in ARCHS:
        sass = _cuobjdump(c.obj, "-sass", "-arch", f"sm_{arch}")
        assert "Function" in sass, f"no SASS for sm_{arch} in {c.obj.name}"
        n = count_local_memory_instructions(sass)
        assert n == 0, f"{src} sm_{arch}: {n} local-memory instructions (LDL/STL) in the SASS"


def test_spill_check_detects_local_memory(compiled):
    """The checks are not vacuous: the canary's local array and forced spills are seen by both readers."""
    c = compiled["canary"]
    assert c.returncode == 0, c.log[-3000:]
    by_name = {re.sub(r"^_Z\d+", "", u.name).split("P", 1)[0]: u for u in c.entries() if u.arch == ARCHS[0]}
    assert by_name["local_array_canary"].stack > 0, by_name
    assert by_name["register_spill_canary"].spill_stores > 0, by_name
    assert all(u.spills() for u in c.entries())
    if CUOBJDUMP is not None:
        usage = parse_resource_usage(_cuobjdump(c.obj, "--dump-resource-usage"))
        assert all(r.get("STACK", 0) > 0 or r.get("LOCAL", 0) > 0 for r in usage.values()), usage
        assert count_local_memory_instructions(_cuobjdump(c.obj, "-sass", "-arch", "sm_80")) > 0


@pytest.mark.skipif(HOST_CXX is None, reason="no host C++ compiler")
def test_header_is_plain_cpp_and_matches_the_definitions(compiled, workdir):
    """ptk_cuda.h compiles with the host compiler alone (no CUDA include path), and a program calling every ABI
    function with the header's types links against the objects: a drifted signature is an undefined symbol."""
    caller = workdir / "abi_caller.cpp"
    caller.write_text(ABI_CALLER)
    obj = workdir / "abi_caller.o"
    res = subprocess.run([HOST_CXX, "-std=c++17", "-Wall", "-Wextra", "-Werror", "-c", f"-I{CUDA_DIR}", str(caller),
                          "-o", str(obj)], capture_output=True, text=True, timeout=120, check=False)
    assert res.returncode == 0, f"ptk_cuda.h is not plain C++17:\n{res.stderr[-3000:]}"
    objs = [c.obj for c in compiled["sources"].values()]
    assert all(c.returncode == 0 for c in compiled["sources"].values()), "a source does not compile"
    res = subprocess.run([NVCC, *GENCODE, str(obj), *map(str, objs), "-o", str(workdir / "abi_link")],
                         capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == 0, f"linking the ABI against csrc/cuda objects failed:\n{res.stdout}{res.stderr}"
    text = HEADER.read_text()
    assert "#include <cuda" not in text and "cuda_runtime" not in text
    for fn in ABI:
        assert re.search(rf"\bint {fn}\(", text), f"{fn} not declared in ptk_cuda.h"


def test_parse_ptxas_output():
    text = """
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_80'
ptxas info    : Function properties for _Z3fooPf
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 384 bytes smem, 464 bytes cmem[0]
ptxas info    : Function properties for _Z6helperv
    32 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 32 registers, used 1 barriers, 384 bytes smem
"""
    u = parse_ptxas(text)
    assert u[("_Z3fooPf", 80)].regs == 40 and u[("_Z3fooPf", 80)].spill_stores == 8 and u[("_Z3fooPf", 80)].spills()
    assert u[("_Z3fooPf", 80)].smem == 384 and u[("_Z3fooPf", 80)].entry
    assert u[("_Z6helperv", 80)].stack == 32 and not u[("_Z6helperv", 80)].entry
    assert u[("_Z3fooPf", 90)].regs == 32 and not u[("_Z3fooPf", 90)].spills()
    dump = """
arch = sm_90
Resource usage:
 Function _Z3fooPf:
  REG:32 STACK:0 SHARED:384 LOCAL:0 CONSTANT[0]:464 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    r = parse_resource_usage(dump)[("_Z3fooPf", 90)]
    assert r["REG"] == 32 and r["STACK"] == 0 and r["LOCAL"] == 0 and r["SHARED"] == 384
    assert count_local_memory_instructions("  /*0a30*/  STL [R1+0x4], R3 ;\n  /*0a40*/  LDL.64 R4, [R1] ;\n") == 2
    demangled = {"_Z1x": "void ptk::cuda::(anonymous namespace)::ce_rows_kernel<float, true, false>(float const*)"}
    assert short_name("_Z1x", demangled) == "ce_rows_kernel<float, true, false>"


# ----------------------------------------------------------------------------------------------- table


def table(results: dict[str, Compiled], names: dict[str, str]) -> str:
    lines = ["| source | kernel | arch | registers | stack (B) | spill st/ld (B) | smem (B) |",
             "|---|---|---|---:|---:|---:|---:|"]
    for src, c in sorted(results.items()):
        if c.returncode != 0:
            lines.append(f"| {src} | compile error | | | | | |")
            continue
        for u in sorted(c.entries(), key=lambda u: (short_name(u.name, names), u.arch)):
            lines.append(f"| {src} | `{short_name(u.name, names)}` | sm_{u.arch} | {u.regs} | {u.stack} "
                         f"| {u.spill_stores}/{u.spill_loads} | {u.smem} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if NVCC is None:
        raise SystemExit("nvcc not found")
    with tempfile.TemporaryDirectory(prefix="ptk-cuda-") as d:
        res, _ = compile_all(Path(d))
        print(f"nvcc: {NVCC}")
        print(table(res, demangle(u.name for c in res.values() for u in c.usage.values())))
        for src, c in res.items():
            print(f"{src}: {c.seconds:.1f} s")
