"""Small data sets in each of TRL's formats, written as JSONL, for the trainer tests; a tiny random Llama and padded
prompts for the rollout tests."""

import json
import random

import pytest
import torch

from ptkernels.trainers.modeling import load_causal_lm


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


TEXTS = ["Hello there, how are you", "2+2=", "The quick brown fox jumps over", "a", "Once upon a time"]


def tiny_model():
    """The tiny preset with larger random weights. At its own small init the model just repeats the prompt's last
    token (tied embeddings), which would pass the padding test even with wrong padding; with these weights
    every token depends on the whole (correctly masked and positioned) prefix."""
    model, tok = load_causal_lm("tiny", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return model, tok


@pytest.fixture(scope="module")
def model_tok():
    return tiny_model()


@pytest.fixture(scope="module")
def prompts(model_tok):
    _, tok = model_tok
    ids = [tok(t)["input_ids"] for t in TEXTS]
    assert len({len(p) for p in ids}) > 2  # lengths differ, so the batch really is padded
    return ids
