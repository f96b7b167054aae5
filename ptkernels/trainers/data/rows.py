"""Loading and validating training rows in TRL's dataset formats.

Every row carries its ``source`` (``file.jsonl:12``, 1-based line, or ``dataset_dir[12]``, 0-based index) so
that any error, here or later while tokenizing, points at the exact row to fix. ``validate_rows`` checks every
row before training starts: a bad row found at step 9000 costs hours, one found at load time costs nothing.

Formats (TRL's names and rules):

- ``text``: ``{"text": str}``
- ``messages``: ``{"messages": [{"role", "content"}, ...]}``
- ``prompt_completion``: ``{"prompt", "completion"}``
- ``preference``: ``{"prompt", "chosen", "rejected"}``, or ``{"chosen", "rejected"}`` (implicit prompt)
- ``unpaired_preference``: ``{"prompt", "completion", "label": bool}`` (KTO)
- ``prompt_only``: ``{"prompt", ...ground-truth fields for the verifiers}``

``prompt`` / ``completion`` / ``chosen`` / ``rejected`` are either all strings (plain) or all message lists
(conversational) within a row.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..engine.config import TrainConfig
    from ..engine.distributed import DistInfo

FORMATS = ("text", "messages", "prompt_completion", "preference", "unpaired_preference", "prompt_only")

# the fields that hold text, per format, in the order they are checked
_TEXT_FIELDS = {
    "text": ("text",),
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion"),
    "prompt_only": ("prompt",),
}
_CONVERSATIONAL_FIELDS = ("messages", "prompt", "completion", "chosen", "rejected")


class DataError(ValueError):
    """A problem with the training data; the message starts with the row's source (``file.jsonl:12: ...``)."""


@dataclass(frozen=True)
class Row:
    data: dict
    source: str  # "path/to/file.jsonl:12" (1-based line) or "path/to/dataset_dir[12]" (0-based index)


def load_rows(path: str, *, split: str = "train") -> list[Row]:
    """Rows of a JSON Lines file, a JSON array file, or a folder written by ``datasets``' ``save_to_disk`` (a
    ``Dataset``, or a ``DatasetDict`` of which ``split`` is taken)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    rows = _load_dataset_dir(path, split) if os.path.isdir(path) else _load_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows


def _load_jsonl(path: str) -> list[Row]:
    """JSON Lines, or a file holding one JSON array of objects (``.json`` as many data sets ship it)."""
    with open(path, encoding="utf-8") as f:
        head = f.read(4096).lstrip()
    if head.startswith("["):
        return _load_json_array(path)
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            source = f"{path}:{lineno}"
            try:
                data = json.loads(line)
            except json.JSONDecodeError as e:
                hint = " (expected JSON Lines: one JSON object per line)" if line.lstrip().startswith("[") else ""
                raise DataError(f"{source}: invalid JSON: {e.msg} at column {e.colno}{hint}") from None
            if not isinstance(data, dict):
                raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
            rows.append(Row(data, source))
    return rows


def _load_json_array(path: str) -> list[Row]:
    """A JSON array of objects; each row's source is ``file.json:LINE`` (the line its object starts on)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    decoder = json.JSONDecoder()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    rows, pos = [], text.index("[") + 1
    for i, item in enumerate(data):
        # find where item i starts, for a file:line source (the objects are re-decoded in order)
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        source = f"{path}:{text.count(chr(10), 0, pos) + 1}"
        pos = end
        if not isinstance(item, dict):
            raise DataError(f"{source}: expected a JSON object (element {i} of the array), got {type(item).__name__}")
        rows.append(Row(item, source))
    return rows


def _load_dataset_dir(path: str, split: str) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: no split {split!r}; the splits are {sorted(ds)}")
        ds = ds[split]
    # Arrow gives every row every column, filling the ones a row lacks with None: drop them so that the row
    # looks like the JSON object it came from (and detect_format sees the fields the row really has).
    return [Row({k: v for k, v in data.items() if v is not None}, f"{path}[{i}]") for i, data in enumerate(ds)]


def detect_format(row: Row) -> str:
    """Which of ``FORMATS`` the row is in, by TRL's rules (extra fields are allowed)."""
    keys = row.data.keys()
    if "text" in keys:
        return "text"
    if "messages" in keys:
        return "messages"
    if "chosen" in keys and "rejected" in keys:
        return "preference"
    if "prompt" in keys and "completion" in keys:
        return "unpaired_preference" if "label" in keys else "prompt_completion"
    if "prompt" in keys:
        return "prompt_only"
    raise DataError(f"{row.source}: no known format in fields {sorted(keys)}; expected one of: text; messages; "
                    "prompt+completion; prompt+chosen+rejected; prompt+completion+label; prompt")


def is_conversational(row: Row) -> bool:
    """Whether the row's text fields are message lists (TRL's ``is_conversational``)."""
    return any(isinstance(row.data.get(k), list) for k in _CONVERSATIONAL_FIELDS)


def preference_parts(row: Row) -> tuple:
    """``(prompt, chosen, rejected)`` of a preference row. Without a ``prompt`` field the prompt is implicit:
    for conversations, the messages that ``chosen`` and ``rejected`` share at their start (TRL's
    ``extract_prompt``); for plain strings, the empty string (the whole text is the answer)."""
    d = row.data
    if "prompt" in d:
        return d["prompt"], d["chosen"], d["rejected"]
    chosen, rejected = d["chosen"], d["rejected"]
    if isinstance(chosen, list) and isinstance(rejected, list):
        n = 0
        while n < min(len(chosen), len(rejected)) and chosen[n] == rejected[n]:
            n += 1
        return chosen[:n], chosen[n:], rejected[n:]
    return "", chosen, rejected


def validate_rows(rows: list[Row], allowed: tuple[str, ...]) -> str:
    """Check every row and return their common format (one of ``allowed``); raise ``DataError`` naming the
    first bad row's source and field."""
    if not rows:
        raise DataError("no rows to train on")
    first_fmt, first_source = None, None
    for row in rows:
        fmt = detect_format(row)
        if fmt not in allowed:
            raise DataError(f"{row.source}: the row is in {fmt!r} format (fields {sorted(row.data)}) but this stage "
                            f"needs {' or '.join(repr(a) for a in allowed)}")
        if first_fmt is None:
            first_fmt, first_source = fmt, row.source
        elif fmt != first_fmt:
            raise DataError(f"{row.source}: the row is in {fmt!r} format (fields {sorted(row.data)}) but "
                            f"{first_source} is in {first_fmt!r}: all rows must have the same format")
        _check_row(row, fmt)
    return first_fmt


def _check_row(row: Row, fmt: str) -> None:
    d, src = row.data, row.source
    if fmt == "text" and not isinstance(d["text"], str):
        raise DataError(f"{src}: field 'text' must be a string, got {type(d['text']).__name__}")
    if fmt == "messages" and not isinstance(d["messages"], list):
        raise DataError(f"{src}: field 'messages' must be a list of messages, got {type(d['messages']).__name__}")
    for field in _TEXT_FIELDS[fmt]:
        if field in d:  # only the implicit-prompt preference row lacks one (its prompt)
            _check_text(d[field], f"{src}: field {field!r}")
    if fmt in ("prompt_completion", "preference", "unpaired_preference", "prompt_only"):
        present = [f for f in _TEXT_FIELDS[fmt] if f in d]
        kinds = {isinstance(d[f], list) for f in present}
        if len(kinds) > 1:
            shown = ", ".join(f"{f}: {'messages' if isinstance(d[f], list) else 'string'}" for f in present)
            raise DataError(f"{src}: conversational and plain fields mixed in one row ({shown})")
    if fmt == "unpaired_preference" and not isinstance(d["label"], bool):
        raise DataError(f"{src}: field 'label' must be true or false, got {d['label']!r}")
    if fmt == "messages":
        _check_answer(d["messages"], f"{src}: field 'messages'")
    elif fmt in ("prompt_completion", "unpaired_preference"):
        _check_answer(d["completion"], f"{src}: field 'completion'")
    elif fmt == "preference":
        _, chosen, rejected = preference_parts(row)
        where = "" if "prompt" in d else " after the prompt they share"
        _check_answer(chosen, f"{src}: field 'chosen'{where}")
        _check_answer(rejected, f"{src}: field 'rejected'{where}")


def _check_text(value, where: str) -> None:
    """A string or a non-empty list of ``{"role": str, "content": str}`` messages."""
    if isinstance(value, str):
        return
    if not isinstance(value, list):
        raise DataError(f"{where} must be a string or a list of messages, got {type(value).__name__}")
    if not value:
        raise DataError(f"{where} is an empty list of messages")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{i}] must be a message {{'role': str, 'content': str}}, got {m!r}")


def _check_answer(value, where: str) -> None:
    """What is trained on must not be empty: a non-blank string, or messages with assistant content."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where} is empty")
    elif not any(m["role"] == "assistant" and m["content"].strip() for m in value):
        raise DataError(f"{where} has no assistant message with content (nothing to train on)")


def load_data(cfg: TrainConfig, allowed: tuple[str, ...], info: DistInfo) -> tuple[list[Row], str]:
    """Every row of ``--data`` read and checked before anything else happens (a bad line fails the run before
    a model is loaded or an output written)."""
    rows = load_rows(cfg.data)
    fmt = validate_rows(rows, allowed)
    if info.is_main:
        print(f"ptk: {len(rows)} rows ({fmt}) from {cfg.data}")
    return rows, fmt
