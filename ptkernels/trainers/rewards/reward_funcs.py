"""Reward functions for GRPO and PPO with TRL's signature, and the check of every row's fields before training.

A reward function is called once per rollout as TRL's ``GRPOTrainer`` calls its ``reward_funcs``::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], **row_fields) -> list[float | None]

one entry per completion; each data field other than the prompt comes as a list over the batch (``answer=[...]``,
``None`` where a row lacks it). A completion is a string, or ``[{"role": "assistant", "content": ...}]`` when the
prompt is a conversation. ``None`` means "cannot score this one" (TRL's convention): the weighted sum skips it,
and a completion that no function scores is unscorable (GRPO gives it advantage 0, PPO leaves it out of the loss).

``--reward-funcs`` is a comma-separated list of:
    math, format, exact, fact, code, row   the built-in verifiers (``rewards.verifiers``; ``row``: each row's
                                           ``verifier`` field)
    my_module:my_fn, path/to/file.py:fn    a Python function (the module is imported from the working directory)
    path/to/folder                         a reward model (``AutoModelForSequenceClassification`` with one output,
                                           e.g. from ``ptk reward``), scoring prompt + completion as text
with ``--reward-weights`` (one per function; default 1 each). Functions run in the trainer's process: they are the
user's own code, as in TRL; the built-in ``code`` verifier runs model output only in its sandbox.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math as _math
import os
import sys
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .gold import GOLD_FIELDS, final_gold_answer, has_gold
from .verifiers import VERIFIERS, get_verifier, parse_number

__all__ = ["RewardFuncs", "builtin_reward", "load_reward_func", "check_rows", "auto_verifier", "required_fields"]

# the arguments every reward function is given, which are not data fields
CALL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state")


class RewardSpecError(ValueError):
    """A bad --reward-funcs / --reward-weights / --verifier value."""


# ----------------------------------------------------------------------------------------------- field checks
def _gold_problem(row: dict) -> str | None:
    if has_gold(row):
        return None
    return f"a gold answer (one of the fields {', '.join(repr(k) for k in GOLD_FIELDS)})"


def _missing_for(name: str, row: dict) -> str | None:
    """What ``row`` lacks for built-in verifier ``name`` (None when it has everything)."""
    if name in ("math", "exact"):
        return _gold_problem(row)
    if name == "fact":
        return None if ("facts" in row and "fact_key" in row) else _gold_problem(row)
    if name == "code":
        return None if "tests" in row else "a 'tests' field (an assert string or a list of them)"
    if name == "row":
        v = row.get("verifier")
        if not isinstance(v, str):
            return "a 'verifier' field naming its verifier (--verifier row)"
        try:
            get_verifier(v)
        except ValueError as e:
            return f"a valid 'verifier' field ({e})"
        for part in [p.split(":")[0].strip() for p in v.split(",") if p.strip()]:
            missing = _missing_for(part, row)
            if missing:
                return f"{missing} for its verifier {v!r}"
    return None


def required_fields(fn: Callable) -> list[str]:
    """The data fields a user function names as parameters without a default (TRL passes them by name)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return []
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is p.empty and p.name not in CALL_ARGS]


def check_rows(rows, funcs: RewardFuncs) -> None:
    """Every row has the fields each reward function reads; a ``DataError`` naming the row's ``file:line``
    otherwise. Called before any model loads."""
    from ..data.rows import DataError

    for row in rows:
        for f in funcs.funcs:
            missing = None
            if f.kind == "builtin":
                missing = next((m for p in f.parts if (m := _missing_for(p, row.data))), None)
            elif f.kind == "function":
                absent = [k for k in required_fields(f.fn) if k not in row.data]
                missing = f"the field(s) {absent} (parameters of the function)" if absent else None
            if missing:
                raise DataError(f"{row.source}: the reward {f.name!r} needs {missing}; the row has fields "
                                f"{sorted(row.data)}")


def auto_verifier(rows) -> str:
    """The verifier the data supports (``--verifier auto``): ``row`` when every row names its verifier, ``code``
    when rows carry ``tests``, ``math`` when the gold answers are numbers (GSM8K, MATH), else ``fact``."""
    from ..data.rows import DataError

    data = [r.data for r in rows]
    if all(isinstance(d.get("verifier"), str) for d in data):
        return "row"
    if any("tests" in d for d in data):
        return "code"
    golds = [d for d in data if has_gold(d)]
    if not golds:
        raise DataError(f"{rows[0].source}: no verifier fits the data: give rows a 'verifier' field, 'tests', or a "
                        f"gold answer ({', '.join(GOLD_FIELDS)}), or pass --verifier / --reward-funcs (the row "
                        f"has fields {sorted(rows[0].data)})")
    numeric = 0
    for d in golds:
        g = final_gold_answer(next(d[k] for k in GOLD_FIELDS if k in d and d[k] is not None))
        g = g[0] if isinstance(g, (list, tuple)) and g else g
        numeric += parse_number(g) is not None
    return "math" if numeric * 2 >= len(golds) else "fact"


# ------------------------------------------------------------------------------------------- the functions
def _text(completion) -> str:
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return ""


def builtin_reward(name: str, *, unsafe_code_sandbox: bool = False) -> Callable:
    """A built-in verifier spec (``math``, ``math,format``, ``row``) as a TRL-style reward function. Completions
    are scored on a thread pool: a code reward waits on sandboxed processes, not on this one."""
    fixed = None if name == "row" else get_verifier(name, unsafe_code_sandbox=unsafe_code_sandbox)

    def one(i, completion, fields):
        row = {k: v[i] for k, v in fields.items() if v[i] is not None}
        fn = fixed or get_verifier(row["verifier"], unsafe_code_sandbox=unsafe_code_sandbox)
        return fn(_text(completion), row)

    def reward(prompts=None, completions=(), completion_ids=None, **fields):
        if len(completions) <= 1:
            return [one(i, c, fields) for i, c in enumerate(completions)]
        with ThreadPoolExecutor(max_workers=min(len(completions), os.cpu_count() or 1)) as pool:
            return list(pool.map(lambda ic: one(ic[0], ic[1], fields), enumerate(completions)))

    reward.__name__ = name
    return reward


def load_reward_func(spec: str) -> Callable:
    """``module:fn`` (imported with the working directory on the path) or ``file.py:fn``."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSpecError(f"--reward-funcs: {spec!r} is not a verifier name, a folder or module:function")
    try:
        if target.endswith(".py"):
            if not os.path.isfile(target):
                raise RewardSpecError(f"--reward-funcs: no such file {target!r} (in {spec!r})")
            name = "ptk_reward_" + os.path.splitext(os.path.basename(target))[0]
            module_spec = importlib.util.spec_from_file_location(name, target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:  # the `ptk` script does not put it there
                sys.path.append(os.getcwd())
            module = importlib.import_module(target)
    except ImportError as e:
        raise RewardSpecError(f"--reward-funcs: cannot import {target!r} (in {spec!r}): {e}") from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSpecError(f"--reward-funcs: {target!r} has no function {attr!r} (in {spec!r})")
    return fn


class RewardModelFunc:
    """A reward model folder as a reward function: the model's score of prompt + completion (the chat template
    with the completion as the assistant's turn for conversations, the concatenated text otherwise)."""

    def __init__(self, folder: str, *, trust_remote_code: bool = False, device="cpu", batch_size: int = 16):
        from ..modeling import load_sequence_classifier

        self.folder, self.batch_size, self.device = folder, batch_size, device
        self.model, self.tokenizer = load_sequence_classifier(folder, trust_remote_code=trust_remote_code)
        self.model = self.model.requires_grad_(False).to(device).eval()
        self.__name__ = os.path.basename(os.path.normpath(folder))

    def _render(self, prompt, completion) -> str:
        if isinstance(prompt, list):
            messages = list(prompt) + (completion if isinstance(completion, list) else
                                       [{"role": "assistant", "content": completion}])
            return self.tokenizer.apply_chat_template(messages, tokenize=False)
        return str(prompt) + _text(completion)

    def __call__(self, prompts=None, completions=(), completion_ids=None, **fields):
        import torch

        texts = [self._render(p, c) for p, c in zip(prompts, completions)]
        scores = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     add_special_tokens=False).to(self.device)
                logits = self.model(**enc, use_cache=False).logits
                scores += logits[:, 0].float().tolist()
        return scores


class _Func:
    def __init__(self, name: str, fn: Callable, kind: str, parts: Sequence[str] = ()):
        self.name, self.fn, self.kind, self.parts = name, fn, kind, list(parts)


class RewardFuncs:
    """Weighted reward functions: ``score(rows, completions, completion_ids)`` -> per completion ``(reward or
    None, {function name: its reward})``. The reward is the weighted sum over the functions that scored the
    completion (TRL's nansum); None when none did."""

    def __init__(self, specs: str | Sequence[str], weights: str | Sequence[float] | None = None, *,
                 trust_remote_code: bool = False, device="cpu", unsafe_code_sandbox: bool = False):
        if isinstance(specs, str):
            specs = [s.strip() for s in specs.split(",") if s.strip()]
        if not specs:
            raise RewardSpecError("--reward-funcs is empty")
        self.funcs = []
        for s in specs:
            if s in VERIFIERS or s == "row":
                self.funcs.append(_Func(s, builtin_reward(s, unsafe_code_sandbox=unsafe_code_sandbox), "builtin",
                                        [s]))
            elif os.path.isdir(s):
                self.funcs.append(_Func(s, None, "model"))  # loaded by load_models(), after the data checks
            elif ":" in s:
                self.funcs.append(_Func(s, load_reward_func(s), "function"))
            else:
                raise RewardSpecError(f"--reward-funcs: {s!r} is not a verifier ({', '.join(sorted(VERIFIERS))}, "
                                      "row), a reward model folder or module:function")
        if isinstance(weights, str):
            try:
                weights = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError as e:
                raise RewardSpecError(f"--reward-weights: {e}") from None
        self.weights = [1.0] * len(self.funcs) if not weights else [float(w) for w in weights]
        if len(self.weights) != len(self.funcs):
            raise RewardSpecError(f"--reward-weights: {len(self.weights)} weights for {len(self.funcs)} reward "
                                  "functions")
        if not all(_math.isfinite(w) for w in self.weights):
            raise RewardSpecError(f"--reward-weights must be finite, got {self.weights}")
        self.trust_remote_code, self.device, self.unsafe = trust_remote_code, device, unsafe_code_sandbox
        self.parts_of_spec = []

    @classmethod
    def from_verifier(cls, spec: str, *, unsafe_code_sandbox: bool = False) -> RewardFuncs:
        """``--verifier`` (``math``, ``math,format`` with equal weights, ``math:0.8,format:0.2``) as one function."""
        parts = [p.split(":")[0].strip() for p in spec.split(",") if p.strip()]
        self = cls.__new__(cls)
        if spec != "row":
            get_verifier(spec)  # an unknown name fails here, before anything loads
        self.funcs = [_Func(spec, builtin_reward(spec, unsafe_code_sandbox=unsafe_code_sandbox), "builtin", parts)]
        self.weights, self.trust_remote_code, self.device = [1.0], False, "cpu"
        self.unsafe = unsafe_code_sandbox
        self.parts_of_spec = parts if len(parts) > 1 else []
        return self

    def require_sandbox(self, rows=()) -> None:
        """A code reward (named, or in a row's ``verifier`` field with ``row``) needs bubblewrap: without it this
        fails now, before any model loads, saying how to install it (unless --unsafe-code-sandbox)."""
        from .sandbox import require_sandbox

        names = {p for f in self.funcs if f.kind == "builtin" for p in f.parts}
        if "row" in names:
            names |= {p.split(":")[0].strip() for r in rows if isinstance(r.data.get("verifier"), str)
                      for p in r.data["verifier"].split(",")}
        if "code" in names:
            require_sandbox(unsafe=self.unsafe)

    def load_models(self, device="cpu") -> None:
        for f in self.funcs:
            if f.kind == "model" and f.fn is None:
                f.fn = RewardModelFunc(f.name, trust_remote_code=self.trust_remote_code, device=device)

    def names(self) -> list[str]:
        return [_short(f) for f in self.funcs]

    def score(self, rows, completions: list, completion_ids: list[list[int]] | None = None):
        """Per completion: (weighted reward or None, {name: reward of each function that scored it})."""
        prompts = [r.data.get("prompt") for r in rows]
        keys = sorted({k for r in rows for k in r.data} - {"prompt", "completion", "completion_ids"})
        fields = {k: [r.data.get(k) for r in rows] for k in keys}
        if any(isinstance(p, list) for p in prompts):  # TRL: conversational completions are message lists
            completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
        per_func = []
        for f in self.funcs:
            values = f.fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **fields)
            per_func.append(_checked(values, len(completions), f.name))
        out = []
        for i in range(len(completions)):
            parts, total, any_scored = {}, 0.0, False
            for f, w, values in zip(self.funcs, self.weights, per_func):
                if values[i] is not None:
                    # with --verifier row alone, each row's reward is logged under its verifier's name
                    alone_row = f.kind == "builtin" and f.name == "row" and len(self.funcs) == 1
                    name = rows[i].data.get("verifier", "row") if alone_row else _short(f)
                    parts[name] = values[i]
                    total += w * values[i]
                    any_scored = True
            if len(self.funcs) == 1 and self.parts_of_spec:  # --verifier math,format
                row = rows[i].data
                text = _text(completions[i])
                parts = {n: get_verifier(n, unsafe_code_sandbox=self.unsafe)(text, row) for n in self.parts_of_spec}
            out.append((total if any_scored else None, parts))
        return out


def _short(f: _Func) -> str:
    if f.kind == "function":
        return f.name.rpartition(":")[2]
    if f.kind == "model":
        return os.path.basename(os.path.normpath(f.name))
    return f.name


def _checked(values, n: int, name: str) -> list:
    if not isinstance(values, (list, tuple)) or len(values) != n:
        got = f"{len(values)} values" if isinstance(values, (list, tuple)) else type(values).__name__
        raise ValueError(f"reward function {name!r} must return a list of {n} floats or None, got {got}")
    out = []
    for v in values:
        if v is None:
            out.append(None)
            continue
        try:
            v = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"reward function {name!r} returned {v!r}; expected a float or None") from None
        if not _math.isfinite(v):
            raise ValueError(f"reward function {name!r} returned {v}; return None for a completion it cannot "
                             "score")
        out.append(v)
    return out
