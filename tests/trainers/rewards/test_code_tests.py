"""Splitting asserts into call + literal, plain values back, verdicts here; stdin/stdout cases."""

import pytest

from ptkernels.trainers.rewards import code_tests as C
from ptkernels.trainers.rewards import verifiers as V

from .marks import needs_bwrap


@pytest.mark.parametrize(
    "source, op, expected, swapped",
    [
        ("assert f(1) == 2", "Eq", 2, False),
        ("assert [1, (2, 3)] == f(x=1)", "Eq", [1, (2, 3)], True),
        ("assert f('a') != -3.5", "NotEq", -3.5, False),
        ("assert f() in {1, 2}", "In", {1, 2}, False),
        ("assert f() is None", "Is", None, False),
        ("assert abs(f(1) - 3.14) < 1e-6, 'close'", "Lt", 1e-6, False),
    ],
)
def test_split_compare(source, op, expected, swapped):
    split = C.split_test(source)
    (check,) = split.checks
    assert (check.op, check.expected, check.swapped) == (op, expected, swapped)
    assert repr(expected) not in check.expr  # the expected value stays here


def test_split_shapes():
    split = C.split_test("import math\nx = [3, 1, 2]\nassert sort(x) == [1, 2, 3]\nassert is_ok(x)\nassert not bad()")
    assert [k for k, _ in split.statements] == ["exec", "exec", "check", "check", "check"]
    assert [c.op for c in split.checks] == ["Eq", "truthy", "falsy"]
    for whole in ("def check(c):\n    assert c(1) == 2\ncheck(f)", "for i in range(3):\n    assert f(i) == i",
                  "assert f(1) == f(2)", "assert 0 < f(1) < 3", "assert f() is 3", "f(1)", "raise SystemExit(0)",
                  "while True: pass", "def (:"):
        assert C.split_test(whole) is None, whole


def test_decode_and_verdict():
    enc = ("list", (1, ("float", "nan"), ("tuple", ("a", ("bytes", "ff"))), ("set", (1,)),
                    ("dict", ((("frozenset", (2,)), None),)), ("complex", "1.0", "-2.0"), True))
    value = C.decode(enc)
    assert value[0] == 1 and value[1] != value[1] and value[2:] == [("a", b"\xff"), {1}, {frozenset({2}): None},
                                                                        1 - 2j, True]
    for bad in (("object", ()), ("list", [1]), ["list"], ("dict", ((1,),)), 1.5, ("float", 1.5)):
        with pytest.raises(ValueError):
            C.decode(bad)
    check = C.split_test("assert f() == 3").checks[0]
    assert C.verdict(check, 3) and C.verdict(check, 3.0) and not C.verdict(check, "3")
    assert not C.verdict(C.split_test("assert f() < 3").checks[0], None)  # TypeError: a failed test
    assert C.read_reports("(0, 0, 'value', 1)\n(0, 0, 'value', 2)\n(1, 0, 'error', 'X')\n__import__('os')\n") == {
        (1, 0): ("error", "X")}


def test_stdio_cases_and_output_compare():
    assert C.stdio_cases([{"input": "1\n", "output": "2\n"}]) == [("1\n", "2\n")]
    assert C.stdio_cases({"inputs": ["a", "b"], "outputs": ["c", "d"]}) == [("a", "c"), ("b", "d")]
    assert C.stdio_cases(["assert True"]) is None
    with pytest.raises(ValueError, match="input"):
        C.stdio_cases([{"input": 1, "output": "2"}])
    assert C.same_output("3  \n4\n\n", "3\n4") and not C.same_output("3 4", "3\n4")


@needs_bwrap
def test_code_verifier_end_to_end():
    sol = "```python\nimport sys\ndef add(a, b):\n    return a + b\n```"
    assert V.code(sol, {"tests": ["assert add(1, 2) == 3", "assert add((1,), (2,)) == (1, 2)",
                                  "assert add(1, 2) == 4", "x = add('a', 'b')\nassert x == 'ab'"]}) == 0.75
    # Unsplittable tests run whole, one fresh process each, exit status required.
    assert V.code(sol, {"tests": ["def check(c):\n    assert c(2, 2) == 4\ncheck(add)",
                                  "def check(c):\n    assert c(2, 2) == 5\ncheck(add)"]}) == 0.5
    io = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "1 1", "output": "3"}]
    assert V.code(io, {"tests": cases}) == pytest.approx(2 / 3)
    crash = io.replace("print(a + b)", "print(a + b)\nraise SystemExit(1)")
    assert V.code(crash, {"tests": cases}) == 0.0  # right output, non-zero exit
