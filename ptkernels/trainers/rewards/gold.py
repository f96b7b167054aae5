"""The gold answer of an RL row, as users' data sets hold it.

TRL's data sets and reward functions name the reference answer ``answer`` (GSM8K), ``solution`` (TRL's
``accuracy_reward``, MATH-style rows) or ``ground_truth``; the first of these a row has is its gold. A worked
solution is reduced to its final answer the same way a completion is: GSM8K's ``... #### 12`` gives ``12``,
MATH's ``... \\boxed{\\frac{1}{2}}`` gives ``\\frac{1}{2}``; a short answer (``12``, ``"Paris"``) is kept whole.
"""

from __future__ import annotations

import re

__all__ = ["GOLD_FIELDS", "gold_field", "has_gold", "gold_value", "final_gold_answer", "last_boxed"]

GOLD_FIELDS = ("answer", "solution", "ground_truth")


def gold_field(row: dict) -> str | None:
    """The name of the row's gold-answer field (the first of ``GOLD_FIELDS`` it has), or None."""
    if not isinstance(row, dict):
        return None
    return next((k for k in GOLD_FIELDS if k in row and row[k] is not None), None)


def has_gold(row: dict) -> bool:
    return gold_field(row) is not None


def gold_value(row: dict):
    """The raw gold value (a string, a number or a list of accepted answers); ValueError when there is none."""
    key = gold_field(row)
    if key is None:
        raise ValueError(f"the row has none of the gold-answer fields {', '.join(repr(k) for k in GOLD_FIELDS)} "
                         "needed by this verifier")
    return row[key]


def _balanced_after(text: str, start: int) -> str | None:
    """Contents of the brace group opening at text[start] == '{', or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox``; balanced braces; ``\\boxed 42``), or None. The
    verifiers read completions with it too: one parser for both sides."""
    found = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if m.group(1):
            inner = _balanced_after(text, m.start(1))
        else:  # "\boxed 42"
            tail = re.match(r"\s*([^\s$]+)", text[m.end() :])
            inner = tail.group(1) if tail else None
        if inner is not None:
            found = inner
    return found


def final_gold_answer(gold):
    """The final answer of a gold value: after the last ``####`` (GSM8K), else the last ``\\boxed{}`` (MATH), else
    the value itself. Lists (several accepted answers) are reduced element by element; numbers stay numbers."""
    if isinstance(gold, (list, tuple)):
        return [final_gold_answer(g) for g in gold]
    if not isinstance(gold, str):
        return gold
    hashes = re.findall(r"####[ \t]*([^\n]*)", gold)
    if hashes and hashes[-1].strip():
        return hashes[-1].strip()
    boxed = last_boxed(gold)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return gold
