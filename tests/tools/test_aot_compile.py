"""Every hot Triton kernel compiles ahead of time for sm_80 and sm_90, without a GPU, and does not spill.

The kernels are compiled with ``triton.compile`` for an explicit ``GPUTarget`` (ptxas ships with Triton's
wheel, no driver is needed) in a separate process without TRITON_INTERPRET (conftest turns the interpreter
on when there is no GPU). Register, stack and local-memory usage come from ``cuobjdump`` on the cubin; a
stack frame or local memory in these kernels means register spills, which the test rejects. All specs are
compiled once per module (in parallel) and the parametrized tests read the shared results.
"""

from pathlib import Path

import pytest

pytest.importorskip("triton")

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from tools import aot_compile as aot  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SPECS = aot.kernel_specs()
TASKS = [(spec, arch) for spec in SPECS for arch in aot.ARCHS]
_PROBLEM = aot.toolchain_problem()

pytestmark = pytest.mark.skipif(_PROBLEM is not None, reason=f"cannot compile for NVIDIA here: {_PROBLEM}")


@triton.jit
def _spill_canary_kernel(x_ptr, out_ptr, BLOCK: tl.constexpr):
    # BLOCK values per row all stay live across the reduction: with one warp that is BLOCK / 32 fp32 values
    # per thread, far over the 255-register limit at BLOCK = 16384, so ptxas must spill.
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs)
    s = tl.sum(x * x, axis=0)
    tl.store(out_ptr + offs, x / s)


CANARY = aot.KernelSpec(
    kernel=f"{__name__}:_spill_canary_kernel",
    args=(("x_ptr", "*fp32"), ("out_ptr", "*fp32")),
    constexprs=(("BLOCK", 16384),),
    num_warps=1,
    dtype="fp32",
)


def _compile(tasks):
    try:
        results, _ = aot.compile_in_subprocess(tasks, extra_sys_path=[REPO])
    except Exception as e:  # one failure message for every dependent test, not a crash in the fixture
        return e
    return {(r["id"], r["arch"]): r for r in results}


@pytest.fixture(scope="module")
def hot_results():
    res = _compile(TASKS)
    if isinstance(res, Exception):
        pytest.fail(f"AOT compile of the kernels failed: {res}")
    return res


@pytest.fixture(scope="module")
def canary_result():
    res = _compile([(CANARY, 80)])
    if isinstance(res, Exception):
        pytest.fail(f"AOT compile of the spill canary failed: {res}")
    return res[(CANARY.id, 80)]


def _describe(r):
    return (f"{r['id']} sm_{r['arch']}: regs={r.get('regs')} stack={r.get('stack')} local={r.get('local')} "
            f"LDL/STL={r.get('local_insts')}")


@pytest.mark.parametrize("spec,arch", TASKS, ids=[f"{s.id}-sm{a}" for s, a in TASKS])
def test_kernel_compiles_without_spills(hot_results, spec, arch):
    r = hot_results[(spec.id, arch)]
    assert r["error"] is None, f"{spec.id} does not compile for sm_{arch}: {r['error']}"
    assert 0 < r["regs"] <= 255, _describe(r)
    assert not aot.spills(r), f"register spills: {_describe(r)}"
    assert not r["local_insts"], f"local-memory instructions in the SASS: {_describe(r)}"
    if r.get("meta_n_regs") is not None:  # Triton versions that record ptxas' counts in the metadata
        assert r["meta_n_regs"] == r["regs"], _describe(r)
    if r.get("meta_n_spills") is not None:
        assert r["meta_n_spills"] == 0, _describe(r)


def test_spill_check_detects_spills(canary_result):
    """The check is not vacuous: a kernel that must spill is reported as spilling."""
    r = canary_result
    assert r["error"] is None, r["error"]
    assert aot.spills(r), f"expected spills from the canary: {_describe(r)}"
    assert r["local_insts"] > 0, _describe(r)


def test_parse_resource_usage():
    text = """
Resource usage:
 Common:
  GLOBAL:11 CONSTANT[4]:8
 Function ce_rows_kernel:
  REG:70 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:640 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function other:
  REG:12 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:380 TEXTURE:0 SURFACE:0 SAMPLER:0
"""
    usage = aot.parse_resource_usage(text)
    assert set(usage) == {"ce_rows_kernel", "other"}
    assert usage["ce_rows_kernel"]["REG"] == 70
    assert usage["ce_rows_kernel"]["STACK"] == 16
    assert usage["ce_rows_kernel"]["LOCAL"] == 8
    assert usage["ce_rows_kernel"]["CONSTANT[0]"] == 640
    assert usage["other"]["STACK"] == 0
    sass = "        /*0a30*/                   STL [R1+0x4], R3 ;\n        /*0a40*/  LDL.64 R4, [R1] ;\n"
    assert aot.count_local_memory_instructions(sass) == 2


def test_specs_cover_every_kernel_and_follow_the_launchers():
    import importlib
    import pkgutil

    import ptkernels.kernels
    from ptkernels.ops.backends import triton as launch

    kernels = set()
    for info in pkgutil.iter_modules(ptkernels.kernels.__path__):
        module = importlib.import_module(f"ptkernels.kernels.{info.name}")
        kernels |= {name for name in vars(module) if name.endswith("_kernel")}
    assert kernels == {s.kernel_name for s in SPECS}, "a kernel has no spec in tools/aot_compile.py"
    for spec in SPECS:
        for v in spec.vocab:
            launcher_block = launch.jsd_block_v if spec.kernel_name == "jsd_rows_kernel" else launch.block_v
            assert spec.block_v == launcher_block(v)
            assert spec.num_warps == launch.num_warps(spec.block_v)
    assert len({s.id for s in SPECS}) == len(SPECS)
