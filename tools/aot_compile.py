"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets without a GPU, and their resource usage.

Each ``KernelSpec`` is one specialization of one ``@triton.jit`` kernel exactly as a launcher in
``ptkernels/ops/backends/triton.py`` would launch it for a real shape: the same pointer dtypes, the same scalar
specialization (ints equal to 1 become constexprs, ints divisible by 16 get the divisibility hint, pointers
are 16-byte aligned), the same constexprs and ``num_warps``. ``BLOCK_V``, ``num_warps`` and the compute
dtype are taken from the launcher module's own functions, so the specs cannot drift from what runs.

``triton.compile`` is called with an explicit ``GPUTarget`` (no driver is queried) and the cubin's resource
usage (registers, stack frame, local memory) is read back with ``cuobjdump --dump-resource-usage``, the
source of truth. When a cubin has a stack frame or local memory, its SASS is disassembled too and the
local loads/stores (LDL/STL) are counted, as a cross-check. Triton 3.6-3.9 do not record ptxas' register
or spill counts in the metadata without loading the kernel on a GPU; where a version does, they are kept.

Compiling needs a process where ``TRITON_INTERPRET`` is off: under the interpreter ``@triton.jit`` returns
an ``InterpretedFunction`` and patches ``triton.language``. The test suite turns the interpreter on when
there is no GPU, so ``compile_in_subprocess`` runs the compiles in a fresh Python process with the
variable removed (and in parallel worker processes there). Used by tests/tools/test_aot_compile.py and
tools/triton_resource_table.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = (80, 90)  # A100, H100/H200
VOCABS = (32000, 128256)  # Llama-2 / Mistral, Llama-3
DTYPES = ("bf16", "fp32")  # logits storage dtypes
KERNEL_MODULE = "ptkernels.kernels.rows"
_WARP_SIZE = 32


@dataclasses.dataclass(frozen=True)
class KernelSpec:
    """One compile of one kernel. ``args`` holds every non-constexpr argument in any order: a pointer as
    ``"*<dtype>"`` (e.g. ``"*bf16"``), a scalar as an example launch value (int, float or bool) that is
    specialized the way a launch specializes it. A string constexpr value names a Triton dtype ("fp32")."""

    kernel: str  # "module:attribute" of the @triton.jit function
    args: tuple[tuple[str, object], ...]
    constexprs: tuple[tuple[str, object], ...]
    num_warps: int
    dtype: str = ""  # logits dtype, for reports
    vocab: tuple[int, ...] = ()  # vocabulary sizes that launch this specialization, for reports
    tag: str = ""  # appended to the id to tell apart specs that would otherwise share one

    @property
    def kernel_name(self) -> str:
        return self.kernel.rsplit(":", 1)[1]

    @property
    def block_v(self) -> int | None:
        return dict(self.constexprs).get("BLOCK_V")

    @property
    def flags(self) -> str:
        """The boolean constexprs that are on, e.g. ``WRITE_GRAD`` (``-`` when none)."""
        on = [k for k, v in self.constexprs if isinstance(v, bool) and v]
        return "+".join(on) if on else "-"

    @property
    def id(self) -> str:
        name = self.kernel_name.removesuffix("_kernel")
        block = f"-bv{self.block_v}" if self.block_v is not None else ""
        tag = f"-{self.tag}" if self.tag else ""
        return f"{name}[{self.flags}]-{self.dtype or 'na'}{block}-w{self.num_warps}{tag}"

    def to_json(self) -> dict:
        return {"kernel": self.kernel, "args": [list(a) for a in self.args],
                "constexprs": [list(c) for c in self.constexprs], "num_warps": self.num_warps,
                "dtype": self.dtype, "vocab": list(self.vocab), "tag": self.tag}

    @classmethod
    def from_json(cls, d: dict) -> KernelSpec:
        return cls(kernel=d["kernel"], args=tuple(tuple(a) for a in d["args"]),
                   constexprs=tuple(tuple(c) for c in d["constexprs"]), num_warps=int(d["num_warps"]),
                   dtype=d.get("dtype", ""), vocab=tuple(d.get("vocab", ())), tag=d.get("tag", ""))


# ---------------------------------------------------------------------------------------------------------
# The specs, derived from the launchers


def _ptr(dtype) -> str:
    import torch

    names = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64",
             torch.int64: "i64", torch.int32: "i32"}
    return "*" + names[dtype]


def _specialization(value) -> tuple[str, bool]:
    """(Triton type, divisible by 16) of a scalar launch argument, following JITFunction's specialization."""
    if isinstance(value, str):  # pointer: torch allocations (and row slices at V % 16 == 0) are 16B aligned
        return value, True
    if isinstance(value, bool):
        return "u1", False
    if isinstance(value, int):
        if value == 1:
            return "constexpr", False
        ty = "i32" if -(2**31) <= value < 2**31 else "i64" if -(2**63) <= value < 2**63 else "u64"
        return ty, value % 16 == 0
    if isinstance(value, float):
        return "fp32", False
    raise TypeError(f"unsupported example argument {value!r}")


def kernel_specs(vocabs=VOCABS, dtypes=DTYPES) -> list[KernelSpec]:
    """Every hot specialization of the row kernels at the given vocabulary sizes and logits dtypes.

    CE with/without the gradient pass, log-prob forward with/without entropy, log-prob backward with/without
    the entropy gradient, each with and without soft capping. Arguments mirror TritonRows' launches.
    """
    import torch

    from ptkernels.ops.backends import triton as launch
    from ptkernels.types import compute_dtype

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32,
                    "fp64": torch.float64}
    labels = _ptr(torch.int64)
    ignore_index, inv_temp = -100, 1.0
    by_key: dict[tuple, tuple[KernelSpec, list[int]]] = {}

    def add(kernel: str, args: dict, constexprs: dict, num_warps: int, dtype: str, v: int):
        spec = KernelSpec(kernel=f"{KERNEL_MODULE}:{kernel}", args=tuple(args.items()),
                          constexprs=tuple(constexprs.items()), num_warps=num_warps, dtype=dtype)
        # Two vocabulary sizes share a compile when every argument specializes the same way.
        key = (spec.kernel, tuple((k, _specialization(a)) for k, a in spec.args), spec.constexprs, num_warps)
        if key not in by_key:
            by_key[key] = (spec, [])
        by_key[key][1].append(v)

    for v in vocabs:
        bv = launch.block_v(v)
        nw = launch.num_warps(bv)
        for name in dtypes:
            dt = torch_dtypes[name]
            cd = compute_dtype(dt)
            z, out = _ptr(dt), _ptr(cd)
            compute = launch.tl_compute(dt).name
            for has_softcap in (False, True):
                softcap = 30.0 if has_softcap else 1.0
                transform = {"softcap_hi": softcap, "softcap_lo": 0.0, "inv_temp_hi": inv_temp, "inv_temp_lo": 0.0}
                for write_grad in (False, True):
                    # grad: grad_out (logits dtype, row stride V) and scale.expand(n) (stride 0); without a
                    # gradient the launcher passes z and loss with zero strides.
                    add("ce_rows_kernel", {
                        "z_ptr": z, "z_stride": v, "grad_ptr": z, "grad_stride": v if write_grad else 0,
                        "labels_ptr": labels, "scale_ptr": out, "scale_stride": 0, "loss_ptr": out,
                        "lse_ptr": out, "n_cols": v, "ignore_index": ignore_index, "label_smoothing_hi": 0.0,
                        "label_smoothing_lo": 0.0, "z_loss_hi": 0.0, "z_loss_lo": 0.0, **transform,
                    }, {"HAS_SOFTCAP": has_softcap, "WRITE_GRAD": write_grad, "BLOCK_V": bv,
                        "COMPUTE": compute}, nw, name, v)
                for want_entropy in (False, True):
                    add("logprob_rows_fwd_kernel", {
                        "z_ptr": z, "z_stride": v, "targets_ptr": labels, "logp_ptr": out, "lse_ptr": out,
                        "mean_s_ptr": out, "n_cols": v, "ignore_index": ignore_index, **transform,
                    }, {"HAS_SOFTCAP": has_softcap, "WANT_ENTROPY": want_entropy, "BLOCK_V": bv,
                        "COMPUTE": compute}, nw, name, v)
                for has_ent in (False, True):
                    add("logprob_rows_bwd_kernel", {
                        "z_ptr": z, "z_stride": v, "grad_ptr": z, "grad_stride": v, "targets_ptr": labels,
                        "lse_ptr": out, "mean_s_ptr": out, "g_logp_ptr": out, "g_ent_ptr": out, "n_cols": v,
                        "ignore_index": ignore_index, **transform,
                    }, {"HAS_SOFTCAP": has_softcap, "HAS_ENTROPY_GRAD": has_ent, "BLOCK_V": bv,
                        "COMPUTE": compute}, nw, name, v)

    specs, ids = [], set()
    for spec, vs in by_key.values():
        spec = dataclasses.replace(spec, vocab=tuple(vs))
        if spec.id in ids:  # same flags/dtype/block, another scalar specialization (V % 16 != 0): tag by V
            spec = dataclasses.replace(spec, tag="V" + "/".join(map(str, vs)))
        ids.add(spec.id)
        specs.append(spec)
    specs += jsd_kernel_specs(vocabs, dtypes)
    specs += block_grad_kernel_specs(dtypes=dtypes)
    specs += rl_kernel_specs()
    specs += sequence_kernel_specs()
    return specs


def jsd_kernel_specs(vocabs=VOCABS, dtypes=DTYPES) -> list[KernelSpec]:
    """``KernelSpec``s of ``jsd_rows_kernel`` as ``TritonJSDRows`` launches it: every MODE, with and without
    the gradient pass, with labels; row-major chunks (stride V) and a stride-0 expanded gradient scale."""
    import torch

    from ptkernels.ops.backends import triton as launch
    from ptkernels.types import compute_dtype

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    specs = []
    for v in vocabs:
        bv = launch.jsd_block_v(v)
        for name in dtypes:
            dt = torch_dtypes[name]
            z, out = _ptr(dt), _ptr(compute_dtype(dt))
            for mode in (0, 1, 2):
                for write_grad in (False, True):
                    specs.append(KernelSpec(
                        kernel="ptkernels.kernels.jsd:jsd_rows_kernel",
                        args=(("zs_ptr", z), ("zs_stride", v), ("zt_ptr", z), ("zt_stride", v), ("grad_ptr", z),
                              ("grad_stride", v if write_grad else 0), ("labels_ptr", _ptr(torch.int64)),
                              ("scale_ptr", out), ("scale_stride", 0), ("loss_ptr", out), ("n_cols", v),
                              ("ignore_index", -100), ("beta_hi", 0.5), ("beta_lo", 0.0), ("inv_temp_hi", 1.0),
                              ("inv_temp_lo", 0.0)),
                        constexprs=(("MODE", mode), ("HAS_LABELS", True), ("WRITE_GRAD", write_grad),
                                    ("BLOCK_V", bv), ("COMPUTE", launch.tl_compute(dt).name)),
                        num_warps=launch.num_warps(bv), dtype=name, vocab=(v,), tag=f"mode{mode}-V{v}"))
    return specs


def block_grad_kernel_specs(widths=(1024, 2048, 4096), dtypes=DTYPES) -> list[KernelSpec]:
    """``block_grad_kernel`` as ``TritonBlockRows`` launches it (memory="compact", ops/core/vocab_blocks.py):
    blocks of 1024-4096 vocabulary columns (``block_shape`` at D = 8192 / 4096 / 2048 on CUDA), in place in the
    logits tile, with and without the entropy term and soft capping."""
    import torch

    from ptkernels.ops.backends import triton as launch
    from ptkernels.types import compute_dtype

    torch_dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "fp64": torch.float64}
    specs = []
    for w in widths:
        bv = launch.block_v(w)
        for name in dtypes:
            dt = torch_dtypes[name]
            z, out = _ptr(dt), _ptr(compute_dtype(dt))
            for has_softcap in (False, True):
                for has_b in (False, True):
                    specs.append(KernelSpec(
                        kernel=f"{KERNEL_MODULE}:block_grad_kernel",
                        args=(("z_ptr", z), ("z_stride", w), ("grad_ptr", z), ("grad_stride", w),
                              ("labels_ptr", _ptr(torch.int64)), ("lse_ptr", out), ("coef_ptr", out),
                              ("n_cols", w), ("col0", 2 * w), ("ignore_index", -100),
                              ("softcap_hi", 30.0 if has_softcap else 1.0), ("softcap_lo", 0.0),
                              ("inv_temp_hi", 1.0), ("inv_temp_lo", 0.0)),
                        constexprs=(("HAS_SOFTCAP", has_softcap), ("HAS_B", has_b), ("BLOCK_V", bv),
                                    ("COMPUTE", launch.tl_compute(dt).name)),
                        num_warps=launch.num_warps(bv), dtype=name, vocab=(w,),
                        tag=f"W{w}" + ("-cap" if has_softcap else "") + ("-B" if has_b else "")))
    return specs


def sequence_kernel_specs() -> list[KernelSpec]:
    """The per-sequence segment sums of ops/sequence_logprobs.py (launched by ops/backends/triton.py): padded
    and packed, fp32 and bf16 inputs."""
    mod = "ptkernels.kernels.sequence"
    specs = []
    for packed in (False, True):
        for dtype in ("fp32", "bf16"):
            common = {"cu_ptr": "*i32", "row_stride": 512, "seq_len": 512}
            const = {"HAS_MASK": True, "PACKED": packed, "AVERAGE": True, "BLOCK_T": 512, "COMPUTE": "fp32"}
            specs.append(KernelSpec(
                kernel=f"{mod}:sequence_logprobs_fwd_kernel",
                args=tuple({"logp_ptr": f"*{dtype}", "mask_ptr": "*u8", "out_ptr": "*fp32", "den_ptr": "*fp32",
                            **common}.items()),
                constexprs=tuple(const.items()), num_warps=4, dtype=dtype, tag=f"p{int(packed)}"))
            specs.append(KernelSpec(
                kernel=f"{mod}:sequence_logprobs_bwd_kernel",
                args=tuple({"grad_ptr": f"*{dtype}", "g_ptr": "*fp32", "den_ptr": "*fp32", "mask_ptr": "*u8",
                            **common}.items()),
                constexprs=tuple(const.items()), num_warps=4, dtype=dtype, tag=f"p{int(packed)}"))
    return specs


def _grpo_spec(t, block, kind, bias_kl, has_pw, has_ref, seq_level, write_grad) -> KernelSpec:
    f = "*fp32"
    args = {
        "logp_ptr": f, "old_ptr": f, "ref_ptr": f, "mask_ptr": f, "adv_ptr": f,
        "adv_stride_r": 1, "adv_stride_c": 0, "norm_ptr": f, "norm_stride_r": 1,
        "norm_stride_c": 0, "pw_ptr": f, "pw_stride_r": t, "pw_stride_c": 1, "grad_ptr": f, "loss_ptr": f,
        "kl_ptr": f, "low_ptr": f, "high_ptr": f, "region_ptr": f, "n_cols": t, "lo_hi": 0.8, "lo_lo": 1e-9,
        "hi_hi": 1.2, "hi_lo": 1e-9, "delta_hi": 1.0, "delta_lo": 0.0, "beta_hi": 0.04, "beta_lo": 1e-10,
        "cap_hi": 5.0, "cap_lo": 0.0, "tp_hi": 1.0, "tp_lo": 0.0, "tn_hi": 1.05, "tn_lo": 1e-9,
    }
    return KernelSpec(
        kernel="ptkernels.kernels.grpo:grpo_rows_kernel", args=tuple(args.items()),
        constexprs=(("HAS_REF", has_ref), ("HAS_DELTA", kind == 0), ("SEQ_LEVEL", seq_level),
                    ("WRITE_GRAD", write_grad), ("KIND", kind), ("BIAS_KL", bias_kl), ("HAS_PW", has_pw),
                    ("BLOCK", block), ("COMPUTE", "fp32")),
        num_warps=4, dtype="fp32", vocab=(), tag=f"T{t}" + (f"-K{kind}" if kind else ""))


def rl_kernel_specs(seq_lens=(1024,)) -> list[KernelSpec]:
    """The GRPO surrogate and the GAE scan as ops/backends/triton.py launches them for ops/grpo.py and
    ops/ppo.py: all inputs in the compute dtype (fp32; log-probs come out of the row kernels in fp32), one row
    per program."""
    import triton

    specs = []
    f = "*fp32"
    for t in seq_lens:
        block = min(1024, triton.next_power_of_2(max(t, 16)))
        # (KIND, BIAS_KL, HAS_PW): the clipped types plain and with every option (TRL 1.16's bias-corrected KL,
        # per-token policy weights), then each other loss type's policy term with the options on
        variants = [(0, False, False), (0, True, True), (1, True, True), (2, True, True), (3, True, True),
                    (5, True, True)]
        for kind, bias_kl, has_pw in variants:
            for has_ref in (False, True):
                for seq_level in (False, True):
                    for write_grad in (False, True):
                        if (kind, bias_kl) != (0, False) and not (has_ref and write_grad):
                            continue  # the variants' extra code is all under HAS_REF / WRITE_GRAD's worst case
                        specs.append(_grpo_spec(t, block, kind, bias_kl, has_pw, has_ref, seq_level, write_grad))
        specs.append(_grpo_spec(t, block, 4, False, True, True, True, True))  # GMPO: sequence rows only
        args = {"rewards_ptr": f, "values_ptr": f, "mask_ptr": f, "adv_ptr": f, "ret_ptr": f, "n_cols": t,
                "gamma_hi": 1.0, "gamma_lo": 0.0, "gl_hi": 0.95, "gl_lo": 1e-9}
        specs.append(KernelSpec(kernel="ptkernels.kernels.gae:gae_kernel", args=tuple(args.items()),
                                constexprs=(("COMPUTE", "fp32"),), num_warps=1, dtype="fp32", tag=f"T{t}"))
    return specs


# ---------------------------------------------------------------------------------------------------------
# Toolchain


def find_nvidia_tool(name: str) -> str | None:
    """Path of ``ptxas`` / ``cuobjdump`` as Triton finds it (TRITON_<NAME>_PATH, then the wheel's bin/)."""
    candidates = []
    try:
        from triton import knobs

        tool = getattr(knobs.nvidia, name.replace("-", "_"), None)
        if tool is not None and getattr(tool, "path", None):
            candidates.append(tool.path)
    except Exception:  # older/newer Triton without knobs: fall back to the paths below
        pass
    candidates.append(os.environ.get(f"TRITON_{name.upper().replace('-', '_')}_PATH", ""))
    try:
        import triton

        candidates.append(str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name))
    except ImportError:
        pass
    candidates.append(shutil.which(name) or "")
    for path in candidates:
        if path and os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    return None


def toolchain_problem() -> str | None:
    """Why kernels cannot be compiled for NVIDIA here, or None when they can."""
    try:
        import triton  # noqa: F401
        from triton.backends import backends
    except ImportError as e:
        return f"triton is not importable: {e}"
    if "nvidia" not in backends:
        return f"Triton has no nvidia backend (backends: {sorted(backends)})"
    for tool in ("ptxas", "cuobjdump"):
        if find_nvidia_tool(tool) is None:
            return f"{tool} not found (Triton's nvidia/bin, TRITON_{tool.upper()}_PATH, PATH)"
    return None


def toolchain_versions() -> dict:
    import triton

    out = {"triton": triton.__version__}
    ptxas = find_nvidia_tool("ptxas")
    if ptxas:
        text = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
        m = re.search(r"release (\d+\.\d+)", text)
        out["ptxas"] = m.group(1) if m else "?"
    return out


# ---------------------------------------------------------------------------------------------------------
# Resource usage


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """``cuobjdump --dump-resource-usage`` output -> {function: {"REG": n, "STACK": n, "LOCAL": n, ...}}."""
    out: dict[str, dict[str, int]] = {}
    func = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?)\s*:\s*$", line)
        if m:
            func = m.group(1)
            continue
        if func is not None and "REG:" in line:
            out[func] = {k: int(v) for k, v in re.findall(r"([A-Z_]+(?:\[\d+\])?):(\d+)", line)}
            func = None
    return out


def count_local_memory_instructions(sass: str) -> int:
    """Local loads/stores (LDL/STL: register spills, stack arrays) in ``cuobjdump -sass`` output."""
    return len(re.findall(r"\b(?:LDL|STL)\b", sass))


def cubin_usage(cubin: bytes, function: str | None = None, sass: bool | None = None) -> dict:
    """Registers, stack, local and static shared memory of ``function`` (the only one when None) in a cubin.

    ``local_insts`` counts LDL/STL in the SASS. Disassembling costs far more than the resource dump, so by
    default (``sass=None``) it is done only when the cubin has a stack frame or local memory (without either
    there is nothing for LDL/STL to address) and ``local_insts`` is None otherwise."""
    cuobjdump = find_nvidia_tool("cuobjdump")
    if cuobjdump is None:
        raise RuntimeError("cuobjdump not found")
    fd, path = tempfile.mkstemp(suffix=".cubin")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(cubin)

        def dump(*flags):
            cmd = [cuobjdump, *flags, path]
            return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout

        text = dump("--dump-resource-usage")
        usage = parse_resource_usage(text)
        if function is None or function not in usage:
            if len(usage) != 1:
                raise RuntimeError(f"cannot pick function {function!r} in cuobjdump output:\n{text[:4000]}")
            function = next(iter(usage))
        u = usage[function]
        res = {"function": function, "regs": u.get("REG", 0), "stack": u.get("STACK", 0),
               "local": u.get("LOCAL", 0), "static_shared": u.get("SHARED", 0), "local_insts": None}
        if sass or (sass is None and spills(res)):
            res["local_insts"] = count_local_memory_instructions(dump("-sass", "-fun", function))
    finally:
        os.remove(path)
    return res


def spills(result: dict) -> bool:
    """Whether a compile result uses local memory (register spills or a stack frame)."""
    return bool(result.get("stack") or result.get("local"))


# ---------------------------------------------------------------------------------------------------------
# Compiling (only in a process without TRITON_INTERPRET)


def _resolve_kernel(ref: str):
    module, _, attr = ref.partition(":")
    obj = getattr(importlib.import_module(module), attr)
    from triton.runtime.jit import JITFunction

    seen = 0
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn") and seen < 8:  # autotune/heuristics
        obj, seen = obj.fn, seen + 1
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{ref} is a {type(obj).__name__}, not a JITFunction (is TRITON_INTERPRET set?)")
    return obj


def _ast_source(kernel, spec: KernelSpec):
    import triton.language as tl
    from triton.compiler import ASTSource

    args, consts = dict(spec.args), dict(spec.constexprs)
    names = list(kernel.arg_names)
    unknown = (set(args) | set(consts)) - set(names)
    missing = set(names) - set(args) - set(consts)
    if unknown or missing:
        raise ValueError(f"{spec.id}: spec does not match {kernel.__name__}{tuple(names)}: "
                         f"missing {sorted(missing)}, unknown {sorted(unknown)}")
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(names):
        if name in consts:
            value = consts[name]
            signature[name] = "constexpr"
            constexprs[name] = tl.dtype(value) if isinstance(value, str) else value
            continue
        ty, div16 = _specialization(args[name])
        signature[name] = ty
        if ty == "constexpr":
            constexprs[name] = args[name]
        elif div16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)


def _gpu_target(arch: int):
    try:
        from triton.backends.compiler import GPUTarget
    except ImportError:  # pragma: no cover - other layouts
        from triton.compiler import GPUTarget
    return GPUTarget("cuda", arch, _WARP_SIZE)


def compile_spec(spec: KernelSpec, arch: int) -> dict:
    """Compiles one spec for ``sm_<arch>``; returns its resource usage, or the error."""
    res = {"id": spec.id, "arch": arch, "kernel": spec.kernel_name, "flags": spec.flags, "dtype": spec.dtype,
           "block_v": spec.block_v, "num_warps": spec.num_warps, "vocab": list(spec.vocab), "error": None}
    t0 = time.time()
    try:
        import triton

        kernel = _resolve_kernel(spec.kernel)
        compiled = triton.compile(_ast_source(kernel, spec), target=_gpu_target(arch),
                                  options={"num_warps": spec.num_warps})
        md = compiled.metadata
        res.update(cubin_usage(compiled.asm["cubin"], getattr(md, "name", None)))
        res["triton_shared"] = int(getattr(md, "shared", 0) or 0)
        # Some Triton versions put ptxas' counts in the metadata; without a driver 3.6-3.9 do not.
        for key in ("n_regs", "n_spills"):
            val = getattr(md, key, None)
            res[f"meta_{key}"] = int(val) if isinstance(val, int) else None
    except Exception as e:  # reported per spec
        res["error"] = f"{type(e).__name__}: {e}"
    res["seconds"] = round(time.time() - t0, 2)
    return res


def _compile_task(task: tuple[dict, int]) -> dict:
    spec, arch = task
    return compile_spec(KernelSpec.from_json(spec), arch)


def compile_all(tasks: list[tuple[KernelSpec, int]], jobs: int | None = None) -> list[dict]:
    """Compiles (spec, arch) pairs in worker processes; this process must not be in interpreter mode."""
    if _interpreting():
        raise RuntimeError("TRITON_INTERPRET is on: compile in a process without it (compile_in_subprocess)")
    payload = [(spec.to_json(), arch) for spec, arch in tasks]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(payload)))
    if jobs == 1:
        return [_compile_task(t) for t in payload]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # spawn: fresh interpreters, no MLIR/LLVM state inherited through fork
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(_compile_task, payload))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def compile_in_subprocess(tasks: list[tuple[KernelSpec, int]], jobs: int | None = None, timeout: float = 1200,
                          extra_sys_path=()) -> tuple[list[dict], dict]:
    """Runs ``compile_all`` in a fresh Python process without TRITON_INTERPRET.

    Returns (one result per task, in order; toolchain versions). ``extra_sys_path`` lets the child import
    kernels that live outside the package (a test module)."""
    repo = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch default; silences Triton 3.9's warning
    env["PYTHONPATH"] = os.pathsep.join([*map(str, extra_sys_path), repo, env.get("PYTHONPATH", "")]).rstrip(
        os.pathsep)
    with tempfile.TemporaryDirectory() as tmp:
        inp, out = Path(tmp, "tasks.json"), Path(tmp, "results.json")
        inp.write_text(json.dumps([[spec.to_json(), arch] for spec, arch in tasks]))
        cmd = [sys.executable, "-c", "from tools.aot_compile import main; main()",
               "--tasks", str(inp), "--out", str(out)]
        if jobs:
            cmd += ["--jobs", str(jobs)]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not out.exists():
            raise RuntimeError(f"AOT compile process failed (rc={proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
        data = json.loads(out.read_text())
    return data["results"], data["toolchain"]


def main(argv=None) -> None:
    import argparse

    p = argparse.ArgumentParser(description="AOT-compile Triton kernels for NVIDIA targets; JSON results")
    p.add_argument("--tasks", help="JSON file of [[spec, arch], ...] (default: kernel_specs() x --archs)")
    p.add_argument("--archs", default=",".join(map(str, ARCHS)))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--out", help="write JSON here (default: stdout)")
    a = p.parse_args(argv)
    if a.tasks:
        tasks = [(KernelSpec.from_json(s), int(arch)) for s, arch in json.loads(Path(a.tasks).read_text())]
    else:
        tasks = [(s, int(arch)) for s in kernel_specs() for arch in a.archs.split(",")]
    problem = toolchain_problem()
    if problem:
        raise SystemExit(problem)
    data = json.dumps({"toolchain": toolchain_versions(), "results": compile_all(tasks, a.jobs)}, indent=1)
    if a.out:
        Path(a.out).write_text(data)
    else:
        print(data)


if __name__ == "__main__":
    main()
