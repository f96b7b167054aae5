"""Verifiable rewards: answer extraction, exact-rational equivalence, formats, facts, code, the registry."""

import os
import uuid
from fractions import Fraction

import pytest

from ptkernels.trainers.rewards import verifiers as V

from .marks import needs_bwrap


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("Adding up, we get \\boxed{42}.", "42"),
        ("so \\boxed{\\frac{3}{4}}", "0.75"),
        ("so \\boxed{\\dfrac{3}{4}}", "3/4"),
        ("\\boxed{-\\frac{3}{4}}", -0.75),
        ("first \\boxed{12}, corrected: \\boxed{13}", 13),
        ("\\boxed{{1{,}234}}", "1234"),
        ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"),
        ("#### 1,234", 1234),
        ("#### 1,234,567.5", "1234567.5"),
        ("The answer is -7.", "-7"),
        ("Answer: 42 apples", "42"),
        ("The final answer is $18$.", 18),
        ("x = 2, so the ratio is 3/4", "0.75"),
        ("it costs 3.5 dollars", "7/2"),
        ("\\boxed{2*(3+4)}", 14),
        ("\\boxed{(1+2)/3 - -1}", 2),
        ("\\boxed{2 \\times 3}", "6"),
        ("\\boxed{x = 5}", "5"),
        ("\\boxed{0.333333}", "1/3"),
        ("\\boxed{0.1}", 0.1),
        ("\\boxed{10}", 10.0),
        ("\\boxed{B}", "B"),
        ("\\boxed{50\\%}", "50"),
    ],
)
def test_math_accepts_equivalent_answers(completion, answer):
    assert V.math(completion, {"answer": answer}) == 1.0


@pytest.mark.parametrize(
    "completion, answer",
    [
        ("\\boxed{41}", "42"),
        ("\\boxed{0.33}", "1/3"),  # not within tolerance of a non-terminating decimal
        ("\\boxed{0.7500001}", "3/4"),  # 3/4 is exact in decimal: no tolerance
        ("#### 1234", "1,235"),
        ("The answer is 7.", "-7"),
        ("\\boxed{12} and later \\boxed{13}", "12"),  # the last box counts
        ("\\boxed{2x+3}", "2"),  # leading number of an expression is not the answer
        ("\\boxed{1/0}", "1"),
        ("\\boxed{" + "(" * 100 + "1" + ")" * 100 + "}", "1"),  # over the parser's size bound
        ("\\boxed{2**10}", "1024"),  # no power operator
        ("\\boxed{A}", "B"),
        ("", "1"),
        ("garbage without digits", "1"),
        ("\\boxed{", "1"),
        ("#### ", "0"),
        ("\\boxed{__import__('os').getpid()}", "0"),
    ],
)
def test_math_rejects_wrong_or_garbage(completion, answer):
    assert V.math(completion, {"answer": answer}) == 0.0


def test_math_extraction_priority():
    assert V.extract_math_answer("#### 5\n\\boxed{6}") == "6"
    assert V.extract_math_answer("answer is 3\n#### 4") == "4"
    assert V.extract_math_answer("The answer is 3. Some 9 more") == "3. Some 9 more"
    assert V.extract_math_answer("1 then 2 then -3.5") == "-3.5"
    assert V.extract_math_answer("nothing here") is None
    assert V.extract_math_answer(None) is None


def test_parse_number_is_exact():
    assert V.parse_number("1,234") == (Fraction(1234), False)
    assert V.parse_number("\\frac{1}{3}") == (Fraction(1, 3), False)
    assert V.parse_number("0.1") == (Fraction(1, 10), True)
    assert V.parse_number(0.1) == (Fraction(1, 10), True)
    assert V.parse_number(True) is None
    assert V.parse_number("1" * 100) is None  # digit bound
    assert V.parse_number("1+" * 70 + "1") is None  # token bound
    assert V.parse_number("-" * 50 + "1") is None  # depth bound


def test_math_needs_answer_field():
    with pytest.raises(ValueError, match="answer"):
        V.math("\\boxed{1}", {"prompt": "p"})


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("Let me think.\nThe answer is 5", 1.0),
        ("work\n\\boxed{3}", 1.0),
        ("So the total is \\boxed{3}.", 1.0),
        ("#### 72", 1.0),
        ("Answer: Paris\n\n", 1.0),
        ("The answer is 5\nbut wait, more rambling", 0.0),
        ("no final line", 0.0),
        ("####", 0.0),
        ("", 0.0),
    ],
)
def test_format_default(completion, expected):
    assert V.format(completion, {}) == expected


def test_format_custom_pattern_is_fullmatch_and_bounded():
    row = {"format_pattern": r"<think>.*?</think>\s*<answer>.*?</answer>"}
    assert V.format("<think>hm\nok</think>\n<answer>4</answer>", row) == 1.0
    assert V.format("preamble <think>x</think><answer>4</answer>", row) == 0.0  # fullmatch, not search
    assert V.format("<think>x</think>", row) == 0.0
    # Matching sees at most MAX_FORMAT_CHARS characters (bounds backtracking time): a "b" past them is cut off.
    assert V.format("a" * 100 + "b", {"format_pattern": r"a+b"}) == 1.0
    assert V.format("a" * V.MAX_FORMAT_CHARS + "b", {"format_pattern": r"a+b"}) == 0.0
    with pytest.raises(ValueError, match="format_pattern"):
        V.format("x", {"format_pattern": "("})


@pytest.mark.parametrize(
    "completion, answer, expected",
    [
        ("  Hello   World. ", "hello world", 1.0),
        ("HELLO\tworld", "Hello World.", 1.0),
        ("yes", ["no", "Yes"], 1.0),
        ("hello world!", "hello world", 0.0),
        ("hello", "hello world", 0.0),
        ("", "", 0.0),
    ],
)
def test_exact(completion, answer, expected):
    assert V.exact(completion, {"answer": answer}) == expected


def test_exact_case_sensitive_row_keeps_case():
    row = {"answer": "E M B E R", "case_sensitive": True}
    assert V.exact("Answer: E M B E R.", row) == 1.0 and V.exact("Answer:  E M  B E R", row) == 1.0
    assert V.exact("Answer: e m b e r", row) == 0.0 and V.exact("Answer: E m b e r", row) == 0.0
    assert V.exact("Answer: e m b e r", {**row, "case_sensitive": False}) == 1.0


FACTS = {"capital_fr": ["Paris", "Paris, France"], "beatles": "The Beatles", "author": "J. R. R. Tolkien"}


@pytest.mark.parametrize(
    "completion, key, expected",
    [
        ("Paris", "capital_fr", 1.0),
        ("The answer is Paris.", "capital_fr", 1.0),
        ("Thinking...\nAnswer: paris, FRANCE", "capital_fr", 1.0),
        ("\\boxed{Paris}", "capital_fr", 1.0),
        ("the beatles", "beatles", 1.0),
        ("Beatles!", "beatles", 1.0),
        ("J.R.R. Tolkien", "author", 1.0),  # punctuation becomes spaces on both sides
        ("JRR Tolkien", "author", 0.0),
        ("J. R. R. Tolkien", "author", 1.0),
        ("Paris London Berlin", "capital_fr", 0.0),  # equality, not containment
        ("Lyon", "capital_fr", 0.0),
        ("", "capital_fr", 0.0),
        ("the", "beatles", 0.0),
    ],
)
def test_fact_from_table(completion, key, expected):
    assert V.fact(completion, {"facts": FACTS, "fact_key": key}) == expected


def test_fact_from_answer_and_errors():
    assert V.fact("An apple", {"answer": ["apple", "pomme"]}) == 1.0
    assert V.fact("pear", {"answer": "apple"}) == 0.0
    with pytest.raises(ValueError, match="fact_key"):
        V.fact("x", {"facts": FACTS, "fact_key": "missing"})
    with pytest.raises(ValueError, match="answer"):
        V.fact("x", {"prompt": "p"})


def test_extract_code():
    assert V.extract_code("text\n```python\na = 1\n```\nmore\n```python\nb = 2\n```") == "b = 2\n"
    assert V.extract_code("```\nc = 3\n```") == "c = 3\n"
    assert V.extract_code("```py\nd = 4\n```\n```\ne = 5\n```") == "d = 4\n"
    assert V.extract_code("f = 6") == "f = 6"


ADD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```"


@needs_bwrap
def test_code_string_tests():
    assert V.code(ADD, {"tests": "assert add(1, 2) == 3\nassert add(-1, 1) == 0"}) == 1.0
    assert V.code(ADD.replace("a + b", "a - b"), {"tests": "assert add(1, 2) == 3"}) == 0.0
    assert V.code("```python\ndef add(a, b) return\n```", {"tests": "assert add(1, 2) == 3"}) == 0.0  # syntax
    # Exiting 0 before the tests run earns nothing: the completion marker after the tests is required.
    assert V.code("```python\nimport sys\nsys.exit(0)\n```", {"tests": "assert add(1, 2) == 3"}) == 0.0
    assert V.code("import os\nos._exit(0)", {"tests": "assert False"}) == 0.0
    # A forged marker without the per-run nonce is just output.
    assert V.code("print('__ptk_result_0__')", {"tests": "assert False"}) == 0.0


@needs_bwrap
def test_code_list_tests_fraction():
    # A test's exit never passes it by itself (a function of the model's choosing could exit): only checks that
    # ran do (unittest.main()'s cases are run and judged after it exits).
    tests = ["assert add(1, 2) == 3", "assert add(2, 2) == 4", "assert add(0, 0) == 1", "raise SystemExit(0)",
             "assert add(1, 1) == 2\nexit(0)"]
    assert V.code(ADD, {"tests": tests}) == pytest.approx(0.4)
    # A hanging test times out; the tests that passed before it still count.
    slow = V.make_code_verifier(timeout_s=1.5)
    assert slow(ADD, {"tests": ["assert add(1, 1) == 2", "while True: pass", "assert True"]}) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="tests"):
        V.code(ADD, {"tests": []})
    with pytest.raises(ValueError, match="tests"):
        V.code(ADD, {"tests": [1, 2]})


@needs_bwrap
def test_model_text_is_never_executed_in_process(tmp_path):
    target = tmp_path / f"pwned-{uuid.uuid4().hex}"
    payload = f"__import__('os').system('touch {target}')"
    completions = [payload, f"\\boxed{{{payload}}}", f"#### {payload}", f"The answer is {payload}",
                   f"```python\n{payload}\n```"]
    row = {"answer": payload, "facts": {"k": payload}, "fact_key": "k", "format_pattern": ".*",
           "tests": "assert True"}
    for completion in completions:
        for name in ("math", "format", "exact", "fact", "code"):
            reward = V.get_verifier(name)(completion, row)
            assert 0.0 <= reward <= 1.0
    assert not target.exists()
    assert not os.path.exists("/tmp/pwned-" + target.name)


def test_registry_and_combine():
    assert set(V.VERIFIERS) == {"math", "format", "exact", "fact", "code"}
    assert V.get_verifier("math") is V.math
    with pytest.raises(ValueError, match="valid names: code, exact, fact, format, math"):
        V.get_verifier("nope")
    row = {"answer": "3"}
    both = V.get_verifier("math,format")
    assert both("\\boxed{3}", row) == 1.0
    assert both("\\boxed{3}\nrambling", row) == 0.5
    assert both("\\boxed{4}", row) == 0.5
    weighted = V.get_verifier("math:0.8, format:0.2")
    assert weighted("\\boxed{3}\nrambling", row) == pytest.approx(0.8)
    assert V.combine(["math", "format"], [1.0, 0.0])("\\boxed{4}", row) == 0.0
    with pytest.raises(ValueError, match="weights"):
        V.combine(["math"], [1.0, 2.0])
    with pytest.raises(ValueError, match="weight"):
        V.get_verifier("math:0.5,format")
    with pytest.raises(ValueError, match="valid names"):
        V.combine("math,bogus")
