"""--model as users give it: Hub ids go to transformers (a clear message when offline and not cached), a tokenizer
that does not fit the model's embedding is refused at load with both sizes named."""

import pytest

from ptkernels.trainers.modeling import load_causal_lm, load_sequence_classifier, save_pretrained


def test_hub_id_offline_and_not_cached_is_one_clear_message(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    with pytest.raises(FileNotFoundError, match=r"cannot load 'ptk-nobody/no-such-model-7'.*offline .*not in the "
                                                r"local Hugging Face cache"):
        load_causal_lm("ptk-nobody/no-such-model-7")


@pytest.mark.parametrize("name", ["./no/such/folder", "/abs/missing", "a/b/c"])
def test_missing_local_folder_is_not_mistaken_for_a_hub_id(name):
    with pytest.raises(FileNotFoundError, match=r"neither a preset .*, a local model folder nor a Hugging Face Hub"):
        load_causal_lm(name)


def test_tokenizer_larger_than_the_embedding_is_refused(tmp_path):
    model, tok = load_causal_lm("tiny")
    rows = model.get_input_embeddings().num_embeddings
    tok.add_tokens([f"<extra_{i}>" for i in range(5)])
    save_pretrained(model, tok, str(tmp_path / "m"))
    with pytest.raises(ValueError, match=rf"tokenizer has {len(tok)} tokens but the model's embedding has only "
                                         rf"{rows} rows"):
        load_causal_lm(str(tmp_path / "m"))
    with pytest.raises(ValueError, match=rf"{len(tok)} tokens .* {rows} rows"):
        load_sequence_classifier(str(tmp_path / "m"))


def _gpt2_with_dropout(folder):
    """A tiny GPT-2 (nn.Dropout modules, p = 0.1 as its default config) saved with the shipped tokenizer."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from ptkernels.trainers.data.tiny_tokenizer import load_tiny_tokenizer

    tok = load_tiny_tokenizer()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=1, n_head=2, n_positions=128,
                                       bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    save_pretrained(model, tok, str(folder))
    return str(folder)


def test_disable_dropout_has_trls_defaults_per_stage(tmp_path):
    """TRL 1.16's disable_dropout: on for DPO, KTO and reward models, off for SFT and GRPO; nn.Dropout modules, LoRA's
    dropout and Llama-style functional attention dropout all off when on."""
    import torch

    from ptkernels.trainers.engine.config import DPOConfig, GRPOConfig, KTOConfig, RewardConfig, SFTConfig
    from ptkernels.trainers.lora import disable_dropout, load_policy

    assert [c().disable_dropout for c in (DPOConfig, KTOConfig, RewardConfig, SFTConfig, GRPOConfig)] == [
        True, True, True, False, False]
    folder = _gpt2_with_dropout(tmp_path / "gpt2")
    rates = lambda m: {mod.p for mod in m.modules() if isinstance(mod, torch.nn.Dropout)}  # noqa: E731
    assert rates(load_policy(SFTConfig(model=folder))[0]) == {0.1}
    assert rates(load_policy(DPOConfig(model=folder))[0]) == {0.0}
    lora = load_policy(DPOConfig(model=folder, lora=True, lora_target_modules="c_attn", lora_dropout=0.05))[0]
    assert rates(lora) == {0.0}
    llama, _ = load_causal_lm("tiny", seed=0)
    for module in llama.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = 0.1
    disable_dropout(llama)
    assert {m.attention_dropout for m in llama.modules() if hasattr(m, "attention_dropout")} == {0.0}


def test_dpo_starts_at_ln2_on_a_model_with_dropout(tmp_path, data_dir):
    """With dropout on, the policy's log-probs at step 1 would differ from the reference's (TRL's reason for
    disable_dropout): the first DPO loss is exactly ln 2 only without it."""
    import json
    import math

    from ptkernels.cli import main as ptk

    folder = _gpt2_with_dropout(tmp_path / "gpt2")
    out = tmp_path / "dpo"
    ptk(["dpo", "--model", folder, "--data", data_dir["pref"], "--output-dir", str(out), "--max-steps", "1",
         "--batch-size", "4", "--max-length", "48", "--no-progress"])
    first = json.loads(open(out / "metrics.jsonl").readline())
    assert math.isclose(first["loss"], math.log(2), rel_tol=0, abs_tol=1e-6), first["loss"]
