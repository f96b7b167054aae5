"""Every offline stage end to end on a tiny model: the loss falls, and the output folder loads with
from_pretrained (and generates, or scores for the reward model)."""

import json
import os

import pytest
import torch

from ptkernels.cli import main as ptk

COMMON = ["--model", "tiny", "--no-progress", "--batch-size", "8", "--max-length", "64"]


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [m["loss"] for m in metrics(out)]


def run(stage, data, out, *extra):
    assert ptk([stage, "--data", data, "--output-dir", str(out), *COMMON, *extra]) == 0
    return str(out)


def falls(values, by=0.85):
    """The mean of the last three losses is clearly below the mean of the first three."""
    return sum(values[-3:]) / 3 < by * sum(values[:3]) / 3


def generates(out):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 12+30?"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    new = model.generate(**ids, max_new_tokens=6, do_sample=False)[0, ids["input_ids"].shape[1]:]
    assert new.numel() >= 1


@pytest.mark.parametrize("packing", [False, True])
def test_sft(data_dir, tmp_path, packing):
    out = run("sft", data_dir["sft"], tmp_path / "sft", "--max-steps", "30", "--lr", "3e-3",
              *(["--packing"] if packing else []))
    assert falls(losses(out), 0.6)
    generates(out)


def test_pretrain(data_dir, tmp_path):
    out = run("pretrain", data_dir["text"], tmp_path / "pt", "--max-steps", "30", "--lr", "3e-3", "--max-length", "32")
    assert falls(losses(out), 0.6)
    generates(out)


@pytest.fixture(scope="module")
def sft_model(data_dir, tmp_path_factory):
    """A briefly SFT-ed tiny model: the starting point of the preference stages."""
    return run("sft", data_dir["sft"], tmp_path_factory.mktemp("sft") / "m", "--max-steps", "20", "--lr", "3e-3")


def test_reward_model(data_dir, tmp_path, sft_model):
    out = run("reward", data_dir["pref"], tmp_path / "rm", "--model", sft_model, "--max-steps", "25", "--lr", "1e-3")
    assert falls(losses(out), 0.7)
    assert metrics(out)[-1]["accuracy"] > 0.9
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm, tok = AutoModelForSequenceClassification.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    good = tok.apply_chat_template([{"role": "user", "content": "What is 10+20?"},
                                    {"role": "assistant", "content": "Answer: 30"}], return_tensors="pt",
                                   return_dict=True)
    bad = tok.apply_chat_template([{"role": "user", "content": "What is 10+20?"},
                                   {"role": "assistant", "content": "I think it might be 37 or so, maybe."}],
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        assert rm(**good).logits.item() > rm(**bad).logits.item()


@pytest.mark.parametrize("stage,extra", [
    ("dpo", ["--loss-type", "sigmoid"]),
    ("dpo", ["--loss-type", "ipo", "--ref-mode", "live"]),
    ("dpo", ["--loss-type", "hinge"]),
    ("orpo", []),
    ("simpo", []),
])
def test_preference_stages(data_dir, tmp_path, sft_model, stage, extra):
    out = run(stage, data_dir["pref"], tmp_path / stage, "--model", sft_model, "--max-steps", "20", "--lr", "2e-3",
              *extra)
    m = metrics(out)
    assert falls([r["loss"] for r in m], 0.9)
    assert m[-1]["margin"] > m[0]["margin"]
    generates(out)


@pytest.mark.parametrize("mode", ["precompute", "live"])
def test_kto(data_dir, tmp_path, sft_model, mode):
    out = run("kto", data_dir["kto"], tmp_path / "kto", "--model", sft_model, "--max-steps", "20", "--lr", "2e-3",
              "--ref-mode", mode)
    m = metrics(out)
    assert falls([r["loss"] for r in m], 0.9)
    assert m[-1]["chosen_reward"] > m[-1]["rejected_reward"]
    generates(out)


def test_precomputed_and_live_reference_agree(data_dir, tmp_path, sft_model):
    """Precomputing the reference log-probs changes nothing but memory: the runs take the same steps. In fp32 on
    every device: under bf16 autocast (the GPU default) the precompute pass batches pairs in file order and the
    training steps in shuffled order, so other padded lengths give other bf16 roundings (~1e-4 on the loss)."""
    common = ("--model", sft_model, "--max-steps", "3", "--lr", "1e-3", "--precision", "fp32")
    a = run("dpo", data_dir["pref"], tmp_path / "a", *common)
    b = run("dpo", data_dir["pref"], tmp_path / "b", *common, "--ref-mode", "live")
    for x, y in zip(metrics(a), metrics(b)):
        assert x["loss"] == pytest.approx(y["loss"], rel=1e-5)
        assert x["chosen_reward"] == pytest.approx(y["chosen_reward"], rel=1e-4, abs=1e-6)
