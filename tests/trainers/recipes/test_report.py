"""The pipeline report (ptkernels/trainers/recipes/report.py): JSON structure, markdown table, plots, reading
metrics.jsonl."""

import json
import math
import random

import pytest

from ptkernels.trainers.recipes.report import METRICS, STAGES, format_table, read_metrics, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _eval(rng, **over):
    m = {"format_rate": rng.random(), "accuracy": rng.random(), "accuracy_add": rng.random(),
         "refusal_rate_harmful": rng.random(), "over_refusal_benign": rng.random(), "win_rate_vs_sft": rng.random(),
         "win_rate_vs_sft_rm": None, "mean_length": 20 + 10 * rng.random(), "kl_to_sft": rng.random(),
         "ece": rng.random() / 5, "n_arithmetic": 100}
    m.update(over)
    return m


@pytest.fixture
def evals():
    rng = random.Random(0)
    # "ppo" and "grpo" missing; base has no SFT model to compare with; sft lacks ece altogether
    sft = _eval(rng, win_rate_vs_sft=None, kl_to_sft=None)
    del sft["ece"]
    # given out of STAGES order on purpose
    return {"safety": _eval(rng, format_rate=0.8749, refusal_rate_harmful=1.0),
            "dpo": _eval(rng, kl_to_sft=float("nan")),
            "base": _eval(rng, win_rate_vs_sft=None, kl_to_sft=None, format_rate=0.0),
            "sft": sft}


def _write_rows(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


@pytest.fixture
def curves(tmp_path):
    rng = random.Random(1)
    d = tmp_path / "runs"
    d.mkdir()
    loss = lambda s, n: 3.0 * math.exp(-3 * s / n) + 0.3 + 0.1 * rng.random()
    out = {
        "pretrain": _write_rows(d / "pretrain.jsonl", [{"step": s, "loss": loss(s, 200), "lr": 1e-3}
                                                       for s in range(1, 201)]),
        "sft": _write_rows(d / "sft.jsonl", [{"step": s, "loss": loss(s, 30), "lr": 1e-4} for s in range(1, 31)]),
        "dpo": _write_rows(d / "dpo.jsonl", [{"step": s, "loss": loss(s, 80), "lr": 1e-6,
                                              "accuracy": min(1, s / 60 + 0.2 * rng.random()), "margin": s / 40}
                                             for s in range(1, 81)]),
        "ppo": _write_rows(d / "ppo.jsonl", [{"step": s, "loss": loss(s, 10), "score": s / 10, "reward": s / 12,
                                              "kl": 0.01 * s} for s in range(1, 11)]),
        "grpo": _write_rows(d / "grpo.jsonl", [{"step": s, "loss": 0.1 * rng.random(), "reward": s / 100}
                                               for s in range(1, 101)]),
        "safety_sft": str(d / "does_not_exist" / "metrics.jsonl"),  # missing: skipped, no crash
    }
    return out


def test_report_json_structure(tmp_path, evals, curves):
    paths = write_report(str(tmp_path / "out"), evals, curves, meta={"machine": "cpu", "wall_s": {"sft": 12.5}})
    assert set(paths) == {"json", "md", "curves_png", "metrics_png"}
    report = json.loads(open(paths["json"], encoding="utf-8").read())
    assert set(report) == {"stages", "meta"}
    assert report["meta"] == {"machine": "cpu", "wall_s": {"sft": 12.5}}
    assert list(report["stages"]) == ["base", "sft", "dpo", "safety"]  # STAGES order, only the evaluated ones
    assert list(report["stages"]) == [s for s in STAGES if s in evals]
    extra = ["accuracy_add", "win_rate_vs_sft_rm", "n_arithmetic"]
    for stage, entry in report["stages"].items():
        assert list(entry)[:len(METRICS)] == list(METRICS)
        assert set(entry) == set(METRICS) | set(extra), stage
        assert entry["win_rate_vs_sft_rm"] is None
    assert report["stages"]["base"]["win_rate_vs_sft"] is None
    assert report["stages"]["base"]["kl_to_sft"] is None
    assert report["stages"]["sft"]["ece"] is None  # key absent from the eval -> null
    assert report["stages"]["dpo"]["kl_to_sft"] is None  # NaN -> null (the file stays valid JSON)
    assert report["stages"]["safety"]["format_rate"] == 0.8749
    assert report["stages"]["safety"]["accuracy_add"] == evals["safety"]["accuracy_add"]


def test_report_markdown(tmp_path, evals, curves):
    paths = write_report(str(tmp_path / "out"), evals, curves, meta={"preset": "tiny", "total_time_s": 125})
    md = open(paths["md"], encoding="utf-8").read()
    assert md.startswith("# ")
    assert "**preset**: tiny" in md and "2m 05s" in md
    header = next(line for line in md.splitlines() if line.startswith("| stage"))
    assert all(f" {k} " in header for k in METRICS)
    rows = [line for line in md.splitlines() if line.startswith("| ") and not line.startswith("| stage")]
    assert [r.split("|")[1].strip() for r in rows] == ["base", "sft", "dpo", "safety"]
    safety = dict(zip(METRICS, [c.strip() for c in rows[-1].split("|")[2:-1]]))
    assert safety["format_rate"] == "87%" and safety["refusal_rate_harmful"] == "100%"
    assert safety["mean_length"] == f"{evals['safety']['mean_length']:.1f}"
    assert safety["kl_to_sft"] == f"{evals['safety']['kl_to_sft']:.2f}"
    assert safety["ece"] == f"{evals['safety']['ece']:.3f}"
    base = dict(zip(METRICS, [c.strip() for c in rows[0].split("|")[2:-1]]))
    assert base["format_rate"] == "0%" and base["win_rate_vs_sft"] == "–" and base["kl_to_sft"] == "–"
    assert "How to read this" in md
    assert all(f"**{k}**" in md for k in METRICS)
    assert "](plots/training_curves.png)" in md and "](plots/metrics.png)" in md
    assert "safety_sft" in md  # the missing curve is noted
    assert format_table(evals) in md


def test_report_plots(tmp_path, evals, curves):
    paths = write_report(str(tmp_path / "out"), evals, curves)
    for key in ("curves_png", "metrics_png"):
        data = open(paths[key], "rb").read()
        assert data[:8] == PNG_MAGIC, key
        assert len(data) > 10_000, (key, len(data))


def test_report_with_nothing(tmp_path):
    paths = write_report(str(tmp_path / "out"), {}, {"sft": str(tmp_path / "missing.jsonl")})
    assert json.loads(open(paths["json"], encoding="utf-8").read()) == {"stages": {}, "meta": {}}
    for key in ("curves_png", "metrics_png"):
        assert open(paths[key], "rb").read()[:8] == PNG_MAGIC


def test_report_skips_malformed_curve(tmp_path, evals, curves):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "loss"\n', encoding="utf-8")
    with pytest.warns(UserWarning, match="bad.jsonl:2"):
        paths = write_report(str(tmp_path / "out"), evals, {**curves, "reward": str(bad)})
    assert "bad.jsonl:2" in open(paths["md"], encoding="utf-8").read()


def test_read_metrics(tmp_path):
    assert read_metrics(tmp_path / "nope.jsonl") == []
    good = tmp_path / "good.jsonl"
    good.write_text('{"step": 1, "loss": 2.0}\n\n{"step": 2, "loss": 1.5, "reward": 0.1}\n', encoding="utf-8")
    assert read_metrics(good) == [{"step": 1, "loss": 2.0}, {"step": 2, "loss": 1.5, "reward": 0.1}]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3"):
        read_metrics(bad)
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"arr\.jsonl:1"):
        read_metrics(arr)


def test_format_table_alone():
    table = format_table({"grpo": {"accuracy": 0.5, "ece": None}, "base": {}})
    lines = table.splitlines()
    assert len(lines) == 4 and lines[2].startswith("| base ") and lines[3].startswith("| grpo ")
    assert "| 50% |" in lines[3]


def test_report_without_matplotlib_still_writes_the_tables(tmp_path, evals, curves, monkeypatch):
    """An environment without matplotlib (e.g. a vLLM one) loses the plots, not the evaluation."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    for name in [n for n in sys.modules if n == "matplotlib" or n.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.warns(UserWarning, match="matplotlib is not installed"):
        paths = write_report(str(tmp_path / "out"), evals, curves)
    assert paths["curves_png"] is None and paths["metrics_png"] is None
    assert set(json.load(open(paths["json"]))["stages"]) == set(evals)
    md = open(paths["md"], encoding="utf-8").read()
    assert format_table(evals) in md and "pip install matplotlib" in md and "](plots/" not in md
