"""docs/architecture.md cannot rot: every path it names exists, every op file is in its table with a test and a
benchmark, and every public function it lists is in the public API."""

from __future__ import annotations

import re
from pathlib import Path

import ptkernels

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
# A backticked token that names a file or folder of the repository.
PATH = re.compile(r"`((?:ptkernels|csrc|tests|benchmarks|tools|docs|scripts)/[^`\s]*)`")
# Files of ptkernels/ops/ that are not an op family of their own.
NOT_A_FAMILY = {"__init__.py"}


def _table_rows() -> list[list[str]]:
    rows = []
    for line in DOC.read_text().splitlines():
        if line.startswith("| ") and not line.startswith("| family") and not line.startswith("|---"):
            rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_table_has_every_column():
    rows = _table_rows()
    assert len(rows) >= 10, "the op-family table is missing or was cut short"
    assert all(len(r) == 9 for r in rows), [r[0] for r in rows if len(r) != 9]


def test_every_path_named_exists():
    named = PATH.findall(DOC.read_text())
    assert len(named) > 50, "no paths found: did the doc's format change?"
    missing = sorted({p for p in named if not (ROOT / p).exists()})
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


def test_every_op_file_is_in_the_table_with_a_test_and_a_benchmark():
    rows = _table_rows()
    table = "\n".join(" ".join(r) for r in rows)
    ops = [p for p in (ROOT / "ptkernels" / "ops").glob("*.py") if p.name not in NOT_A_FAMILY]
    missing = [p.relative_to(ROOT).as_posix() for p in ops if f"`{p.relative_to(ROOT).as_posix()}`" not in table]
    assert not missing, f"op files missing from the table of docs/architecture.md: {missing}"
    for row in rows:  # columns: ..., test (7), benchmark (8)
        assert re.search(r"`tests/ops/test_\w+\.py`", row[7]), f"{row[0]}: no test named"
        assert re.search(r"`benchmarks/test_bench_\w+\.py`", row[8]), f"{row[0]}: no benchmark named"


def test_public_functions_listed_are_public():
    listed = {name for row in _table_rows() for name in re.findall(r"`(\w+)`", row[1])}
    assert listed
    assert not sorted(n for n in listed if n not in ptkernels.__all__)


def test_links_resolve_and_the_doc_stands_alone():
    text = DOC.read_text()
    for target in re.findall(r"\]\(([^)#]+)\)", text):
        assert (DOC.parent / target).exists(), f"broken link {target}"
    assert "DESIGN" not in text
