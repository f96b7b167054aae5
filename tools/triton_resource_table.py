"""Prints a markdown table of the Triton kernels' register / stack / local-memory usage for sm_80 and sm_90.

Compiles every spec in tools/aot_compile.py ahead of time (no GPU needed: ptxas and cuobjdump ship with
Triton's wheel), in a subprocess without TRITON_INTERPRET. Paste the output into benchmarks/RESULTS.md.

    python tools/triton_resource_table.py [--archs 80,90] [--jobs N] [--json results.json]

Exits with status 1 when a kernel fails to compile or spills.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import aot_compile as aot  # noqa: E402


def table(results: list[dict], toolchain: dict) -> str:
    lines = [
        f"Triton {toolchain.get('triton', '?')}, ptxas {toolchain.get('ptxas', '?')}; "
        "compiled ahead of time (no GPU); registers/stack/local from `cuobjdump --dump-resource-usage`, "
        "smem = Triton's shared-memory scratch (metadata). "
        f"Shapes: V in {{{', '.join(map(str, aot.VOCABS))}}}.",
        "",
        "| kernel | flags | arch | dtype | BLOCK_V | warps | registers | stack (B) | local (B) | spills | "
        "smem (B) |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    order = {arch: i for i, arch in enumerate(aot.ARCHS)}
    rows = sorted(results, key=lambda r: (r["kernel"], r["flags"].count("+"), r["flags"], r["dtype"],
                                          order.get(r["arch"], r["arch"])))
    for r in rows:
        head = (f"| {r['kernel']} | {r['flags']} | sm_{r['arch']} | {r['dtype']} | {r['block_v']} "
                f"| {r['num_warps']} |")
        if r["error"]:
            lines.append(f"{head} compile error: {r['error'].splitlines()[0][:120]} | | | | |")
            continue
        spill = "**yes**" if aot.spills(r) else "no"
        lines.append(f"{head} {r['regs']} | {r['stack']} | {r['local']} | {spill} | {r['triton_shared']} |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--archs", default=",".join(map(str, aot.ARCHS)))
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--json", help="also write the raw results here")
    a = p.parse_args()
    problem = aot.toolchain_problem()
    if problem:
        print(f"cannot compile for NVIDIA here: {problem}", file=sys.stderr)
        return 2
    tasks = [(spec, int(arch)) for spec in aot.kernel_specs() for arch in a.archs.split(",")]
    results, toolchain = aot.compile_in_subprocess(tasks, jobs=a.jobs)
    if a.json:
        Path(a.json).write_text(json.dumps({"toolchain": toolchain, "results": results}, indent=1))
    print(table(results, toolchain))
    bad = [r for r in results if r["error"] or aot.spills(r)]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
