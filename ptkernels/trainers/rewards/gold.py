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


def _closing_braces(text: str) -> dict[int, int]:
    """Index of each '{' -> index of the '}' that closes it, in one pass (unclosed ones are absent)."""
    match, stack = {}, []
    for m in re.finditer(r"[{}]", text):
        if m.group() == "{":
            stack.append(m.start())
        elif stack:
            match[stack.pop()] = m.start()
    return match


_BARE_BOXED = re.compile(r"\s*([^\s$]+)")


def last_boxed(text: str) -> str | None:
    """The contents of the last ``\\boxed{...}`` (or ``\\fbox``) whose brace group closes, or of a bare
    ``\\boxed 42``; None when there is none. Linear in the text (brace pairs are found once, not rescanned per
    candidate: a completion is adversarial input). The verifiers read completions with it too: one parser for both
    sides."""
    candidates = list(re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text))
    if not candidates:
        return None
    closing = _closing_braces(text) if any(m.group(1) for m in candidates) else {}
    for m in reversed(candidates):
        if m.group(1):
            end = closing.get(m.start(1))
            if end is not None:
                return text[m.start(1) + 1 : end]
        else:  # "\boxed 42"
            tail = _BARE_BOXED.match(text, m.end())
            if tail:
                return tail.group(1)
    return None


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
