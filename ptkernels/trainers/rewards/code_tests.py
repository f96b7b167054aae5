"""Code-reward tests whose verdict the sandboxed code cannot forge.

A test ``assert CALL == EXPECTED`` is split with ``ast``: ``EXPECTED`` must be a literal (``ast.literal_eval``),
and only ``CALL`` runs in the sandbox. Its value comes back as plain data (``decode``: exact built-in types only,
parsed with ``ast.literal_eval``, so no object with a custom ``__eq__`` can cross), and the trainer compares. The
expected values never enter the sandbox, so code that tampers with the harness can only report values it chose,
which earns the reward only if they are the right ones. The same holds for ``!=``, ``<``, ``<=``, ``>``, ``>=``,
``in``, ``not in``, ``is``/``is not`` (against None, True, False), literal on either side, and for a bare ``assert
EXPR``/``assert not EXPR`` (the value must be plain data, truthy or falsy).

A test may hold several statements: top-level checks of those forms are split, the other top-level statements
(assignments, imports, calls) run in the sandbox as setup, in order. A test with an ``assert`` anywhere else (a
loop, a ``def check(candidate)``), or with no assert at all, cannot be split: it runs as a whole, in a fresh
process of its own, and passes only when the runner reports that it finished and the process exits 0
(``UNSPLIT``). Such tests sit next to the model's code and are as strong as the old harness; prefer the split
forms.

stdin/stdout tests (``{"input": ..., "output": ...}`` rows as in APPS and CodeContests) run the program once per
case in a fresh process; its stdout is compared here with ``same_output``.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass, field

__all__ = ["Check", "SplitTest", "split_test", "decode", "verdict", "read_reports", "same_output", "stdio_cases"]

_COMPARE = {
    ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
    ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
    ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b,
    ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b,
}
_SINGLETONS = (None, True, False)
_NO_LITERAL = object()


@dataclass(frozen=True)
class Check:
    """One split assert: ``expr`` (source) runs in the sandbox; the verdict is ``op(value, expected)`` (or
    ``op(expected, value)`` when ``swapped``), or truthiness when ``op`` is "truthy"/"falsy"."""

    expr: str
    op: str
    expected: object = None
    swapped: bool = False


@dataclass
class SplitTest:
    """A test as the sandbox runs it: ``statements`` are ("exec", source) or ("check", expr source) pairs, and
    ``checks`` the verdict rule of each ("check", ...) statement, in order."""

    statements: list[tuple[str, str]] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)


def _literal(node: ast.expr):
    try:
        return ast.literal_eval(node)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return _NO_LITERAL


def _split_assert(node: ast.Assert) -> Check | None:
    test = node.test
    if isinstance(test, ast.Compare) and len(test.ops) == 1:
        op, left, right = type(test.ops[0]), test.left, test.comparators[0]
        left_lit, right_lit = _literal(left), _literal(right)
        if (left_lit is _NO_LITERAL) == (right_lit is _NO_LITERAL):
            return None  # both sides code (or both constants): no literal to keep outside
        swapped = left_lit is not _NO_LITERAL
        expected, expr = (left_lit, right) if swapped else (right_lit, left)
        if op in (ast.Is, ast.IsNot) and not any(expected is s for s in _SINGLETONS):
            return None
        return Check(ast.unparse(expr), op.__name__, expected, swapped)
    if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        return Check(ast.unparse(test.operand), "falsy")
    if isinstance(test, ast.Compare):
        return None  # chained comparison
    return Check(ast.unparse(test), "truthy")


def split_test(source: str) -> SplitTest | None:
    """The split form of one test's source, or None when it must run whole (see the module docstring)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, MemoryError, RecursionError):
        return None
    split = SplitTest()
    for stmt in tree.body:
        if isinstance(stmt, ast.Assert):
            check = _split_assert(stmt)
            if check is None:
                return None
            split.statements.append(("check", check.expr))
            split.checks.append(check)
        else:
            if any(isinstance(n, ast.Assert) for n in ast.walk(stmt)):
                return None
            split.statements.append(("exec", ast.unparse(stmt)))
    return split if split.checks else None


# ------------------------------------------------------------------------------------ values back from the sandbox
_SEQUENCES = {"list": list, "tuple": tuple, "set": set, "frozenset": frozenset}


class _Bad(Exception):
    pass


def _decode(x, depth: int = 0):
    if depth > 100:
        raise _Bad
    t = type(x)
    if x is None or t in (bool, int, str):
        return x
    if t is not tuple or not x or type(x[0]) is not str:
        raise _Bad
    tag, rest = x[0], x[1:]
    if tag == "float" and len(rest) == 1 and type(rest[0]) is str:
        return float(rest[0])
    if tag == "complex" and len(rest) == 2 and all(type(r) is str for r in rest):
        return complex(float(rest[0]), float(rest[1]))
    if tag == "bytes" and len(rest) == 1 and type(rest[0]) is str:
        return bytes.fromhex(rest[0])
    if tag in _SEQUENCES and len(rest) == 1 and type(rest[0]) is tuple:
        return _SEQUENCES[tag](_decode(v, depth + 1) for v in rest[0])
    if tag == "dict" and len(rest) == 1 and type(rest[0]) is tuple:
        out = {}
        for pair in rest[0]:
            if type(pair) is not tuple or len(pair) != 2:
                raise _Bad
            out[_decode(pair[0], depth + 1)] = _decode(pair[1], depth + 1)
        return out
    raise _Bad


def decode(encoded):
    """The plain value the runner encoded (``rewards/runner.py``), or raises ``ValueError`` on anything else."""
    try:
        return _decode(encoded)
    except (_Bad, TypeError, ValueError, RecursionError, OverflowError) as e:
        raise ValueError("not a plain value") from e


def verdict(check: Check, value) -> bool:
    """Whether the plain ``value`` of ``check.expr`` passes. Runs here, on plain data only."""
    try:
        if check.op == "truthy":
            return bool(value)
        if check.op == "falsy":
            return not value
        op = _COMPARE[getattr(ast, check.op)]
        return bool(op(check.expected, value) if check.swapped else op(value, check.expected))
    except (TypeError, ValueError, RecursionError, OverflowError):
        return False  # what the assert would have raised: a failed test


def read_reports(text: str) -> dict[tuple[int, int], tuple[str, object]]:
    """The runner's check reports: (test, statement) -> ("value", encoded) or ("error", name). A key reported twice
    (something else wrote to the report descriptor) is dropped: conflicting reports pass nothing."""
    seen: dict[tuple[int, int], tuple[str, object]] = {}
    dropped = set()
    for line in text.splitlines():
        try:
            rec = ast.literal_eval(line)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if (type(rec) is not tuple or len(rec) != 4 or type(rec[0]) is not int or type(rec[1]) is not int
                or rec[2] not in ("value", "error")):
            continue
        key = (rec[0], rec[1])
        if key in seen:
            dropped.add(key)
        seen[key] = (rec[2], rec[3])
    for key in dropped:
        del seen[key]
    return seen


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
