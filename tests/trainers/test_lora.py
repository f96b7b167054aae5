"""LoRA through PEFT (``--lora``): the reference is the policy with its adapter disabled, the fused head reads a
trained head copy, only adapter weights change, the saved adapter and the merged model reload to the same outputs,
resume is exact, every stage runs, and QLoRA trains the adapter on a 4-bit / 8-bit base (bitsandbytes on CUDA, or its
CPU backend) and fails clearly without bitsandbytes. Tiny preset, 2-3 steps each."""

import importlib.util
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from ptkernels.cli import main as ptk
from ptkernels.trainers import lora
from ptkernels.trainers.engine.config import DPOConfig, SFTConfig, parse_config
from ptkernels.trainers.modeling import CausalLMLoss, ReferenceModel, load_causal_lm, save_pretrained, token_logps
from ptkernels.trainers.rollout.scoring import completion_batch

from .conftest import write_jsonl
from .lora_helpers import trained_lora_policy

COMMON = ["--model", "tiny", "--no-progress", "--batch-size", "4", "--max-length", "48", "--lora", "--lora-r", "4",
          "--lora-dropout", "0"]


def run(stage, data, out, *extra):
    assert ptk([stage, "--data", data, "--output-dir", str(out), *COMMON, *extra]) == 0
    return str(out)


def metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def config(*extra, cls=SFTConfig):
    return parse_config(cls, ["--model", "tiny", "--data", "unused.jsonl", "--lora", "--lora-r", "4",
                              "--lora-dropout", "0", *extra])


def batch_of(tok):
    prompts = [tok("What is 12+30?")["input_ids"], tok("Hello there")["input_ids"]]
    return completion_batch(prompts, [tok(" Answer: 42")["input_ids"], tok(" hi")["input_ids"]], tok.pad_token_id)


def perturb_adapter(model, scale=0.5):
    """LoRA's B starts at 0 (adapted == base): give every adapter weight a value so the two differ."""
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * scale)


def test_reference_with_adapter_disabled_equals_base_logps_exactly():
    policy, tok = lora.load_policy(config("--lora-modules-to-save", "lm_head"))
    base, _ = load_causal_lm("tiny", seed=0)
    perturb_adapter(policy)
    batch = batch_of(tok)
    with torch.no_grad():
        adapted, expected = token_logps(policy, batch), token_logps(base, batch)
    assert not torch.allclose(adapted, expected, atol=1e-3)  # the adapter (and the head copy) change the outputs
    ref = ReferenceModel(policy)
    torch.testing.assert_close(ref.summed_logps(batch), expected.sum(-1), rtol=0, atol=0)
    hidden, weight, _ = ref.head_inputs(batch)
    assert weight is base.lm_head.weight or torch.equal(weight, base.lm_head.weight)
    # and the adapter is back on afterwards
    torch.testing.assert_close(token_logps(policy, batch).detach(), adapted, rtol=0, atol=0)


def test_only_the_adapter_trains_and_the_fused_head_reads_the_trained_copy():
    policy, tok = lora.load_policy(config("--lora-modules-to-save", "lm_head"))
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    batch = batch_of(tok)
    loss, _ = CausalLMLoss(policy, backend="torch")(batch, 1.0)
    loss.backward()
    head = policy.get_output_embeddings()
    copy = head.modules_to_save["default"]
    assert copy.weight.grad is not None and copy.weight.grad.abs().sum() > 0  # the fused loss read the copy
    assert head.original_module.weight.grad is None  # the frozen original (the tied embedding) got nothing
    # with the head frozen (default), the fused op reads the base head itself
    frozen, _ = lora.load_policy(config())
    assert not frozen.get_output_embeddings().weight.requires_grad


def test_bad_options_are_clear_errors():
    with pytest.raises(ValueError, match="--load-in-4bit needs --lora"):
        parse_config(SFTConfig, ["--model", "tiny", "--data", "x.jsonl", "--load-in-4bit"])
    with pytest.raises(ValueError, match="--lora-modules-to-save lm_head"):
        lora.load_policy(config("--lora-target-modules", "q_proj,lm_head"))
    with pytest.raises(ValueError, match="--lora-r"):
        config("--lora-r", "0")


needs_bitsandbytes = pytest.mark.skipif(
    importlib.util.find_spec("bitsandbytes") is None,
    reason="QLoRA needs bitsandbytes (in the dev extras: pip install -e '.[dev]')")


def test_qlora_without_bitsandbytes_is_a_clear_error(monkeypatch, tiny_folder):
    import sys
    import types

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes -> ImportError
    with pytest.raises(RuntimeError, match=r"--load-in-4bit \(QLoRA\) needs bitsandbytes: pip install"):
        lora.load_policy(config("--model", tiny_folder, "--load-in-4bit"))
    if not torch.cuda.is_available():  # on CPU, one too old for its CPU backend
        monkeypatch.setitem(sys.modules, "bitsandbytes", types.SimpleNamespace(__version__="0.45.5"))
        with pytest.raises(RuntimeError, match=r"without a CUDA GPU needs bitsandbytes >= 0.50.*0.45.5"):
            lora.load_policy(config("--model", tiny_folder, "--load-in-8bit"))


@needs_bitsandbytes
def test_qlora_computes_in_the_runs_precision():
    cuda = torch.cuda.is_available()
    for precision, dtype in (("auto", torch.bfloat16 if cuda else torch.float32), ("fp32", torch.float32),
                             ("bf16", torch.bfloat16)):
        q = lora.check_quantization(config("--model", "some/folder", "--load-in-4bit", "--precision", precision))
        assert q["quantization_config"].bnb_4bit_compute_dtype == dtype, precision
    assert q["device_map"] == {"": torch.cuda.current_device() if cuda else "cpu"}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The tiny preset saved as a model folder: --load-in-4bit / --load-in-8bit load a folder, not a preset."""
    model, tok = load_causal_lm("tiny", seed=0)
    path = str(tmp_path_factory.mktemp("tiny_base") / "model")
    save_pretrained(model, tok, path)
    return path


@needs_bitsandbytes
@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_dpo_trains_the_adapter_on_a_quantized_base(data_dir, tiny_folder, tmp_path, bits):
    import bitsandbytes as bnb

    policy, _ = lora.load_policy(config("--model", tiny_folder, f"--load-in-{bits}", cls=DPOConfig))
    quantized = bnb.nn.Linear4bit if bits == "4bit" else bnb.nn.Linear8bitLt
    layers = [m for m in policy.modules() if isinstance(m, quantized)]
    assert layers and all(not p.requires_grad for m in layers for p in m.parameters())  # the frozen, quantized base
    trainable = {n for n, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    del policy
    quant = ["--model", tiny_folder, f"--load-in-{bits}", "--max-steps", "3", "--lr", "1e-2", "--ref-mode", "live"]
    out = run("dpo", data_dir["pref"], tmp_path / "out", *quant, "--save-steps", "2", "--merge-adapter")
    rows = metrics(out)
    # the reference is the quantized policy with its adapter off, and LoRA's B starts at 0: the same log-probs on
    # the first step, so the loss is ln 2 up to run-to-run differences of the kernels (none expected)
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-4)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows) and rows[-1]["loss"] < rows[0]["loss"]
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)
    # the adapter applies to the full-precision base (it was trained on a quantized copy of it) and --merge-adapter
    # writes exactly that: W + s B A on the base's own weights
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = load_causal_lm(tiny_folder)
    adapted = PeftModel.from_pretrained(base, out).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(out, "merged")).eval()
    ids = torch.tensor([tok("What is 12+30? Answer: 42")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits, rtol=1e-4, atol=1e-4)
    if torch.cuda.is_available():
        return  # on CUDA, bitsandbytes' kernels need not repeat bit for bit; on CPU they do
    # resume from step 2 on the quantized base: the same adapter and loss as the run that never stopped
    resumed = run("dpo", data_dir["pref"], tmp_path / "resumed", *quant,
                  "--resume", os.path.join(out, "checkpoints", "step-000002"))
    again = load_file(os.path.join(resumed, "adapter_model.safetensors"))
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)
    assert metrics(resumed)[-1]["loss"] == rows[-1]["loss"]


@needs_bitsandbytes
def test_qlora_layers_pass_gradients_after_a_rollout(tiny_folder):
    """A rollout (eval, no grad) must leave the 4-bit layers trainable: on CPUs with AVX512-BF16 bitsandbytes would
    repack them for an inference kernel that passes no gradient to its input."""
    policy, tok = lora.load_policy(config("--model", tiny_folder, "--load-in-4bit"))
    ids = torch.tensor([tok("What is 12+30? The answer is 42.")["input_ids"]])
    policy.eval()
    with torch.no_grad():
        policy(ids)
    policy.train()
    policy(input_ids=ids, labels=ids).loss.backward()
    first_b = [p.grad for n, p in policy.named_parameters() if "layers.0." in n and "lora_B" in n]
    assert first_b and all(g is not None and g.abs().sum() > 0 for g in first_b)  # reached through layer 1's base


@pytest.fixture(scope="module")
def dpo_run(data_dir, tmp_path_factory):
    """DPO with a live reference (the policy, adapter off), a trained head copy, merged at the end."""
    return run("dpo", data_dir["pref"], tmp_path_factory.mktemp("dpo") / "out", "--max-steps", "3", "--lr", "1e-2",
               "--ref-mode", "live", "--lora-modules-to-save", "lm_head", "--merge-adapter", "--save-steps", "2")


def test_dpo_reference_for_free_and_only_adapter_changes(dpo_run):
    rows = metrics(dpo_run)
    assert rows[0]["loss"] == pytest.approx(0.6931471805599453, abs=1e-6)  # reference = initial policy exactly
    assert rows[-1]["loss"] < rows[0]["loss"]
    saved = load_file(os.path.join(dpo_run, "adapter_model.safetensors"))
    assert saved and all("lora_" in k or "lm_head" in k for k in saved)
    # checkpoints hold the adapter and the optimizer state only
    ckpt = os.path.join(dpo_run, "checkpoints", "step-000002")
    assert not os.path.exists(os.path.join(ckpt, "model.safetensors"))
    assert os.path.exists(os.path.join(ckpt, "adapter_model.safetensors"))
    # the merged model differs from the base only in the adapted projections and the trained head
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(os.path.join(dpo_run, "merged")).state_dict()
    base = load_causal_lm("tiny", seed=0)[0].state_dict()
    adapted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head")
    for k, v in base.items():
        if any(a in k for a in adapted):
            assert not torch.equal(merged[k], v), k
        else:
            assert torch.equal(merged[k], v), k


def test_saved_adapter_and_merged_model_reload_to_the_same_outputs(dpo_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base, tok = load_causal_lm("tiny", seed=0)
    adapted = PeftModel.from_pretrained(base, dpo_run).eval()
    merged = AutoModelForCausalLM.from_pretrained(os.path.join(dpo_run, "merged")).eval()
    ids = torch.tensor([tok("What is 12+30? Answer: 42")["input_ids"]])
    with torch.no_grad():
        a, m = adapted(input_ids=ids).logits, merged(input_ids=ids).logits
        plain = load_causal_lm("tiny", seed=0)[0].eval()(input_ids=ids).logits
    assert not torch.allclose(a, plain, atol=1e-3)  # the adapter is really there
    torch.testing.assert_close(m, a, rtol=1e-4, atol=1e-4)  # merging rounds W + s B A once
    # ptk merge writes the same model; an adapter folder also loads as --model (merged on load)
    out = os.path.join(dpo_run, "merged-again")
    assert ptk(["merge", dpo_run, "--output-dir", out]) == 0
    again = AutoModelForCausalLM.from_pretrained(out).state_dict()
    for k, v in merged.state_dict().items():
        torch.testing.assert_close(again[k], v, rtol=0, atol=0, msg=k)


def test_resume_is_exact(data_dir, tmp_path, dpo_run):
    out = run("dpo", data_dir["pref"], tmp_path / "resumed", "--max-steps", "3", "--lr", "1e-2", "--ref-mode", "live",
              "--lora-modules-to-save", "lm_head",
              "--resume", os.path.join(dpo_run, "checkpoints", "step-000002"))
    a = load_file(os.path.join(dpo_run, "adapter_model.safetensors"))
    b = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert metrics(out)[-1]["loss"] == metrics(dpo_run)[-1]["loss"]


@pytest.mark.parametrize("stage,data,extra", [
    ("pretrain", "text", []), ("sft", "sft", []), ("kto", "kto", ["--ref-mode", "live"]),
    ("orpo", "pref", []),
])
def test_offline_stages_run_with_lora(data_dir, tmp_path, stage, data, extra):
    out = run(stage, data_dir[data], tmp_path / stage, "--max-steps", "2", "--lr", "1e-2", *extra)
    assert len(metrics(out)) == 2 and os.path.exists(os.path.join(out, "adapter_model.safetensors"))
    assert not os.path.exists(os.path.join(out, "model.safetensors"))


@pytest.fixture(scope="module")
def reward_adapter(data_dir, tmp_path_factory):
    """A reward model trained with LoRA (its new score head in full): an adapter folder PPO takes as is."""
    out = run("reward", data_dir["pref"], tmp_path_factory.mktemp("rm") / "out", "--max-steps", "2", "--lr", "1e-2")
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert any("score" in k for k in saved)
    return out


@pytest.fixture(scope="module")
def rl_data(tmp_path_factory):
    rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{a + 3}?"}], "answer": str(2 * a + 3)}
            for a in range(10, 26)]
    return write_jsonl(tmp_path_factory.mktemp("rl") / "rl.jsonl", rows)


ONPOLICY = ["--max-steps", "2", "--lr", "1e-3", "--prompts-per-step", "2", "--max-new-tokens", "6",
            "--batch-size", "8"]


def test_grpo_with_beta_runs_with_lora(rl_data, tmp_path):
    out = run("grpo", rl_data, tmp_path / "grpo", *ONPOLICY, "--num-generations", "4", "--beta", "0.1",
              "--verifier", "math")
    rows = metrics(out)
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-7)  # reference = the policy, adapter off


@needs_bitsandbytes
def test_qlora_grpo_samples_and_trains_on_a_4bit_base(rl_data, tiny_folder, tmp_path):
    """The on-policy path on a quantized base: the rollout engine generates from the 4-bit policy with its adapter,
    the reference is that policy with the adapter off (KL 0 on the first step), the adapter is saved."""
    out = run("grpo", rl_data, tmp_path / "grpo", "--model", tiny_folder, "--load-in-4bit", *ONPOLICY,
              "--num-generations", "4", "--beta", "0.1", "--verifier", "math")
    rows = metrics(out)
    assert len(rows) == 2 and rows[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    saved = load_file(os.path.join(out, "adapter_model.safetensors"))
    assert saved and all("lora_" in k for k in saved)


def test_ppo_runs_with_lora(rl_data, tmp_path, reward_adapter):
    out = run("ppo", rl_data, tmp_path / "ppo", *ONPOLICY, "--reward-model", reward_adapter, "--ppo-epochs", "1")
    assert len(metrics(out)) == 2
    assert os.path.exists(os.path.join(out, "value_model", "adapter_model.safetensors"))


@needs_bitsandbytes
def test_qlora_ppo_trains_on_4bit_policy_and_critic(rl_data, tmp_path, reward_adapter, tiny_folder):
    """PPO with --load-in-4bit: the policy on the 4-bit base, the critic on the 4-bit reward model, each with its
    adapter. The reward model is a LoRA reward run's adapter folder: quantizing needs its merged model, so without
    merged/ it is a clear error naming ptk merge, and with it the run trains."""
    import shutil

    reward = str(tmp_path / "reward")
    shutil.copytree(reward_adapter, reward)
    args = [*ONPOLICY, "--model", tiny_folder, "--load-in-4bit", "--reward-model", reward, "--ppo-epochs", "1"]
    with pytest.raises(ValueError, match="ptk merge"):
        run("ppo", rl_data, tmp_path / "refused", *args)
    assert ptk(["merge", reward]) == 0
    out = run("ppo", rl_data, tmp_path / "ppo", *args)
    rows = metrics(out)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    assert os.path.exists(os.path.join(out, "value_model", "adapter_model.safetensors"))


def test_every_stage_has_the_lora_options():
    from ptkernels.trainers.engine import config as c

    for cls in (c.PretrainConfig, c.SFTConfig, c.RewardConfig, DPOConfig, c.ORPOConfig, c.SimPOConfig, c.KTOConfig,
                c.GRPOConfig, c.PPOConfig, c.SafetyConfig):
        names = {f for f in cls.__dataclass_fields__}
        assert {"lora", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "lora_modules_to_save",
                "load_in_4bit", "load_in_8bit", "merge_adapter"} <= names, cls.__name__


@pytest.mark.parametrize("mode", ["ddp", "fsdp", pytest.param("fsdp-qlora", marks=needs_bitsandbytes)])
def test_two_processes_match_one(data_dir, tmp_path, mode, request):
    """torchrun with 2 gloo processes takes the same LoRA steps as 1 process with the same global batch (DDP and
    FSDP2 with the frozen base: the optimizer holds the adapter's state only; and FSDP2 on a 4-bit base)."""
    from .engine.test_distributed import torchrun

    quant = []
    if mode == "fsdp-qlora":
        quant = ["--model", request.getfixturevalue("tiny_folder"), "--load-in-4bit"]
    common = ["--data", data_dir["sft"], "--max-steps", "2", "--lr", "1e-2", "--grad-accum", "2", *COMMON, *quant]
    one = run("sft", data_dir["sft"], tmp_path / "one", "--max-steps", "2", "--lr", "1e-2", "--grad-accum", "2",
              *quant)
    torchrun(["sft", *common, "--output-dir", str(tmp_path / "two"), "--batch-size", "2", "--distributed",
              mode.split("-")[0]])
    a = load_file(os.path.join(one, "adapter_model.safetensors"))
    b = load_file(os.path.join(tmp_path / "two", "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # reduction-order noise only (see engine/test_distributed.py)
        torch.testing.assert_close(a[k], b[k], atol=5e-5, rtol=1e-4, msg=k)
    state = torch.load(os.path.join(tmp_path / "two", "checkpoints", "step-000002", "trainer_state.pt"),
                       weights_only=False)
    assert len(state["optimizer"]["state"]) == len(a)  # Adam moments for the adapter's tensors only


# ------------------------------------------------------------------ the vLLM engine gets the merged weights


def test_vllm_weight_sync_streams_the_merged_model():
    """What ``sync_weights`` pushes for a LoRA policy: the plain model's names, each LoRA layer's W + s B A and the
    trained head copy, bit for bit what PEFT's ``merge_and_unload`` gives; the policy's own base is left as it
    was (the reference with the adapter disabled reads it)."""
    import copy

    from ptkernels.trainers.rollout.vllm_engine import iter_full_weights

    policy, _ = trained_lora_policy()
    base_before = {k: v.clone() for k, v in policy.get_base_model().state_dict().items()}
    streamed = dict(iter_full_weights(policy))
    merged = copy.deepcopy(policy).merge_and_unload().state_dict()
    assert streamed.keys() == merged.keys()
    assert all(torch.equal(streamed[k], merged[k]) for k in merged)
    assert not torch.equal(streamed["lm_head.weight"], base_before["lm_head.original_module.weight"])
    after = policy.get_base_model().state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base_before.items())


def test_vllm_engine_of_a_lora_policy_loads_its_merged_model(monkeypatch):
    """Without a plain folder to load (a preset, an adapter folder), the engine is built from the policy saved as
    its merged model: a plain Hugging Face folder whose logits are the adapted policy's."""
    from transformers import AutoModelForCausalLM

    from ptkernels.trainers.rollout import engines, vllm_engine

    loaded = {}

    class FolderReader:  # vLLM's engine stand-in: reads the folder it is built from, as the engine would
        def __init__(self, folder, tokenizer, **options):
            loaded["model"] = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)

    monkeypatch.setattr(vllm_engine, "VLLMEngine", FolderReader)
    policy, tok = trained_lora_policy()
    engines.make_engine("vllm", policy, tok)
    ids = torch.tensor([tok("What is 12+30? The answer is 42.")["input_ids"]])
    with torch.no_grad():
        want, got = policy(input_ids=ids).logits, loaded["model"](input_ids=ids).logits
    assert not any("lora_" in n for n, _ in loaded["model"].named_parameters())
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5 * want.abs().max().item())


def test_vllm_rollouts_refuse_a_quantized_base():
    from ptkernels.trainers.engine.config import GRPOConfig
    from ptkernels.trainers.rollout.onpolicy import check_rollout_options

    cfg = config("--model", "some/folder", "--load-in-4bit", "--rollout-engine", "vllm", cls=GRPOConfig)
    with pytest.raises(ValueError, match="--rollout-engine vllm does not take --load-in-4bit"):
        check_rollout_options(cfg)
