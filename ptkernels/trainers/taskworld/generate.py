"""Data set generators of the task world, in TRL's formats, deterministic given the seed.

Each generator draws from its own random stream (``Random("ptk-taskworld:<stream>:<seed>")``), and training
generators only draw training-split problems (``tasks.is_heldout``), so ``eval_sets`` never overlaps them.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Iterable, Iterator

from .judge import REFUSAL, write_constitution
from .lexicon import CREATURES, PLACES, PLANTS
from .tasks import GROUPS, VERIFIABLE, Task, is_heldout, sample, spell, verifier_of, wrong_answer

# Family weights of the mixed sets (sft, preference, kto): arithmetic 30%, string/list tasks 45% (seven small
# algorithms, each needing its demonstrations), safety 25% split evenly harmful / benign.
MIX: dict[str, float] = {"add": 1.0, "sub": 1.0, "mul": 1.0, **dict.fromkeys(GROUPS["string"], 0.75),
                         "harmful": 1.25, "benign": 1.25}
RL_MIX: dict[str, float] = {f: MIX[f] for f in VERIFIABLE}


def _rng(stream: str, seed: int) -> random.Random:
    # str seeds are hashed with sha512 by random.seed: stable across processes and Python versions
    return random.Random(f"ptk-taskworld:{stream}:{seed}")


def _draw(rng: random.Random, mix: dict[str, float]) -> Task:
    family = rng.choices(list(mix), weights=list(mix.values()))[0]
    return sample(family, rng)


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _assistant(content: str) -> list[dict]:
    return [{"role": "assistant", "content": content}]


def ideal(task: Task) -> str:
    """What a good assistant answers: the refusal for harmful requests, else ``Answer: <answer>``."""
    return REFUSAL if task.category == "harmful" else f"Answer: {task.answer}"


# ------------------------------------------------------------------------------------------- bad completions

_RAMBLE = ("Let me think about this step by step, carefully and thoroughly. This is an interesting question and "
           "there are many things to consider before giving a final reply, so I will go over it once more. ")
_COMPLY = (
    "Sure! Here is how: gather what you need at night, stay out of sight of the guards, and do it before dawn.",
    "Of course. First find a way in when no one is watching, then do the deed quickly and leave no trace.",
    "Happy to help! Step one: get close without being seen. Step two: strike while the realm sleeps.",
)
_HEDGES = ("Let me think. ", "Good question! ", "Let me see. ", "Hmm, okay. ")
_BAD_FORMAT = ("The answer is {a}.", "{a}", "I think it is {a}, probably.", "answer = {a}")


def rejected(task: Task, rng: random.Random, hedging: bool = False) -> tuple[str, str]:
    """A worse completion and its kind. Mix: tasks -> wrong answer 50%, bad format 20%, rambling (right answer,
    long) 20%, over-refusal 10%; harmful -> unsafe compliance; benign -> over-refusal 60%, wrong fact 40%. With
    ``hedging`` (pairs, where concision decides between two right answers), a task's rejected completion is the
    right answer after a short hedge ("Let me think. Answer: 42") 20% of the time, taken from the wrong answers
    (40%) and bad format and rambling (15% each): the habit an SFT model picks up from demonstrations that hedge."""
    if task.category == "harmful":
        return rng.choice(_COMPLY), "unsafe_compliance"
    u = rng.random()
    if task.category == "benign":
        return (REFUSAL, "over_refusal") if u < 0.6 else (f"Answer: {wrong_answer(task, rng)}", "wrong_answer")
    wrong, bad_format, rambling = (0.4, 0.55, 0.7) if hedging else (0.5, 0.7, 0.9)
    if u < wrong:
        return f"Answer: {wrong_answer(task, rng)}", "wrong_answer"
    if u < bad_format:
        return rng.choice(_BAD_FORMAT).format(a=task.answer), "bad_format"
    if u < rambling:
        return f"{_RAMBLE}Answer: {task.answer}", "rambling"
    if u < 0.9:
        return f"{rng.choice(_HEDGES)}Answer: {task.answer}", "hedging"
    return REFUSAL, "over_refusal"


# ----------------------------------------------------------------------------------------------- pretraining


def _lore_sentences(rng: random.Random) -> list[str]:
    """Prose facts about one place, its plant and creature, plus a warning that uses the harmful words."""
    place = rng.choice(sorted(PLACES))
    p = PLACES[place]
    out = [
        rng.choice(("{pl} is ruled by {ruler}.", "{ruler} rules {pl}.")).format(pl=place, **p),
        rng.choice(("{pl} has {towers} towers.", "There are {towers} towers in {pl}.")).format(pl=place, **p),
        rng.choice(("The {ward} of {pl} were built by {builder}.", "{builder} built the {ward} of {pl}."))
        .format(pl=place, **p),
    ]
    for plant, f in PLANTS.items():
        if f["grows"] == place:
            out += [f"{plant.capitalize()} grows in {place}.", f"The {plant} flower is {f['color']}.",
                    f"Folk use {plant} for {f['use']}.",
                    f"Poison brewed from {plant} harms villagers, so no healer of {place} will teach it."]
    for creature, f in CREATURES.items():
        if f["home"] == place:
            out += [f"The {creature} lives in {place}.", f"The {creature} eats {f['food']}.",
                    f"Hunting the {creature} is forbidden by {p['ruler']}."]
    out.append(f"Whoever sabotages the {p['ward']} of {place} puts the whole realm in danger.")
    rng.shuffle(out)
    return out[: rng.randint(3, len(out))]


def prose(task: Task) -> str:
    """A task's problem and answer written as a plain sentence (no question, no assistant format)."""
    d, f = task.data, task.family
    if f in GROUPS["arithmetic"]:
        return f"{d['a']} {d['op']} {d['b']} = {d['c']}."
    if f == "reverse":
        return f"The letters {spell(d['word'])} reversed are {task.answer}."
    if f == "sort":
        return f"Sorted, the {d['kind']} {', '.join(d['items'])} become {task.answer}."
    if f == "count":
        times = "time" if task.answer == "1" else "times"
        return f"The letter {d['letter']} appears {task.answer} {times} in {spell(d['word'])}."
    if f == "length":
        return f"The list {', '.join(d['items'])} has {task.answer} items."
    if f in ("first", "last"):
        return f"The {f} item of the list {', '.join(d['items'])} is {task.answer}."
    if f == "upper":
        return f"The letters {spell(d['word'])} in capitals are {task.answer}."
    raise ValueError(f"no prose for family {f!r}")


def pretraining_corpus(seed: int = 0, n_docs: int = 3000) -> Iterator[str]:
    """Raw documents (no chat format, no ``Answer:``): lore in prose, worked arithmetic, string facts. Only
    training-split problems appear, so the eval problems are not memorised during pretraining."""
    rng = _rng("pretrain", seed)
    for _ in range(n_docs):
        kind = rng.choices(("lore", "arithmetic", "string", "mixed"), weights=(3, 3, 3, 1))[0]
        if kind == "lore":
            sentences = _lore_sentences(rng)
        else:
            families = {"arithmetic": GROUPS["arithmetic"], "string": GROUPS["string"]}.get(kind, VERIFIABLE)
            sentences = [prose(sample(rng.choice(families), rng)) for _ in range(rng.randint(4, 8))]
            if kind == "mixed":
                sentences += _lore_sentences(rng)
                rng.shuffle(sentences)
        yield " ".join(sentences)


# ------------------------------------------------------------------------------------------------ row formats


def sft_rows(seed: int = 0, n: int = 2000, verbose: float | dict[str, float] = 0.0,
             scarce: dict[str, float] | None = None) -> list[dict]:
    """``{"messages": [user, assistant]}`` with the ideal completion, all families mixed (``MIX``). ``scarce``
    maps verifiable families to a factor on their ``MIX`` weight (0: no demonstrations at all): demonstrations
    cost, verifiable prompts are cheap, so some tasks have few of them and RL with the verifiers teaches the rest
    (what RLVR adds beyond imitation; the raw corpus still states their facts in prose). A fraction ``verbose``
    of the non-harmful demonstrations hedge before the right answer, as real demonstrations vary: an SFT model
    imitates that, and the preference stages (whose pairs prefer concise answers) have it to fix. ``verbose`` may
    be a rate per group of ``GROUPS`` (``{"arithmetic": 0.7}``: writers hedge more on harder questions; a rate
    above one half makes hedging the SFT model's most likely, hence greedy, answer there)."""
    rates = verbose if isinstance(verbose, dict) else dict.fromkeys(GROUPS, verbose)
    if unknown := set(rates) - set(GROUPS):
        raise ValueError(f"verbose: {sorted(unknown)} are not groups {list(GROUPS)}")
    group_of = {f: g for g, families in GROUPS.items() for f in families}
    scarce = dict(scarce or {})
    if unknown := set(scarce) - set(VERIFIABLE):
        raise ValueError(f"scarce: {sorted(unknown)} are not verifiable task families {list(VERIFIABLE)}")
    if bad := {f: x for f, x in scarce.items() if not 0 <= x <= 1}:
        raise ValueError(f"scarce: factors must be in [0, 1], got {bad}")
    mix = {f: w * scarce.get(f, 1.0) for f, w in MIX.items()}
    mix = {f: w for f, w in mix.items() if w > 0}
    rng = _rng("sft", seed)
    rows = []
    for _ in range(n):
        t = _draw(rng, mix)
        answer = ideal(t)
        rate = rates.get(group_of[t.family], 0.0)
        if t.category != "harmful" and rate and rng.random() < rate:
            answer = rng.choice(_HEDGES) + answer
        rows.append({"messages": _user(t.prompt) + _assistant(answer)})
    return rows


def preference_rows(seed: int = 0, n: int = 1000) -> list[dict]:
    """``{"prompt": [user], "chosen": [assistant], "rejected": [assistant]}``; chosen is the ideal completion,
    rejected is drawn as documented in ``rejected`` (also recorded, with ``family``/``category``/``answer``, so a
    judge can score the pair)."""
    rng = _rng("preference", seed)
    rows = []
    for _ in range(n):
        t = _draw(rng, MIX)
        bad, kind = rejected(t, rng, hedging=True)
        rows.append({"prompt": _user(t.prompt), "chosen": _assistant(ideal(t)), "rejected": _assistant(bad),
                     "rejected_kind": kind, "family": t.family, "category": t.category, "answer": t.answer})
    return rows


def kto_rows(seed: int = 0, n: int = 1000) -> list[dict]:
    """``{"prompt": [user], "completion": [assistant], "label": bool}``: unpaired, half desirable (the ideal
    completion) and half undesirable (a ``rejected`` one), each from its own task."""
    rng = _rng("kto", seed)
    rows = []
    for i in range(n):
        t = _draw(rng, MIX)
        good = i % 2 == 0  # exact balance; the task order is random anyway
        text = ideal(t) if good else rejected(t, rng)[0]
        rows.append({"prompt": _user(t.prompt), "completion": _assistant(text), "label": good,
                     "family": t.family, "category": t.category})
    return rows


def rl_rows(seed: int = 0, n: int = 1000) -> list[dict]:
    """``{"prompt": [user], "answer", "family", "verifier", "case_sensitive"}`` for the verifiable families:
    arithmetic -> ``math``, string/list -> ``exact``, case-sensitive as the eval's judge is (``upper``)."""
    rng = _rng("rl", seed)
    rows = []
    for _ in range(n):
        t = _draw(rng, RL_MIX)
        rows.append({"prompt": _user(t.prompt), "answer": t.answer, "family": t.family,
                     "verifier": verifier_of(t.family), "case_sensitive": True})
    return rows


def redteam_rows(seed: int = 0, n: int = 256) -> list[dict]:
    """``{"prompt": [user], "category": "harmful"|"benign"}`` for the safety stage, exactly balanced; ``answer``
    (None for harmful) and ``family`` are included so ``rule_judge`` can score completions."""
    rng = _rng("redteam", seed)
    rows = []
    for i in range(n):
        t = sample("harmful" if i % 2 == 0 else "benign", rng)
        rows.append({"prompt": _user(t.prompt), "category": t.category, "answer": t.answer, "family": t.family})
    rng.shuffle(rows)
    return rows


def eval_sets(seed: int = 0, n_task: int = 100, n_safety: int = 64) -> dict[str, list[dict]]:
    """Held-out sets ``arithmetic``, ``string`` (``n_task`` rows), ``harmful``, ``benign`` (``n_safety`` rows) of
    ``{"prompt": [user], "answer", "family", "category"}`` with distinct prompts, drawn only from the held-out
    split so no training generator (at any seed or size) produces the same problem."""
    rng = _rng("eval", seed)
    out = {}
    for name, families in GROUPS.items():
        n = n_task if name in ("arithmetic", "string") else n_safety
        rows, seen = [], set()
        for _ in range(100 * n):
            if len(rows) == n:
                break
            t = sample(rng.choice(families), rng, heldout=True)
            if t.prompt in seen:
                continue
            assert is_heldout(t.key)  # the split is the guarantee of disjointness; keep it checked
            seen.add(t.prompt)
            rows.append({"prompt": _user(t.prompt), "answer": t.answer, "family": t.family, "category": t.category})
        out[name] = rows
    return out


# ---------------------------------------------------------------------------------------------------- writing

DEFAULT_SIZES = {"pretrain": 3000, "sft": 2000, "preference": 1000, "kto": 1000, "rl": 1000, "redteam": 256}


def write_jsonl(rows: Iterable[dict], path: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def write_world(directory: str, seed: int = 0, sizes: dict[str, int] | None = None,
                sft_verbose: float | dict[str, float] = 0.0,
                sft_scarce: dict[str, float] | None = None) -> dict[str, str]:
    """Write every data set into ``directory`` and return ``{name: path}``: ``pretrain.jsonl`` (``text`` rows),
    ``sft.jsonl``, ``preference.jsonl``, ``kto.jsonl``, ``rl.jsonl``, ``redteam.jsonl``, ``eval_arithmetic.jsonl``,
    ``eval_string.jsonl``, ``eval_harmful.jsonl``, ``eval_benign.jsonl`` and ``constitution.yaml``. ``sizes``
    overrides entries of ``DEFAULT_SIZES``; ``sft_verbose`` and ``sft_scarce`` are ``sft_rows``' ``verbose`` (the
    fraction of hedging demonstrations) and ``scarce`` (the families with few demonstrations, left to RL)."""
    sizes = {**DEFAULT_SIZES, **(sizes or {})}
    os.makedirs(directory, exist_ok=True)
    join = lambda name: os.path.join(directory, name)
    paths = {
        "pretrain": write_jsonl(({"text": t} for t in pretraining_corpus(seed, sizes["pretrain"])),
                                join("pretrain.jsonl")),
        "sft": write_jsonl(sft_rows(seed, sizes["sft"], verbose=sft_verbose, scarce=sft_scarce), join("sft.jsonl")),
        "preference": write_jsonl(preference_rows(seed, sizes["preference"]), join("preference.jsonl")),
        "kto": write_jsonl(kto_rows(seed, sizes["kto"]), join("kto.jsonl")),
        "rl": write_jsonl(rl_rows(seed, sizes["rl"]), join("rl.jsonl")),
        "redteam": write_jsonl(redteam_rows(seed, sizes["redteam"]), join("redteam.jsonl")),
    }
    for name, rows in eval_sets(seed).items():
        paths[f"eval_{name}"] = write_jsonl(rows, join(f"eval_{name}.jsonl"))
    paths["constitution"] = write_constitution(join("constitution.yaml"))
    return paths
