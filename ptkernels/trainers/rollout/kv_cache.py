"""A lean sampler for the on-policy stages: the model's own forward, a Hugging Face ``DynamicCache``, no generate().

    engine = KVCacheEngine(model, tokenizer)
    rollout = engine.generate(prompts, SamplingConfig(max_new_tokens=24), seed=step)

It samples from the same distribution as ``engines.HFGenerateEngine`` (softmax(logits / temperature), top-p
truncated; greedy when ``do_sample`` is False: the same tokens as generate) and returns the same ``Rollout``, but
skips what a small model on a CPU pays for in ``generate()`` (the figures: benchmarks/RESULTS.md, "Rollouts and
the GRPO step"):

- **One prefill per distinct prompt.** A GRPO group repeats its prompt ``num_generations`` times; the prompt is run
  through the model once and its cache rows are repeated (``DynamicCache.batch_select_indices``). The prefill of
  256 left-padded rows cost as much as the whole decode.
- **Sampling by inverse CDF**: one uniform per row and a ``searchsorted`` over the cumulative probabilities, where
  ``torch.multinomial`` draws an exponential for every vocabulary entry.
- **Finished rows leave the batch.** A batch decodes until its longest sample stops; once a quarter of the rows
  in the cache have sampled eos they are dropped from it, so the long tail runs on the rows still going.
- No logits processors, stopping criteria or per-step output bookkeeping.

Models whose cache cannot repeat or drop rows (hybrid linear-attention and state-space models: Qwen3-Next, Jamba,
Falcon-H1; ``cache_rows_selectable``) get ``engines.HFGenerateEngine`` from ``make_engine`` instead, with a note.
"""

from __future__ import annotations

import inspect
import weakref

import torch

from ..modeling import cache_argument
from .sampling import (
    Rollout,
    SamplingConfig,
    check_request,
    cut_at_eos,
    distinct_left_padded,
    eval_mode,
    is_sharded,
    model_device,
    seeded,
    unwrap_model,
)

__all__ = ["KVCacheEngine", "cache_rows_selectable", "next_tokens", "top_p_filter"]


_SELECTABLE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> cache_rows_selectable(model)


def cache_rows_selectable(model) -> bool:
    """Whether ``model``'s cache can repeat and drop batch rows (``batch_select_indices``), which the KV-cache engine
    and GRPO's ``--share-prompt`` rely on: a plain attention cache can; the linear-attention or state-space layers of
    hybrid models (Qwen3-Next, Jamba, Falcon-H1) cannot. Found by trying it on a two-token batch, once per model
    (every process calls it alike: under FSDP the forward is a collective)."""
    model = unwrap_model(model)
    if model not in _SELECTABLE:
        _SELECTABLE[model] = _try_selecting_rows(model)
    return _SELECTABLE[model]


def _try_selecting_rows(model) -> bool:
    device = model_device(model)
    arg = cache_argument(model)
    try:
        with eval_mode(model), torch.no_grad():
            out = model(input_ids=torch.zeros(2, 2, dtype=torch.long, device=device), use_cache=True)
            getattr(out, arg).batch_select_indices(torch.tensor([0, 0, 1], device=device))
    except (AttributeError, IndexError, NotImplementedError, TypeError, ValueError):
        return False
    return True


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus truncation as Hugging Face's ``TopPLogitsWarper`` does it: drop the least likely tokens whose
    cumulative probability stays at or below ``1 - top_p`` (the most likely token always stays); not renormalized
    (``next_tokens`` samples against the total that remains)."""
    if top_p >= 1.0:
        return probs
    ascending, order = probs.sort(dim=-1)
    drop = ascending.cumsum(-1) <= 1 - top_p
    drop[..., -1] = False
    return probs.scatter(-1, order, ascending.masked_fill(drop, 0.0))


def next_tokens(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """``[rows]`` token ids for ``[rows, V]`` logits: the argmax when greedy, else one draw from
    softmax(logits / temperature), top-p truncated, by inverse CDF with one uniform per row (the caller's RNG)."""
    if not sampling.do_sample:
        return logits.argmax(-1)
    probs = top_p_filter(torch.softmax(logits.float() / sampling.temperature, dim=-1), sampling.top_p)
    cdf = probs.cumsum(-1)
    u = torch.rand((cdf.shape[0], 1), device=cdf.device) * cdf[:, -1:]
    # The first entry whose cumulative probability exceeds u: token j with probability p_j owns [cdf_{j-1}, cdf_j),
    # so a zero-probability token is never drawn. The clamp only guards against u rounding up to the total.
    return torch.searchsorted(cdf, u, right=True).squeeze(1).clamp_(max=cdf.shape[1] - 1)


class KVCacheEngine:
    """Batched sampling with the model's forward and a KV cache (see the module docstring); a ``RolloutEngine``."""

    def __init__(self, model, tokenizer):
        self.model = unwrap_model(model)
        self.tokenizer = tokenizer
        self._cache_arg = cache_argument(self.model)
        keep_last = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        self._keep_last = {"logits_to_keep": 1} if keep_last else {}

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, *, seed: int | None = None) -> Rollout:
        check_request(prompts, sampling, self.tokenizer)
        completions: list[list[int]] = []
        finished: list[bool] = []
        device = model_device(self.model)
        with eval_mode(self.model), torch.no_grad(), seeded(seed, device):
            for start in range(0, len(prompts), sampling.batch_size):
                tokens = self._sample(prompts[start:start + sampling.batch_size], sampling, device)
                for row in tokens.tolist():
                    ids, done = cut_at_eos(row, self.tokenizer.eos_token_id)
                    completions.append(ids)
                    finished.append(done)
        texts = self.tokenizer.batch_decode(completions, skip_special_tokens=True)
        return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=completions, texts=texts,
                       finished=finished)

    def _forward(self, cache, **inputs):
        out = self.model(use_cache=True, **{self._cache_arg: cache}, **inputs)
        return out.logits[:, -1], getattr(out, self._cache_arg)

    def _sample(self, prompts: list[list[int]], sampling: SamplingConfig, device) -> torch.Tensor:
        """``[rows, steps]`` sampled tokens (after a row's eos: whatever was sampled, cut by the caller)."""
        rows, ids, mask, positions = distinct_left_padded(prompts, self.tokenizer.pad_token_id, device)
        logits, cache = self._forward(None, input_ids=ids, attention_mask=mask, position_ids=positions,
                                      **self._keep_last)
        if ids.shape[0] < len(prompts):
            cache.batch_select_indices(rows)
        logits, mask, position = logits[rows], mask[rows], positions[rows, -1:]
        eos = self.tokenizer.eos_token_id
        # Under FSDP every rank must run as many forwards as the others (each all-gathers the weights): no early
        # stop and no dropped rows.
        stop_early = eos is not None and not is_sharded(self.model)
        sampled = torch.full((len(prompts), sampling.max_new_tokens), -1 if eos is None else eos, device=device)
        active = torch.arange(len(prompts), device=device)  # the rows in the cache, in its order
        ended = torch.zeros(len(prompts), dtype=torch.bool, device=device)  # which of them have sampled eos
        for step in range(sampling.max_new_tokens):
            token = next_tokens(logits, sampling)
            sampled[active, step] = token
            if step + 1 == sampling.max_new_tokens:
                break
            if stop_early:
                ended |= token == eos
                if bool(ended.all()):
                    break
                # Rows past their eos leave the batch once they are a quarter of it: each later step then costs
                # less than the copy of the cache's remaining rows.
                if 4 * int(ended.sum()) >= len(active):
                    keep = (~ended).nonzero().squeeze(1)
                    cache.batch_select_indices(keep)
                    active, token, mask, position = active[keep], token[keep], mask[keep], position[keep]
                    ended = ended[keep]
            mask = torch.cat([mask, mask.new_ones((mask.shape[0], 1))], dim=1)
            position = position + 1
            logits, cache = self._forward(cache, input_ids=token[:, None], attention_mask=mask, position_ids=position)
        return sampled[:, :step + 1]
