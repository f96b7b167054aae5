"""stdin/stdout tests of the code reward: reading the cases, comparing the output.

stdin/stdout tests (``{"input": ..., "output": ...}`` rows as in APPS and CodeContests) run the program once per
case in a fresh sandboxed process; its stdout is compared here with ``same_output``, and the expected output never
enters the sandbox. Test sources (asserts, ``def check(candidate)``, loops) run apart from the model's code, in a
sandboxed process of their own (``rewards/runner.py``, ``verifiers.make_code_verifier``).
"""

from __future__ import annotations

__all__ = ["same_output", "stdio_cases"]


# ------------------------------------------------------------------------------------------------- stdin/stdout
def stdio_cases(tests) -> list[tuple[str, str]] | None:
    """[(input, expected output)] from ``[{"input", "output"}, ...]`` or APPS' ``{"inputs": [...], "outputs":
    [...]}``; None when ``tests`` is neither."""
    if isinstance(tests, dict) and "inputs" in tests and "outputs" in tests:
        ins, outs = tests["inputs"], tests["outputs"]
        if not isinstance(ins, list) or not isinstance(outs, list) or len(ins) != len(outs):
            raise ValueError("code verifier: row['tests'] inputs and outputs must be lists of the same length")
        tests = [{"input": i, "output": o} for i, o in zip(ins, outs)]
    if not isinstance(tests, (list, tuple)) or not tests or not all(isinstance(t, dict) for t in tests):
        return None
    cases = []
    for t in tests:
        if not isinstance(t.get("input"), str) or not isinstance(t.get("output"), str):
            raise ValueError("code verifier: each stdin/stdout test needs str 'input' and 'output' fields")
        cases.append((t["input"], t["output"]))
    return cases


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def same_output(got: str, expected: str) -> bool:
    """Output equality as the contest judges use it: trailing spaces on a line and trailing blank lines ignored."""
    return _lines(got) == _lines(expected)
