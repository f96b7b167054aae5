"""Code-reward sandbox overhead and verifier cost on adversarial text (CPU; times are never asserted).

    sandbox-run        ``run_python("import os")``: bubblewrap, namespaces, seccomp, the trusted runner, teardown
    bare-python        the same interpreter started directly (``-I -S -B -c "import os"``): the floor (every
                       program, and the runner, imports os)
    code-verifier      one completion against 4 split asserts (one sandboxed run)
    code-parallel-8    8 completions scored at once in a thread pool (GRPO's scoring), per completion in extra_info
    verifier-1MB       math / fact / format / exact on 1 MB of unclosed ``\\boxed{`` (the old quadratic case)

``extra_info["fixed_overhead_ms"]`` of sandbox-run is its mean minus bare-python's, measured in the same session.
"""

from __future__ import annotations

import subprocess
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from ptkernels.trainers.rewards import verifiers as V
from ptkernels.trainers.rewards.sandbox import run_python, sandbox_info

pytestmark = pytest.mark.skipif(sandbox_info()["isolation"] != "bubblewrap", reason="bubblewrap not installed")

SOLUTION = "```python\ndef add(a, b):\n    return a + b\n```"
ROW = {"tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add('a', 'b') == 'ab'",
                 "assert add([1], [2]) == [1, 2]"]}
_FLOOR = {}


def _mean_s(fn, n: int = 10) -> float:
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def test_bare_python(benchmark):
    python = sandbox_info()["python"]
    run = lambda: subprocess.run([python, "-I", "-S", "-B", "-c", "import os"], check=True)  # noqa: E731
    benchmark.pedantic(run, rounds=20, warmup_rounds=2)
    _FLOOR["bare"] = benchmark.stats.stats.mean


def test_sandbox_run(benchmark):
    result = benchmark.pedantic(lambda: run_python("import os"), rounds=20, warmup_rounds=2)
    assert result.ok
    info = sandbox_info()
    benchmark.extra_info.update(isolation=info["isolation"], seccomp=info["seccomp"], run_as=info["run_as"])
    bare = _FLOOR.get("bare") or _mean_s(
        lambda: subprocess.run([info["python"], "-I", "-S", "-B", "-c", "import os"], check=True))
    benchmark.extra_info["fixed_overhead_ms"] = round((benchmark.stats.stats.mean - bare) * 1e3, 1)


def test_code_verifier(benchmark):
    assert benchmark.pedantic(lambda: V.code(SOLUTION, ROW), rounds=10, warmup_rounds=1) == 1.0


def test_code_parallel_8(benchmark):
    def score():
        with ThreadPoolExecutor(max_workers=8) as pool:
            return list(pool.map(lambda _: V.code(SOLUTION, ROW), range(8)))

    assert benchmark.pedantic(score, rounds=5, warmup_rounds=1) == [1.0] * 8
    serial = _mean_s(lambda: V.code(SOLUTION, ROW), n=8)
    benchmark.extra_info.update(per_completion_parallel_ms=round(benchmark.stats.stats.mean / 8 * 1e3, 1),
                                per_completion_serial_ms=round(serial * 1e3, 1))


@pytest.mark.parametrize("name", ["math", "fact", "format", "exact"])
def test_verifier_1mb(benchmark, name):
    text = "\\boxed{" * ((1 << 20) // 7)
    row = {"answer": "42", "facts": {"k": "x"}, "fact_key": "k"}
    assert benchmark.pedantic(lambda: V.get_verifier(name)(text, row), rounds=5) == 0.0
