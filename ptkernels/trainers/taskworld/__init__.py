"""The embedded task world the ``ptk pipeline`` trains its tiny model on, with nothing downloaded.

A procedural, fictional realm (``lexicon``) with verifiable task families (``tasks``): arithmetic, string/list
tasks, harmful requests to refuse and benign look-alikes to answer. ``generate`` turns it into data sets in TRL's
formats and held-out eval sets; ``judge`` checks the answer format, detects refusals and scores completions.
"""

from .generate import (
    DEFAULT_SIZES,
    MIX,
    eval_sets,
    ideal,
    kto_rows,
    preference_rows,
    pretraining_corpus,
    read_jsonl,
    redteam_rows,
    rl_rows,
    sft_rows,
    write_jsonl,
    write_world,
)
from .judge import (
    ANSWER_PATTERN,
    CONSTITUTION,
    REFUSAL,
    answers_match,
    extract_answer,
    is_refusal,
    rule_judge,
    rule_preference,
    write_constitution,
)
from .tasks import FAMILIES, GROUPS, Task, is_heldout, verifier_of

__all__ = [
    "ANSWER_PATTERN", "CONSTITUTION", "DEFAULT_SIZES", "FAMILIES", "GROUPS", "MIX", "REFUSAL", "Task",
    "answers_match", "eval_sets", "extract_answer", "ideal", "is_heldout", "is_refusal", "kto_rows",
    "preference_rows", "pretraining_corpus", "read_jsonl", "redteam_rows", "rl_rows", "rule_judge",
    "rule_preference", "sft_rows", "verifier_of", "write_constitution", "write_jsonl", "write_world",
]
