"""Rows (see ``rows.py``) to token ids, with the labels that say which tokens are trained, as TRL 1.16 does.

Labels are aligned with ``input_ids`` (the Hugging Face convention; the loss shifts them): the token id where
the model is trained, ``-100`` elsewhere (the prompt, padding; with ``assistant_only_loss`` the system and user
turns). A prompt and its completion are tokenized together and the completion starts where that diverges from
the prompt tokenized alone (TRL's ``common_prefix_length``); plain text gets the eos token unless it already ends
with it. Truncation always slices ids and labels together, so a label can never drift onto the wrong token.

Works with any Hugging Face tokenizer: conversational rows need a chat template, plain rows do not.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .rows import DataError, Row, detect_format, preference_parts

if TYPE_CHECKING:
    from ..engine.distributed import DistInfo

IGNORE_INDEX = -100
TRUNCATIONS = ("left", "keep_end", "keep_start", "drop")  # keep_end is left under TRL's name


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]


@dataclass
class EncodedPair:
    chosen: Encoded
    rejected: Encoded


# ---------------------------------------------------------------------------------------------- helpers


def _as_row(row) -> Row:
    return row if isinstance(row, Row) else Row(dict(row), "<row>")


def _eos(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token; plain text needs one to mark where an answer ends")
    return tokenizer.eos_token_id


def _bos_prefix(tokenizer) -> list[int]:
    """``[bos]`` when the tokenizer puts bos in front of what it encodes (Llama-style), else ``[]``. Plain text
    is tokenized without special tokens and gets exactly this in front, so no tokenizer adds eos (or anything
    else) in the middle of a prompt + completion."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return [bos] if with_special[:1] == [bos] and without[:1] != [bos] else []


def _plain(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _template_text(tokenizer) -> str | None:
    template = tokenizer.chat_template
    if isinstance(template, dict):  # several named templates
        template = template.get("default")
    return template


def _has_generation_markers(tokenizer) -> bool:
    """Whether the chat template marks assistant tokens with ``{% generation %}`` (then
    ``return_assistant_tokens_mask`` works)."""
    return bool(re.search(r"\{%-?\s*generation\s*-?%\}", _template_text(tokenizer) or ""))


def _chat(tokenizer, messages: list, row: Row, *, add_generation_prompt: bool = False, assistant_mask=False):
    """Token ids of ``messages`` rendered with the chat template (and the assistant-token mask if asked)."""
    if _template_text(tokenizer) is None:
        raise DataError(f"{row.source}: the row is conversational but the tokenizer has no chat template")
    tools = row.data.get("tools")
    if isinstance(tools, str):  # TRL's datasets store the tool schemas as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError as e:
            raise DataError(f"{row.source}: field 'tools' is not JSON: {e.msg}") from None
    out = tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=True, return_dict=True,
                                        add_generation_prompt=add_generation_prompt,
                                        return_assistant_tokens_mask=assistant_mask)
    ids = list(out["input_ids"])
    return (ids, list(out["assistant_masks"])) if assistant_mask else ids


def common_prefix_length(ids: list[int], other: list[int]) -> int:
    """How many leading tokens two sequences share (TRL 1.16's ``common_prefix_length``)."""
    n = 0
    for a, b in zip(ids, other):
        if a != b:
            break
        n += 1
    return n


def _completion_start(prompt_ids: list[int], ids: list[int], tokenizer) -> int:
    """Where the completion starts in ``ids``: after the longest prefix it shares with the prompt rendered alone.
    As in TRL 1.16, that is the whole prompt unless the chat template renders the prompt differently when an
    answer follows or tokens merge across the boundary ("The ca" + "t sat": " cat" is one token); then the
    completion starts where they diverge, with a warning (one per call site: the message does not vary)."""
    n = common_prefix_length(prompt_ids, ids)
    if n < len(prompt_ids):
        warnings.warn("the tokenized prompt is not a prefix of the tokenized prompt + completion (the chat template "
                      "renders the prompt alone differently, or tokens merge across the boundary): the completion "
                      "starts where they diverge and the end of the prompt is trained as part of it (as in TRL); "
                      "end prompts on a token boundary to avoid it", stacklevel=3)
    return n


def _check_prefix(prefix: list[int], ids: list[int], row: Row) -> None:
    if ids[:len(prefix)] != prefix:
        raise DataError(f"{row.source}: the chat template renders the start of this conversation differently "
                        "when more messages follow, so the assistant turns' tokens cannot be told apart")


def _assistant_mask(row: Row, messages: list, tokenizer) -> tuple[list[int], list[int]]:
    """A conversation's ids and a 1 on each assistant token (TRL's ``assistant_only_loss``)."""
    if _has_generation_markers(tokenizer):
        return _chat(tokenizer, messages, row, assistant_mask=True)
    # No markers: each assistant turn is what rendering messages[:i + 1] adds to rendering messages[:i] with the
    # generation prompt (the turn's content, end-of-turn token and whatever the template puts after it).
    ids = _chat(tokenizer, messages, row)
    mask = [0] * len(ids)
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = _chat(tokenizer, messages[:i], row, add_generation_prompt=True) if i else []
        end = _chat(tokenizer, messages[:i + 1], row)
        _check_prefix(start, end, row)
        _check_prefix(end, ids, row)
        mask[len(start):len(end)] = [1] * (len(end) - len(start))
    return ids, mask


def _with_eos(text: str, tokenizer) -> str:
    """TRL's ``add_eos``: plain text gets the eos token's text unless it already ends with it."""
    _eos(tokenizer)
    return text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token


def _plain_ids(tokenizer, text: str) -> list[int]:
    return _bos_prefix(tokenizer) + _plain(tokenizer, text)


@dataclass
class _PromptCompletion:
    ids: list[int]  # prompt + completion, tokenized together
    start: int  # where the completion starts (``_completion_start``)
    assistant: list[int] | None  # 1 on assistant tokens, when asked for (conversational rows only)


def _prompt_completion(row: Row, prompt, completion, tokenizer, assistant_only: bool = False) -> _PromptCompletion:
    """``prompt`` + ``completion`` as TRL 1.16 tokenizes them: conversational rows are the whole conversation
    rendered with the chat template, the prompt rendered with the generation prompt; plain rows are the text
    ``prompt + completion + eos`` tokenized as one string (so a token spanning the boundary is the one the model
    would see), the prompt alone beside it."""
    if isinstance(prompt, list):
        prompt_ids = _chat(tokenizer, prompt, row, add_generation_prompt=True) if prompt else []
        if assistant_only:
            ids, mask = _assistant_mask(row, prompt + completion, tokenizer)
        else:
            ids, mask = _chat(tokenizer, prompt + completion, row), None
    else:
        prompt_ids = _plain_ids(tokenizer, prompt)
        ids, mask = _plain_ids(tokenizer, prompt + _with_eos(completion, tokenizer)), None
    return _PromptCompletion(ids, _completion_start(prompt_ids, ids, tokenizer), mask)


def _labels(ids: list[int], start: int = 0, mask: list[int] | None = None) -> list[int]:
    """``ids`` as labels, ``IGNORE_INDEX`` before ``start`` and wherever ``mask`` is 0."""
    return [IGNORE_INDEX if i < start or (mask is not None and not mask[i]) else t for i, t in enumerate(ids)]


def _check_truncation(truncation: str, max_length: int) -> None:
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2, got {max_length}")


def _finish(ids: list[int], labels: list[int], max_length: int, truncation: str) -> Encoded | None:
    if len(ids) > max_length:
        if truncation == "drop":
            return None
        if truncation == "keep_start":  # TRL 1.16's default: the end goes, the answer's first
            ids, labels = ids[:max_length], labels[:max_length]
        else:  # drop from the start (the prompt first), keeping the end of the answer
            ids, labels = ids[-max_length:], labels[-max_length:]
    # the label at position 0 is never a target (position t predicts labels[t + 1])
    if all(label == IGNORE_INDEX for label in labels[1:]):
        return None
    return Encoded(ids, labels)


# ---------------------------------------------------------------------------------------------- encoders


def encode_sft(row: Row, tokenizer, *, max_length: int, truncation: str = "left", fmt: str | None = None,
               assistant_only_loss: bool = False, completion_only_loss: bool = True) -> Encoded | None:
    """A ``text``, ``messages`` or ``prompt_completion`` row for supervised fine-tuning, with TRL 1.16's SFT
    semantics: ``text`` and ``messages`` train every token, a prompt_completion row its completion
    (``completion_only_loss``); ``assistant_only_loss`` trains only the assistant tokens of conversational rows.
    ``None`` when the row is too long and ``truncation="drop"``, or when no trained token is left."""
    _check_truncation(truncation, max_length)
    row = _as_row(row)
    fmt = fmt or detect_format(row)
    d = row.data
    if fmt == "text":
        ids = _plain_ids(tokenizer, _with_eos(d["text"], tokenizer))
        labels = list(ids)
    elif fmt == "messages":
        if assistant_only_loss:
            ids, mask = _assistant_mask(row, d["messages"], tokenizer)
            labels = _labels(ids, mask=mask)
        else:
            ids = _chat(tokenizer, d["messages"], row)
            labels = list(ids)
    elif fmt == "prompt_completion":
        pc = _prompt_completion(row, d["prompt"], d["completion"], tokenizer,
                                assistant_only_loss and isinstance(d["prompt"], list))
        ids, labels = pc.ids, _labels(pc.ids, pc.start if completion_only_loss else 0, pc.assistant)
    else:
        raise DataError(f"{row.source}: SFT takes text, messages or prompt_completion rows, not {fmt!r}")
    return _finish(ids, labels, max_length, truncation)


def encode_pretrain_stream(rows, tokenizer, *, block_size: int) -> list[Encoded]:
    """A plain next-token corpus: every ``text`` (+ eos) concatenated and cut into ``block_size`` blocks, all
    tokens trained. The last block may be shorter (a small corpus still gives something to train on)."""
    if block_size < 2:
        raise ValueError(f"block_size must be at least 2, got {block_size}")
    rows = [_as_row(r) for r in rows]
    for r in rows:
        if not isinstance(r.data.get("text"), str):
            raise DataError(f"{r.source}: pretraining needs a string field 'text'")
    bos, eos = _bos_prefix(tokenizer), _eos(tokenizer)
    stream: list[int] = []
    if rows:  # one batched call: fast tokenizers encode the corpus in parallel
        for ids in tokenizer([r.data["text"] for r in rows], add_special_tokens=False)["input_ids"]:
            stream += bos + list(ids) + [eos]
    blocks = [stream[i:i + block_size] for i in range(0, len(stream), block_size)]
    return [Encoded(b, list(b)) for b in blocks if len(b) >= 2]


def encode_preference(row: Row, tokenizer, *, max_length: int, truncation: str = "left") -> EncodedPair | None:
    """prompt + chosen and prompt + rejected as TRL 1.16's DPO tokenizes them (``_prompt_completion``); both
    completions start where the earlier of the two diverges from the prompt, and every token after it is
    trained. ``None`` if either is dropped."""
    _check_truncation(truncation, max_length)
    row = _as_row(row)
    prompt, chosen, rejected = preference_parts(row)
    both = [_prompt_completion(row, prompt, answer, tokenizer) for answer in (chosen, rejected)]
    start = min(pc.start for pc in both)
    encoded = [_finish(pc.ids, _labels(pc.ids, start), max_length, truncation) for pc in both]
    return None if None in encoded else EncodedPair(*encoded)


def encode_unpaired(row: Row, tokenizer, *, max_length: int,
                    truncation: str = "left") -> tuple[Encoded, bool] | None:
    """A KTO row: prompt + completion tokenized as TRL 1.16's KTO does (every token of the completion trained),
    and its desirability label."""
    _check_truncation(truncation, max_length)
    row = _as_row(row)
    d = row.data
    pc = _prompt_completion(row, d["prompt"], d["completion"], tokenizer)
    encoded = _finish(pc.ids, _labels(pc.ids, pc.start), max_length, truncation)
    return None if encoded is None else (encoded, bool(d["label"]))


def encode_prompt(row: Row, tokenizer, *, max_prompt_length: int) -> list[int]:
    """The prompt's ids for generation: the chat template with the generation prompt (conversational) or the
    plain prompt, keeping the last ``max_prompt_length`` tokens."""
    if max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be at least 1, got {max_prompt_length}")
    row = _as_row(row)
    if "prompt" not in row.data:
        raise DataError(f"{row.source}: no 'prompt' field to generate from")
    prompt = row.data["prompt"]
    if isinstance(prompt, list):
        ids = _chat(tokenizer, prompt, row, add_generation_prompt=True)
    else:
        ids = _bos_prefix(tokenizer) + _plain(tokenizer, prompt)
    if not ids:
        raise DataError(f"{row.source}: field 'prompt' gives no tokens (generation needs something to condition on)")
    return ids[-max_prompt_length:]


def end_of_turn_suffix(tokenizer) -> list[int]:
    """The tokens the chat template renders after the eos that ends an assistant turn (ChatML: the newline after
    ``<|im_end|>``); ``[]`` without a template or when nothing follows eos.

    A sampled completion stops at eos, but ``ptk reward`` trained the reward model on whole rendered turns and
    scores the last token: a rollout scored without this suffix is scored at a position the reward model never
    learned to score (on the pipeline's reward model, the margin between a chosen and a rejected answer fell from
    ~7 to ~0.1 there)."""
    eos = tokenizer.eos_token_id
    if eos is None or _template_text(tokenizer) is None:
        return []
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    ids = list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    if eos not in ids:
        return []
    last = len(ids) - 1 - ids[::-1].index(eos)
    return ids[last + 1:]


# ---------------------------------------------------------------------------------------------- batching


def pack(examples: list[Encoded], max_length: int) -> list[dict]:
    """Whole examples packed into rows of at most ``max_length`` tokens (best fit, longest first).

    Each row is ``{"input_ids", "labels", "position_ids"}``; position ids restart at 0 for each example, which
    is how the model tells the examples apart (see ``collate``). The first token of each example gets label
    -100: it would otherwise be trained as the continuation of the previous example."""
    import bisect

    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins: list[list[int]] = []  # example indices per row
    free: list[tuple[int, int]] = []  # (free tokens, row index), sorted
    for i in order:
        n = len(examples[i].input_ids)
        if n > max_length:
            raise ValueError(f"example {i} has {n} tokens, more than max_length={max_length} (truncate it first)")
        if n == 0:
            continue
        j = bisect.bisect_left(free, (n, -1))  # the fullest row that still has room
        if j < len(free):
            space, b = free.pop(j)
        else:
            space, b = max_length, len(bins)
            bins.append([])
        bins[b].append(i)
        bisect.insort(free, (space - n, b))
    rows = []
    for b in bins:
        row = {"input_ids": [], "labels": [], "position_ids": []}
        for i in sorted(b):  # the data set's order within a row
            e = examples[i]
            row["input_ids"] += e.input_ids
            row["labels"] += [IGNORE_INDEX] + e.labels[1:]
            row["position_ids"] += list(range(len(e.input_ids)))
        rows.append(row)
    return rows


def collate(examples, pad_token_id: int, *, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-padded LongTensors ``input_ids`` (``pad_token_id``), ``labels`` (-100) and ``attention_mask``.

    Packed rows (dicts with ``position_ids``, from ``pack``) give ``position_ids`` instead of an attention mask:
    with ``attention_mask=None`` (and ``use_cache=False``) Transformers builds the block-diagonal mask from the
    restarts of the position ids, for every attention implementation. Padding continues the last example's
    positions, so it joins that example (after it, so the causal mask keeps it from changing anything)."""
    if not examples:
        raise ValueError("collate needs at least one example")
    rows = [e if isinstance(e, dict) else {"input_ids": e.input_ids, "labels": e.labels} for e in examples]
    packed = "position_ids" in rows[0]
    if any(("position_ids" in r) != packed for r in rows):
        raise ValueError("cannot collate packed rows (with position_ids) together with unpacked examples")
    length = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch = {"input_ids": torch.full((len(rows), length), pad_token_id, dtype=torch.long),
             "labels": torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)}
    if packed:
        batch["position_ids"] = torch.zeros((len(rows), length), dtype=torch.long)
    else:
        batch["attention_mask"] = torch.zeros((len(rows), length), dtype=torch.long)
    for i, r in enumerate(rows):
        n = len(r["input_ids"])
        if len(r["labels"]) != n:
            raise ValueError(f"example {i}: {n} input_ids but {len(r['labels'])} labels")
        batch["input_ids"][i, :n] = torch.tensor(r["input_ids"], dtype=torch.long)
        batch["labels"][i, :n] = torch.tensor(r["labels"], dtype=torch.long)
        if packed:
            last = r["position_ids"][-1] if n else -1
            batch["position_ids"][i, :n] = torch.tensor(r["position_ids"], dtype=torch.long)
            batch["position_ids"][i, n:] = torch.arange(last + 1, last + 1 + length - n)
        else:
            batch["attention_mask"][i, :n] = 1
    return batch


def collate_pairs(pairs: list[EncodedPair], pad_token_id: int, *,
                  pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """One batch of 2B rows, ``[chosen_0 .. chosen_{B-1}, rejected_0 .. rejected_{B-1}]``, padded to one length
    (one forward pass for both halves, as the fused preference losses expect)."""
    return collate([p.chosen for p in pairs] + [p.rejected for p in pairs], pad_token_id,
                   pad_to_multiple_of=pad_to_multiple_of)


def token_count(batch) -> int:
    """The number of trained tokens after the causal shift (``labels[:, 1:] != -100``): the denominator that
    makes a gradient-accumulated loss the mean over all of the step's tokens."""
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def encode_all(rows, encode, what: str, info: DistInfo) -> list:
    """``encode(row)`` for every row; rows it drops (``None``: too long with --truncation drop, or nothing to
    train on) are counted and reported."""
    out = [e for e in map(encode, rows) if e is not None]
    if info.is_main and len(out) < len(rows):
        print(f"ptk: {len(rows) - len(out)} of {len(rows)} {what} dropped (too long for --max-length with "
              f"--truncation drop, or nothing left to train on)")
    if not out:
        raise ValueError(f"no {what} left to train on after tokenization (check --max-length / --truncation)")
    return out


def pairs_in(batch: dict) -> int:
    """The preference pairs of a ``collate_pairs`` batch (its chosen rows, then its rejected rows)."""
    return batch["input_ids"].shape[0] // 2
