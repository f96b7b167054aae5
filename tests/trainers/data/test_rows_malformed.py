"""Every malformed row (bad encoding, deep nesting, huge numbers, lone surrogates) is reported as file:line before
the model loads, and nothing is written."""

import json

import pytest

from ptkernels.cli import main as ptk
from ptkernels.trainers.data.rows import DataError, load_rows

GOOD = json.dumps({"prompt": "What is 1+1?", "completion": "Answer: 2"})


@pytest.mark.parametrize("bad,what", [
    (b'{"prompt": "caf\xe9", "completion": "x"}', "not UTF-8 text (byte 0xe9 at column 16)"),
    (b"[" * 50_000 + b"]" * 50_000, "nested too deeply"),
    (b'{"prompt": "a", "completion": "b", "n": ' + b"9" * 5000 + b"}", "unreadable JSON value"),
    (b'{"prompt": "a\\ud800b", "completion": "x"}', "field 'prompt' holds a lone surrogate"),
    (b'{"prompt": "a", "completion": "b", "deep": ' + b"[" * 100 + b"]" * 100 + b"}", "nested more than 64"),
], ids=["not-utf8", "deep-nesting", "huge-int", "lone-surrogate", "nested-row"])
def test_malformed_line_named(tmp_path, bad, what):
    f = tmp_path / "d.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + bad + b"\n" + GOOD.encode() + b"\n")
    with pytest.raises(DataError) as e:
        load_rows(str(f))
    assert str(e.value).startswith(f"{f}:2: ") and what in str(e.value)


def test_every_bad_row_is_reported(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(b"\n".join([GOOD.encode(), b"{bad", GOOD.encode(), b'"\xff"', b'{"prompt": "\\udfff"}']) + b"\n")
    with pytest.raises(DataError) as e:
        load_rows(str(f))
    assert str(e.value).startswith(f"{f}:2: invalid JSON") and "2 more malformed rows" in str(e.value)
    assert f"{f}:4" in str(e.value) and f"{f}:5" in str(e.value)


def test_bad_row_fails_before_anything_is_written(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_bytes(GOOD.encode() + b"\n" + b'{"prompt": "a\\ud800", "completion": "x"}\n')
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'prompt' holds a lone surrogate"):
        ptk(["sft", "--data", str(f), "--output-dir", str(out), "--model", "tiny", "--max-steps", "1"])
    assert not out.exists()
