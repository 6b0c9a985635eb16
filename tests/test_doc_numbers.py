"""Every figure in a result table of the README and docs/ is in the committed file its table cites.

The convention and what counts as a figure: tests/doc_numbers.py and docs/metrics.md ("Where the
published numbers come from"). Reads Markdown and JSON only: no training, no mirror.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.doc_numbers import Figure, check_table, figures, is_result_file, linked_files, read_tables, rounds_to


@pytest.fixture(autouse=True)
def _offline_mirror():
    """Overrides conftest's fixture of the same name: these tests read only Markdown and JSON."""


def doc_files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def result_tables():
    """Tables that cite files, by a Source paragraph or in their rows, and carry no marker."""
    tables = [t for path in doc_files() for t in read_tables(path) if not t.marker]
    return [t for t in tables if t.sources or any(row_files(t, row) for row in t.rows)]


def row_files(table, row) -> list[Path]:
    return [p for p in linked_files(" ".join(row), table.path.parent) if is_result_file(p, REPO)]


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_each_figure_is_in_the_file_its_table_cites(path):
    problems = [problem for table in read_tables(path) for problem in check_table(table, REPO)]
    assert not problems, "\n".join(problems)


def test_the_readme_has_result_tables_and_cites_files_for_them():
    tables = [t for t in read_tables(REPO / "README.md") if t.sources]
    assert len(tables) >= 4, "the README's result tables lost their Source lines"


def test_every_cited_file_says_how_it_was_made():
    """A file carries its command (or its published source), an experiment folder its run.json, or the
    table's Source paragraph names the command in code; metrics/ is the pipeline's (dvc.yaml)."""
    told_by_table: dict[Path, bool] = {}
    for table in [t for path in doc_files() for t in read_tables(path) if not t.marker]:
        names_command = bool(re.search(r"`(python|gptcore|dvc|PYTHONPATH)[^`]*`", table.source_text))
        links = [p for row in table.rows for p in linked_files(" ".join(row), table.path.parent)]
        for path in [*table.sources, *links]:
            if is_result_file(path, REPO):
                told_by_table[path] = told_by_table.get(path, False) or names_command
    assert told_by_table
    for path, named in sorted(told_by_table.items()):
        relative = path.relative_to(REPO).as_posix()
        if relative.startswith("metrics/") or path.suffix != ".json" or named:
            continue  # the pipeline's own metrics (dvc.yaml, dvc.lock); params files sit beside a run.json
        data = json.loads(path.read_text())
        told = bool({"command", "source"} & keys_of(data))  # at the top or in each run it holds
        told = told or (path.parent.parent / "run.json").is_file() or (path.parent / "run.json").is_file()
        assert told, f"{relative}: no command (or source) in it, no run.json beside it, none in its Source line"


def keys_of(node) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in keys_of(v)}
    if isinstance(node, list):
        return {k for v in node for k in keys_of(v)}
    return set()


def copy_page(tmp_path: Path, text: str) -> Path:
    """A page in a copy of docs/ whose links reach the real committed files (through symlinks)."""
    (tmp_path / "docs").mkdir()
    for folder in ("benchmarks", "metrics"):
        (tmp_path / folder).symlink_to(REPO / folder)
    page = tmp_path / "docs" / "page.md"
    page.write_text(text, encoding="utf-8")
    return page


def problems_of(page: Path, repo: Path) -> list[str]:
    return [problem for table in read_tables(page) for problem in check_table(table, repo)]


def changed(figure: Figure) -> str:
    """The figure as a hand edit might leave it: its last printed digit moved by 3."""
    text = figure.text
    digits = [i for i, c in enumerate(text) if c.isdigit()]
    last = digits[-1]
    return text[:last] + str((int(text[last]) + 3) % 10) + text[last + 1 :]


def table_text(table) -> str:
    """The table's Markdown and its Source paragraph, as they stand in the page."""
    lines = table.path.read_text(encoding="utf-8").splitlines()
    end = table.line + 1 + len(table.rows)
    tail = []
    for line in lines[end:]:
        if tail and not line.strip():
            break
        tail.append(line)
    return "\n".join(lines[table.line - 1 : end] + tail) + "\n"


def test_a_readme_figure_changed_by_hand_fails(tmp_path):
    """The README's Stage 3 table in a copy: as committed it passes; one accuracy edited, it fails."""
    table = next(t for t in read_tables(REPO / "README.md") if "test accuracy" in " ".join(t.header))
    text = table_text(table).replace("](benchmarks/", "](../benchmarks/").replace("](metrics/", "](../metrics/")
    assert problems_of(copy_page(tmp_path, text), tmp_path) == []
    row = next(r for r in table.rows if "baseline" in r[0])
    figure = figures(row[1])[0]
    edited = text.replace(f"| {row[1]} |", f"| {row[1].replace(figure.text, changed(figure))} |", 1)
    assert edited != text
    (tmp_path / "docs" / "page.md").write_text(edited, encoding="utf-8")
    problems = problems_of(tmp_path / "docs" / "page.md", tmp_path)
    assert len(problems) == 1 and changed(figure) in problems[0]


@pytest.mark.parametrize("table", result_tables(), ids=lambda t: t.where())
def test_every_result_table_notices_a_changed_figure(table, tmp_path):
    """In each result table some figure, changed by hand, is caught (not all: 100% stays 100% of itself)."""
    text = table_text(table)
    if table.path.parent == REPO:
        text = re.sub(r"\]\((?!\.\./|https?:)", "](../", text)
    assert problems_of(copy_page(tmp_path, text), tmp_path) == []
    for row in table.rows:
        for cell in row[1:]:
            for figure in figures(cell):
                edited = text.replace(cell, cell.replace(figure.text, changed(figure), 1), 1)
                (tmp_path / "docs" / "page.md").write_text(edited, encoding="utf-8")
                if problems_of(tmp_path / "docs" / "page.md", tmp_path):
                    return
    pytest.fail(f"{table.where()}: no figure of the table, changed by hand, was noticed")


@pytest.mark.parametrize(
    ("cell", "expected"),
    [
        ("**95.67%** / 96.00%", [("95.67%", 95.67, 2, "%"), ("96.00%", 96.0, 2, "%")]),
        ("14,119.7; 4,831.5", [("14,119.7", 14119.7, 1, ""), ("4,831.5", 4831.5, 1, "")]),
        ("8.509 → **3.404**", [("8.509", 8.509, 3, ""), ("3.404", 3.404, 3, "")]),
        ("25.76 (19.42-26.44)", [("25.76", 25.76, 2, ""), ("19.42", 19.42, 2, ""), ("26.44", 26.44, 2, "")]),
        ("1.17 GB, 0.37× the data file", [("1.17 GB", 1.17, 2, "GB"), ("0.37×", 0.37, 2, "×")]),
        ("3.0e-05", [("3.0e-05", 3.0e-05, 6, "")]),
    ],
)
def test_figures_are_read_as_printed(cell, expected):
    assert [(f.text, f.value, f.decimals, f.unit) for f in figures(cell)] == expected


@pytest.mark.parametrize(
    "cell",
    [
        "8 × 120 tokens",
        "2026-12-07",
        "12:19 UTC",
        "at 0fcbb95",
        "< 1e-4",
        "≤ 12 GiB",
        "gpt2-large, 774M",
        "run 3",
        "`lr: 0.0003`",
        "[f](a1.json)",
    ],
)
def test_names_dates_shapes_bounds_and_code_are_not_figures(cell):
    assert figures(cell) == []


def test_rounding_is_as_printed():
    figure = figures("95.67%")[0]
    assert rounds_to(95.6667, figure) and not rounds_to(95.66, figure)
    assert rounds_to(0.9567 * 100, figure)


def test_a_table_without_source_or_marker_fails_and_markers_exempt(tmp_path):
    table = "| run | loss |\n| --- | --- |\n| a | 0.150 |\n"
    page = copy_page(tmp_path, table)
    assert "no Source line" in problems_of(page, tmp_path)[0]
    page.write_text("<!-- not-results: a definition -->\n" + table, encoding="utf-8")
    assert problems_of(page, tmp_path) == []
    page.write_text("<!-- unverified: old -->\n" + table, encoding="utf-8")
    assert "does not say so" in problems_of(page, tmp_path)[0]
    page.write_text("*Unverified history: no file.*\n\n<!-- unverified: old -->\n" + table, encoding="utf-8")
    assert problems_of(page, tmp_path) == []


def test_a_figure_without_a_file_fails_and_a_target_is_exempt(tmp_path):
    source = "\nSource: [pretrain](../metrics/pretrain.json)\n"
    train_loss = json.loads((REPO / "metrics" / "pretrain.json").read_text())["train_loss"]
    good = f"| run | train loss |\n| --- | --- |\n| ours | {train_loss:.3f} |\n"
    page = copy_page(tmp_path, good + source)
    assert problems_of(page, tmp_path) == []
    page.write_text(good + "| not in the file | 123.456 |\n" + source, encoding="utf-8")
    assert "'123.456'" in problems_of(page, tmp_path)[0]
    page.write_text(good + "| the default | **target**: 123.456 |\n" + source, encoding="utf-8")
    assert problems_of(page, tmp_path) == []
    page.write_text(good + "\nSource: [gone](../benchmarks/results/no-such-file.json)\n", encoding="utf-8")
    assert "missing" in problems_of(page, tmp_path)[0]
