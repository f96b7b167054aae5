"""Loading and validating training rows in TRL's dataset formats.

Every row carries its ``source`` (``file.jsonl:12``, 1-based line, or ``dataset_dir[12]``, 0-based index) so
that any error, here or later while tokenizing, points at the exact row to fix. ``validate_rows`` checks every
row before training starts: a bad row found at step 9000 costs hours, one found at load time costs nothing.

Formats (TRL's names and rules):

- ``text``: ``{"text": str}``
- ``messages``: ``{"messages": [{"role", "content"}, ...]}`` (an assistant turn may carry ``tool_calls`` instead of
  content; a ``tools`` field reaches the chat template)
- ``prompt_completion``: ``{"prompt", "completion"}``
- ``preference``: ``{"prompt", "chosen", "rejected"}``, or ``{"chosen", "rejected"}`` (implicit prompt)
- ``unpaired_preference``: ``{"prompt", "completion", "label": bool}`` (KTO)
- ``prompt_only``: ``{"prompt", ...ground-truth fields for the verifiers}``

``prompt`` / ``completion`` / ``chosen`` / ``rejected`` are either all strings (plain) or all message lists
(conversational) within a row. A row with the fields of several formats is read as the first of them in TRL's
order that the stage takes (``FORMAT_ORDER``): a prompt/completion row with an extra ``text`` column is
prompt/completion for ``ptk sft``, as in TRL's SFTTrainer, and a prompt row with one is a prompt for ``ptk grpo``.

Files: JSON Lines, a JSON array, Parquet or CSV (through ``datasets``), or a ``save_to_disk`` folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

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


TRAIN_SPLITS = ("train",)
EVAL_SPLITS = ("test", "validation", "valid", "eval", "dev")  # the held-out split of a DatasetDict, first found


def load_rows(path: str, *, splits: tuple[str, ...] = TRAIN_SPLITS) -> list[Row]:
    """Rows of a JSON Lines file, a JSON array file, a Parquet or CSV file, or a folder written by ``datasets``'
    ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` of which the first of ``splits`` it has is taken)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder")
    if os.path.isdir(path):
        rows = _load_dataset_dir(path, splits)
    elif path.lower().endswith((".parquet", ".csv", ".tsv")):
        rows = _load_table(path)
    else:
        rows = _load_jsonl(path)
    if not rows:
        raise DataError(f"{path}: the data set is empty")
    return rows


MAX_REPORTED = 10  # malformed rows listed in one error (the count says how many more)
_BOM = b"\xef\xbb\xbf"  # UTF-8's byte order mark


def _load_jsonl(path: str) -> list[Row]:
    """JSON Lines, or a file holding one JSON array of objects (``.json`` as many data sets ship it). Every line
    decoded and parsed; every malformed one (not UTF-8, invalid JSON, nesting too deep, a number too long to read,
    a lone surrogate) collected as ``file:line: what`` and reported together."""
    with open(path, "rb") as f:
        head = f.read(4096).removeprefix(_BOM).lstrip()
    if head.startswith(b"["):
        return _load_json_array(path)
    rows, errors = [], []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            source = f"{path}:{lineno}"
            if lineno == 1:
                raw = raw.removeprefix(_BOM)  # a byte order mark, as some Windows editors write
            try:
                data = _parse_line(raw, source)
            except DataError as e:
                errors.append(str(e))
                continue
            if data is not None:
                rows.append(Row(data, source))
    if errors:
        raise DataError(_many(errors))
    return rows


def _many(errors: list[str]) -> str:
    if len(errors) == 1:
        return errors[0]
    more = len(errors) - 1
    listed = ", ".join(e.split(": ", 1)[0] for e in errors[1:MAX_REPORTED])
    tail = "" if more < MAX_REPORTED else f" and {len(errors) - MAX_REPORTED} more"
    return f"{errors[0]} (and {more} more malformed row{'s' if more > 1 else ''}: {listed}{tail})"


def _parse_line(raw: bytes, source: str) -> dict | None:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{source}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                        f"re-encode the file as UTF-8") from None
    if not line.strip():
        return None
    try:
        data = json.loads(line)
    except json.JSONDecodeError as e:
        hint = " (expected JSON Lines: one JSON object per line)" if line.lstrip().startswith("[") else ""
        raise DataError(f"{source}: invalid JSON: {e.msg} at column {e.colno}{hint}") from None
    except RecursionError:
        raise DataError(f"{source}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(f"{source}: unreadable JSON value: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(data, dict):
        raise DataError(f"{source}: expected a JSON object, got {type(data).__name__}")
    _check_values(data, source)
    return data


MAX_DEPTH = 64  # nesting levels a row may have (messages need 3)


def _check_values(data: dict, source: str) -> None:
    """Walks the row without recursion: every string must be valid Unicode (no lone surrogates, which JSON's
    ``\\ud800`` escapes allow but no tokenizer takes) and the nesting at most ``MAX_DEPTH`` deep."""
    stack = [(data, 1, "")]
    while stack:
        value, depth, path = stack.pop()
        if depth > MAX_DEPTH:
            raise DataError(f"{source}: nested more than {MAX_DEPTH} levels deep (at {path or 'the row'})")
        if isinstance(value, dict):
            for k, v in value.items():
                _check_string(k, source, f"{path}.{k}" if path else repr(k))
                stack.append((v, depth + 1, f"{path}.{k}" if path else k))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{path}[{i}]") for i, v in enumerate(value))
        elif isinstance(value, str):
            _check_string(value, source, path)


def _check_string(text: str, source: str, path: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise DataError(f"{source}: field {path!r} holds a lone surrogate ({text[e.start]!r} at character "
                        f"{e.start}), which is not valid Unicode text") from None


def _load_json_array(path: str) -> list[Row]:
    """A JSON array of objects; each row's source is ``file.json:LINE`` (the line its object starts on)."""
    with open(path, "rb") as f:
        raw = f.read().removeprefix(_BOM)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{raw[e.start]:02x}); re-encode the file as UTF-8") \
            from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to read") from None
    except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
        raise DataError(f"{path}: unreadable JSON value: {str(e).splitlines()[0][:160]}") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of objects, got {type(data).__name__}")
    decoder = json.JSONDecoder()
    rows, errors, pos, line, counted = [], [], text.index("[") + 1, 1, 0
    for i, item in enumerate(data):
        # find where item i starts, for a file:line source (the objects are re-decoded in order; lines are
        # counted incrementally so a large file stays linear)
        while text[pos] in " \t\r\n,":
            pos += 1
        _, end = decoder.raw_decode(text, pos)
        line += text.count("\n", counted, pos)
        counted, source, pos = pos, f"{path}:{line}", end
        try:
            if not isinstance(item, dict):
                raise DataError(f"{source}: expected a JSON object (element {i} of the array), "
                                f"got {type(item).__name__}")
            _check_values(item, source)
        except DataError as e:
            errors.append(str(e))
            continue
        rows.append(Row(item, source))
    if errors:
        raise DataError(_many(errors))
    return rows


def _load_dataset_dir(path: str, splits: tuple[str, ...]) -> list[Row]:
    import datasets

    try:
        ds = datasets.load_from_disk(path)
    except FileNotFoundError as e:
        raise DataError(f"{path}: not a folder saved with datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        split = next((s for s in splits if s in ds), None)
        if split is None:
            wanted = " or ".join(repr(s) for s in splits)
            raise DataError(f"{path}: no split {wanted}; the splits are {sorted(ds)} (pass the split's own folder "
                            f"{os.path.join(path, sorted(ds)[0]) if ds else path!r} to take another)")
        ds = ds[split]
    return [Row(_without_nones(data), f"{path}[{i}]") for i, data in enumerate(ds)]


def _without_nones(value):
    """Arrow gives every row (and every message of a list column) every column, filling the ones it lacks with
    None: drop those, so that the row looks like the JSON object it came from (and detect_format sees the fields
    the row really has)."""
    if isinstance(value, dict):
        return {k: _without_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nones(v) for v in value]
    return value


def _load_table(path: str) -> list[Row]:
    """A Parquet or CSV/TSV file through ``datasets``; sources are ``file.csv:LINE`` (the header is line 1; a cell
    spanning lines shifts the count) or ``file.parquet[i]``."""
    import datasets

    kind = "parquet" if path.lower().endswith(".parquet") else "csv"
    kwargs = {}
    if kind == "csv":  # text: every cell a string, an empty cell "" (pandas would type "4" as a number, "" as NaN)
        import csv

        delimiter = "\t" if path.lower().endswith(".tsv") else ","
        with open(path, newline="", encoding="utf-8-sig", errors="replace") as f:
            header = next(csv.reader(f, delimiter=delimiter), [])
        kwargs = {"delimiter": delimiter, "keep_default_na": False, "encoding": "utf-8-sig",
                  "features": datasets.Features({name: datasets.Value("string") for name in header})}
    try:
        ds = datasets.load_dataset(kind, data_files=path, split="train", **kwargs)
    except Exception as e:  # pyarrow's and pandas' parse errors have no common base
        raise DataError(f"{path}: cannot read it as {kind.upper()}: {str(e).splitlines()[0][:200]}") from None
    source = (lambda i: f"{path}:{i + 2}") if kind == "csv" else (lambda i: f"{path}[{i}]")
    rows = [Row(_without_nones(data), source(i)) for i, data in enumerate(ds)]
    if kind == "csv":  # KTO's label is the formats' one boolean: CSV writes it as text
        for row in rows:
            label = row.data.get("label")
            if isinstance(label, str) and label.strip().lower() in ("true", "false"):
                row.data["label"] = label.strip().lower() == "true"
    return rows


# TRL's order when a row has the fields of several formats (its SFTTrainer checks prompt, then messages, then text)
FORMAT_ORDER = ("preference", "unpaired_preference", "prompt_completion", "messages", "text", "prompt_only")
_REQUIRED = {"preference": ("chosen", "rejected"), "unpaired_preference": ("prompt", "completion", "label"),
             "prompt_completion": ("prompt", "completion"), "messages": ("messages",), "text": ("text",),
             "prompt_only": ("prompt",)}


def detect_format(row: Row, allowed: tuple[str, ...] = FORMATS) -> str:
    """Which of ``FORMATS`` the row is in (extra fields are allowed): the first in ``FORMAT_ORDER`` whose fields
    it has and that ``allowed`` takes, else the first whose fields it has (the caller reports it)."""
    keys = row.data.keys()
    matching = [f for f in FORMAT_ORDER if all(k in keys for k in _REQUIRED[f])]
    if not matching:
        raise DataError(f"{row.source}: no known format in fields {sorted(keys)}; expected one of: text; messages; "
                        "prompt+completion; prompt+chosen+rejected; prompt+completion+label; prompt")
    return next((f for f in matching if f in allowed), matching[0])


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
    first_fmt, first_source, errors = None, None, []
    for row in rows:
        try:
            fmt = detect_format(row, allowed)
            if fmt not in allowed:
                raise DataError(f"{row.source}: the row is in {fmt!r} format (fields {sorted(row.data)}) but this "
                                f"stage needs {' or '.join(repr(a) for a in allowed)}")
            if first_fmt is None:
                first_fmt, first_source = fmt, row.source
            elif fmt != first_fmt:
                raise DataError(f"{row.source}: the row is in {fmt!r} format (fields {sorted(row.data)}) but "
                                f"{first_source} is in {first_fmt!r}: all rows must have the same format")
            _check_row(row, fmt)
        except DataError as e:  # every bad row is reported, not only the first
            errors.append(str(e))
    if errors:
        raise DataError(_many(errors))
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
    if fmt == "prompt_only" and d["prompt"] == "":
        raise DataError(f"{src}: field 'prompt' is empty (generation needs something to condition on)")
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
        calls = isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("tool_calls"), list)
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not (
                isinstance(m.get("content"), str) or (calls and m.get("content") is None)):
            raise DataError(f"{where}[{i}] must be a message {{'role': str, 'content': str}} (or an assistant "
                            f"message with 'tool_calls'), got {m!r}")


def _check_answer(value, where: str) -> None:
    """What is trained on must not be empty: a non-blank string, or messages with assistant content."""
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where} is empty")
    elif not any(m["role"] == "assistant" and ((m.get("content") or "").strip() or m.get("tool_calls"))
                 for m in value):
        raise DataError(f"{where} has no assistant message with content (nothing to train on)")


# cfg is an engine.config.TrainConfig and info an engine.distributed.DistInfo: not imported, as the engine sits
# above the data layer (engine.config reads rows through its callers)
def load_data(cfg, allowed: tuple[str, ...], info) -> tuple[list[Row], str]:
    """Every row of ``--data`` read and checked before anything else happens (a bad line fails the run before
    a model is loaded or an output written)."""
    rows = load_rows(cfg.data)
    fmt = validate_rows(rows, allowed)
    if info.is_main:
        print(f"ptk: {len(rows)} rows ({fmt}) from {cfg.data}")
    return rows, fmt
