"""RL data as users have it (TRL's gold-answer fields, GSM8K / MATH gold answers) and user reward functions with
TRL's signature, in GRPO and PPO: every row checked before any model loads, None as "cannot score"."""

import json
import math
import sys
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

    # prompts, completion_ids, trainer_state, log_extra and log_metric as TRL 1.16 gives them, and the data fields,
    # each a list over the batch
    assert my_rewards.calls[-1] == ["answer", "completion_ids", "extra", "log_extra", "log_metric", "prompts",
                                    "trainer_state"]
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


# ------------------------------------------------------------- TRL 1.16's calling convention, case by case
def write_module(folder, name, source):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(source))
    return folder / f"{name}.py"


@pytest.fixture
def rewards_dir(tmp_path, monkeypatch):
    """A folder on the path for the tests' reward modules; sys.path restored after (file imports add folders)."""
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_two_functions_of_one_name_are_two_columns(rewards_dir):
    """pkg.a:score and pkg.b:score: before, both columns of the [N, functions] matrix held b's values (the matrix was
    built from a dict by name) and one metric was logged. TRL: one column per function, by position."""
    pkg = rewards_dir / "same_name_pkg"
    write_module(pkg, "__init__", "")
    write_module(pkg, "a", "def score(completions, **kw):\n    return [1.0] * len(completions)\n")
    write_module(pkg, "b", "def score(completions, **kw):\n    return [float(i) for i in range(len(completions))]\n")
    funcs = RewardFuncs("same_name_pkg.a:score,same_name_pkg.b:score", "1,0")
    assert funcs.names() == ["score", "score_2"]
    scored = funcs.score(rows_of(*[{"prompt": "p"}] * 4), ["a", "b", "c", "d"])
    assert [r for r, _ in scored] == [1.0] * 4  # weight 0 on b
    assert [parts for _, parts in scored][3] == {"score": 1.0, "score_2": 3.0}
    matrix, weights = reward_tensor(funcs, scored)
    assert matrix.tolist() == [[1.0, 0.0], [1.0, 1.0], [1.0, 2.0], [1.0, 3.0]]
    # a's column is constant and b weighs 0: every advantage is 0, as in TRL (before: b's 0..3 drove them)
    assert torch.all(ptk.group_advantages(matrix, group_size=4, reward_weights=weights) == 0)
    # two reward-model folders of one name (checkpoints/step-000002 of two runs), and a function named 'std'
    # (reward_std is a metric of its own)
    for run in ("run1", "run2"):
        (rewards_dir / run / "checkpoints" / "step-000002").mkdir(parents=True)
    write_module(rewards_dir, "std_rewards", "def std(completions, **kw):\n    return [0.0] * len(completions)\n")
    models = RewardFuncs(f"run1/checkpoints/step-000002,{rewards_dir}/run2/checkpoints/step-000002/,std_rewards:std")
    assert models.names() == ["step-000002", "step-000002_2", "std_2"]


def test_return_types_trl_accepts(rewards_dir):
    """TRL 1.16 turns the returned values into a tensor after mapping None to NaN: a numpy array or a torch tensor
    works, and NaN is "cannot score" as None is (some_nan: rewards/some_nan/mean 1.0 over [0, nan, 2, nan])."""
    write_module(rewards_dir, "returns_mod", """
        import numpy as np
        import torch

        def np_array(completions, **kw):
            return np.arange(len(completions), dtype=np.float32)

        def tensor(completions, **kw):
            return torch.arange(len(completions), dtype=torch.float32) * 2

        def some_nan(completions, **kw):
            return [float("nan") if i % 2 else float(i) for i in range(len(completions))]

        def two_d(completions, **kw):
            return np.zeros((len(completions), 1))

        def infinite(completions, **kw):
            return [float("inf")] * len(completions)
    """)
    rows = rows_of(*[{"prompt": "p"}] * 4)
    funcs = RewardFuncs("returns_mod:np_array,returns_mod:tensor,returns_mod:some_nan")
    scored = funcs.score(rows, ["a", "b", "c", "d"])
    assert [s.per_func for s in scored] == [[0.0, 0.0, 0.0], [1.0, 2.0, None], [2.0, 4.0, 2.0], [3.0, 6.0, None]]
    assert [r for r, _ in scored] == [0.0, 3.0, 8.0, 9.0]
    assert "some_nan" not in scored[1][1]
    nan_only = RewardFuncs("returns_mod:some_nan").score(rows, ["a", "b", "c", "d"])
    assert [r for r, _ in nan_only] == [0.0, None, 2.0, None]  # NaN alone: unscorable, as None
    with pytest.raises(ValueError, match=r"'returns_mod:two_d' must return 4 rewards, got an array of shape"):
        RewardFuncs("returns_mod:two_d").score(rows, ["a", "b", "c", "d"])
    with pytest.raises(ValueError, match=r"'returns_mod:infinite' returned inf"):
        RewardFuncs("returns_mod:infinite").score(rows, ["a", "b", "c", "d"])


def test_async_functions_run_concurrently_after_the_others(rewards_dir):
    """TRL 1.16 runs async reward functions (async def, a partial of one, an object with an async __call__)
    together with asyncio.gather on an event loop in a daemon thread, after the synchronous ones. ping waits for
    pong and pong for ping: run one after the other, they would time out."""
    write_module(rewards_dir, "async_mod", """
        import asyncio
        import functools

        order, events = [], {}

        def event(name):
            return events.setdefault(name, asyncio.Event())

        async def meet(me, other, completions, **kw):
            order.append(me)
            event(me).set()
            await asyncio.wait_for(event(other).wait(), 10)
            return [0.5] * len(completions)

        async def ping(completions, **kw):
            return await meet("ping", "pong", completions)

        pong = functools.partial(meet, "pong", "ping")

        class Judge:
            async def __call__(self, completions, **kw):
                order.append("judge")
                return [1.0] * len(completions)

        judge = Judge()

        def sync(completions, **kw):
            order.append("sync")
            return [2.0] * len(completions)
    """)
    import async_mod

    funcs = RewardFuncs("async_mod:ping,async_mod:pong,async_mod:judge,async_mod:sync")
    scored = funcs.score(rows_of({"prompt": "p"}, {"prompt": "q"}), ["a", "b"])
    assert [s.per_func for s in scored] == [[0.5, 0.5, 1.0, 2.0]] * 2 and scored[0][0] == 4.0
    assert async_mod.order[0] == "sync" and sorted(async_mod.order[1:]) == ["judge", "ping", "pong"]
    assert funcs.score(rows_of({"prompt": "p"}), ["a"])[0][0] == 4.0  # the same loop serves the next rollout


def test_extra_arguments_and_functions_without_kwargs(rewards_dir):
    """TRL 1.16 passes trainer_state (its TrainerState), log_extra and log_metric; a function without **kwargs
    gets only the arguments it names (the data fields among them)."""
    write_module(rewards_dir, "args_mod", """
        seen = {}

        def named_only(completions, answer):
            seen["named_only"] = answer
            return [float(a == "7") for a in answer]

        def state(completions, trainer_state, log_metric, log_extra):
            seen["state"] = (trainer_state.global_step, trainer_state.max_steps, trainer_state.epoch)
            log_metric("my_metric", 2.0)
            log_metric("my_metric", 4)
            log_extra("judge_notes", ["ok"] * len(completions))
            return [0.0] * len(completions)
    """)
    import args_mod

    from ptkernels.trainers.rewards.reward_funcs import make_trainer_state

    funcs = RewardFuncs("args_mod:named_only,args_mod:state")
    rows = rows_of({"prompt": "p", "answer": "7", "other": 1}, {"prompt": "q", "answer": "8", "other": 2})
    scored = funcs.score(rows, ["a", "b"], [[1], [2]],
                         trainer_state=make_trainer_state(global_step=3, max_steps=10, epoch=0.5))
    assert [r for r, _ in scored] == [1.0, 0.0]
    assert args_mod.seen == {"named_only": ["7", "8"], "state": (3, 10, 0.5)}
    assert funcs.pop_logged() == {"my_metric": [2.0, 4.0]} and funcs.pop_logged() == {}
    funcs.score(rows, ["a", "b"])  # e.g. an evaluation between rollouts: the last state given
    assert args_mod.seen["state"] == (3, 10, 0.5)


def test_a_data_column_named_like_an_argument(rewards_dir):
    """A column 'completions' (or prompts, trainer_state, log_extra, log_metric) cannot reach a user function: it
    crashed the first rollout with "got multiple values for keyword argument" after the model loaded. Now an error
    naming the column and file:line, before any model loads; the built-in verifiers, which never read it, score
    the rows; a 'completion_ids' column is not passed (TRL's rule), so it is no clash."""
    write_module(rewards_dir, "col_mod", "def f(completions, **kw):\n    return [1.0] * len(completions)\n")
    rows = rows_of({"prompt": "p", "answer": "4"}, {"prompt": "p", "answer": "4", "completions": "x"})
    with pytest.raises(DataError, match=r"data\.jsonl:2: the data column 'completions' has the name of an argument "
                                        r".* the reward 'col_mod:f' cannot get it: rename the column"):
        check_rows(rows, RewardFuncs("math,col_mod:f"))
    check_rows(rows, RewardFuncs.from_verifier("math"))
    assert [r for r, _ in RewardFuncs.from_verifier("math").score(rows, ["4", "4"])] == [1.0, 1.0]
    with pytest.raises(DataError, match=r"data\.jsonl:1: the data column 'trainer_state'"):
        check_rows(rows_of({"prompt": "p", "trainer_state": 1}), RewardFuncs("col_mod:f"))
    ids_rows = rows_of({"prompt": "p", "completion_ids": [9]})
    check_rows(ids_rows, RewardFuncs("col_mod:f"))
    assert RewardFuncs("col_mod:f").score(ids_rows, ["a"], [[1, 2]])[0][0] == 1.0


def test_a_file_imports_the_modules_beside_it(rewards_dir, monkeypatch):
    """path/to/file.py:fn imports with the file's folder on sys.path, as Python runs a script: `from helpers import
    bonus` finds the helpers.py beside it (before: "No module named ..."), also when the function imports it
    lazily; two files of one name in two folders are two modules."""
    for folder, value in (("one", 1.0), ("two", 2.0)):
        write_module(rewards_dir / folder, f"bonus_helper_{folder}", f"def bonus():\n    return {value}\n")
        write_module(rewards_dir / folder, "rewards_with_helper", f"""
            from dataclasses import dataclass
            from bonus_helper_{folder} import bonus

            @dataclass
            class Config:  # needs the module in sys.modules
                scale: float = 1.0

            def fn(completions, **kw):
                return [bonus() * Config().scale] * len(completions)

            def lazy(completions, **kw):
                import bonus_helper_{folder}
                return [bonus_helper_{folder}.bonus()] * len(completions)
        """)
    elsewhere = rewards_dir / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    funcs = RewardFuncs("../one/rewards_with_helper.py:fn,../two/rewards_with_helper.py:fn,"
                        "../two/rewards_with_helper.py:lazy")
    assert funcs.score(rows_of({"prompt": "p"}), ["a"])[0][1] == {"fn": 1.0, "fn_2": 2.0, "lazy": 2.0}
    assert sys.path[0] != str(rewards_dir / "one")  # left on the path last, not first


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
