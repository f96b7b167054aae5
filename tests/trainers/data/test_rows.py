"""Loading and validating rows in TRL's formats: every error names the file and line (or folder and index)."""

import json

import pytest

from ptkernels.trainers.data.rows import (
    EVAL_SPLITS,
    FORMATS,
    DataError,
    Row,
    detect_format,
    is_conversational,
    load_rows,
    validate_rows,
)

USER = {"role": "user", "content": "What is 2+2?"}
ASSISTANT = {"role": "assistant", "content": "4"}
WRONG = {"role": "assistant", "content": "5"}

EXAMPLES = {
    "text": {"text": "Once upon a time"},
    "messages": {"messages": [USER, ASSISTANT]},
    "prompt_completion": {"prompt": "2+2=", "completion": "4"},
    "preference": {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
    "unpaired_preference": {"prompt": "2+2=", "completion": "4", "label": True},
    "prompt_only": {"prompt": "2+2=", "answer": "4"},
}


def write_jsonl(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return str(path)


def rows_of(*dicts, name="d.jsonl"):
    return [Row(d, f"{name}:{i}") for i, d in enumerate(dicts, start=1)]


# ---------------------------------------------------------------------------------------------- loading


def test_load_jsonl_skips_blank_lines_and_keeps_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "", "   ", {"text": "b"}])
    rows = load_rows(path)
    assert [r.data for r in rows] == [{"text": "a"}, {"text": "b"}]
    assert [r.source for r in rows] == [f"{path}:1", f"{path}:4"]


def test_load_invalid_json_names_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, "", '{"text": "b",}'])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        load_rows(path)


def test_load_non_object_line(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a"}, '["text", "b"]'])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: expected a JSON object, got list"):
        load_rows(path)


def test_load_missing_and_empty(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl"):
        load_rows(str(tmp_path / "nope.jsonl"))
    path = write_jsonl(tmp_path / "empty.jsonl", ["", ""])
    with pytest.raises(DataError, match="empty"):
        load_rows(path)


def test_load_dataset_folder(tmp_path):
    import datasets

    data = [{"prompt": "a", "completion": "b"}, {"prompt": "c", "completion": "d"}]
    datasets.Dataset.from_list(data).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(str(tmp_path / "ds"))
    assert [r.data for r in rows] == data
    assert rows[1].source == f"{tmp_path / 'ds'}[1]"
    assert validate_rows(rows, ("prompt_completion",)) == "prompt_completion"


def test_load_dataset_dict_split(tmp_path):
    import datasets

    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list([{"text": "a"}]),
                               "test": datasets.Dataset.from_list([{"text": "b"}, {"text": "c"}])})
    dd.save_to_disk(str(tmp_path / "dd"))
    assert [r.data["text"] for r in load_rows(str(tmp_path / "dd"))] == ["a"]
    assert [r.data["text"] for r in load_rows(str(tmp_path / "dd"), splits=EVAL_SPLITS)] == ["b", "c"]
    with pytest.raises(DataError, match=r"no split 'validation'.*\['test', 'train'\]"):
        load_rows(str(tmp_path / "dd"), splits=("validation",))
    # held-out prompts (ptk eval --data, --eval-data) come from the held-out split, never the training one
    from ptkernels.trainers.recipes.eval_data import load_eval_data

    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "train q", "answer": "1"}]),
                          "test": datasets.Dataset.from_list([{"prompt": "test q", "answer": "2"}])}
                         ).save_to_disk(str(tmp_path / "rl"))
    assert [r.data["prompt"] for r in load_eval_data(str(tmp_path / "rl"))] == ["test q"]
    datasets.DatasetDict({"train": datasets.Dataset.from_list([{"prompt": "q", "answer": "1"}])}
                         ).save_to_disk(str(tmp_path / "train_only"))
    with pytest.raises(DataError, match="no split 'test' or 'validation'"):
        load_eval_data(str(tmp_path / "train_only"))


def test_byte_order_mark(tmp_path):
    """Some Windows editors start UTF-8 files with a byte order mark; datasets' json loader reads them."""
    lines = tmp_path / "bom.jsonl"
    lines.write_bytes(b"\xef\xbb\xbf" + b'{"text": "a"}\n{"text": "b"}\n')
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + b'[\n{"text": "a"},\n{"text": "b"}\n]\n')
    for path in (lines, array):
        rows = load_rows(str(path))
        assert [r.data for r in rows] == [{"text": "a"}, {"text": "b"}]
        assert rows[0].source == f"{path}:{1 if path == lines else 2}"


def test_parquet_and_csv(tmp_path):
    import datasets

    # CSV is text: every cell a string (no number typing: an answer "4" or a prompt "12" stays a string)
    ds = datasets.Dataset.from_list([{"prompt": "2+2=", "completion": "4"}, {"prompt": "12", "completion": " six"}])
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    for name, sources in (("d.parquet", ["[0]", "[1]"]), ("d.csv", [":2", ":3"])):
        rows = load_rows(str(tmp_path / name))
        assert [r.data for r in rows] == ds.to_list()
        assert [r.source for r in rows] == [str(tmp_path / name) + s for s in sources]
    (tmp_path / "kto.csv").write_text("prompt,completion,label\n2+2=, 4,True\n3+3=, 5,false\n")
    assert [r.data["label"] for r in load_rows(str(tmp_path / "kto.csv"))] == [True, False]  # KTO's one boolean
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(DataError, match=r"bad\.parquet: cannot read it as PARQUET"):
        load_rows(str(tmp_path / "bad.parquet"))


def test_rows_with_several_formats_read_as_the_stage_needs():
    """TRL's SFTTrainer checks prompt, then messages, then text: an extra 'text' column is just a column."""
    pc = Row({"prompt": "Translate: cat", "completion": " chat", "text": "source: wiktionary"}, "x")
    assert validate_rows([pc], ("text", "messages", "prompt_completion")) == "prompt_completion"
    convo = Row({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
                 "text": "meta"}, "x")
    assert validate_rows([convo], ("text", "messages", "prompt_completion")) == "messages"
    rl = Row({"prompt": "What is 2+2?", "answer": "4", "text": "source text"}, "x")
    assert validate_rows([rl], ("prompt_only",)) == "prompt_only"
    assert validate_rows([Row({"text": "plain"}, "x")], ("text", "messages", "prompt_completion")) == "text"
    with pytest.raises(DataError, match="x: field 'prompt' is empty"):
        validate_rows([Row({"prompt": "", "answer": "4"}, "x")], ("prompt_only",))


def test_tool_calls_and_tools(tmp_path):
    """TRL's tool-calling rows: an assistant turn with tool_calls and no content; the row's tools reach the
    chat template."""
    from ptkernels.trainers.data.tiny_tokenizer import load_tiny_tokenizer
    from ptkernels.trainers.data.tokenization import encode_sft

    call = {"role": "assistant", "tool_calls": [{"type": "function",
                                                  "function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]}
    messages = [{"role": "user", "content": "2+2?"}, call, {"role": "tool", "content": "4"},
                {"role": "assistant", "content": "It is 4."}]
    tools = '[{"type": "function", "function": {"name": "add", "description": "adds two numbers"}}]'
    row = Row({"messages": messages, "tools": tools}, "x")
    assert validate_rows([row], ("messages",)) == "messages"
    tok = load_tiny_tokenizer()
    tok.chat_template = ("{% if tools %}TOOLS:{{ tools | tojson }}\n{% endif %}{% for m in messages %}{{ m.role }}: "
                         "{{ m.content if m.content is defined else m.tool_calls | tojson }}\n{% endfor %}")
    text = tok.decode(encode_sft(row, tok, max_length=512).input_ids)
    assert text.startswith('TOOLS:[{"type": "function"') and '"name": "add"' in text.split("assistant: ")[1]
    with pytest.raises(DataError, match=r"x: field 'messages'\[1\] must be a message"):
        validate_rows([Row({"messages": [messages[0], {"role": "assistant"}]}, "x")], ("messages",))


def test_load_dataset_folder_drops_missing_columns(tmp_path):
    """Arrow fills a column a row lacks with None; the row must still look like the object it came from."""
    import datasets

    datasets.Dataset.from_list([{"prompt": "a", "answer": "1"}, {"prompt": "b"}]).save_to_disk(str(tmp_path / "ds"))
    rows = load_rows(str(tmp_path / "ds"))
    assert rows[1].data == {"prompt": "b"}


def test_load_folder_that_is_not_a_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    with pytest.raises(DataError, match="save_to_disk"):
        load_rows(str(tmp_path / "x"))


# ---------------------------------------------------------------------------------------------- formats


@pytest.mark.parametrize("fmt", FORMATS)
def test_detect_format(fmt):
    assert detect_format(Row(EXAMPLES[fmt], "x")) == fmt
    assert validate_rows(rows_of(EXAMPLES[fmt], EXAMPLES[fmt]), (fmt,)) == fmt


def test_detect_implicit_prompt_preference():
    row = Row({"chosen": [USER, ASSISTANT], "rejected": [USER, WRONG]}, "x")
    assert detect_format(row) == "preference"
    assert is_conversational(row)
    assert validate_rows([row], ("preference",)) == "preference"


def test_detect_unknown():
    with pytest.raises(DataError, match=r"d\.jsonl:1: no known format in fields \['completion', 'foo'\]"):
        detect_format(rows_of({"foo": 1, "completion": "x"})[0])


def test_is_conversational():
    assert not is_conversational(Row(EXAMPLES["prompt_completion"], "x"))
    assert is_conversational(Row({"prompt": [USER], "completion": [ASSISTANT]}, "x"))


# ---------------------------------------------------------------------------------------------- validation


def test_validate_format_not_allowed():
    with pytest.raises(DataError, match=r"d\.jsonl:1: the row is in 'text' format.*needs 'preference'"):
        validate_rows(rows_of(EXAMPLES["text"]), ("preference",))


def test_validate_mixed_formats_names_the_row():
    rows = rows_of(EXAMPLES["prompt_completion"], EXAMPLES["prompt_completion"], {"prompt": "x"})
    with pytest.raises(DataError, match=r"d\.jsonl:3: .*'prompt_only'.*d\.jsonl:1 is in 'prompt_completion'"):
        validate_rows(rows, ("prompt_completion", "prompt_only"))


def test_validate_missing_field_in_a_file(tmp_path):
    """A preference row that lost its 'rejected' reads as a prompt-only row: caught, with its line."""
    good = EXAMPLES["preference"]
    path = write_jsonl(tmp_path / "bad.jsonl", [good, good, {"prompt": "2+2=", "chosen": "4"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:3: the row is in 'prompt_only' format"):
        validate_rows(load_rows(path), ("preference",))


@pytest.mark.parametrize("row, fmt, message", [
    ({"text": 3}, "text", r"field 'text' must be a string"),
    ({"messages": "hi"}, "messages", r"field 'messages' must be a list"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages", r"field 'messages'\[1\] must be a message"),
    ({"messages": [USER, {"role": "assistant", "content": 4}]}, "messages", r"field 'messages'\[1\] must be a message"),
    ({"messages": [USER]}, "messages", r"field 'messages' has no assistant message"),
    ({"prompt": 1, "completion": "4"}, "prompt_completion", r"field 'prompt' must be a string or a list"),
    ({"prompt": "2+2=", "completion": {"a": 1}}, "prompt_completion", r"field 'completion' must be a string"),
    ({"prompt": "2+2=", "completion": "4", "label": 1}, "unpaired_preference", r"field 'label' must be true or false"),
    ({"prompt": "2+2=", "completion": "4", "label": "yes"}, "unpaired_preference", r"field 'label' must be true"),
    ({"prompt": "2+2=", "completion": ""}, "prompt_completion", r"field 'completion' is empty"),
    ({"prompt": "2+2=", "completion": "  "}, "prompt_completion", r"field 'completion' is empty"),
    ({"prompt": [USER], "completion": [{"role": "assistant", "content": ""}]}, "prompt_completion",
     r"field 'completion' has no assistant message"),
    ({"prompt": "2+2=", "chosen": "4", "rejected": ""}, "preference", r"field 'rejected' is empty"),
    ({"prompt": "2+2=", "chosen": "", "rejected": "5"}, "preference", r"field 'chosen' is empty"),
    ({"chosen": [USER, ASSISTANT], "rejected": [USER, ASSISTANT]}, "preference",
     r"field 'chosen' after the prompt they share has no assistant message"),
    ({"prompt": [USER], "completion": "4"}, "prompt_completion", r"conversational and plain fields mixed"),
    ({"prompt": "2+2=", "chosen": [ASSISTANT], "rejected": [WRONG]}, "preference", r"conversational and plain"),
    ({"prompt": [], "answer": "4"}, "prompt_only", r"field 'prompt' is an empty list"),
])
def test_validate_bad_rows(tmp_path, row, fmt, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [EXAMPLES[fmt], EXAMPLES[fmt], "", row])
    with pytest.raises(DataError, match=r"bad\.jsonl:4: " + message):
        validate_rows(load_rows(path), (fmt,))


def test_validate_conversational_rows():
    rows = rows_of({"prompt": [USER], "completion": [ASSISTANT]},
                   {"prompt": [{"role": "system", "content": "Be brief."}, USER], "completion": [ASSISTANT]})
    assert validate_rows(rows, ("prompt_completion",)) == "prompt_completion"


def test_validate_empty():
    with pytest.raises(DataError, match="no rows"):
        validate_rows([], FORMATS)
