"""RL data as users have it (TRL's gold-answer fields, GSM8K / MATH gold answers) and user reward functions with
TRL's signature, in GRPO and PPO: every row checked before any model loads, None as "cannot score"."""

import json
import math
import textwrap

import pytest
import torch

import ptkernels as ptk
from ptkernels.cli import main as ptk_cli
from ptkernels.trainers.data.rows import DataError, Row, load_rows
from ptkernels.trainers.recipes.grpo import reward_tensor
from ptkernels.trainers.rewards.gold import final_gold_answer, gold_value
from ptkernels.trainers.rewards.reward_funcs import RewardFuncs, RewardSpecError, auto_verifier, check_rows
from ptkernels.trainers.rewards.verifiers import exact, fact
from ptkernels.trainers.rewards.verifiers import math as math_verifier

from ..conftest import write_jsonl


@pytest.mark.parametrize("field", ["answer", "solution", "ground_truth"])
def test_gold_is_read_from_trl_field_names(field):
    row = {"prompt": "2+3?", field: "5"}
    assert gold_value(row) == "5"
    assert math_verifier("so the answer is 5", row) == 1.0
    assert math_verifier("so the answer is 6", row) == 0.0


@pytest.mark.parametrize("gold,completion", [
    ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nShe sold 48+24 = <<48+24=72>>72 clips.\n#### 72",
     "She sold 72 clips altogether. #### 72"),
    ("Natalia sold 24 in May, 72 in all.\n#### 72", "The total is \\boxed{72}."),
    ("We get $x = \\frac{1}{2}$, so the answer is $\\boxed{\\frac{1}{2}}$.", "x = 0.5, so \\boxed{0.5}"),
    ("The sum is \\boxed{1{,}234}.", "Answer: 1234"),
])
def test_gsm8k_and_boxed_gold_answers(gold, completion):
    row = {"prompt": "q", "solution": gold}
    assert math_verifier(completion, row) == 1.0
    assert math_verifier(completion.replace("72", "73").replace("0.5", "0.25").replace("1234", "1235"), row) == 0.0


def test_final_gold_answer():
    assert final_gold_answer("steps\n#### 1,000") == "1,000"
    assert final_gold_answer("so \\boxed{\\frac{a}{b}} holds") == "\\frac{a}{b}"
    assert final_gold_answer("Paris") == "Paris"
    assert final_gold_answer(12) == 12
    assert final_gold_answer(["#### 3", "three"]) == ["3", "three"]
    assert exact("Answer: Paris", {"ground_truth": "The capital is \\boxed{Paris}"}) == 1.0
    assert fact("the answer is the Nile", {"solution": "#### Nile"}) == 1.0


def rows_of(*dicts):
    return [Row(d, f"data.jsonl:{i + 1}") for i, d in enumerate(dicts)]


def test_auto_verifier_follows_the_data():
    assert auto_verifier(rows_of({"prompt": "p", "verifier": "math", "answer": 1})) == "row"
    assert auto_verifier(rows_of({"prompt": "p", "solution": "... #### 12"}, {"prompt": "p", "answer": 3})) == "math"
    assert auto_verifier(rows_of({"prompt": "p", "ground_truth": "Paris"})) == "fact"
    assert auto_verifier(rows_of({"prompt": "p", "tests": ["assert f() == 1"]})) == "code"
    with pytest.raises(DataError, match=r"data.jsonl:1: no verifier fits the data"):
        auto_verifier(rows_of({"prompt": "p", "question_id": 4}))


def test_every_row_is_checked_for_its_verifiers_fields():
    rows = rows_of({"prompt": "p", "answer": 1}, {"prompt": "p", "answer": 2}, {"prompt": "p", "sol": 3})
    with pytest.raises(DataError, match=r"data.jsonl:3: the reward 'math' needs a gold answer .*'solution'"):
        check_rows(rows, RewardFuncs.from_verifier("math"))
    check_rows(rows, RewardFuncs.from_verifier("format"))  # format reads no field
    with pytest.raises(DataError, match=r"data.jsonl:1: .*'verifier' field"):
        check_rows(rows, RewardFuncs.from_verifier("row"))
    with pytest.raises(DataError, match=r"data.jsonl:2: .*'tests'.*for its verifier 'code'"):
        check_rows(rows_of({"prompt": "p", "verifier": "math", "answer": 1}, {"prompt": "p", "verifier": "code"}),
                   RewardFuncs.from_verifier("row"))


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A user's reward module in the working directory, as `--reward-funcs my_rewards:fn` finds it."""
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent('''
        calls = []

        def length_reward(completions, **kwargs):
            calls.append(sorted(kwargs))
            return [min(len(c if isinstance(c, str) else c[0]["content"]), 10) / 10 for c in completions]

        def needs_answer(completions, answer, **kwargs):
            # None: this row cannot be scored by this function (TRL's convention)
            return [None if a is None else float(str(a) in (c if isinstance(c, str) else c[0]["content"]))
                    for c, a in zip(completions, answer)]

        def only_none(completions, **kwargs):
            return [None] * len(completions)

        def wrong_length(completions, **kwargs):
            return [1.0]
    '''))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_user_function_with_trl_signature(user_module):
    funcs = RewardFuncs("my_rewards:length_reward,my_rewards:needs_answer,format", "0.5,2,1")
    rows = rows_of({"prompt": "p", "answer": 7, "extra": "x"}, {"prompt": "q", "answer": None})
    scored = funcs.score(rows, ["Answer: 7", "no idea at all"], [[1, 2], [3]])
    # row 1: 0.5 * 0.9 + 2 * 1 + 1 * 1; row 2: needs_answer returns None (answer is None) and is skipped
    assert scored[0][0] == pytest.approx(0.5 * 0.9 + 2.0 + 1.0)
    assert scored[0][1] == {"length_reward": 0.9, "needs_answer": 1.0, "format": 1.0}
    assert scored[1][0] == pytest.approx(0.5 * 1.0 + 0.0)
    assert "needs_answer" not in scored[1][1]
    import my_rewards

    # prompts and completion_ids as TRL gives them, and the data fields, each a list over the batch
    assert my_rewards.calls[-1] == ["answer", "completion_ids", "extra", "prompts"]
    assert RewardFuncs("my_rewards:only_none").score(rows, ["a", "b"]) == [(None, {}), (None, {})]


def test_user_function_errors(user_module):
    with pytest.raises(DataError, match=r"data.jsonl:1: the reward 'my_rewards:needs_answer' needs .*'answer'"):
        check_rows(rows_of({"prompt": "p"}), RewardFuncs("my_rewards:needs_answer"))
    with pytest.raises(ValueError, match="must return a list of 2 floats or None, got 1 values"):
        RewardFuncs("my_rewards:wrong_length").score(rows_of({"prompt": "p"}, {"prompt": "q"}), ["a", "b"])
    with pytest.raises(RewardSpecError, match="cannot import 'no_such_module'"):
        RewardFuncs("no_such_module:fn")
    with pytest.raises(RewardSpecError, match="has no function 'nope'"):
        RewardFuncs("my_rewards:nope")
    with pytest.raises(RewardSpecError, match="2 weights for 1 reward functions"):
        RewardFuncs("math", "1,2")
    with pytest.raises(RewardSpecError, match="'maths' is not a verifier"):
        RewardFuncs("maths")
    assert RewardFuncs(str(user_module / "my_rewards.py") + ":length_reward").score(
        rows_of({"prompt": "p"}), ["abc"])[0][0] == pytest.approx(0.3)


def test_unscorable_completions_get_advantage_zero():
    """TRL 1.16: a completion no function scores is NaN in the reward matrix, left out of its group's statistics,
    advantage 0; the scorable ones are normalized among themselves."""
    funcs = RewardFuncs("math")
    scored = [(1.0, {}), (None, {}), (0.0, {}), (1.0, {}), (None, {}), (None, {}), (None, {}), (None, {})]
    rewards, weights = reward_tensor(funcs, scored)
    assert weights is None and torch.isnan(rewards[1])
    adv = ptk.group_advantages(rewards, group_size=4)
    assert adv[1] == 0 and torch.all(adv[4:] == 0)
    kept = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    want = (kept - kept.mean()) / (kept.std() + 1e-4)
    torch.testing.assert_close(adv[[0, 2, 3]].double(), want, atol=1e-6, rtol=0)
    two = RewardFuncs("math,format", "1,0.5")  # several functions: the [N, functions] matrix and their weights
    matrix, weights = reward_tensor(two, [(1.5, {"math": 1.0, "format": 1.0}), (0.5, {"format": 1.0})])
    torch.testing.assert_close(weights, torch.tensor([1.0, 0.5]))
    assert matrix[0].tolist() == [1.0, 1.0] and torch.isnan(matrix[1, 0]) and matrix[1, 1] == 1.0


# ------------------------------------------------------------------------------------------------ end to end
COMMON = ["--model", "tiny", "--no-progress", "--max-length", "48", "--max-new-tokens", "6", "--batch-size", "8",
          "--prompts-per-step", "2", "--max-steps", "2"]


def gsm8k_rows(n=6):
    return [{"prompt": f"What is {k}+{k}?", "solution": f"{k}+{k} = <<{k}+{k}={2 * k}>>{2 * k}\n#### {2 * k}"}
            for k in range(n)]


def test_grpo_with_a_user_reward_function(user_module, tmp_path):
    data = tmp_path / "gsm8k.json"
    data.write_text(json.dumps(gsm8k_rows(), indent=1))  # a JSON array, as many data sets ship
    out = tmp_path / "grpo"
    assert ptk_cli(["grpo", "--data", str(data), "--output-dir", str(out), "--num-generations", "2",
                    "--reward-funcs", "math,my_rewards:length_reward", "--reward-weights", "1,0.5",
                    "--eval-data", write_jsonl(tmp_path / "held_out.jsonl", gsm8k_rows(3)), "--eval-steps", "1",
                    *COMMON]) == 0
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 2
    for key in ("reward_math", "reward_length_reward", "unscorable"):
        assert key in m[-1], key
    assert m[-1]["unscorable"] == 0.0
    assert math.isclose(m[-1]["reward"], m[-1]["reward_math"] + 0.5 * m[-1]["reward_length_reward"], abs_tol=1e-6)
    # --eval-data with --eval-steps 1: the held-out metrics beside the training metrics at every step
    for row in m:
        for key in ("eval_reward", "eval_reward_math", "eval_accuracy", "eval_pass@1", "eval_format_rate"):
            assert key in row, key


def test_grpo_checks_every_row_before_the_model_loads(tmp_path):
    rows = gsm8k_rows(4)
    del rows[2]["solution"]  # line 3 has no gold answer; auto picks math from the others
    data = write_jsonl(tmp_path / "rl.jsonl", rows)
    with pytest.raises(DataError, match=r"rl\.jsonl:3: the reward 'math' needs a gold answer"):
        ptk_cli(["grpo", "--data", data, "--model", str(tmp_path / "no-such-model"), "--output-dir",
                 str(tmp_path / "x"), "--no-progress"])
    assert not (tmp_path / "x").exists()


def test_ppo_with_a_user_reward_function(user_module, tmp_path):
    rows = [{**r, "answer": r["solution"].split("#### ")[1]} for r in gsm8k_rows()]
    rows[0]["answer"] = None  # needs_answer cannot score row 1: left out of the loss, the run goes on
    data = write_jsonl(tmp_path / "rl.jsonl", rows)
    out = tmp_path / "ppo"
    assert ptk_cli(["ppo", "--data", data, "--output-dir", str(out), "--reward-funcs", "my_rewards:needs_answer",
                    "--ppo-epochs", "1", *COMMON]) == 0
    m = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(m) == 2 and all(math.isfinite(r["score"]) for r in m)


def test_json_array_rows_name_their_line(tmp_path):
    f = tmp_path / "d.json"
    f.write_text('[\n  {"prompt": "a", "answer": 1},\n  {"prompt": "b",\n   "answer": 2},\n  3\n]\n')
    with pytest.raises(DataError, match=r"d\.json:5: expected a JSON object"):
        load_rows(str(f))
    f.write_text('[\n  {"prompt": "a", "answer": 1},\n  {"prompt": "b",\n   "answer": 2}\n]\n')
    assert [r.source.rsplit(":", 1)[1] for r in load_rows(str(f))] == ["2", "3"]


def test_eval_on_user_data(user_module, tmp_path):
    """ptk eval --data: any prompt / gold data, a user reward function beside a verifier, pass@k, KL to a ref."""
    data = write_jsonl(tmp_path / "gsm8k.jsonl", gsm8k_rows(3))
    out = tmp_path / "m.json"
    assert ptk_cli(["eval", "--model", "tiny", "--data", data, "--reward-funcs", "math,my_rewards:length_reward",
                    "--num-samples", "2", "--max-new-tokens", "5", "--ref-model", "tiny", "--output", str(out)]) == 0
    m = json.loads(out.read_text())
    assert m["n_prompts"] == 3 and m["n_completions"] == 6
    for key in ("reward", "reward_math", "reward_length_reward", "accuracy", "pass@1", "pass@2", "mean_length",
                "format_rate", "unscorable"):
        assert key in m, key
    assert 0 < m["mean_length"] <= 5 and m["pass@1"] <= m["pass@2"]
    assert abs(m["kl_to_ref"]) < 1e-5  # the same seed: the reference is the model itself
    with pytest.raises(DataError, match=r"gsm8k\.jsonl:1: the reward 'exact' needs a gold answer"):
        bad = write_jsonl(tmp_path / "gsm8k.jsonl", [{"prompt": "p"}])
        ptk_cli(["eval", "--model", str(tmp_path / "no-model"), "--data", bad, "--verifier", "exact"])


def test_pass_at_k():
    from ptkernels.trainers.recipes.eval_data import _pass_at

    assert _pass_at(0, 4, 1) == 0 and _pass_at(4, 4, 2) == 1
    assert _pass_at(1, 4, 1) == pytest.approx(0.25) and _pass_at(1, 4, 2) == pytest.approx(0.5)
