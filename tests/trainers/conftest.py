"""Small data sets in each of TRL's formats, written as JSONL, for the trainer tests."""

import json
import random

import pytest


def _arith(rng):
    a, b = rng.randint(10, 60), rng.randint(10, 60)
    return f"What is {a}+{b}?", a + b


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """JSONL files: text, sft (messages), pref (prompt/chosen/rejected), kto (prompt/completion/label)."""
    d = tmp_path_factory.mktemp("data")
    rng = random.Random(0)
    text, sft, pref, kto = [], [], [], []
    for i in range(48):
        q, s = _arith(rng)
        user, good, bad = ([{"role": "user", "content": q}], [{"role": "assistant", "content": f"Answer: {s}"}],
                           [{"role": "assistant", "content": f"I think it might be {s + 7} or so, maybe."}])
        text.append({"text": f"{q[8:-1]} = {s}."})
        sft.append({"messages": user + good})
        pref.append({"prompt": user, "chosen": good, "rejected": bad})
        kto.append({"prompt": user, "completion": good if i % 2 == 0 else bad, "label": i % 2 == 0})
    return {name: write_jsonl(d / f"{name}.jsonl", rows)
            for name, rows in (("text", text), ("sft", sft), ("pref", pref), ("kto", kto))}
