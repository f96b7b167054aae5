"""Rows to token ids: exact label masks per format, truncation, packing, collation, and packed == unpacked for a
real (tiny, random) Llama."""

import pytest
import torch

from ptkernels.trainers.data.rows import DataError, Row
from ptkernels.trainers.data.tiny_tokenizer import CHAT_TEMPLATE, load_tiny_tokenizer
from ptkernels.trainers.data.tokenization import (
    Encoded,
    EncodedPair,
    collate,
    collate_pairs,
    encode_preference,
    encode_pretrain_stream,
    encode_prompt,
    encode_sft,
    encode_unpaired,
    end_of_turn_suffix,
    pack,
    token_count,
)

EOS = "<|im_end|>"
SYSTEM = {"role": "system", "content": "Answer briefly."}
USER = {"role": "user", "content": "What is two plus two?"}
ANSWER = {"role": "assistant", "content": "It is four."}
USER2 = {"role": "user", "content": "And three plus three?"}
ANSWER2 = {"role": "assistant", "content": "Six."}
WRONG = {"role": "assistant", "content": "It is five."}


@pytest.fixture(scope="module")
def tok():
    return load_tiny_tokenizer()


def clone(tok, **kwargs):
    """A separate tokenizer over a copy of tok's backend (so changing one never changes the shared one)."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    args = dict(bos_token=tok.bos_token, eos_token=tok.eos_token, pad_token=tok.pad_token, chat_template=CHAT_TEMPLATE)
    args.update(kwargs)
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(tok.backend_tokenizer.to_str()), **args)


def trained(tok, e: Encoded) -> str:
    return tok.decode([t for t in e.labels if t != -100])


def chat_ids(tok, messages, **kwargs):
    return list(tok.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"])


# ---------------------------------------------------------------------------------------------- SFT formats


def test_text(tok):
    e = encode_sft(Row({"text": "Once upon a time"}, "x"), tok, max_length=64)
    assert e.labels == e.input_ids
    assert e.input_ids == tok("Once upon a time", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # TRL's add_eos: text that already ends with the eos token does not get a second one
    assert encode_sft(Row({"text": "Once upon a time" + EOS}, "x"), tok, max_length=64) == e


def test_messages_train_every_token_by_default(tok):
    """TRL 1.16's SFT default (assistant_only_loss=False): a conversation is language modelling."""
    messages = [SYSTEM, USER, ANSWER, USER2, ANSWER2]
    e = encode_sft(Row({"messages": messages}, "x"), tok, max_length=256)
    assert e.input_ids == chat_ids(tok, messages) and e.labels == e.input_ids


def test_messages_assistant_only_loss(tok):
    messages = [SYSTEM, USER, ANSWER, USER2, ANSWER2]
    e = encode_sft(Row({"messages": messages}, "x"), tok, max_length=256, assistant_only_loss=True)
    assert e.input_ids == chat_ids(tok, messages)
    assert trained(tok, e) == "It is four." + EOS + "Six." + EOS
    # the trained tokens are exactly the two answers' spans, in place
    spans = [i for i, t in enumerate(e.labels) if t != -100]
    assert all(e.labels[i] == e.input_ids[i] for i in spans)
    assert tok.decode(e.input_ids[spans[0]:spans[0] + 4]).startswith("It is")


def test_messages_without_generation_markers(tok):
    """A template without {% generation %}: each assistant turn is what rendering it adds (here with the '\\n'
    ChatML puts after the end-of-turn token)."""
    plain = clone(tok, chat_template=CHAT_TEMPLATE.replace("{% generation %}", "").replace("{% endgeneration %}", ""))
    e = encode_sft(Row({"messages": [SYSTEM, USER, ANSWER, USER2, ANSWER2]}, "x"), plain, max_length=256,
                   assistant_only_loss=True)
    assert trained(plain, e) == "It is four." + EOS + "\n" + "Six." + EOS + "\n"


def test_prompt_completion_conversational(tok):
    """TRL 1.16: everything after the prompt (rendered with the generation prompt) is the completion, ChatML's
    newline after the end-of-turn token included; assistant_only_loss keeps the assistant tokens of that."""
    row = Row({"prompt": [SYSTEM, USER], "completion": [ANSWER]}, "x")
    e = encode_sft(row, tok, max_length=256)
    prompt_ids = chat_ids(tok, [SYSTEM, USER], add_generation_prompt=True)
    assert e.input_ids == chat_ids(tok, [SYSTEM, USER, ANSWER])
    assert e.input_ids[:len(prompt_ids)] == prompt_ids
    assert e.labels == [-100] * len(prompt_ids) + e.input_ids[len(prompt_ids):]
    assert trained(tok, e) == "It is four." + EOS + "\n"
    only = encode_sft(row, tok, max_length=256, assistant_only_loss=True)
    assert only.input_ids == e.input_ids and trained(tok, only) == "It is four." + EOS
    everything = encode_sft(row, tok, max_length=256, completion_only_loss=False)
    assert everything.labels == everything.input_ids


def test_prompt_completion_plain(tok):
    e = encode_sft(Row({"prompt": "2+2=", "completion": " 4"}, "x"), tok, max_length=64)
    prompt_ids = tok("2+2=", add_special_tokens=False)["input_ids"]
    assert e.input_ids == tok("2+2= 4" + EOS, add_special_tokens=False)["input_ids"]
    assert e.labels == [-100] * len(prompt_ids) + e.input_ids[len(prompt_ids):]
    assert trained(tok, e) == " 4" + EOS
    # a completion that already ends with eos keeps one; completion_only_loss=False trains the prompt too
    assert encode_sft(Row({"prompt": "2+2=", "completion": " 4" + EOS}, "x"), tok, max_length=64) == e
    everything = encode_sft(Row({"prompt": "2+2=", "completion": " 4"}, "x"), tok, max_length=64,
                            completion_only_loss=False)
    assert everything.input_ids == e.input_ids and everything.labels == e.input_ids


@pytest.mark.parametrize("prompt, completion", [("The ca", "t sat."), ("Answer: ", "yes")])
def test_plain_tokens_merging_across_the_boundary(tok, prompt, completion):
    """TRL 1.16 tokenizes prompt + completion as one string: a token spanning the boundary is the one the model
    sees, and the completion starts where that diverges from the prompt tokenized alone (with a warning)."""
    whole = tok(prompt + completion + EOS, add_special_tokens=False)["input_ids"]
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    n = next(i for i, (a, b) in enumerate(zip(alone, whole)) if a != b)  # these two do merge
    with pytest.warns(UserWarning, match="not a prefix"):
        e = encode_sft(Row({"prompt": prompt, "completion": completion}, "x"), tok, max_length=64)
    assert e.input_ids == whole and e.labels == [-100] * n + whole[n:]
    assert trained(tok, e).endswith(completion + EOS) and len(trained(tok, e)) > len(completion + EOS)


def test_plain_with_a_bos_adding_tokenizer(tok):
    bos_tok = clone(tok, add_bos_token=True, chat_template=None)
    assert bos_tok("a")["input_ids"][0] == bos_tok.bos_token_id  # the tokenizer really adds bos
    e = encode_sft(Row({"prompt": "2+2=", "completion": " 4"}, "x"), bos_tok, max_length=64)
    assert e.input_ids[0] == bos_tok.bos_token_id and e.input_ids.count(bos_tok.bos_token_id) == 1
    assert trained(bos_tok, e) == " 4" + EOS
    e = encode_sft(Row({"text": "hello"}, "x"), bos_tok, max_length=64)
    assert e.input_ids[0] == bos_tok.bos_token_id and e.input_ids[-1] == bos_tok.eos_token_id


def test_no_chat_template(tok):
    bare = clone(tok, chat_template=None)
    e = encode_sft(Row({"prompt": "2+2=", "completion": " 4"}, "x"), bare, max_length=64)
    assert trained(bare, e) == " 4" + EOS
    with pytest.raises(DataError, match=r"d\.jsonl:7: .*no chat template"):
        encode_sft(Row({"messages": [USER, ANSWER]}, "d.jsonl:7"), bare, max_length=64)


def test_template_breaking_the_prefix_property(tok):
    """A template that renders the first messages differently when more follow: as in TRL, the completion
    starts where the two renderings diverge (a warning says so); the assistant turns of a template without
    generation markers cannot be found that way, so assistant_only_loss refuses the row."""
    broken = clone(tok, chat_template="{{ messages | length }}" + CHAT_TEMPLATE)
    row = Row({"prompt": [USER], "completion": [ANSWER]}, "d.jsonl:3")
    with pytest.warns(UserWarning, match="not a prefix"):
        e = encode_sft(row, broken, max_length=256)
    whole = chat_ids(broken, [USER, ANSWER])
    alone = chat_ids(broken, [USER], add_generation_prompt=True)
    n = next(i for i, (a, b) in enumerate(zip(alone, whole)) if a != b)
    assert e.input_ids == whole and e.labels == [-100] * n + whole[n:]
    no_markers = clone(tok, chat_template="{{ messages | length }}" + CHAT_TEMPLATE.replace(
        "{% generation %}", "").replace("{% endgeneration %}", ""))
    with pytest.raises(DataError, match=r"d\.jsonl:3: the chat template renders"):
        encode_sft(row, no_markers, max_length=256, assistant_only_loss=True)


def test_sft_rejects_other_formats(tok):
    with pytest.raises(DataError, match="x: SFT takes"):
        encode_sft(Row({"prompt": "2+2="}, "x"), tok, max_length=64)


# ---------------------------------------------------------------------------------------------- truncation


@pytest.mark.parametrize("conversational", [False, True])
def test_truncation_left_keeps_the_completion_and_alignment(tok, conversational):
    long_prompt = "Tell me a long story about numbers and letters " * 6
    if conversational:
        data = {"prompt": [{"role": "user", "content": long_prompt}], "completion": [ANSWER]}
        answer = "It is four." + EOS + "\n"
    else:
        data = {"prompt": long_prompt, "completion": " It is four."}
        answer = " It is four." + EOS
    full = encode_sft(Row(data, "x"), tok, max_length=10_000)
    n_trained = sum(t != -100 for t in full.labels)
    max_length = n_trained + 5
    assert len(full.input_ids) > max_length
    cut = encode_sft(Row(data, "x"), tok, max_length=max_length)
    assert cut.input_ids == full.input_ids[-max_length:]
    assert cut.labels == full.labels[-max_length:]
    assert all(label in (-100, i) for i, label in zip(cut.input_ids, cut.labels))
    assert trained(tok, cut) == answer


def test_truncation_drop_and_nothing_left(tok):
    row = Row({"prompt": "2+2= " * 20, "completion": " four"}, "x")
    assert encode_sft(row, tok, max_length=8, truncation="drop") is None
    assert encode_sft(row, tok, max_length=200, truncation="drop") is not None
    # cut to its last 2 tokens the example still trains the eos (predicted from the token before it)
    full = encode_sft(row, tok, max_length=200)
    cut = encode_sft(row, tok, max_length=2)
    assert cut.input_ids == full.input_ids[-2:] and cut.labels == full.labels[-2:]
    assert cut.labels[-1] == tok.eos_token_id
    # a conversation ending with a user turn, cut to that turn, has nothing left to train
    no_answer = Row({"messages": [USER, ANSWER, USER2]}, "x")
    assert encode_sft(no_answer, tok, max_length=4, assistant_only_loss=True) is None
    # ... and so does one whose only trained label is at position 0 (never a target after the shift)
    full = encode_sft(no_answer, tok, max_length=200, assistant_only_loss=True)
    k = max(i for i, t in enumerate(full.labels) if t != -100)
    for cut_to, left in ((len(full.labels) - k, False), (len(full.labels) - k + 1, True)):
        assert (encode_sft(no_answer, tok, max_length=cut_to, assistant_only_loss=True) is not None) is left


def test_truncation_keep_start_and_keep_end(tok):
    """TRL's names: keep_start (its default) keeps the first tokens, keep_end is ptk's left."""
    row = Row({"prompt": "Tell me a long story about numbers and letters " * 3, "completion": " It is four."}, "x")
    full = encode_sft(row, tok, max_length=10_000)
    start = encode_sft(row, tok, max_length=len(full.input_ids) - 2, truncation="keep_start")
    assert start.input_ids == full.input_ids[:-2] and start.labels == full.labels[:-2]
    assert encode_sft(row, tok, max_length=20, truncation="keep_end") == encode_sft(row, tok, max_length=20)
    assert encode_sft(row, tok, max_length=20, truncation="keep_start") is None  # only prompt left: nothing trained


def test_truncation_argument_is_checked(tok):
    with pytest.raises(ValueError, match="truncation"):
        encode_sft(Row({"text": "a"}, "x"), tok, max_length=8, truncation="right")
    with pytest.raises(ValueError, match="truncation"):
        encode_preference(Row({"prompt": "a", "chosen": "b", "rejected": "c"}, "x"), tok, max_length=8,
                          truncation="middle")


# ---------------------------------------------------------------------------------------------- other stages


def test_pretrain_stream(tok):
    texts = ["first document here", "second one", "and a third, a bit longer than the others"]
    blocks = encode_pretrain_stream([Row({"text": t}, f"x:{i}") for i, t in enumerate(texts)], tok, block_size=5)
    stream = []
    for t in texts:
        stream += tok(t, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert [i for b in blocks for i in b.input_ids] == stream
    assert all(len(b.input_ids) == 5 for b in blocks[:-1]) and 2 <= len(blocks[-1].input_ids) <= 5
    assert all(b.labels == b.input_ids for b in blocks)


def test_preference_explicit_and_implicit_prompt(tok):
    explicit = Row({"prompt": [USER], "chosen": [ANSWER], "rejected": [WRONG]}, "x")
    implicit = Row({"chosen": [USER, ANSWER], "rejected": [USER, WRONG]}, "x")
    for row in (explicit, implicit):  # TRL 1.16's DPO: every token after the prompt, ChatML's newline included
        pair = encode_preference(row, tok, max_length=256)
        assert trained(tok, pair.chosen) == "It is four." + EOS + "\n"
        assert trained(tok, pair.rejected) == "It is five." + EOS + "\n"
        n = len(chat_ids(tok, [USER], add_generation_prompt=True))
        assert pair.chosen.input_ids[:n] == pair.rejected.input_ids[:n]
    plain = encode_preference(Row({"prompt": "2+2=", "chosen": " 4", "rejected": " 5"}, "x"), tok, max_length=64)
    assert (trained(tok, plain.chosen), trained(tok, plain.rejected)) == (" 4" + EOS, " 5" + EOS)
    long = Row({"prompt": "2+2=", "chosen": " 4", "rejected": " 5" * 40}, "x")
    assert encode_preference(long, tok, max_length=20, truncation="drop") is None


def test_preference_completions_start_together(tok):
    """TRL 1.16's DPO: both completions start where the earlier of the two diverges from the prompt, so a token
    merging across the boundary on one side moves the start of the other side too."""
    prompt, chosen, rejected = "The ca", "t sat.", " dog."
    alone = tok(prompt, add_special_tokens=False)["input_ids"]
    sides = [tok(prompt + answer + EOS, add_special_tokens=False)["input_ids"] for answer in (chosen, rejected)]
    starts = [next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), len(alone)) for ids in sides]
    assert starts[0] < starts[1]  # only the chosen side merges
    with pytest.warns(UserWarning, match="not a prefix"):
        pair = encode_preference(Row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, "x"), tok,
                                 max_length=64)
    for e, ids in zip((pair.chosen, pair.rejected), sides):
        assert e.input_ids == ids and e.labels == [-100] * starts[0] + ids[starts[0]:]


def test_unpaired(tok):
    e, label = encode_unpaired(Row({"prompt": "2+2=", "completion": " 5", "label": False}, "x"), tok, max_length=64)
    assert label is False and trained(tok, e) == " 5" + EOS
    e, _ = encode_unpaired(Row({"prompt": [USER], "completion": [WRONG], "label": True}, "x"), tok, max_length=64)
    assert trained(tok, e) == "It is five." + EOS + "\n"


def test_encode_prompt(tok):
    ids = encode_prompt(Row({"prompt": [SYSTEM, USER], "answer": "4"}, "x"), tok, max_prompt_length=256)
    assert ids == chat_ids(tok, [SYSTEM, USER], add_generation_prompt=True)
    assert tok.decode(ids).endswith("<|im_start|>assistant\n")
    assert encode_prompt(Row({"prompt": [SYSTEM, USER]}, "x"), tok, max_prompt_length=5) == ids[-5:]
    assert encode_prompt(Row({"prompt": "2+2="}, "x"), tok, max_prompt_length=64) == tok("2+2=")["input_ids"]


def test_end_of_turn_suffix_completes_a_sampled_turn(tok):
    """A sampled answer stops at eos; with the suffix after it, prompt + answer are exactly the tokens ptk reward
    trains (and scores) on, so PPO's reward model scores rollouts where it learned to."""
    suffix = end_of_turn_suffix(tok)
    assert tok.decode(suffix) == "\n"  # the shipped ChatML template ends a turn with <|im_end|> and a newline
    sampled = tok("It is four.", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    prompt = encode_prompt(Row({"prompt": [USER]}, "x"), tok, max_prompt_length=256)
    trained_on = encode_sft(Row({"prompt": [USER], "completion": [ANSWER]}, "x"), tok, max_length=256)
    assert prompt + sampled + suffix == trained_on.input_ids
    assert end_of_turn_suffix(clone(tok, chat_template=None)) == []
    ends_at_eos = CHAT_TEMPLATE.replace("{{ '\n' }}{% endfor %}", "{% endfor %}")
    assert ends_at_eos != CHAT_TEMPLATE
    assert end_of_turn_suffix(clone(tok, chat_template=ends_at_eos)) == []


# ---------------------------------------------------------------------------------------------- batching


def examples_of(*lengths):
    out, start = [], 100
    for n in lengths:
        ids = list(range(start, start + n))
        out.append(Encoded(ids, [-100] + ids[1:]))  # first token a prompt token
        start += n
    return out


def test_pack():
    examples = examples_of(5, 3, 4, 2, 6)
    rows = pack(examples, max_length=8)
    assert all(len(r["input_ids"]) <= 8 for r in rows)
    assert len(rows) == 3  # 20 tokens: best fit needs 3 rows of 8
    assert sorted(i for r in rows for i in r["input_ids"]) == sorted(i for e in examples for i in e.input_ids)
    by_first = {e.input_ids[0]: e for e in examples}
    for r in rows:
        assert len(r["input_ids"]) == len(r["labels"]) == len(r["position_ids"])
        starts = [i for i, p in enumerate(r["position_ids"]) if p == 0]
        assert starts[0] == 0
        for a, b in zip(starts, starts[1:] + [len(r["input_ids"])]):
            e = by_first[r["input_ids"][a]]
            assert r["input_ids"][a:b] == e.input_ids
            assert r["position_ids"][a:b] == list(range(b - a))
            assert r["labels"][a] == -100 and r["labels"][a + 1:b] == e.labels[1:]
    with pytest.raises(ValueError, match="more than max_length"):
        pack(examples_of(9), max_length=8)


def test_collate():
    batch = collate(examples_of(3, 5), pad_token_id=0, pad_to_multiple_of=4)
    assert batch["input_ids"].shape == (2, 8) and batch["input_ids"].dtype == torch.long
    assert batch["input_ids"][0].tolist() == [100, 101, 102, 0, 0, 0, 0, 0]
    assert batch["labels"][0].tolist() == [-100, 101, 102] + [-100] * 5
    assert batch["attention_mask"].tolist() == [[1] * 3 + [0] * 5, [1] * 5 + [0] * 3]
    assert "position_ids" not in batch
    assert token_count(batch) == 2 + 4


def test_collate_packed():
    rows = pack(examples_of(3, 2, 4), max_length=6)
    batch = collate(rows, pad_token_id=0)
    assert "attention_mask" not in batch
    length = batch["input_ids"].shape[1]
    for i, r in enumerate(rows):
        n, last = len(r["input_ids"]), r["position_ids"][-1]
        assert batch["position_ids"][i].tolist() == r["position_ids"] + list(range(last + 1, last + 1 + length - n))
        assert batch["labels"][i, n:].eq(-100).all()
    with pytest.raises(ValueError, match="packed"):
        collate([rows[0], examples_of(2)[0]], pad_token_id=0)


def test_collate_pairs():
    a, b, c, d = examples_of(2, 4, 3, 6)
    batch = collate_pairs([EncodedPair(a, b), EncodedPair(c, d)], pad_token_id=0)
    assert batch["input_ids"].shape == (4, 6)
    assert [row[0] for row in batch["input_ids"].tolist()] == [a.input_ids[0], c.input_ids[0], b.input_ids[0],
                                                               d.input_ids[0]]
    assert batch["attention_mask"].sum(1).tolist() == [2, 3, 4, 6]
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_rows_give_the_same_logprobs_as_separate_documents(tok, attn):
    """The key property of packing: with attention_mask=None and restarting position_ids, Transformers keeps the
    documents of a packed row from attending to each other."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM._from_config(config, attn_implementation=attn, torch_dtype=torch.float32).eval()
    rows = [{"messages": [SYSTEM, USER, ANSWER]}, {"prompt": "2+2=", "completion": " 4"},
            {"messages": [USER2, ANSWER2, USER, WRONG]}, {"text": "Once upon a time there were numbers."}]
    examples = [encode_sft(Row(r, "x"), tok, max_length=256) for r in rows]
    packed = pack(examples, max_length=sum(len(e.input_ids) for e in examples))
    assert len(packed) == 1
    batch = collate(packed + pack(examples[:1], max_length=256), pad_token_id=tok.pad_token_id)

    def logprobs(input_ids, **kwargs):
        with torch.no_grad():
            logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
        return torch.log_softmax(logits[:, :-1], -1).gather(-1, input_ids[:, 1:, None])[..., 0]

    got = logprobs(batch["input_ids"], attention_mask=None, position_ids=batch["position_ids"])
    positions = packed[0]["position_ids"]
    starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
    ids = packed[0]["input_ids"]
    for a, b in zip(starts, starts[1:]):
        alone = logprobs(torch.tensor([ids[a:b]]))[0]
        # token t (a < t < b) is predicted at position t - 1 of the shifted log-probs
        torch.testing.assert_close(got[0, a:b - 1], alone, atol=1e-5, rtol=0)
    # the second row, one document then padding, matches too
    n = len(examples[0].input_ids)
    torch.testing.assert_close(got[1, :n - 1], logprobs(torch.tensor([examples[0].input_ids]))[0], atol=1e-5, rtol=0)


def test_packing_probe_refuses_models_that_let_packed_examples_meet(tok, tmp_path, data_dir):
    """OPT's attention ignores restarting position ids (measured: a packed example's log-probs move by ~3): the
    probe finds it and ptk sft --packing stops before training; Llama keeps packed examples apart."""
    from transformers import OPTConfig, OPTForCausalLM

    from ptkernels.cli import main as ptk
    from ptkernels.trainers.modeling import load_causal_lm, packing_keeps_documents_apart, save_pretrained

    apart, moved = packing_keeps_documents_apart(load_causal_lm("tiny", seed=0)[0])
    assert apart and moved < 1e-4
    torch.manual_seed(0)
    opt = OPTForCausalLM(OPTConfig(vocab_size=len(tok), hidden_size=32, ffn_dim=64, num_hidden_layers=1,
                                   num_attention_heads=2, word_embed_proj_dim=32, max_position_embeddings=64,
                                   bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id))
    apart, moved = packing_keeps_documents_apart(opt)
    assert not apart and moved > 1e-2
    save_pretrained(opt, tok, str(tmp_path / "opt"))
    with pytest.raises(ValueError, match="--packing: OPTForCausalLM does not keep packed examples apart"):
        ptk(["sft", "--model", str(tmp_path / "opt"), "--data", data_dir["sft"], "--output-dir", str(tmp_path / "o"),
             "--packing", "--max-steps", "1", "--no-progress"])
    assert not (tmp_path / "o" / "metrics.jsonl").exists()
