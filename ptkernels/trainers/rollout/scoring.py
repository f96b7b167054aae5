"""Scoring rollouts with ptkernels: the right-padded training batch of prompt + completion rows and its per-token
log-probs under a model, from hidden states and the fused head (no ``[B, T, V]`` logits).

    batch = completion_batch(rollout.prompt_ids, rollout.completion_ids, tokenizer.pad_token_id)
    old_logps = sequence_token_logps(model, batch)        # [B, T-1], aligned with labels[:, 1:]
"""

from __future__ import annotations

import torch

from ..data.tokenization import IGNORE_INDEX
from ..modeling import token_logps
from .sampling import eval_mode, model_device, unwrap_model

__all__ = ["completion_batch", "sequence_token_logps"]


def completion_batch(prompt_ids: list[list[int]], completion_ids: list[list[int]],
                     pad_token_id: int) -> dict[str, torch.Tensor]:
    """The right-padded training batch of prompt + completion rows.

    ``input_ids`` / ``attention_mask`` / ``labels`` as ``tokenization.collate`` makes them (labels: the completion's
    token ids, -100 on the prompt and the padding), plus ``completion_mask`` ``[B, T-1]`` float: 1 where the shifted
    labels ``labels[:, 1:]`` are a completion token, i.e. exactly the positions of the ``[B, T-1]`` per-token
    log-probs that ``sequence_token_logps`` and the GRPO / PPO losses work on."""
    if len(prompt_ids) != len(completion_ids):
        raise ValueError(f"{len(prompt_ids)} prompts but {len(completion_ids)} completions")
    if not prompt_ids:
        raise ValueError("completion_batch needs at least one row")
    length = max(len(p) + len(c) for p, c in zip(prompt_ids, completion_ids))
    n = len(prompt_ids)
    input_ids = torch.full((n, length), pad_token_id, dtype=torch.long)
    labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
        if not p:
            raise ValueError(f"row {i}: an empty prompt (the first completion token needs a position before it)")
        row = torch.tensor(list(p) + list(c), dtype=torch.long)
        input_ids[i, :len(row)] = row
        labels[i, len(p):len(row)] = row[len(p):]
        attention_mask[i, :len(row)] = 1
    completion_mask = (labels[:, 1:] != IGNORE_INDEX).float()
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels,
            "completion_mask": completion_mask}


@torch.no_grad()
def sequence_token_logps(model, batch: dict, *, backend: str = "auto", chunk_rows: int | None = None,
                         temperature: float = 1.0) -> torch.Tensor:
    """``[B, T-1]`` log p(completion token) under ``model`` (0 on the prompt and padding), aligned with
    ``batch["labels"][:, 1:]``: hidden states + ``ptkernels.linear_token_logprobs`` (``modeling.token_logps``), no
    ``[B, T, V]`` logits. ``chunk_rows`` rows at a time (all at once by default) bound the activation memory.
    Run in eval mode (no dropout: the numbers the policy is later compared with), the model's mode restored.
    ``temperature``: the sampling temperature, so the log-probs are those of the distribution sampled from."""
    model = unwrap_model(model)
    device = model_device(model)
    rows, width = batch["input_ids"].shape
    step = chunk_rows or rows
    if step < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    out = torch.zeros((rows, max(width - 1, 0)), dtype=torch.float32, device=device)
    with eval_mode(model):
        for start in range(0, rows, step):
            part = {k: batch[k][start:start + step].to(device)
                    for k in ("input_ids", "attention_mask", "position_ids", "labels") if k in batch}
            # Columns after the chunk's last attended one are padding that nothing before it can see (causal
            # mask): dropping them makes a chunk of short rows cost only its own length.
            used = width
            if "attention_mask" in part and part["attention_mask"].any():
                used = int(part["attention_mask"].any(0).nonzero().max()) + 1
            part = {k: v[:, :used] for k, v in part.items()}
            if used > 1:
                out[start:start + step, :used - 1] = token_logps(model, part, backend=backend,
                                                                      temperature=temperature).float()
    return out
