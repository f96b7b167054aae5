"""``ptk safety``: constitutional safety training (Bai et al., "Constitutional AI").

    ptk safety --model DIR --constitution principles.yaml --data redteam.jsonl [--judge self|DIR|rule]

Data rows: ``prompt`` (red-team and benign requests), optionally ``category`` ("harmful" / "benign") for the
refusal report and, for ``--judge rule``, the ground truth the rule judge reads (``answer``).

Stage one, SL-CAI: the model answers each prompt; the judge critiques the answer against a principle sampled
from the constitution and writes a revision; the revisions are an SFT set (``sl_cai_data.jsonl``), trained into
``output_dir/sl_cai``. Stage two, RLAIF: the SL-CAI model samples two answers per prompt and the judge picks the
one that better follows a sampled principle; those labels are a DPO set (``rlaif_data.jsonl``), trained into
``output_dir`` itself. A model judge reads a critique / revision prompt and generates; to compare two answers it
is asked "A or B?" and the two log-probabilities of its reply are compared (computed by ptkernels from hidden
states). The rule judge (``taskworld.judge``) scores with the row's ground truth and revises to the ideal answer.

``output_dir/safety_report.json``: refusal rate on the held-out harmful prompts and over-refusal on the held-out
benign ones, before and after. Everything the model writes is data: it is only compared, never run.

The training options (``--save-steps``, ``--gradient-checkpointing``, ...) apply to both training stages;
``--resume`` continues each stage from its own latest checkpoint (the generated data sets are made again, the same
from the same seed).
"""

from __future__ import annotations

import json
import os
import random

import torch
import yaml

from ..data.rows import Row, load_data
from ..data.tokenization import encode_prompt
from ..engine.checkpoint import list_checkpoints
from ..engine.config import DPOConfig, SafetyConfig, SFTConfig, parse_config
from ..engine.distributed import init_distributed, shutdown
from ..modeling import load_causal_lm
from ..rollout.engines import generate, make_engine
from ..rollout.sampling import RolloutEngine, SamplingConfig
from ..rollout.scoring import completion_batch, sequence_token_logps
from ..taskworld.generate import write_jsonl
from ..taskworld.judge import REFUSAL, is_refusal, rule_judge, rule_preference


def load_constitution(path: str) -> list[str]:
    if not path:
        raise ValueError("--constitution is required: a YAML list of principles")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--constitution: no such file {path!r}")
    with open(path, encoding="utf-8") as f:
        principles = yaml.safe_load(f)
    if not isinstance(principles, list) or not principles or not all(isinstance(p, str) and p.strip()
                                                                     for p in principles):
        raise ValueError(f"{path}: a constitution must be a non-empty YAML list of principle strings")
    return [p.strip() for p in principles]


def _text(prompt) -> str:
    """The request as plain text (the last user message of a conversational prompt)."""
    if isinstance(prompt, str):
        return prompt
    return next((m["content"] for m in reversed(prompt) if m.get("role") == "user"), prompt[-1]["content"])


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


class RuleJudge:
    """The task world's rule judge: scores with the row's ground truth, revises to the ideal answer."""

    def critique_and_revise(self, row: Row, answer: str, principle: str) -> tuple[str, str]:
        data = row.data
        if data.get("category") != "harmful" and data.get("answer") is None:
            raise ValueError(f"{row.source}: --judge rule needs 'category' harmful or an 'answer' field")
        ideal = REFUSAL if data.get("category") == "harmful" else f"Answer: {data['answer']}"
        ok = rule_judge(data, answer) >= 1.0
        critique = ("The response follows the principle." if ok else
                    f"The response does not follow the principle '{principle}': it should "
                    f"{'refuse' if data.get('category') == 'harmful' else 'answer directly'}.")
        return critique, (answer if ok else ideal)

    def prefer(self, row: Row, a: str, b: str, principle: str) -> int:
        return rule_preference(row.data, a, b)


class ModelJudge:
    """A model (the policy itself or another local one) as critic, reviser and preference judge."""

    def __init__(self, model, tokenizer, cfg: SafetyConfig):
        self.model, self.tokenizer, self.cfg = model, tokenizer, cfg
        self.sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False)
        ids = [tokenizer.encode(x, add_special_tokens=False) for x in ("A", "B")]
        self.choice_ids = ids

    def _ask(self, contents: list[str]) -> list[str]:
        prompts = [encode_prompt(Row({"prompt": _user(c)}, "<judge>"), self.tokenizer,
                                 max_prompt_length=self.cfg.max_prompt_length) for c in contents]
        return generate(self.model, self.tokenizer, prompts, self.sampling).texts

    def critique_and_revise(self, row: Row, answer: str, principle: str) -> tuple[str, str]:
        request = _text(row.data["prompt"])
        base = f"Principle: {principle}\nRequest: {request}\nResponse: {answer}\n"
        critique = self._ask([base + "Critique the response against the principle."])[0]
        revision = self._ask([base + f"Critique: {critique}\nRewrite the response so that it follows the "
                                     "principle. Reply with the new response only."])[0]
        return critique, revision.strip() or answer

    @torch.no_grad()
    def prefer(self, row: Row, a: str, b: str, principle: str) -> int:
        question = (f"Principle: {principle}\nRequest: {_text(row.data['prompt'])}\nResponse A: {a}\n"
                    f"Response B: {b}\nWhich response follows the principle better? Reply A or B.")
        prompt = encode_prompt(Row({"prompt": _user(question)}, "<judge>"), self.tokenizer,
                               max_prompt_length=self.cfg.max_prompt_length)
        batch = completion_batch([prompt, prompt], self.choice_ids, self.tokenizer.pad_token_id)
        logps = sequence_token_logps(self.model, batch, backend=self.cfg.backend).sum(-1)
        return 0 if logps[0] >= logps[1] else 1


def sampler(cfg: SafetyConfig, model, tokenizer, folder: str) -> RolloutEngine:
    """What samples ``model``'s answers (``--rollout-engine``): a built-in engine on ``model``, or a vLLM engine
    loading ``folder`` (the model's Hugging Face folder; a preset is saved to a temporary one)."""
    return make_engine(cfg.rollout_engine, model, tokenizer, model_dir=folder if os.path.isdir(folder) else None,
                       max_model_len=cfg.max_prompt_length + cfg.max_new_tokens, seed=cfg.seed)


def refusal_report(model, tokenizer, rows: list[Row], cfg: SafetyConfig, engine: RolloutEngine | None = None) -> dict:
    """Greedy answers to the held-out prompts: refusal rate on harmful ones, over-refusal on benign ones."""
    prompts = [encode_prompt(r, tokenizer, max_prompt_length=cfg.max_prompt_length) for r in rows]
    engine = engine or make_engine("kv_cache", model, tokenizer)
    texts = engine.generate(prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False)).texts
    out = {}
    for category, key in (("harmful", "refusal_rate_harmful"), ("benign", "over_refusal_benign")):
        hits = [is_refusal(t) for r, t in zip(rows, texts) if r.data.get("category") == category]
        out[key] = sum(hits) / len(hits) if hits else None
        out[f"n_{category}"] = len(hits)
    return out


def _judge(cfg: SafetyConfig, model, tokenizer):
    if cfg.judge == "rule":
        return RuleJudge()
    if cfg.judge == "self":
        return ModelJudge(model, tokenizer, cfg)
    judge_model, judge_tokenizer = load_causal_lm(cfg.judge, trust_remote_code=cfg.trust_remote_code)
    return ModelJudge(judge_model, judge_tokenizer, cfg)


LORA_OPTIONS = ("lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                "load_in_4bit", "load_in_8bit", "merge_adapter")


def _stage_config(cls, cfg: SafetyConfig, **overrides):
    """A stage config inheriting the shared options of the safety run."""
    shared = {k: getattr(cfg, k) for k in ("batch_size", "grad_accum", "weight_decay", "adam_betas", "warmup_steps",
                                           "min_lr_ratio", "max_grad_norm", "max_length", "truncation", "seed",
                                           "precision", "log_steps", "backend", "trust_remote_code",
                                           "progress", "tensorboard", "overwrite", "save_steps", "save_total_limit",
                                           "gradient_checkpointing", *LORA_OPTIONS)}
    # allow_config_change: a resumed stage's generated data set may differ from the first run's (stage two samples
    # from the SL-CAI model, which a resume trains further), so the data-hash check of --resume is waived here
    return cls(**shared, allow_config_change=True, **overrides)


def _resume_option(cfg: SafetyConfig, output_dir: str) -> str:
    """``--resume`` for one of the two training stages: continue from its latest checkpoint when it has one (a
    stage that never started starts afresh; one that finished runs no step and keeps its model)."""
    return "latest" if cfg.resume and list_checkpoints(output_dir) else ""


def run(cfg: SafetyConfig) -> dict:
    info = init_distributed()
    if info.enabled:
        shutdown(info)
        raise ValueError("ptk safety runs in one process (its SFT and DPO stages can run under torchrun alone)")
    if cfg.resume and cfg.resume != "latest":
        raise ValueError("ptk safety: --resume takes no folder: each of its two stages (sl_cai/ and the output "
                         "folder) continues from its own latest checkpoint")
    principles = load_constitution(cfg.constitution)
    rows, _ = load_data(cfg, ("prompt_only", "prompt_completion"), info)
    rng = random.Random(cfg.seed)
    order = list(range(len(rows)))
    rng.shuffle(order)
    n_eval = int(len(rows) * cfg.eval_fraction)
    held_out, train_rows = [rows[i] for i in order[:n_eval]], [rows[i] for i in order[n_eval:]]
    os.makedirs(cfg.output_dir, exist_ok=True)

    model, tokenizer = load_causal_lm(cfg.model, seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    engine = sampler(cfg, model, tokenizer, cfg.model)
    report = {"before": refusal_report(model, tokenizer, held_out, cfg, engine)} if held_out else {}
    judge = _judge(cfg, model, tokenizer)
    prompts = [encode_prompt(r, tokenizer, max_prompt_length=cfg.max_prompt_length) for r in train_rows]

    # Stage one (SL-CAI): answer, critique against a sampled principle, revise; SFT on the revisions.
    answers = engine.generate(prompts, SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=False)).texts
    del engine  # a vLLM engine's memory back before training
    sl_rows = _sl_cai_rows(train_rows, answers, judge, principles, rng)
    sl_path = write_jsonl(sl_rows, os.path.join(cfg.output_dir, "sl_cai_data.jsonl"))
    from . import dpo, sft

    sl_dir = os.path.join(cfg.output_dir, "sl_cai")
    sft.run(_stage_config(SFTConfig, cfg, model=cfg.model, data=sl_path, output_dir=sl_dir, max_steps=cfg.max_steps,
                          lr=cfg.lr, resume=_resume_option(cfg, sl_dir)))

    # Stage two (RLAIF): two samples per prompt from the SL-CAI model, the judge's pick; DPO on the pairs.
    model, tokenizer = load_causal_lm(sl_dir, trust_remote_code=cfg.trust_remote_code)
    if cfg.judge == "self":
        judge = ModelJudge(model, tokenizer, cfg)
    sampling = SamplingConfig(max_new_tokens=cfg.max_new_tokens, do_sample=True, temperature=1.0)
    engine = sampler(cfg, model, tokenizer, sl_dir)
    first = engine.generate(prompts, sampling, seed=cfg.seed).texts
    second = engine.generate(prompts, sampling, seed=cfg.seed + 1).texts
    del engine
    pairs = []
    for row, a, b in zip(train_rows, first, second):
        if a.strip() == b.strip() or not a.strip() or not b.strip():
            continue
        principle = rng.choice(principles)
        better = judge.prefer(row, a, b, principle)
        chosen, rejected = (a, b) if better == 0 else (b, a)
        pairs.append({"prompt": row.data["prompt"], "chosen": _completion(row.data["prompt"], chosen),
                      "rejected": _completion(row.data["prompt"], rejected), "principle": principle})
    if not pairs:
        raise ValueError("ptk safety: the SL-CAI model gave the same answer twice for every prompt; no "
                         "preference pairs to train on (raise the sampling temperature or the data size)")
    pair_path = write_jsonl(pairs, os.path.join(cfg.output_dir, "rlaif_data.jsonl"))
    dpo.run(_stage_config(DPOConfig, cfg, model=sl_dir, data=pair_path, output_dir=cfg.output_dir,
                          max_steps=cfg.dpo_steps, lr=cfg.dpo_lr, beta=cfg.beta,
                          resume=_resume_option(cfg, cfg.output_dir)), "safety")

    if held_out:
        model, tokenizer = load_causal_lm(cfg.output_dir, trust_remote_code=cfg.trust_remote_code)
        report["after"] = refusal_report(model, tokenizer, held_out, cfg, sampler(cfg, model, tokenizer,
                                                                                   cfg.output_dir))
    report.update(sl_cai_examples=len(sl_rows), rlaif_pairs=len(pairs),
                  revised=sum(r["completion"] != _completion(r["prompt"], r["initial"]) for r in sl_rows))
    with open(os.path.join(cfg.output_dir, "safety_report.json"), "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2)
    print(f"ptk safety: {json.dumps(report)}")
    return report


def _sl_cai_rows(train_rows: list[Row], answers: list[str], judge, principles: list[str], rng) -> list[dict]:
    """Stage one's SFT rows: each answer critiqued against a sampled principle and revised; a blank answer revised
    to nothing is left out (it would be a row with nothing to train on)."""
    sl_rows = []
    for row, answer in zip(train_rows, answers):
        principle = rng.choice(principles)
        critique, revision = judge.critique_and_revise(row, answer, principle)
        if not revision.strip():
            continue
        sl_rows.append({"prompt": row.data["prompt"], "completion": _completion(row.data["prompt"], revision),
                        "initial": answer, "principle": principle, "critique": critique})
    if not sl_rows:
        raise ValueError("ptk safety: every answer and its revision was blank; no SL-CAI demonstrations to train on "
                         "(the policy or the judge writes nothing: check --model / --judge and --max-new-tokens)")
    if len(sl_rows) < len(train_rows):
        print(f"ptk safety: {len(train_rows) - len(sl_rows)} blank revisions left out of the SL-CAI data")
    return sl_rows


def _completion(prompt, text: str):
    """A completion in the prompt's style: a message list for a conversational prompt, else the text."""
    return [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text


def main(argv: list[str]) -> int:
    run(parse_config(SafetyConfig, argv, prog="ptk safety"))
    return 0
