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
