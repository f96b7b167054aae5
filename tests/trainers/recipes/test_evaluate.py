"""``ptk eval``: the metric contract, self-comparison, an oracle / a refuser with known metrics, ECE by hand, CLI."""

import json
import math

import pytest
import torch

from ptkernels.cli import main as ptk
from ptkernels.trainers.data.tokenization import encode_prompt
from ptkernels.trainers.modeling import load_causal_lm, load_sequence_classifier, save_pretrained
from ptkernels.trainers.recipes import evaluate as ev
from ptkernels.trainers.rollout.sampling import Rollout, SamplingConfig
from ptkernels.trainers.taskworld import GROUPS, REFUSAL, eval_sets

RATES = ("format_rate", "accuracy", "refusal_rate_harmful", "over_refusal_benign", "win_rate_vs_sft",
         "win_rate_vs_sft_rm", "ece")
FAMILIES = GROUPS["arithmetic"] + GROUPS["string"]
KEYS = set(RATES) | {"mean_length", "kl_to_sft"} | {f"accuracy_{f}" for f in FAMILIES} | {
    f"n_{s}" for s in ("arithmetic", "string", "harmful", "benign")}
FAST = SamplingConfig(do_sample=False, max_new_tokens=8, batch_size=16)


@pytest.fixture(scope="module")
def tiny():
    return load_causal_lm("tiny", seed=0)


@pytest.fixture(scope="module")
def sets():
    return eval_sets(0, n_task=6, n_safety=4)


def _check_contract(m, sets, max_length=FAST.max_new_tokens):
    assert set(m) == KEYS
    for k in RATES + tuple(f"accuracy_{f}" for f in FAMILIES):
        assert m[k] is None or 0.0 <= m[k] <= 1.0, (k, m[k])
    assert {k: m[k] for k in m if k.startswith("n_")} == {f"n_{s}": len(rows) for s, rows in sets.items()}
    assert 1 <= m["mean_length"] <= (max_length or math.inf)
    json.dumps(m)  # the report writes it as is


def test_expected_calibration_error_by_hand():
    # bin 0: {0.05: wrong} -> |0 - 0.05|; bin 1: {0.15 right, 0.15 wrong} -> |0.5 - 0.15|;
    # bin 9: {0.95, 1.0 (the last bin), both right} -> |1 - 0.975|
    conf, correct = [0.05, 0.15, 0.15, 0.95, 1.0], [False, True, False, True, True]
    expected = 1 / 5 * 0.05 + 2 / 5 * 0.35 + 2 / 5 * 0.025
    assert ev.expected_calibration_error(conf, correct) == pytest.approx(expected)
    assert ev.expected_calibration_error([0.7] * 10, [True] * 7 + [False] * 3) == pytest.approx(0.0)
    assert ev.expected_calibration_error([1.0, 0.0], [False, True]) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        ev.expected_calibration_error([], [])


def test_against_itself(tiny, sets):
    """The same model as SFT model: every completion ties and the KL is exactly zero."""
    model, tok = tiny
    rm, rm_tok = load_sequence_classifier("tiny", seed=3)
    model.train()  # as a trainer would hand it over: evaluated without dropout, handed back in train mode
    m = ev.evaluate(model, tok, sets, sft_model=model, reward_model=rm, reward_tokenizer=rm_tok, sampling=FAST)
    _check_contract(m, sets)
    assert m["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)
    assert m["win_rate_vs_sft"] == 0.5 and m["win_rate_vs_sft_rm"] == 0.5
    assert model.training
    # another SFT model: a real KL (one sample per prompt, so only its being non-zero is certain)
    other, _ = load_causal_lm("tiny", seed=1)
    m2 = ev.evaluate(model, tok, sets, sft_model=other, sampling=FAST)
    assert m2["kl_to_sft"] != 0.0 and m2["win_rate_vs_sft_rm"] is None


def test_without_reference_models(tiny, sets):
    m = ev.evaluate(*tiny, sets, sampling=FAST)
    _check_contract(m, sets)
    assert m["win_rate_vs_sft"] is None and m["win_rate_vs_sft_rm"] is None and m["kl_to_sft"] is None


def _fake_generate(sets, tok, reply_of):
    """A stand-in for rollout.generate: completion = ``reply_of(model, row)`` + eos, looked up by prompt."""
    row_of = {tuple(encode_prompt(r, tok, max_prompt_length=256)): r for rows in sets.values() for r in rows}

    def generate(model, tokenizer, prompts, sampling, *, seed=None):
        texts = [reply_of(model, row_of[tuple(p)]) for p in prompts]
        ids = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
        return Rollout([list(p) for p in prompts], ids, texts, [True] * len(prompts))

    return generate


def _ideal(row):
    return REFUSAL if row["category"] == "harmful" else f"Answer: {row['answer']}"


def test_oracle_and_refuser(tiny, sets, monkeypatch):
    """The ideal completions score perfectly; a model that refuses everything wins only where it is right."""
    model, tok = tiny
    refuser, _ = load_causal_lm("tiny", seed=2)
    reply = lambda m, row: REFUSAL if m is refuser else _ideal(row)  # noqa: E731
    monkeypatch.setattr(ev, "generate", _fake_generate(sets, tok, reply))

    m = ev.evaluate(model, tok, sets, sft_model=refuser, sampling=FAST)
    _check_contract(m, sets, max_length=None)  # the fake ignores max_new_tokens
    lengths = [len(tok(_ideal(r), add_special_tokens=False)["input_ids"]) + 1 for rows in sets.values() for r in rows]
    assert m["mean_length"] == pytest.approx(sum(lengths) / len(lengths))
    assert m["accuracy"] == 1.0 and m["format_rate"] == 1.0
    assert m["refusal_rate_harmful"] == 1.0 and m["over_refusal_benign"] == 0.0
    assert all(m[f"accuracy_{f}"] in (None, 1.0) for f in FAMILIES)
    # wins every non-harmful prompt, ties (the same refusal) every harmful one
    n = {s: len(rows) for s, rows in sets.items()}
    assert m["win_rate_vs_sft"] == pytest.approx((sum(n.values()) - n["harmful"] / 2) / sum(n.values()))

    # every answer is right, so ECE = 1 - mean confidence; the confidence recomputed from full logits
    conf = []
    with torch.no_grad():
        for row in sets["arithmetic"]:
            prompt = encode_prompt(row, tok, max_prompt_length=256)
            prefix = tok("Answer: ", add_special_tokens=False)["input_ids"]
            answer = tok(row["answer"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([prompt + prefix + answer])
            logps = model(input_ids=ids).logits[0].float().log_softmax(-1)
            start = len(prompt) + len(prefix)
            conf.append(math.exp(sum(logps[start + j - 1, t].item() for j, t in enumerate(answer))))
    assert m["ece"] == pytest.approx(1 - sum(conf) / len(conf), abs=1e-4)

    refused = ev.evaluate(refuser, tok, sets, sft_model=model, sampling=FAST)
    assert refused["accuracy"] == 0.0 and refused["format_rate"] == 0.0 and refused["ece"] is None
    assert refused["refusal_rate_harmful"] == 1.0 and refused["over_refusal_benign"] == 1.0
    assert refused["win_rate_vs_sft"] == pytest.approx(1 - m["win_rate_vs_sft"])


def test_cli_writes_json(tmp_path, tiny, capsys):
    model, tok = tiny
    save_pretrained(model, tok, str(tmp_path / "model"))
    rm, rm_tok = load_sequence_classifier("tiny", seed=3)
    save_pretrained(rm, rm_tok, str(tmp_path / "rm"))
    out = tmp_path / "out" / "metrics.json"
    rc = ptk(["eval", "--model", str(tmp_path / "model"), "--sft-model", str(tmp_path / "model"),
              "--reward-model", str(tmp_path / "rm"), "--n-task", "3", "--n-safety", "2", "--max-new-tokens", "6",
              "--device", "cpu", "--output", str(out)])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m) == KEYS and m["n_arithmetic"] == 3 and m["n_benign"] == 2
    assert m["kl_to_sft"] == pytest.approx(0.0, abs=1e-6) and m["win_rate_vs_sft"] == 0.5
    assert m["win_rate_vs_sft_rm"] == 0.5
    assert "format_rate" in capsys.readouterr().out
