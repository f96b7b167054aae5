"""Reward functions for GRPO and PPO with TRL's signature, and the check of every row's fields before training.

A reward function is called once per rollout as TRL's ``GRPOTrainer`` calls its ``reward_funcs``::

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], trainer_state=..., log_extra=...,
       log_metric=..., **row_fields) -> list[float | None]   (or a 1-D numpy array / torch tensor)

one entry per completion; each data field other than ``prompt``, ``completion`` and ``completion_ids`` comes as a
list over the batch (``answer=[...]``, ``None`` where a row lacks it). A completion is a string, or
``[{"role": "assistant", "content": ...}]`` when the prompt is a conversation. ``None`` (or NaN, as in TRL) means
"cannot score this one": the weighted sum skips it, and a completion that no function scores is unscorable (GRPO
gives it advantage 0, PPO leaves it out of the loss). ``trainer_state`` is a ``transformers.TrainerState``
(``global_step``: the optimizer steps done before this rollout, ``max_steps``, ``epoch``), ``log_metric(name,
value)`` adds ``name`` (its mean over the rollout) to metrics.jsonl, and ``log_extra(column, values)`` is accepted
(TRL's completions-table columns; ptk keeps no such table). A function gets only the arguments its signature
names, unless it takes ``**kwargs``. ``async def`` functions run concurrently on an event loop in a daemon
thread, after the others (as TRL 1.16 runs them). Each function is keyed by its position: two functions of the
same name are two columns of GRPO's reward matrix, logged as ``reward_<name>`` and ``reward_<name>_2``.

``--reward-funcs`` is a comma-separated list of:
    math, format, exact, fact, code, row   the built-in verifiers (``rewards.verifiers``; ``row``: each row's
                                           ``verifier`` field)
    my_module:my_fn, path/to/file.py:fn    a Python function (the module is imported from the working directory; a
                                           file with its folder on ``sys.path``, as Python runs a script)
    path/to/folder                         a reward model (``AutoModelForSequenceClassification`` with one output,
                                           e.g. from ``ptk reward``), scoring prompt + completion as text
with ``--reward-weights`` (one per function; default 1 each). Functions run in the trainer's process: they are the
user's own code, as in TRL; the built-in ``code`` verifier runs model output only in its sandbox.
"""

from __future__ import annotations

import asyncio
import functools
import importlib
import importlib.util
import inspect
import math as _math
import os
import sys
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

from .gold import GOLD_FIELDS, final_gold_answer, has_gold
from .verifiers import VERIFIERS, get_verifier, parse_number

__all__ = ["RewardFuncs", "builtin_reward", "load_reward_func", "check_rows", "auto_verifier", "required_fields",
           "make_trainer_state"]

# the arguments every reward function is given (TRL 1.16's _calculate_rewards), which are not data fields
CALL_ARGS = ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric")
# the data columns that are not passed (TRL's rule: the prompt, the data set's own completion and completion_ids)
NOT_PASSED = ("prompt", "completion", "completion_ids")
# a data column of one of these names would reach a user function twice (TRL: "got multiple values for keyword
# argument") or be replaced by the trainer's object: refused before any model loads
RESERVED_COLUMNS = tuple(a for a in CALL_ARGS if a not in NOT_PASSED)


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

    user = next((f for f in funcs.funcs if f.kind == "function"), None)
    for row in rows:
        clash = [k for k in RESERVED_COLUMNS if k in row.data] if user is not None else []
        if clash:
            raise DataError(f"{row.source}: the data column {clash[0]!r} has the name of an argument every reward "
                            f"function is given ({', '.join(CALL_ARGS)}), so the reward {user.name!r} cannot get "
                            f"it: rename the column")
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
    """``module:fn`` (imported with the working directory on the path) or ``file.py:fn`` (imported with the
    file's folder first on the path, as Python runs a script, so that it imports the modules beside it; the folder
    stays on the path, last, for the imports the function makes when it runs)."""
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise RewardSpecError(f"--reward-funcs: {spec!r} is not a verifier name, a folder or module:function")
    try:
        if target.endswith(".py"):
            module = _import_file(target, spec)
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


def _import_file(target: str, spec: str):
    if not os.path.isfile(target):
        raise RewardSpecError(f"--reward-funcs: no such file {target!r} (in {spec!r})")
    path = os.path.abspath(target)
    folder = os.path.dirname(path)
    base = "ptk_reward_" + os.path.splitext(os.path.basename(path))[0]
    for name, loaded in list(sys.modules.items()):  # imported already (another function of the same file)
        if name.startswith(base) and os.path.abspath(getattr(loaded, "__file__", None) or "") == path:
            return loaded
    name = _label(base, set(sys.modules))  # another folder's file of the same name: base_2, ...
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.path.insert(0, folder)
    sys.modules[name] = module  # as an import does: dataclasses and pickle look the module up there
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path.remove(folder)  # the first occurrence: the one inserted above
        if folder not in sys.path:
            sys.path.append(folder)
    return module


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
        self.label = name  # its metric name, unique among the functions (see _label)

    @property
    def params(self) -> set[str] | None:
        """The keyword arguments the function takes; None when it takes ``**kwargs`` (or has no signature)."""
        try:
            params = inspect.signature(self.fn).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind == p.VAR_KEYWORD for p in params):
            return None
        return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


class Scored(tuple):
    """One completion's ``(reward or None, {function label: its reward})``, with ``per_func``: each function's
    reward by position (None where it did not score)."""

    def __new__(cls, reward, parts: dict, per_func: list):
        self = super().__new__(cls, (reward, parts))
        self.per_func = per_func
        return self


def make_trainer_state(**fields):
    """TRL's ``trainer_state`` argument: a ``transformers.TrainerState`` with ``fields`` (global_step, max_steps,
    epoch, ...)."""
    from transformers import TrainerState

    return TrainerState(**fields)


def is_async_callable(fn) -> bool:
    """TRL's test: an ``async def`` function, a partial of one, or an object whose ``__call__`` is one."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(type(fn).__call__))


_ASYNC_LOOP: list = []  # the event loop async reward functions run on (in a daemon thread), started on first use


def _run_async(calls: list[tuple[Callable, dict]]) -> list:
    """The results of the async ``fn(**kwargs)`` calls, run concurrently (``asyncio.gather``) on one event loop in
    a daemon thread that lives as long as the process (TRL 1.16's way: a client made by a function stays usable)."""
    if not _ASYNC_LOOP:
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(loop)
            loop.call_soon(ready.set)
            loop.run_forever()

        threading.Thread(target=run, name="ptk-reward-funcs-async", daemon=True).start()
        ready.wait()
        _ASYNC_LOOP.append(loop)

    async def gather():
        return await asyncio.gather(*(fn(**kwargs) for fn, kwargs in calls))

    return asyncio.run_coroutine_threadsafe(gather(), _ASYNC_LOOP[0]).result()


class RewardFuncs:
    """Weighted reward functions: ``score(rows, completions, completion_ids)`` -> per completion ``(reward or
    None, {function label: its reward})`` (a ``Scored``, with each function's reward by position in ``per_func``).
    The reward is the weighted sum over the functions that scored the completion (TRL's nansum); None when none
    did."""

    def __init__(self, specs: str | Sequence[str], weights: str | Sequence[float] | None = None, *,
                 trust_remote_code: bool = False, device="cpu", unsafe_code_sandbox: bool = False):
        if isinstance(specs, str):
            specs = [s.strip() for s in specs.split(",") if s.strip()]
        if not specs:
            raise RewardSpecError("--reward-funcs is empty")
        funcs = []
        for s in specs:
            if s in VERIFIERS or s == "row":
                funcs.append(_Func(s, builtin_reward(s, unsafe_code_sandbox=unsafe_code_sandbox), "builtin", [s]))
            elif os.path.isdir(s):
                funcs.append(_Func(s, None, "model"))  # loaded by load_models(), after the data checks
            elif ":" in s:
                funcs.append(_Func(s, load_reward_func(s), "function"))
            else:
                raise RewardSpecError(f"--reward-funcs: {s!r} is not a verifier ({', '.join(sorted(VERIFIERS))}, "
                                      "row), a reward model folder or module:function")
        if isinstance(weights, str):
            try:
                weights = [float(w) for w in weights.split(",") if w.strip()]
            except ValueError as e:
                raise RewardSpecError(f"--reward-weights: {e}") from None
        self._setup(funcs, [1.0] * len(funcs) if not weights else [float(w) for w in weights], unsafe_code_sandbox)
        if len(self.weights) != len(self.funcs):
            raise RewardSpecError(f"--reward-weights: {len(self.weights)} weights for {len(self.funcs)} reward "
                                  "functions")
        if not all(_math.isfinite(w) for w in self.weights):
            raise RewardSpecError(f"--reward-weights must be finite, got {self.weights}")
        self.trust_remote_code, self.device = trust_remote_code, device

    def _setup(self, funcs: list[_Func], weights: list[float], unsafe: bool) -> None:
        self.funcs, self.weights, self.unsafe = funcs, weights, unsafe
        self.trust_remote_code, self.device = False, "cpu"
        self.parts_of_spec = []
        self.trainer_state = None  # the last one given to score(): what an evaluation between rollouts sees
        self.logged: dict[str, list[float]] = {}  # log_metric's values since pop_logged()
        taken = {"std"}  # reward_std is a metric of its own
        for f in funcs:
            f.label = _label(_short(f), taken)
            taken.add(f.label)

    @classmethod
    def from_verifier(cls, spec: str, *, unsafe_code_sandbox: bool = False) -> RewardFuncs:
        """``--verifier`` (``math``, ``math,format`` with equal weights, ``math:0.8,format:0.2``) as one function."""
        parts = [p.split(":")[0].strip() for p in spec.split(",") if p.strip()]
        self = cls.__new__(cls)
        if spec != "row":
            get_verifier(spec)  # an unknown name fails here, before anything loads
        self._setup([_Func(spec, builtin_reward(spec, unsafe_code_sandbox=unsafe_code_sandbox), "builtin", parts)],
                    [1.0], unsafe_code_sandbox)
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
        """Each function's metric name, in order (unique: a clash gets ``_2``, ``_3``, ...)."""
        return [f.label for f in self.funcs]

    def log_metric(self, name: str, value: float) -> None:
        """TRL's ``log_metric`` argument: ``value`` joins metric ``name`` (its mean over the rollout is logged)."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"log_metric: the metric name must be a non-empty string, got {name!r}")
        try:
            value = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"log_metric({name!r}, ...): the value must be a number, got {value!r}") from None
        self.logged.setdefault(name, []).append(value)

    def log_extra(self, column: str, values: list) -> None:
        """TRL's ``log_extra`` argument (columns of its completions table): accepted; ptk keeps no such table."""

    def pop_logged(self) -> dict[str, list[float]]:
        """The values given to ``log_metric`` since the last call, by name."""
        logged, self.logged = self.logged, {}
        return logged

    def score(self, rows, completions: list, completion_ids: list[list[int]] | None = None, trainer_state=None):
        """Per completion: (weighted reward or None, {label: reward of each function that scored it}), as a
        ``Scored``. ``trainer_state``: what the functions get as ``trainer_state`` (kept for the next calls)."""
        if trainer_state is not None:
            self.trainer_state = trainer_state
        elif self.trainer_state is None:
            self.trainer_state = make_trainer_state()
        prompts = [r.data.get("prompt") for r in rows]
        keys = sorted({k for r in rows for k in r.data} - set(NOT_PASSED))
        fields = {k: [r.data.get(k) for r in rows] for k in keys}
        if any(isinstance(p, list) for p in prompts):  # TRL: conversational completions are message lists
            completions = [[{"role": "assistant", "content": c}] if isinstance(c, str) else c for c in completions]
        per_func = self._call(prompts, completions, completion_ids, fields)
        return [self._combine(i, rows, completions, [values[i] for values in per_func])
                for i in range(len(completions))]

    def _call(self, prompts, completions, completion_ids, fields) -> list[list]:
        """Each function's checked rewards, by position: the synchronous ones in order, then the async ones
        together (TRL 1.16). A user function gets the arguments its signature takes (all with ``**kwargs``)."""
        n = len(completions)
        given = {"prompts": prompts, "completions": completions, "completion_ids": completion_ids}
        data = {k: v for k, v in fields.items() if k not in CALL_ARGS}
        extras = {"trainer_state": self.trainer_state, "log_extra": self.log_extra, "log_metric": self.log_metric}
        out, pending = [None] * len(self.funcs), []
        for i, f in enumerate(self.funcs):
            if f.kind != "function":  # ours: the data fields only
                out[i] = _checked(f.fn(**given, **data), n, f.name)
                continue
            kwargs = {**fields, **given, **extras}
            params = f.params
            if params is not None:
                kwargs = {k: v for k, v in kwargs.items() if k in params}
            if is_async_callable(f.fn):
                pending.append((i, f, kwargs))
            else:
                out[i] = _checked(f.fn(**kwargs), n, f.name)
        if pending:
            results = _run_async([(f.fn, kwargs) for _, f, kwargs in pending])
            for (i, f, _), values in zip(pending, results):
                out[i] = _checked(values, n, f.name)
        return out

    def _combine(self, i: int, rows, completions, values: list) -> Scored:
        parts, total, any_scored = {}, 0.0, False
        for f, w, v in zip(self.funcs, self.weights, values):
            if v is not None:
                # with --verifier row alone, each row's reward is logged under its verifier's name
                alone_row = f.kind == "builtin" and f.name == "row" and len(self.funcs) == 1
                parts[rows[i].data.get("verifier", "row") if alone_row else f.label] = v
                total += w * v
                any_scored = True
        if len(self.funcs) == 1 and self.parts_of_spec:  # --verifier math,format
            row, text = rows[i].data, _text(completions[i])
            parts = {n: get_verifier(n, unsafe_code_sandbox=self.unsafe)(text, row) for n in self.parts_of_spec}
        return Scored(total if any_scored else None, parts, values)


def _short(f: _Func) -> str:
    if f.kind == "function":
        return f.name.rpartition(":")[2]
    if f.kind == "model":
        return os.path.basename(os.path.normpath(f.name))
    return f.name


def _label(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... when another function (or a metric) has it."""
    label, k = name, 1
    while label in taken:
        k += 1
        label = f"{name}_{k}"
    return label


def _checked(values, n: int, name: str) -> list:
    """A function's rewards as floats or None: a list or tuple, or a 1-D numpy array / torch tensor (TRL accepts
    both); NaN is None (TRL's NaN is its None)."""
    shape = getattr(values, "shape", None)
    if shape is not None and hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        if len(shape) != 1:
            raise ValueError(f"reward function {name!r} must return {n} rewards, got an array of shape "
                             f"{tuple(shape)}")
        values = values.tolist()
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
        if _math.isnan(v):
            v = None
        elif not _math.isfinite(v):
            raise ValueError(f"reward function {name!r} returned {v}; return None (or NaN) for a completion it "
                             "cannot score")
        out.append(v)
    return out
