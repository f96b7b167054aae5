"""The tokenizer of the built-in ``tiny`` preset: byte-level BPE (Hugging Face ``tokenizers``) with a ChatML
chat template, shipped in ``assets/tokenizer/`` so nothing is downloaded.

``train_tokenizer`` makes one from any iterable of texts; the shipped one is trained on the task world's
pretraining corpus (``python -m ptkernels.trainers.data.tiny_tokenizer`` rewrites it).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

ASSET_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tokenizer")

PAD, BOS, EOS = "<|endoftext|>", "<|endoftext|>", "<|im_end|>"
IM_START = "<|im_start|>"
SPECIAL_TOKENS = [PAD, IM_START, EOS]

# ChatML. The {% generation %} markers let ``apply_chat_template(..., return_assistant_tokens_mask=True)`` mark
# the assistant's tokens (the ones SFT trains on); the rendering of a conversation's prefix is a prefix of the
# rendering of the whole conversation, which prompt/completion masking relies on.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024):
    """A byte-level BPE tokenizer trained on ``texts``, wrapped as a ``PreTrainedTokenizerFast`` with the chat
    template, pad = bos = ``<|endoftext|>`` and eos = ``<|im_end|>``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Digits one by one: a small model learns column arithmetic far better than from BPE's merged digit runs.
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   chat_template=CHAT_TEMPLATE, model_max_length=2048)


def load_tiny_tokenizer():
    """The shipped tokenizer of the ``tiny`` preset."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSET_DIR)


def _bootstrap_corpus() -> list[str]:
    """Text to train on when the task world is not available: this package's own docs and digits."""
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    texts = []
    for name in ("README.md", os.path.join("docs", "hf_integration.md")):
        path = os.path.join(here, name)
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                texts.append(f.read())
    texts += [" ".join(str(i) for i in range(1000))]
    return texts


if __name__ == "__main__":
    try:  # the task world's raw corpus and its assistant turns (the answer format, the refusal), when present
        from ..taskworld import pretraining_corpus, sft_rows

        corpus = list(pretraining_corpus(seed=0))
        corpus += [m["content"] for r in sft_rows(seed=0, n=2000) for m in r["messages"]]
    except ImportError:
        corpus = _bootstrap_corpus()
    train_tokenizer(corpus).save_pretrained(ASSET_DIR)
    print(f"wrote {ASSET_DIR}")
