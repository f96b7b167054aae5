"""Verifiable rewards for GRPO: ``fn(completion, row) -> float`` in [0, 1].

Model output is data: nothing here evaluates the completion in this process. Numbers are parsed with ``Fraction``
and a small hand-written arithmetic parser; code runs only in ``sandbox.run_python``'s child process. A verifier
never raises because of what the completion contains; a row missing its ground-truth field raises ``ValueError``
(that is a data bug and should be loud).

Registry: ``VERIFIERS`` (name -> fn) and ``get_verifier("math")``, ``get_verifier("math,format")`` (equal weights)
or ``get_verifier("math:0.8,format:0.2")``.
"""

from __future__ import annotations

import ast
import math as _math
import os
import re
import string
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

from ptkernels.trainers.rewards import code_tests
from ptkernels.trainers.rewards.gold import final_gold_answer, gold_value
from ptkernels.trainers.rewards.gold import last_boxed as _last_boxed
from ptkernels.trainers.rewards.sandbox import SandboxResult, run_python

__all__ = [
    "VERIFIERS", "combine", "get_verifier", "math", "format", "exact", "fact", "code", "make_code_verifier",
    "extract_math_answer", "parse_number", "extract_code",
]

Verifier = Callable[[str, dict], float]

# Only the tail of a very long completion is searched for a final answer: it is where the answer is, and it bounds
# the work done on hostile input.
MAX_ANSWER_SEARCH_CHARS = 20_000
MAX_EXPR_TOKENS = 64
MAX_EXPR_DEPTH = 16
MAX_DIGITS = 40  # per number literal; keeps Fraction arithmetic on at most 64 tokens cheap
MAX_FORMAT_CHARS = 16_384
# A decimal answer matches a non-terminating rational (1/3 vs 0.333333) within this relative tolerance.
DECIMAL_RTOL = 1e-6


def _text(completion) -> str:
    return completion if isinstance(completion, str) else ""


# ----------------------------------------------------------------------------------------------------------- math
_NUMBER_RE = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+")


def extract_math_answer(completion: str) -> str | None:
    """The model's final answer as text: last ``\\boxed{}``, else ``#### x``, else "answer is x" / "Answer: x",
    else the last number. None when there is nothing that looks like an answer."""
    text = _text(completion)[-MAX_ANSWER_SEARCH_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    hashes = re.findall(r"####[ \t]*([^\n]*)", text)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    said = re.findall(r"answer\s*(?:is|:)[ \t:]*([^\n]*)", text, flags=re.IGNORECASE)
    if said and said[-1].strip():
        return said[-1].strip()
    numbers = _NUMBER_RE.findall(text)
    return numbers[-1] if numbers else None


def _latex_to_plain(s: str) -> str:
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = s.replace("{,}", ",").replace("\\%", "%")  # LaTeX thousands separator 1{,}234; escaped percent
    for _ in range(MAX_EXPR_DEPTH):  # innermost first; bounded so nested junk cannot loop long
        new = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"((\1)/(\2))", s)
        new = re.sub(r"\\frac\s*(\d)\s*(\d)", r"((\1)/(\2))", new)  # \frac34
        if new == s:
            break
        s = new
    s = re.sub(r"\\text\s*\{[^{}]*\}|\\mathrm\s*\{[^{}]*\}", "", s)  # units
    s = re.sub(r"\\(?:left|right|displaystyle|!|,|;|\s)|\$|\\\$", "", s)
    s = re.sub(r"\\(?:cdot|times)", "*", s).replace("\\div", "/").replace("×", "*").replace("÷", "/")
    return s.replace("{", "(").replace("}", ")").replace("−", "-")


_TOKEN_RE = re.compile(r"\s*(?:(\d+(?:\.\d*)?|\.\d+)|(.))")


def _tokenize(s: str) -> list[str] | None:
    tokens = []
    for number, op in _TOKEN_RE.findall(s):
        if number:
            if len(number) > MAX_DIGITS:
                return None
            tokens.append(number)
        elif op in "+-*/()":
            tokens.append(op)
        elif op.strip():
            return None
        if len(tokens) > MAX_EXPR_TOKENS:
            return None
    return tokens or None


class _Parser:
    """Recursive descent over + - * / ( ) and unary signs, exact in Fraction. Returns None on anything else."""

    def __init__(self, tokens: list[str]):
        self.tokens, self.pos, self.has_decimal = tokens, 0, False

    def parse(self) -> Fraction | None:
        try:
            value = self._expr(0)
        except (ValueError, ZeroDivisionError, IndexError):
            return None
        return value if self.pos == len(self.tokens) else None

    def _peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def _expr(self, depth: int) -> Fraction:
        value = self._term(depth)
        while self._peek() in ("+", "-"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._term(depth)
            value = value + rhs if op == "+" else value - rhs
        return value

    def _term(self, depth: int) -> Fraction:
        value = self._unary(depth)
        while self._peek() in ("*", "/"):
            op = self.tokens[self.pos]
            self.pos += 1
            rhs = self._unary(depth)
            value = value * rhs if op == "*" else value / rhs
        return value

    def _unary(self, depth: int) -> Fraction:
        if depth > MAX_EXPR_DEPTH:
            raise ValueError("too deep")
        tok = self._peek()
        if tok in ("+", "-"):
            self.pos += 1
            value = self._unary(depth + 1)
            return -value if tok == "-" else value
        if tok == "(":
            self.pos += 1
            value = self._expr(depth + 1)
            if self._peek() != ")":
                raise ValueError("unbalanced")
            self.pos += 1
            return value
        if tok is None or tok in "+-*/)":
            raise ValueError("expected a number")
        self.pos += 1
        self.has_decimal |= "." in tok
        return Fraction(tok)


def parse_number(s) -> tuple[Fraction, bool] | None:
    """Exact value of a numeric answer (int, decimal, "1,234", "-3/4", ``\\frac{3}{4}``, "2*(3+4)") and whether it
    was written with a decimal point. None when it is not a plain arithmetic expression."""
    if isinstance(s, bool):
        return None
    if isinstance(s, int):
        return Fraction(s), False
    if isinstance(s, float):
        return (Fraction(repr(s)), True) if _math.isfinite(s) else None  # repr: 0.1 is "0.1", not 0.1000000000000000055
    if not isinstance(s, str) or len(s) > 1000:
        return None
    s = _latex_to_plain(s.strip())
    if "=" in s:  # "x = 5" -> "5"
        s = s.rsplit("=", 1)[1]
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    s = s.strip().rstrip(".").rstrip("%").strip()
    tokens = _tokenize(s)
    if tokens is None:
        return None
    parser = _Parser(tokens)
    value = parser.parse()
    return None if value is None else (value, parser.has_decimal)


def _terminates(x: Fraction) -> bool:
    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    return d == 1


def _numbers_equal(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    (x, x_dec), (y, y_dec) = a, b
    if x == y:
        return True
    # Tolerance only where exactness is impossible: a decimal standing for a rational with no finite decimal.
    inexact = (x_dec and not _terminates(y)) or (y_dec and not _terminates(x))
    return inexact and abs(x - y) <= DECIMAL_RTOL * max(1, abs(y))


def _squash(s: str) -> str:
    return re.sub(r"\s+|\\[,;! ]|\$", "", s).rstrip(".").casefold()


def math(completion: str, row: dict) -> float:
    """1.0 when the final answer equals the gold answer as an exact rational (see ``parse_number``); answers that
    are not numbers are compared as strings with whitespace, ``$`` and a trailing period removed. The gold is
    ``row["answer"]``, ``row["solution"]`` or ``row["ground_truth"]`` reduced to its final answer (GSM8K's
    ``#### n``, the last ``\\boxed{}``; see ``gold.final_gold_answer``), or a list of accepted answers."""
    truth = final_gold_answer(gold_value(row))
    predicted = extract_math_answer(completion)
    if predicted is None:
        return 0.0
    if isinstance(truth, (list, tuple)):
        return float(any(_math_equal(predicted, t) for t in truth))
    return _math_equal(predicted, truth)


def _math_equal(predicted: str, truth) -> float:
    got, want = parse_number(predicted), parse_number(truth)
    if got is None:
        # "42 apples": a number followed only by words. Not "2x+3", whose leading 2 is not the answer.
        units = re.fullmatch(rf"\s*({_NUMBER_RE.pattern})\s+[A-Za-z][A-Za-z\s.,!]*", predicted)
        got = parse_number(units.group(1)) if units else None
    if got is not None and want is not None:
        return float(_numbers_equal(got, want))
    return float(_squash(predicted) == _squash(str(truth)) and bool(_squash(predicted)))


# --------------------------------------------------------------------------------------------------------- format
# Default format: the (stripped) completion's last line is a final-answer line: it contains \boxed{...}, or is
# "#### x", or says "answer is x" / "Answer: x".
DEFAULT_FORMAT_PATTERN = (
    r"(?:.*\n)?[^\n]*(?:\\boxed\{[^\n]*\}[^\n]*|####[ \t]*\S[^\n]*|(?i:answer)(?:[ \t]+is|[ \t]*:)[ \t]*\S[^\n]*)"
)


_ANSWER_SAID = re.compile(r"(?i:answer)(?:[ \t]+is|[ \t]*:)[ \t]*\S")
_HASHES_SAID = re.compile(r"####[ \t]*\S")


def _default_format(text: str) -> bool:
    """``DEFAULT_FORMAT_PATTERN`` checked on the last line with plain searches: linear, where the regex engine
    backtracks quadratically on a line of many unclosed ``\\boxed{``."""
    last = text[text.rfind("\n") + 1 :]
    boxed = last.find("\\boxed{")
    return ((boxed >= 0 and last.rfind("}") > boxed + 6) or _HASHES_SAID.search(last) is not None
            or _ANSWER_SAID.search(last) is not None)


def format(completion: str, row: dict) -> float:
    """1.0 when ``re.fullmatch(pattern, completion.strip(), re.DOTALL)`` matches; pattern is ``row["format_pattern"]``
    or ``DEFAULT_FORMAT_PATTERN``. fullmatch (not search) so a pattern describes the whole completion. The
    completion is first truncated to ``MAX_FORMAT_CHARS`` to bound backtracking time on long inputs."""
    pattern = row.get("format_pattern") or DEFAULT_FORMAT_PATTERN
    text = _text(completion)[:MAX_FORMAT_CHARS].strip()
    if pattern == DEFAULT_FORMAT_PATTERN:
        return float(_default_format(text))
    try:
        return float(re.fullmatch(pattern, text, flags=re.DOTALL) is not None)
    except re.error as e:
        raise ValueError(f"row['format_pattern'] is not a valid regex: {e}") from e


# ---------------------------------------------------------------------------------------------------------- exact
def _normalize_exact(s: str, case_sensitive: bool = False) -> str:
    s = " ".join(str(s).split())
    return (s if case_sensitive else s.casefold()).rstrip(".").rstrip()


_MARKED_ANSWER = re.compile(r"(?:####|\banswer\s*(?:is|:))[ \t:]*([^\n]*)\s*$", flags=re.IGNORECASE)


def exact(completion: str, row: dict) -> float:
    """1.0 when the answer equals the gold (``answer``/``solution``/``ground_truth``, or one of a list) after
    strip, whitespace collapse, case-fold and dropping a trailing period; ``row["case_sensitive"] = True`` keeps
    the case (a task whose answer *is* a change of case). The answer is what follows a final-answer marker on the
    last line ("Answer: x", "the answer is x", "#### x") when there is one, else the whole completion."""
    truth = final_gold_answer(gold_value(row))
    accepted = truth if isinstance(truth, (list, tuple)) else [truth]
    case = bool(row.get("case_sensitive", False))
    text = _text(completion)[-MAX_ANSWER_SEARCH_CHARS:].strip()
    marked = _MARKED_ANSWER.search(text)
    got = _normalize_exact(marked.group(1) if marked else text, case)
    return float(bool(got) and any(got == _normalize_exact(a, case) for a in accepted))


# ----------------------------------------------------------------------------------------------------------- fact
_ARTICLES = re.compile(r"\b(?:a|an|the)\b")
_PUNCT = str.maketrans({c: " " for c in string.punctuation + "“”‘’«»–—…"})


def _normalize_fact(s) -> str:
    s = unicodedata.normalize("NFKC", str(s)).casefold().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def _fact_answer(completion: str) -> str:
    text = _text(completion)[-MAX_ANSWER_SEARCH_CHARS:]
    boxed = _last_boxed(text)
    if boxed is not None:
        return boxed
    said = re.findall(r"answer\s*(?:is|:)[ \t:]*([^\n]*)", text, flags=re.IGNORECASE)
    if said and said[-1].strip():
        return said[-1]
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1] if lines else ""


def fact(completion: str, row: dict) -> float:
    """1.0 when the model's final answer equals one accepted value after normalization (NFKC, case-fold,
    punctuation and the articles a/an/the removed, whitespace collapsed).

    Accepted values: ``row["facts"][row["fact_key"]]`` (a value or a list of aliases), else ``row["answer"]`` (value
    or list; or ``solution`` / ``ground_truth``). The final answer is the last ``\\boxed{}``, else the text after
    the last "answer is"/"Answer:", else the last non-empty line. Equality, not containment: containment would
    reward listing every candidate.
    """
    if "facts" in row and "fact_key" in row:
        facts = row["facts"]
        if not isinstance(facts, dict) or row["fact_key"] not in facts:
            raise ValueError(f"fact verifier: fact_key {row['fact_key']!r} is not in row['facts']")
        truth = facts[row["fact_key"]]
    else:
        truth = final_gold_answer(gold_value(row))
    accepted = {_normalize_fact(a) for a in (truth if isinstance(truth, (list, tuple, set)) else [truth])}
    accepted.discard("")
    return float(_normalize_fact(_fact_answer(completion)) in accepted)


# ----------------------------------------------------------------------------------------------------------- code
def extract_code(completion: str) -> str:
    """The last ```python (or ```py / ```python3) fenced block, else the last bare ``` block, else everything."""
    text = _text(completion)
    blocks = re.findall(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)```", text, flags=re.DOTALL | re.IGNORECASE)
    for want_lang in (True, False):
        chosen = [body for lang, body in blocks if bool(lang) == want_lang]
        if chosen:
            return chosen[-1]
    return text


def _passed(reports: str, n_tests: int) -> list[bool]:
    """Per test: the tests' process reported it passed, exactly once (on its own descriptor, which the model's
    process does not have)."""
    passes = [0] * n_tests
    for line in reports.splitlines():
        try:
            rec = ast.literal_eval(line)
        except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
            continue
        if type(rec) is tuple and len(rec) == 2 and rec[1] == "pass" and type(rec[0]) is int:
            if 0 <= rec[0] < n_tests:
                passes[rec[0]] += 1
    return [p == 1 for p in passes]


def make_code_verifier(*, timeout_s: float = 5.0, memory_mb: int = 256, unsafe_sandbox: bool = False,
                       workers: int | None = None, **sandbox_kwargs) -> Verifier:
    """A ``code`` verifier with its own sandbox limits (``run_python`` keyword arguments). ``unsafe_sandbox``
    runs code even without bubblewrap (weaker isolation, with a warning); ``workers`` bounds the sandboxed
    processes one completion runs at once (default: the CPU count)."""
    workers = workers or os.cpu_count() or 1

    def run(program: str, **kw) -> SandboxResult:
        return run_python(program, timeout_s=timeout_s, memory_mb=memory_mb, unsafe=unsafe_sandbox,
                          **sandbox_kwargs, **kw)

    def run_all(calls: list[dict]) -> list[SandboxResult]:
        if len(calls) == 1:
            return [run(**calls[0])]
        with ThreadPoolExecutor(max_workers=min(workers, len(calls))) as pool:
            return list(pool.map(lambda kw: run(**kw), calls))

    def code(completion: str, row: dict) -> float:
        """Run the extracted code against ``row["tests"]`` in the sandbox (see ``rewards/code_tests.py``).

        ``tests`` a string: 1.0 when it passes as a whole, else 0.0. A list of strings: the fraction that pass.
        A list of ``{"input", "output"}`` (or APPS' ``{"inputs", "outputs"}``): the fraction of cases whose
        stdout matches, each run in a fresh process that must exit 0. Test sources (any Python: asserts,
        loops, ``def check(candidate)`` and its call) run in a sandboxed process of their own, in order, and
        reach the model's functions and classes over a pipe that carries plain data only; the model's code runs
        in a second sandboxed process. A test passes when its source finishes without raising.
        """
        tests = _require(row, "tests")
        program = extract_code(completion)
        cases = code_tests.stdio_cases(tests)
        if cases is not None:
            results = run_all([{"program": program, "stdin": given} for given, _ in cases])
            passed = [r.ok and code_tests.same_output(r.stdout, want) for r, (_, want) in zip(results, cases)]
            return sum(passed) / len(cases)
        if isinstance(tests, str):
            items = [tests]
        elif isinstance(tests, (list, tuple)) and all(isinstance(t, str) for t in tests):
            items = list(tests)
        else:
            raise ValueError("code verifier: row['tests'] must be a str, a list of str or stdin/stdout cases")
        if not items:
            raise ValueError("code verifier: row['tests'] is empty")
        # Two sandboxed processes joined by two pipes: the model's code serves, the tests run apart from it.
        requests_r, requests_w = os.pipe()
        answers_r, answers_w = os.pipe()
        serve = {"program": program, "job": {"mode": "serve"}, "channel": (requests_r, answers_w)}
        check = {"program": "", "job": {"mode": "tests", "tests": items}, "channel": (answers_r, requests_w)}
        with ThreadPoolExecutor(max_workers=2) as pool:
            served = pool.submit(run, **serve)
            results = pool.submit(run, **check).result()
            served.result()
        # A test that runs out of time ends the run: the tests after it are never reported, so they earn nothing.
        passed = _passed(results.reports, len(items))
        if isinstance(tests, str):
            return float(passed[0])
        return sum(passed) / len(items)

    return code


code = make_code_verifier()
_unsafe_code = make_code_verifier(unsafe_sandbox=True)  # --unsafe-code-sandbox: runs even without bubblewrap


# ------------------------------------------------------------------------------------------------------- registry
def _require(row: dict, key: str):
    if not isinstance(row, dict) or key not in row:
        raise ValueError(f"the row has no {key!r} field needed by this verifier")
    return row[key]


VERIFIERS: dict[str, Verifier] = {"math": math, "format": format, "exact": exact, "fact": fact, "code": code}


def combine(names: Sequence[str] | str, weights: Sequence[float] | None = None, *,
            unsafe_code_sandbox: bool = False) -> Verifier:
    """Weighted sum of verifiers. Default weights are 1/n each, so the result stays in [0, 1]; explicit weights
    are used as given (non-negative; they sum to 1 to stay in [0, 1])."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    names = list(names)
    if not names:
        raise ValueError("combine: names is empty")
    fns = [_lookup(n, unsafe_code_sandbox) for n in names]
    weights = [1.0 / len(names)] * len(names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(names):
        raise ValueError(f"combine: {len(weights)} weights for {len(names)} verifiers")
    if any(not _math.isfinite(w) or w < 0 for w in weights):
        raise ValueError(f"combine: weights must be finite and >= 0, got {weights}")

    def combined(completion: str, row: dict) -> float:
        return sum(w * fn(completion, row) for w, fn in zip(weights, fns) if w)

    combined.__name__ = "+".join(names)
    return combined


def _lookup(name: str, unsafe_code_sandbox: bool = False) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"unknown verifier {name!r}; valid names: {', '.join(sorted(VERIFIERS))}")
    if name == "code" and unsafe_code_sandbox:
        return _unsafe_code
    return VERIFIERS[name]


def get_verifier(name: str, *, unsafe_code_sandbox: bool = False) -> Verifier:
    """``"math"``; ``"math,format"`` (equal weights); ``"math:0.8,format:0.2"`` (explicit weights).
    ``unsafe_code_sandbox`` lets ``code`` run without bubblewrap (see ``sandbox.run_python``'s ``unsafe``)."""
    if not isinstance(name, str):
        raise ValueError(f"verifier name must be a str, got {name!r}; valid names: {', '.join(sorted(VERIFIERS))}")
    parts = [p.strip() for p in name.split(",") if p.strip()]
    if len(parts) == 1 and ":" not in parts[0]:
        return _lookup(parts[0], unsafe_code_sandbox)
    if any(":" in p for p in parts):
        if not all(":" in p for p in parts):
            raise ValueError(f"verifier spec {name!r}: give a weight for every verifier or for none")
        pairs = [p.split(":", 1) for p in parts]
        try:
            weights = [float(w) for _, w in pairs]
        except ValueError as e:
            raise ValueError(f"verifier spec {name!r}: bad weight ({e})") from e
        return combine([n.strip() for n, _ in pairs], weights, unsafe_code_sandbox=unsafe_code_sandbox)
    return combine(parts, unsafe_code_sandbox=unsafe_code_sandbox)
