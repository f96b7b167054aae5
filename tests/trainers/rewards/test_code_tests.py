"""The code verifier end to end: tests apart from the model's code, plain data between them; stdin/stdout cases."""

import ast

import pytest

from ptkernels.trainers.rewards import code_tests as C
from ptkernels.trainers.rewards import runner as R
from ptkernels.trainers.rewards import verifiers as V

from .marks import needs_bwrap


class _Ref:
    def __init__(self, n):
        self.n = n


def test_plain_data_round_trip_and_refusals():
    enc, dec = R._encoder(), R._decoder(_Ref)
    value = [1, float("nan"), ("a", b"\xff"), {1}, {frozenset({2}): None}, 1 - 2j, True, -0.0, "x\ny"]
    back = dec(ast.literal_eval(repr(enc(value))))
    assert back[0] == 1 and back[1] != back[1] and back[2:] == value[2:] and str(back[7]) == "-0.0"
    assert type(back[2]) is tuple and type(back[3]) is set

    class Anything(int):
        def __eq__(self, other):
            return True

        def __int__(self):
            return 9
    # a subclass's own __eq__ never crosses, its value does (read through int's own slot, not its __int__)
    assert dec(ast.literal_eval(repr(enc(Anything(5))))) == 5 and type(dec(enc(Anything(5)))) is int
    with pytest.raises(TypeError):
        enc(object())
    with pytest.raises(ValueError):
        deep = []
        deep.append(deep)
        enc(deep)
    for bad in (("object", ()), ("list", [1]), ["list"], ("dict", ((1,),)), 1.5, ("float", 1.5), ("ref", "1")):
        with pytest.raises((ValueError, TypeError)):
            dec(bad)
    assert dec(("list", (("ref", 3),)))[0].n == 3  # references only where a tag says so
    import collections
    import decimal
    import fractions
    pair = collections.namedtuple("Pair", "x y")
    for v in (range(1, 9, 3), int, type(None), pair(1, [2]), fractions.Fraction(1, 3), decimal.Decimal("1.10")):
        back = dec(ast.literal_eval(repr(enc(v))))
        assert back == v and type(back).__name__ == type(v).__name__
    assert dec(enc(pair(1, 2))).y == 2 and dec(enc(bytearray(b"ab"))) == b"ab"
    assert R._encoder(lambda x: ("ref", 7))(object()) == ("ref", 7)


@needs_bwrap
def test_tests_reach_functions_classes_and_generators_but_compare_only_plain_data():
    program = (
        "```python\nclass Stack:\n    def __init__(self):\n        self.items = []\n"
        "    def push(self, v):\n        self.items.append(v)\n    def pop(self):\n        return self.items.pop()\n"
        "    def __len__(self):\n        return len(self.items)\n"
        "def count(n):\n    yield from range(n)\n"
        "def sort_in_place(xs):\n    xs.sort()\n"
        "def boom(x):\n    raise ValueError('negative')\n"
        "class Custom(Exception):\n    pass\n"
        "def custom():\n    raise Custom('mine')\n"
        "def identity(x):\n    return x\n"
        "class Base(Exception):\n    pass\nclass Derived(Base):\n    pass\n"
        "def derived():\n    raise Derived('d')\n"
        "import collections\ndef letters(s):\n    return collections.Counter(s)\n"
        "def point():\n    return collections.namedtuple('P', 'x y')(1, 2)\n"
        "def big():\n    return 7 ** 20000\n"
        "def stops():\n    raise StopIteration\n"
        "def sort_by(xs, key):\n    return sorted(xs, key=key)\n"
        "def call_with(fn):\n    return fn(identity)\n"
        "from fractions import Fraction\ndef half():\n    return Fraction(1, 2)\n"
        "def keep_type(xs, t):\n    return [x for x in xs if isinstance(x, t)]\n```"
    )
    passing = [
        "s = Stack()\ns.push(1)\ns.push(2)\nassert s.pop() == 2 and len(s) == 1",
        "assert list(count(3)) == [0, 1, 2] and sum(count(4)) == 6",
        "xs = [3, 1, 2]\nsort_in_place(xs)\nassert xs == [1, 2, 3]",  # in-place changes come back
        "try:\n    boom(1)\nexcept ValueError as e:\n    assert str(e) == 'negative'\nelse:\n    raise AssertionError",
        "try:\n    custom()\nexcept Custom as e:\n    assert str(e) == 'mine'",  # the model's own exception class
        "s = Stack()\nassert identity(s) is not None",  # a reference goes back and forth
        "try:\n    derived()\nexcept Base as e:\n    assert str(e) == 'd' and isinstance(e, Derived)",
        "assert letters('aab') == {'a': 2, 'b': 1} and point() == (1, 2)",  # Counter, namedtuple: plain values
        "assert big() == 7 ** 20000",  # past the default int-to-str limit
        # the test's own functions run in the tests' process when the model's code calls them, also nested
        "assert sort_by([3, 1, 2], key=lambda v: -v) == [3, 2, 1] and sort_by(['bb', 'a'], len) == ['a', 'bb']",
        "assert call_with(lambda g: g(4) + 1) == 5",
        "assert point().x == 1 and half() == 0.5 and keep_type([1, 'a', 2.0], int) == [1]",
        "assert sum(identity(range(4))) == 6",
        "s = Stack()\nassert not s\ns.push(1)\nassert s",  # truth value: the model's own __len__, as in one process
    ]
    failing = [
        "assert Stack() == Stack()",  # comparing objects of the model's code: refused
        "s = Stack()\ns.push(1)\nassert 1 in s",
        "assert boom(1) == 0",
        "assert undefined_name(1) == 1",
        "for x in map(lambda _: stops(), [1]):\n    pass",  # StopIteration out of a call must not end map() quietly
        "assert sort_by(['1'], key=eval) == ['1']",  # builtins that run code are never callable from the model
    ]
    assert V.code(program, {"tests": passing}) == 1.0
    assert V.code(program, {"tests": failing}) == 0.0
    # the model's imports of standard modules reach the tests as the tests' own copies; its stand-ins for builtins
    # or standard modules never do
    imports = "```python\nimport math\ndef area(r):\n    return math.pi * r * r\n```"
    assert V.code(imports, {"tests": "assert math.isclose(area(2), 12.566, rel_tol=1e-3)"}) == 1.0
    fakes = ("```python\ndef f(x):\n    return 0\nabs = lambda x: 0\nclass M:\n    def isclose(self, *a):\n"
             "        return True\nmath = M()\n```")
    assert V.code(fakes, {"tests": ["assert abs(f(3) - 7) < 0.5", "assert math.isclose(f(3), 7)"]}) == 0.0
    # the model's code failing before it serves: nothing passes, quickly
    assert V.code("```python\ndef f():\n    return 1\nraise SystemExit(0)\n```", {"tests": "assert f() == 1"}) == 0.0


@needs_bwrap
def test_unittest_and_pytest_style_tests_run_their_cases():
    right = "```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return 0\n```"
    tests = [
        "import unittest\nclass T(unittest.TestCase):\n    def test_add(self):\n"
        "        self.assertEqual(add(2, 3), 5)\nunittest.main()",  # exits with 0 on success: its own exit decides
        "import unittest\nclass U(unittest.TestCase):\n    def test_add(self):\n"
        "        self.assertEqual(add(1, 1), 2)\nunittest.main(exit=False)",  # returns even on failures: judged here
        "def test_add():\n    assert add(4, 5) == 9",  # pytest style, never called by the source: called here
        "from solution import add as plus\nassert plus(1, 2) == 3",
        "def helper(x):\n    return x * 2",  # a helper defined by one test ...
        "assert add(helper(1), 0) == 2",  # ... is there for the next (the tests share one module, as one file)
        "class TestAdd:\n    def setup_method(self, method):\n        self.n = 2\n"
        "    def test_add(self):\n        assert add(self.n, 1) == 3",  # pytest's plain test classes
        "async def test_async():\n    assert add(1, 1) == 2",
        "def test_helper(x, y):\n    assert add(x, y) == x + y\ntest_helper(1, 2)",  # called by the source: once
    ]
    assert V.code(right, {"tests": tests}) == 1.0
    assert V.code(wrong, {"tests": tests}) == pytest.approx(1 / 9)  # only the helper's definition passes
    # named like a test but not runnable here: fails rather than passing unrun
    for unrunnable in ("def test_gen():\n    yield\n    assert add(1, 1) == 3",
                       "def test_fixture(capsys):\n    assert add(1, 1) == 3",
                       "class TestInit:\n    def __init__(self):\n        pass\n    def test_a(self):\n        pass",
                       "import unittest\nunittest.main()"):  # exits before any check
        assert V.code(right, {"tests": unrunnable}) == 0.0, unrunnable
    # the model's functions named like builtins or standard modules: neither the builtin nor the model's answers
    redefines = "```python\ndef pow(a, b):\n    return 0\ndef copy(x):\n    return x\n```"
    assert V.code(redefines, {"tests": ["assert pow(2, 10) == 1024", "assert copy([1]) == [1]"]}) == 0.0
    # an exception's ancestry comes back: the test's `except ValueError` catches a JSONDecodeError
    program = "```python\nimport json\ndef parse(s):\n    return json.loads(s)\n```"
    assert V.code(program, {"tests": "try:\n    parse('{')\nexcept ValueError:\n    pass\nelse:\n"
                                     "    raise AssertionError"}) == 1.0


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
    # HumanEval's form: the check function and its call.
    assert V.code(sol, {"tests": ["def check(c):\n    assert c(2, 2) == 4\ncheck(add)",
                                  "def check(c):\n    assert c(2, 2) == 5\ncheck(add)"]}) == 0.5
    io = "```python\nimport sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b)\n```"
    cases = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5", "output": "10"}, {"input": "1 1", "output": "3"}]
    assert V.code(io, {"tests": cases}) == pytest.approx(2 / 3)
    crash = io.replace("print(a + b)", "print(a + b)\nraise SystemExit(1)")
    assert V.code(crash, {"tests": cases}) == 0.0  # right output, non-zero exit
