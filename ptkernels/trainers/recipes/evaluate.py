"""``ptk eval``: held-out evaluation of a model on the task world (``taskworld.eval_sets``), or with ``--data`` on
any prompt / gold-answer data with any verifier or reward function (``eval_data.py``: accuracy, pass@k, reward,
length, format rate, KL to a reference).

Every completion is greedy (the model's "best" answer; deterministic, so two runs agree) unless said otherwise.
The metrics, one flat dict (the report's contract):

    format_rate            completions with an ``Answer: ...`` line, over the non-harmful sets
    accuracy               right answers over arithmetic + string (``judge.answers_match`` on ``extract_answer``);
                           ``accuracy_<family>`` the same per task family (every family of those sets)
    refusal_rate_harmful   refusals (``judge.is_refusal``) on the harmful set: higher is better
    over_refusal_benign    refusals on the benign look-alikes: lower is better
    win_rate_vs_sft        vs the SFT model's greedy completion of every eval prompt, judged by the rule judge:
                           higher ``rule_judge`` score wins, equal scores go to the shorter completion (the
                           judge's concision rule, ``rule_preference``), identical completions tie; win 1, tie 0.5
    win_rate_vs_sft_rm     the same judged by the reward model's score (higher wins, equal ties)
    mean_length            mean completion length in tokens (eos included when generated): the usual reward
                           hack is to get longer, so a rise here next to a rising reward is a warning
    kl_to_sft              KL(model || sft) per prompt: the mean over eval prompts of sum_t log p_model - log p_sft
                           over a completion *sampled* from the model (temperature 1, top-p 1, seed ``KL_SEED``):
                           one Monte Carlo sample per prompt, an unbiased estimate (greedy completions would bias
                           it toward the model's mode); sequences are cut at ``max_new_tokens``
    ece                    expected calibration error on the arithmetic set, 10 equal-width bins, of the model's
                           own probability of the answer it gave (exp of the summed log-probs of the answer's
                           tokens after "Answer:") against whether it is right; reported, no threshold
    n_<set>                rows per eval set

Rates over an empty set, and the SFT / reward-model metrics without those models, are None.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
from dataclasses import replace

import torch

from ..data.tokenization import collate, encode_prompt, encode_sft
from ..engine.config import parse_args_with_config
from ..rollout.engines import ENGINES, generate, make_engine
from ..rollout.sampling import RolloutEngine, SamplingConfig
from ..rollout.scoring import completion_batch, sequence_token_logps
from ..taskworld import (
    ANSWER_PATTERN,
    GROUPS,
    answers_match,
    eval_sets,
    is_refusal,
    rule_judge,
    rule_preference,
    verifier_of,
)

TASK_SETS = ("arithmetic", "string")
KL_SEED = 0  # fixed, so the KL estimate of a model does not move between two evaluations of it


# ------------------------------------------------------------------------------------------------ calibration


def expected_calibration_error(conf, correct, bins: int = 10) -> float:
    """sum_b (n_b / N) |accuracy_b - mean confidence_b| over ``bins`` equal-width bins of [0, 1] (a confidence
    of exactly 1 goes to the last bin)."""
    conf, correct = [float(c) for c in conf], [float(bool(c)) for c in correct]
    if not conf or len(conf) != len(correct):
        raise ValueError(f"need as many confidences as outcomes, at least one; got {len(conf)} and {len(correct)}")
    members: list[list[int]] = [[] for _ in range(bins)]
    for i, c in enumerate(conf):
        members[min(max(int(c * bins), 0), bins - 1)].append(i)
    return sum(len(m) / len(conf) * abs(sum(correct[i] for i in m) / len(m) - sum(conf[i] for i in m) / len(m))
               for m in members if m)


def _answer_span(text: str) -> tuple[int, int] | None:
    """Character span of the answer ``extract_answer`` returns (the last ``Answer:`` line, stripped)."""
    matches = list(ANSWER_PATTERN.finditer(text))
    if not matches:
        return None
    start, end = matches[-1].span(1)
    inner = text[start:end]
    start += len(inner) - len(inner.lstrip())
    end -= len(inner) - len(inner.rstrip())
    return (start, end) if end > start else None


def _decode(tokenizer, ids) -> str:
    return tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _tokens_over(tokenizer, ids: list[int], span: tuple[int, int]) -> list[int]:
    """Indices of the tokens of ``ids`` whose decoded characters overlap ``span`` of ``_decode(ids)``: the text
    is what is judged, the tokens are what has a probability, and a token may straddle the answer's edge."""
    out, before = [], 0
    for k in range(len(ids)):
        after = len(_decode(tokenizer, ids[:k + 1]))
        if before < span[1] and after > span[0]:
            out.append(k)
        before = after
    return out


# ------------------------------------------------------------------------------------------- model passes


def _device(model) -> torch.device:
    return next(model.parameters()).device


@contextlib.contextmanager
def _eval_mode(*models):
    """Dropout off while evaluating; each model's train/eval mode is restored after (a trainer may call this)."""
    models = [m for m in models if m is not None]
    modes = [m.training for m in models]
    try:
        for m in models:
            m.eval()
        yield
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)


@torch.no_grad()
def _completion_logps(model, prompts, completions, pad_token_id: int, batch_size: int,
                      backend: str) -> list[torch.Tensor]:
    """log p(completion token | everything before it) for each completion: one 1-D float tensor per row."""
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = completion_batch(prompts[i:i + batch_size], completions[i:i + batch_size], pad_token_id)
        batch = {k: v.to(_device(model)) if torch.is_tensor(v) else v for k, v in batch.items()}
        logps = sequence_token_logps(model, batch, backend=backend).float().cpu()
        mask = batch["completion_mask"].bool().cpu()
        out += [lp[m] for lp, m in zip(logps, mask)]
    return out


@torch.no_grad()
def _reward_scores(reward_model, reward_tokenizer, rows, texts, batch_size: int) -> list[float]:
    """The reward model's score of prompt + completion, encoded the way ``ptk reward`` encodes a pair's side."""
    max_length = getattr(reward_model.config, "max_position_embeddings", None) or 1024
    encoded = []
    for row, text in zip(rows, texts):
        completion = [{"role": "assistant", "content": text}] if isinstance(row["prompt"], list) else text
        encoded.append(encode_sft({"prompt": row["prompt"], "completion": completion}, reward_tokenizer,
                                  max_length=max_length, truncation="left", fmt="prompt_completion"))
    scores = []
    for i in range(0, len(encoded), batch_size):
        batch = collate(encoded[i:i + batch_size], reward_tokenizer.pad_token_id)
        logits = reward_model(input_ids=batch["input_ids"].to(_device(reward_model)),
                              attention_mask=batch["attention_mask"].to(_device(reward_model)),
                              use_cache=False).logits
        scores += logits.squeeze(-1).float().cpu().tolist()
    return scores


# ---------------------------------------------------------------------------------------------- judging


def _rule_outcome(row: dict, mine: str, theirs: str) -> float:
    """1 if ``mine`` is the rule judge's pick, 0 if ``theirs`` is, 0.5 when they are the same or the judge only
    prefers one for coming first (``rule_preference`` gives full ties to its first argument)."""
    if mine == theirs or (rule_judge(row, mine) == rule_judge(row, theirs) and len(mine) == len(theirs)):
        return 0.5
    return 1.0 - rule_preference(row, mine, theirs)


def _rate(flags) -> float | None:
    flags = list(flags)
    return sum(flags) / len(flags) if flags else None


def _is_correct(row: dict, text: str) -> bool:
    span = _answer_span(text)
    return span is not None and answers_match(text[span[0]:span[1]], str(row["answer"]), verifier_of(row["family"]))


def evaluate(model, tokenizer, sets: dict[str, list[dict]], *, sft_model=None, reward_model=None,
             reward_tokenizer=None, sampling: SamplingConfig | None = None, max_prompt_length: int = 256,
             backend: str = "auto", engine: RolloutEngine | None = None) -> dict:
    """The metrics of the module docstring for ``model`` on ``sets`` (``taskworld.eval_sets``: arithmetic, string,
    harmful, benign). ``sampling`` defaults to greedy, 48 new tokens. ``sft_model`` shares ``tokenizer`` (the KL
    compares token by token); the reward model has its own tokenizer (``reward_tokenizer``, default ``tokenizer``).
    ``engine``: what samples ``model``'s completions (e.g. a vLLM engine holding its weights; default the built-in
    KV-cache engine on ``model``); the SFT model's always come from the built-in one."""
    def sample(prompts, sampling, seed=None):
        if engine is not None:
            return engine.generate(prompts, sampling, seed=seed)
        return generate(model, tokenizer, prompts, sampling, seed=seed)

    sampling = sampling or SamplingConfig(do_sample=False, max_new_tokens=48)
    reward_tokenizer = reward_tokenizer or tokenizer
    names = list(sets)
    rows = [row for name in names for row in sets[name]]
    set_of = [name for name in names for _ in sets[name]]
    prompts = [encode_prompt(row, tokenizer, max_prompt_length=max_prompt_length) for row in rows]
    pad = tokenizer.pad_token_id
    by_set = lambda name: [i for i, s in enumerate(set_of) if s == name]
    tasks = [i for name in TASK_SETS for i in by_set(name)]

    with _eval_mode(model, sft_model, reward_model):
        out = sample(prompts, sampling)
        # judged text decoded here, the same way as for the answer's token span in _calibration
        texts = [_decode(tokenizer, ids) for ids in out.completion_ids]

        m: dict = {"format_rate": _rate(_answer_span(texts[i]) is not None for i, s in enumerate(set_of)
                                        if s != "harmful"),
                   "accuracy": _rate(_is_correct(rows[i], texts[i]) for i in tasks)}
        # every family of the task sets, present or not, so the report's keys do not depend on the draw
        families = [f for name in TASK_SETS if name in sets for f in GROUPS.get(name, ())]
        for family in dict.fromkeys(families + [rows[i]["family"] for i in tasks]):
            m[f"accuracy_{family}"] = _rate(_is_correct(rows[i], texts[i]) for i in tasks
                                            if rows[i]["family"] == family)
        m["refusal_rate_harmful"] = _rate(is_refusal(texts[i]) for i in by_set("harmful"))
        m["over_refusal_benign"] = _rate(is_refusal(texts[i]) for i in by_set("benign"))

        m["win_rate_vs_sft"] = m["win_rate_vs_sft_rm"] = None
        if sft_model is not None and rows:
            sft_out = generate(sft_model, tokenizer, prompts, sampling)
            sft_texts = [_decode(tokenizer, ids) for ids in sft_out.completion_ids]
            m["win_rate_vs_sft"] = _rate(_rule_outcome(r, a, b) for r, a, b in zip(rows, texts, sft_texts))
            if reward_model is not None:
                mine = _reward_scores(reward_model, reward_tokenizer, rows, texts, sampling.batch_size)
                theirs = _reward_scores(reward_model, reward_tokenizer, rows, sft_texts, sampling.batch_size)
                m["win_rate_vs_sft_rm"] = _rate(0.5 if a == b or x == y else float(x > y)
                                                for a, b, x, y in zip(texts, sft_texts, mine, theirs))

        m["mean_length"] = _rate(len(ids) for ids in out.completion_ids)

        m["kl_to_sft"] = None
        if sft_model is not None and rows:
            sampled = sample(prompts, replace(sampling, do_sample=True, temperature=1.0, top_p=1.0), seed=KL_SEED)
            lp = _completion_logps(model, prompts, sampled.completion_ids, pad, sampling.batch_size, backend)
            lp_sft = _completion_logps(sft_model, prompts, sampled.completion_ids, pad, sampling.batch_size, backend)
            m["kl_to_sft"] = _rate(float((a - b).sum()) for a, b in zip(lp, lp_sft))

        m["ece"] = _calibration(model, tokenizer, [rows[i] for i in by_set("arithmetic")],
                                [prompts[i] for i in by_set("arithmetic")],
                                [out.completion_ids[i] for i in by_set("arithmetic")], sampling.batch_size, backend)
    for name in names:
        m[f"n_{name}"] = len(sets[name])
    return m


def _calibration(model, tokenizer, rows, prompts, completions, batch_size: int, backend: str) -> float | None:
    """ECE of exp(sum of the answer tokens' log-probs) vs correctness, over the completions that give an answer."""
    keep = [(row, p, list(c)) for row, p, c in zip(rows, prompts, completions)
            if _answer_span(_decode(tokenizer, c)) is not None]
    if not keep:
        return None
    logps = _completion_logps(model, [p for _, p, _ in keep], [c for _, _, c in keep], tokenizer.pad_token_id,
                              batch_size, backend)
    conf, correct = [], []
    for (row, _, ids), lp in zip(keep, logps):
        text = _decode(tokenizer, ids)
        positions = _tokens_over(tokenizer, ids, _answer_span(text))
        conf.append(math.exp(float(lp[positions].sum())))
        correct.append(_is_correct(row, text))
    return expected_calibration_error(conf, correct)


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptk eval", description="Held-out evaluation of a model on the task world.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", required=True, help="the model to evaluate: a local Hugging Face folder (or a preset)")
    p.add_argument("--sft-model", default=None, help="the SFT model, for kl_to_sft and the win rates")
    p.add_argument("--reward-model", default=None, help="a reward model folder, for win_rate_vs_sft_rm")
    p.add_argument("--seed", type=int, default=0, help="seed of the eval sets")
    p.add_argument("--n-task", type=int, default=100, help="rows of each of the arithmetic and string sets")
    p.add_argument("--n-safety", type=int, default=64, help="rows of each of the harmful and benign sets")
    p.add_argument("--max-new-tokens", type=int, default=48, help="completion length limit (greedy decoding)")
    p.add_argument("--max-prompt-length", type=int, default=256, help="prompts keep their last this many tokens")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per generation / scoring batch")
    p.add_argument("--backend", default="auto", help="ptkernels backend of the token log-probs")
    p.add_argument("--device", default="auto", help="auto: cuda when available, else cpu")
    p.add_argument("--rollout-engine", default="kv_cache", choices=ENGINES, help="what samples the model's "
                   "completions: the built-in kv_cache or hf engines, or vllm (the model's folder loaded by vLLM)")
    p.add_argument("--trust-remote-code", action="store_true", help="run a model folder's own code (off: safer)")
    p.add_argument("--output", default=None, help="write the metrics to this JSON file")
    # -- your own data (issue 25): any prompt / gold-answer data, any verifier or reward function (eval_data.py)
    p.add_argument("--data", default=None, help="evaluate on this data (JSONL, JSON array or datasets folder of "
                   "prompts with gold answers) instead of the task world")
    p.add_argument("--verifier", default="auto", help="with --data: the reward (auto: what the data supports; "
                   "math, format, exact, fact, code, row, 'math,format')")
    p.add_argument("--reward-funcs", default="", help="with --data: reward functions as in ptk grpo (verifiers, "
                   "module:function, reward model folders)")
    p.add_argument("--reward-weights", default="", help="with --data: weights of --reward-funcs")
    p.add_argument("--num-samples", type=int, default=1, help="with --data: completions per prompt (k of pass@k; "
                   "1 = greedy)")
    p.add_argument("--temperature", type=float, default=1.0, help="with --data and --num-samples > 1")
    p.add_argument("--ref-model", default=None, help="with --data: a reference model for kl_to_ref")
    return p


def format_table(metrics: dict) -> str:
    width = max(map(len, metrics))
    fmt = lambda v: "-" if v is None else (f"{v:.4f}" if isinstance(v, float) else str(v))
    return "\n".join(f"{k:<{width}}  {fmt(v)}" for k, v in metrics.items())


def main(argv: list[str]) -> int:
    from ..modeling import load_causal_lm, load_sequence_classifier

    args = parse_args_with_config(build_parser(), argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if args.data:
        return _main_data(args, device)
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    sft_model = reward_model = reward_tokenizer = None
    if args.sft_model:
        sft_model, sft_tokenizer = load_causal_lm(args.sft_model, trust_remote_code=args.trust_remote_code)
        if sft_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("--sft-model has another tokenizer than --model: the KL compares them token by token")
        sft_model.to(device)
    if args.reward_model:
        reward_model, reward_tokenizer = load_sequence_classifier(args.reward_model,
                                                                  trust_remote_code=args.trust_remote_code)
        reward_model.to(device)
    model.to(device)
    sets = eval_sets(args.seed, n_task=args.n_task, n_safety=args.n_safety)
    sampling = SamplingConfig(do_sample=False, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)
    engine = _engine(args, model, tokenizer)
    metrics = evaluate(model, tokenizer, sets, sft_model=sft_model, reward_model=reward_model,
                       reward_tokenizer=reward_tokenizer, sampling=sampling,
                       max_prompt_length=args.max_prompt_length, backend=args.backend, engine=engine)
    print(format_table(metrics))
    if args.output:
        os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
        with open(args.output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(f"ptk eval: metrics written to {args.output}")
    return 0


def _write(metrics: dict, output: str | None) -> None:
    print(format_table(metrics))
    if output:
        os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
        with open(output, "w", encoding="utf-8") as f:
            json.dump(metrics, f, indent=2)
        print(f"ptk eval: metrics written to {output}")


def _engine(args, model, tokenizer):
    """What samples ``model``'s completions (--rollout-engine): vLLM loads the model's folder itself."""
    return make_engine(args.rollout_engine, model, tokenizer,
                       model_dir=args.model if os.path.isdir(args.model) else None,
                       max_model_len=args.max_prompt_length + args.max_new_tokens, seed=args.seed)


def _main_data(args, device) -> int:
    """``ptk eval --data``: the rows and their rewards checked first, then the models (``eval_data.py``)."""
    from ..modeling import load_causal_lm
    from .eval_data import evaluate_data, load_eval_data, make_eval_rewards

    rows = load_eval_data(args.data)
    rewards = make_eval_rewards(rows, args.verifier, args.reward_funcs, args.reward_weights,
                                trust_remote_code=args.trust_remote_code)
    model, tokenizer = load_causal_lm(args.model, trust_remote_code=args.trust_remote_code)
    ref = None
    if args.ref_model:
        ref, ref_tokenizer = load_causal_lm(args.ref_model, trust_remote_code=args.trust_remote_code)
        if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise ValueError("--ref-model has another tokenizer than --model: the KL compares them token by token")
        ref.to(device)
    model.to(device)
    rewards.load_models(device)
    metrics = evaluate_data(model, tokenizer, rows, rewards, num_samples=args.num_samples,
                            temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                            max_prompt_length=args.max_prompt_length, batch_size=args.batch_size, seed=args.seed,
                            ref_model=ref, backend=args.backend, engine=_engine(args, model, tokenizer))
    _write(metrics, args.output)
    return 0
