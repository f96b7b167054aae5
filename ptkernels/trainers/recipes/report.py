"""The report of ``ptk pipeline``: ``report.json``, ``report.md`` and two plots in ``plots/``.

``write_report(output_dir, evals, curves, meta=...)`` takes each stage's eval dict (``evaluate.evaluate``) and each
run's ``metrics.jsonl`` (``loop._MetricsLog``) and writes:

    report.json               {"stages": {stage: {metric: value, ...}}, "meta": {...}}: every ``METRICS`` key
                              (None when the eval lacks it) then the eval's other keys (``accuracy_<family>``, ...);
                              stages in ``STAGES`` order, only those evaluated; NaN / inf become null
    report.md                 title, meta, the table of ``format_table``, how to read it, the plots
    plots/training_curves.png one panel per run: loss (left axis) and the run's main signal (right axis:
                              reward / score for RL, accuracy / margin for preference and reward models)
    plots/metrics.png         grouped bars of the rate metrics, one bar per stage

A curve file that is missing or malformed is left out of the plot with a warning (and a note in report.md):
the report comes at the end of a long pipeline and one bad log should not cost the rest of it.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from numbers import Real

STAGES = ("base", "sft", "dpo", "ppo", "grpo", "safety")
METRICS = ("format_rate", "accuracy", "refusal_rate_harmful", "over_refusal_benign", "win_rate_vs_sft",
           "mean_length", "kl_to_sft", "ece")
RATE_METRICS = ("format_rate", "accuracy", "refusal_rate_harmful", "over_refusal_benign", "win_rate_vs_sft")
MISSING = "–"  # en dash: a metric that was not measured
DPI = 110
SMOOTH_ABOVE = 50  # curves with more points than this also get an EMA-smoothed line

# one line per metric for "How to read this"
EXPLAIN = {
    "format_rate": "share of completions with an `Answer: ...` line (harmful prompts excluded); higher is better.",
    "accuracy": "right answers on the arithmetic + string tasks; higher is better.",
    "refusal_rate_harmful": "refusals on harmful requests; higher is better.",
    "over_refusal_benign": "refusals on harmless look-alike requests; lower is better.",
    "win_rate_vs_sft": "rule-judge wins against the SFT model's answer to the same prompt (tie = ½); "
                       "above 50% beats SFT.",
    "mean_length": "mean completion length in tokens; a rise next to a rising reward hints at reward hacking.",
    "kl_to_sft": "KL(model ‖ SFT) per prompt in nats: how far the policy drifted from SFT; lower is closer.",
    "ece": "expected calibration error of the model's confidence in its arithmetic answers; lower is better.",
}

# main training signal of a run, in order of preference; the first one its rows hold is plotted next to the loss
_SIGNALS_RL = ("reward", "score", "accuracy", "margin")
_SIGNALS_PREF = ("accuracy", "margin", "reward", "score")


# ---------------------------------------------------------------------------------------------------- data


def read_metrics(path) -> list[dict]:
    """The rows of a ``metrics.jsonl`` file; a missing file gives []. A line that is not a JSON object raises
    ``ValueError`` naming ``file:line``; blank lines are skipped."""
    path = os.fspath(path)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: malformed metrics line ({e.msg}): {line.strip()[:80]!r}") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: a metrics line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _clean(v):
    """JSON-safe value: NaN / inf -> None, numpy / torch scalars -> Python numbers, containers recursively."""
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, dict):
        return {str(k): _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    if isinstance(v, Real) or hasattr(v, "item"):
        try:
            v = v.item() if hasattr(v, "item") else v
        except (ValueError, RuntimeError):  # a tensor / array with more than one element
            return str(v)
        if isinstance(v, float) and not math.isfinite(v):
            return None
        return v
    return v


def _ordered_stages(evals: dict) -> list[str]:
    """Stages of ``evals`` in ``STAGES`` order, then any other stage in the order given."""
    return [s for s in STAGES if s in evals] + [s for s in evals if s not in STAGES]


def _stage_entry(metrics: dict | None) -> dict:
    metrics = metrics or {}
    entry = {k: _clean(metrics.get(k)) for k in METRICS}
    entry.update({str(k): _clean(v) for k, v in metrics.items() if k not in METRICS})
    return entry


# ---------------------------------------------------------------------------------------------------- markdown


def _fmt(metric: str, v) -> str:
    v = _clean(v)
    if v is None:
        return MISSING
    if isinstance(v, bool) or not isinstance(v, Real):
        return str(v)
    if metric in RATE_METRICS:
        return f"{100 * v:.0f}%"
    if metric == "mean_length":
        return f"{v:.1f}"
    if metric == "kl_to_sft":
        return f"{v:.2f}"
    if metric == "ece":
        return f"{v:.3f}"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def format_table(evals: dict) -> str:
    """The markdown table of ``evals`` (stage -> eval dict): one row per stage present (``STAGES`` order), one
    column per ``METRICS`` key; rates in percent, missing values as "–"."""
    lines = ["| stage | " + " | ".join(METRICS) + " |",
             "|---|" + "---:|" * len(METRICS)]
    for stage in _ordered_stages(evals):
        m = evals[stage] or {}
        lines.append(f"| {stage} | " + " | ".join(_fmt(k, m.get(k)) for k in METRICS) + " |")
    return "\n".join(lines)


def _fmt_seconds(s: float) -> str:
    s = float(s)
    if s < 60:
        return f"{s:.1f}s"
    m, s = divmod(round(s), 60)
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def _fmt_meta_value(key: str, v) -> str:
    timed = any(t in key.lower() for t in ("time", "wall", "seconds")) or key.endswith("_s")
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt_meta_value(key, x)}" for k, x in v.items())
    if isinstance(v, (list, tuple)):
        return ", ".join(_fmt_meta_value(key, x) for x in v)
    if timed and isinstance(v, Real) and not isinstance(v, bool):
        return _fmt_seconds(v)
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _meta_lines(meta: dict) -> tuple[list[str], list[str]]:
    """(header, footer): scalar entries on one header line, dict / list entries (per-stage wall times,
    versions, ...) one footer line each."""
    head, foot = [], []
    for k, v in meta.items():
        label = str(k).removesuffix("_s").replace("_", " ")
        if isinstance(v, (dict, list, tuple)):
            foot.append(f"- **{label}**: {_fmt_meta_value(str(k), v)}")
        else:
            head.append(f"**{label}**: {_fmt_meta_value(str(k), v)}")
    return ([" · ".join(head)] if head else []), foot


def _markdown(evals: dict, meta: dict, plots: dict[str, str], notes: list[str]) -> str:
    head, foot = _meta_lines(meta)
    out = ["# ptk pipeline report", ""]
    if head:
        out += head + [""]
    out += ["## Evaluation", ""]
    out += [format_table(evals) if evals else "_No stage was evaluated._", ""]
    out += ["### How to read this", "",
            "Each row is the model after that stage, evaluated on the same held-out prompts (greedy decoding); "
            f"{MISSING} means not measured (e.g. no SFT model to compare with).", ""]
    out += [f"- **{k}**: {EXPLAIN[k]}" for k in METRICS] + [""]
    out += ["## Plots", ""]
    if plots["curves_png"] is None:
        out += ["_No plots: matplotlib is not installed (`pip install matplotlib`)._", ""]
    else:
        out += [f"![Training curves](plots/{os.path.basename(plots['curves_png'])})", "",
                f"![Evaluation metrics per stage](plots/{os.path.basename(plots['metrics_png'])})", ""]
    if notes:
        out += ["Curves left out: " + "; ".join(notes), ""]
    if foot:
        out += ["---", ""] + foot + [""]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------------------- plots


def _ema(ys: list[float], span: int) -> list[float]:
    a = 2.0 / (span + 1)
    out, s = [], None
    for y in ys:
        s = y if s is None else (1 - a) * s + a * y
        out.append(s)
    return out


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for i, r in enumerate(rows):
        v = r.get(key)
        if isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(v):
            step = r.get("step", i)
            xs.append(step if isinstance(step, Real) else i)
            ys.append(float(v))
    return xs, ys


def _main_signal(name: str, rows: list[dict]) -> str | None:
    order = _SIGNALS_PREF if any(t in name.lower() for t in ("dpo", "reward", "kto", "orpo", "simpo")) else _SIGNALS_RL
    return next((k for k in order if _series(rows, k)[1]), None)


def _plot_line(ax, xs, ys, color, label):
    """Raw line, plus an EMA-smoothed one (the raw line then faded) past ``SMOOTH_ABOVE`` points."""
    if len(ys) > SMOOTH_ABOVE:
        ax.plot(xs, ys, color=color, alpha=0.25, linewidth=0.8)
        return ax.plot(xs, _ema(ys, max(5, len(ys) // 25)), color=color, linewidth=1.6, label=f"{label} (EMA)")[0]
    return ax.plot(xs, ys, color=color, linewidth=1.4, marker="o" if len(ys) <= 12 else None, markersize=3,
                   label=label)[0]


def _plot_curves(runs: dict[str, list[dict]], path: str) -> None:
    from matplotlib.figure import Figure  # Agg canvas, no pyplot: no display and no global backend state

    n = len(runs)
    ncols = min(3, max(n, 1))
    nrows = max(1, math.ceil(n / ncols))
    fig = Figure(figsize=(4.6 * ncols, 3.7 * nrows), dpi=DPI)
    if not runs:
        ax = fig.add_subplot(1, 1, 1)
        ax.text(0.5, 0.5, "no training curves", ha="center", va="center", fontsize=12)
        ax.set_axis_off()
    for i, (name, rows) in enumerate(runs.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.set_title(name, fontsize=11)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        handles = []
        xs, ys = _series(rows, "loss")
        if ys:
            handles.append(_plot_line(ax, xs, ys, "C0", "loss"))
            ax.set_ylabel("loss", color="C0")
            ax.tick_params(axis="y", colors="C0")
        signal = _main_signal(name, rows)
        if signal is not None:
            ax2 = ax.twinx() if ys else ax
            sx, sy = _series(rows, signal)
            handles.append(_plot_line(ax2, sx, sy, "C1", signal))
            ax2.set_ylabel(signal, color="C1")
            ax2.tick_params(axis="y", colors="C1")
        if not handles:
            ax.text(0.5, 0.5, "no logged loss", ha="center", va="center", transform=ax.transAxes)
        else:
            # under the axes, not on them: loss and signal cross, any spot inside would hide one of them
            ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=len(handles),
                      fontsize=8, frameon=False)
    fig.suptitle("Training curves", fontsize=13)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


def _plot_metrics(evals: dict, path: str) -> None:
    from matplotlib.figure import Figure

    stages = _ordered_stages(evals)
    fig = Figure(figsize=(min(12.0, 6.0 + 0.18 * len(stages) * len(RATE_METRICS)), 4.8), dpi=DPI)
    ax = fig.add_subplot(1, 1, 1)
    width = 0.8 / max(len(stages), 1)
    for j, stage in enumerate(stages):
        m = evals[stage] or {}
        vals = [_clean(m.get(k)) for k in RATE_METRICS]
        xs = [i - 0.4 + width * (j + 0.5) for i in range(len(RATE_METRICS))]
        heights = [100 * v if isinstance(v, Real) and not isinstance(v, bool) else 0.0 for v in vals]
        ax.bar(xs, heights, width=width * 0.95, color=f"C{j % 10}", label=stage)
        for x, v in zip(xs, vals):
            if not isinstance(v, Real) or isinstance(v, bool):  # not measured: a dash instead of a bar
                ax.text(x, 1, "n/a", ha="center", va="bottom", fontsize=7, color="0.35", rotation=90)
    ax.set_xticks(range(len(RATE_METRICS)))
    ax.set_xticklabels([k.replace("_", " ") for k in RATE_METRICS], fontsize=9)
    ax.set_xlim(-0.6, len(RATE_METRICS) - 0.4)
    ax.set_ylim(0, 105)
    ax.set_ylabel("%")
    ax.set_title("Evaluation per stage (over-refusal: lower is better)", fontsize=12)
    ax.grid(axis="y", alpha=0.3)
    if stages:
        ax.legend(title="stage", fontsize=8, ncol=min(len(stages), 6), loc="upper center",
                  bbox_to_anchor=(0.5, -0.12), frameon=False)
    else:
        ax.text(0.5, 0.5, "no stage was evaluated", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)


# ---------------------------------------------------------------------------------------------------- entry


def write_report(output_dir: str, evals: dict[str, dict], curves: dict[str, str], *,
                 meta: dict | None = None) -> dict[str, str]:
    """Writes report.json, report.md and plots/{training_curves,metrics}.png under ``output_dir`` (see the module
    docstring) and returns their paths: ``{"json", "md", "curves_png", "metrics_png"}`` (the plots None, with a
    warning, where matplotlib is not installed)."""
    import sys

    try:
        import matplotlib
    except ImportError:  # the evaluation is worth more than its plots: the tables are still written
        matplotlib = None
        warnings.warn("report: matplotlib is not installed, so no plots (pip install matplotlib); report.json and "
                      "report.md are written", stacklevel=2)
    if matplotlib is not None and "matplotlib.pyplot" not in sys.modules:
        matplotlib.use("Agg")  # off-screen (switching an open pyplot session's backend would close its figures)

    output_dir = os.fspath(output_dir)
    plots_dir = os.path.join(output_dir, "plots")
    os.makedirs(plots_dir, exist_ok=True)
    meta = dict(meta or {})
    paths = {"json": os.path.join(output_dir, "report.json"), "md": os.path.join(output_dir, "report.md"),
             "curves_png": os.path.join(plots_dir, "training_curves.png"),
             "metrics_png": os.path.join(plots_dir, "metrics.png")}

    runs, notes = {}, []
    for name, path in (curves or {}).items():
        if path is None or not os.path.exists(path):
            notes.append(f"{name} (no metrics file)")
            continue
        try:
            rows = read_metrics(path)
        except (ValueError, OSError) as e:
            warnings.warn(f"report: curve {name!r} left out: {e}", stacklevel=2)
            notes.append(f"{name} ({e})")
            continue
        if not rows:
            notes.append(f"{name} (empty)")
            continue
        runs[str(name)] = rows

    report = {"stages": {s: _stage_entry(evals[s]) for s in _ordered_stages(evals)}, "meta": _clean(meta)}
    with open(paths["json"], "w", encoding="utf-8") as f:
        json.dump(report, f, indent=2, default=str, allow_nan=False)
        f.write("\n")
    if matplotlib is None:
        paths["curves_png"] = paths["metrics_png"] = None
    else:
        _plot_curves(runs, paths["curves_png"])
        _plot_metrics(evals, paths["metrics_png"])
    with open(paths["md"], "w", encoding="utf-8") as f:
        f.write(_markdown(evals, meta, paths, notes))
    return paths
