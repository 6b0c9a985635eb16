"""Read the result tables of the README and docs/ and check each figure against the file it cites.

The convention (docs/metrics.md, "Where the published numbers come from"):

- A **result table** is followed by a paragraph starting `Source:` (one blank line between is allowed)
  that links the committed file(s) its figures come from: `benchmarks/results/...` or `metrics/...`. A row
  that links files itself (a "file" column) is checked against those files only.
- A numeric table that is not a result (params, defaults, definitions, an index) carries the marker
  `<!-- not-results: why -->` on a line above it. A table of earlier measurements whose files were
  never kept carries `<!-- unverified: why -->` and must say "unverified" in the visible text just
  above it: history, not evidence. A numeric table with none of these fails.
- The first column names the row and is not checked; nor is the header. In the other cells a
  **figure** is a number standing alone: not part of a word or a name (`774M`, `gpt2-large`), a date,
  a shape (`8 × 120`), code, a link, or a bound (`< 1e-4`, `≤ 1.3×`). A cell or column that says
  "target" holds targets, which are exempt.
- A figure passes when some number in the cited files, scaled for the unit printed after the figure
  (`%`, `GB`, `MiB`, `min`, ...), rounds to it at the printed number of decimals; a figure with `×`
  or `%` may also be the ratio of two values of the same key, and any figure the median of one key's
  values across the cited files (the "median of N runs" quotes).
"""

from __future__ import annotations

import bisect
import functools
import json
import math
import os
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import yaml

FENCE = re.compile(r"^(```|~~~)")
SEPARATOR = re.compile(r"^\|\s*:?-{3,}")
MARKER = re.compile(r"<!--\s*(not-results|unverified)\b")
COMMENT = re.compile(r"<!--.*?-->")
SOURCE = re.compile(r"^\s*Sources?:")
LINK = re.compile(r"!?\[([^\]]*)\]\(\s*<?([^)\s>]+)>?[^)]*\)")
CODE_SPAN = re.compile(r"`[^`]*`")
IGNORED = [
    re.compile(r"\d{4}-\d{2}-\d{2}(?:T[\d:+]+)?"),  # dates
    re.compile(r"\b\d{1,2}:\d{2}(?::\d{2})?\b"),  # times of day: 12:19 UTC
    re.compile(r"\d[\d,.]*\s*[×x]\s*\d[\d,.]*"),  # shapes: 8 × 120, 4 x 256
    re.compile(r"(?:[<>≤≥~]|&lt;|&gt;|at most|at least|under|over)\s*\d[\d,.]*(?:e[-+]?\d+)?\s*\S*"),  # bounds
    re.compile(r"&\w+;|&#\d+;"),  # HTML entities
    re.compile(r"\b(?:runs?|seeds?|ranks?|steps?) \d+", re.IGNORECASE),  # labels: run 3, seed 1
]
# A number standing alone: not glued to a word, a path or another number; thousands commas allowed.
NUMBER = re.compile(
    r"(?:(?<![\w.\-/])|(?<=\d-))(?P<sign>[-−])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?(?P<exp>e[-+]?\d+)?"
    r"(?P<unit>\s*(?:%|×|x(?![\w])|GiB|GB|MiB|MB|KiB|kB|min(?![\w])|ms(?![\w])|s(?![\w])))?(?![\w.])"
)
RESULT_SUFFIXES = (".json", ".yaml", ".yml", ".tsv")  # metrics, params, run records; curves as TSV
# Scale factors from the number in a file to the unit printed (bytes, KiB, MiB, seconds, fractions).
UNIT_SCALES = {
    "%": (100.0, 1.0),
    "GB": (1.0, 1e-9, 1024 / 1e9, 2**20 / 1e9),
    "GiB": (1.0, 2.0**-30, 2.0**-20, 2.0**-10),
    "MB": (1.0, 1e-6, 1024 / 1e6),
    "MiB": (1.0, 2.0**-20, 2.0**-10),
    "KiB": (1.0, 2.0**-10),
    "kB": (1.0, 1e-3),
    "min": (1.0, 1 / 60),
    "ms": (1.0, 1e3),
}
TARGET = re.compile(r"\btargets?\b", re.IGNORECASE)
RESULT_FILES = ("benchmarks/results/", "metrics/")


@dataclass
class Figure:
    text: str  # as printed, e.g. "95.67%"
    value: float
    decimals: int
    unit: str


@dataclass
class Table:
    path: Path
    line: int  # 1-based line of the header
    header: list[str]
    rows: list[list[str]]
    sources: list[Path] = field(default_factory=list)  # files the Source line links
    source_text: str = ""  # the Source paragraph (it may name the command that made files without one)
    marker: str = ""  # "not-results" or "unverified", from the comment above the table
    label_shown: bool = False  # "unverified" also appears, visibly, in the lines above the table

    def where(self) -> str:
        return f"{self.path.name}:{self.line}"


def split_row(line: str) -> list[str]:
    """The cells of a Markdown table row (pipes inside code spans are not separators)."""
    cells, cell, in_code = [], "", False
    for char in line.strip().strip("|"):
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
    return [*cells, cell.strip()]


def linked_files(text: str, base: Path) -> list[Path]:
    """The local files that Markdown links in `text` point at, resolved against the page's folder."""
    targets = [t.split("#", 1)[0] for _, t in LINK.findall(text) if not re.match(r"^[a-z]+:", t)]
    return [Path(os.path.normpath(base / t)) for t in targets if t]  # symlinks kept: a copied page checks


def read_tables(path: Path) -> list[Table]:
    """Every table of a Markdown page, outside fenced code, with its Source line and exemption marker."""
    lines = path.read_text(encoding="utf-8").splitlines()
    tables, fenced, i = [], False, 0
    while i < len(lines):
        if FENCE.match(lines[i]):
            fenced = not fenced
        if fenced or not lines[i].startswith("|") or i + 1 >= len(lines) or not SEPARATOR.match(lines[i + 1]):
            i += 1
            continue
        end = i + 2
        while end < len(lines) and lines[end].startswith("|"):
            end += 1
        table = Table(path, i + 1, split_row(lines[i]), [split_row(row) for row in lines[i + 2 : end]])
        above = [line for line in lines[max(0, i - 3) : i] if line.strip()]
        marker = MARKER.search(above[-1]) if above else None
        table.marker = marker.group(1) if marker else ""
        visible = " ".join(COMMENT.sub(" ", line) for line in lines[max(0, i - 8) : i])
        table.label_shown = "unverified" in visible.lower()
        start = end + 1 if end < len(lines) and not lines[end].strip() else end
        if start < len(lines) and SOURCE.match(lines[start]):
            paragraph = []  # the Source line and the lines of its paragraph
            while start < len(lines) and lines[start].strip():
                paragraph.append(lines[start])
                start += 1
            table.source_text = " ".join(paragraph)
            table.sources = linked_files(table.source_text, path.parent)
        tables.append(table)
        i = end
    return tables


def figures(cell: str) -> list[Figure]:
    """The figures of one table cell (see the module docstring for what is not a figure)."""
    text = LINK.sub(" ", CODE_SPAN.sub(" ", cell))
    for pattern in IGNORED:
        text = pattern.sub(" ", text)
    found = []
    for match in NUMBER.finditer(text):
        digits = match["int"].replace(",", "") + (match["frac"] or "") + (match["exp"] or "")
        sign = -1.0 if match["sign"] else 1.0
        decimals = len(match["frac"]) - 1 if match["frac"] else 0
        if match["exp"]:
            decimals -= int(match["exp"][1:])
        unit = (match["unit"] or "").strip().replace("x", "×")
        found.append(Figure(match.group(0).strip(), sign * float(digits), decimals, unit))
    return found


@functools.cache
def file_values(path: Path) -> tuple[tuple[str, float], ...]:
    """Every number in a JSON or YAML file with the key it sits under (list items: their list's key), or
    in a TSV of curves (a run's plots: each column's values under its header)."""
    text = path.read_text(encoding="utf-8")
    values: list[tuple[str, float]] = []
    if path.suffix == ".tsv":
        header, *lines = [line.split("\t") for line in text.splitlines() if line.strip()]
        for line in lines:
            for key, cell in zip(header, line):
                try:
                    values.append((key, float(cell)))
                except ValueError:
                    continue
        return tuple(values)
    data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)

    def walk(node, key: str) -> None:
        if isinstance(node, bool) or node is None:
            return
        if isinstance(node, (int, float)):
            if math.isfinite(node):
                values.append((key, float(node)))
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, str(k))
        elif isinstance(node, list):
            for item in node:
                walk(item, key)

    walk(data, "")
    return tuple(values)


@dataclass(frozen=True)
class Values:
    """The numbers a table may quote from its files, sorted for lookup by range."""

    plain: list[float]  # every number in the files, and the median of each key with 3 values or more
    ratios: list[float]  # a / b for two values of one key (only for figures printed with × or %)


@functools.lru_cache(maxsize=256)
def values_of(files: tuple[Path, ...]) -> Values:
    by_key: dict[str, list[float]] = {}
    for path in files:
        for key, value in file_values(path):
            by_key.setdefault(key, []).append(value)
    plain = [v for vs in by_key.values() for v in vs]
    plain += [statistics.median(vs) for vs in by_key.values() if len(vs) > 2]
    ratios = [
        a / b
        for vs in by_key.values()
        if len(vs) <= 64
        for i, a in enumerate(vs)
        for j, b in enumerate(vs)
        if b and i != j
    ]
    return Values(sorted(plain), sorted(ratios))


def rounds_to(value: float, figure: Figure) -> bool:
    """Whether `value` printed with the figure's decimals is the figure (half-way cases either way)."""
    return abs(value - figure.value) <= tolerance(figure, value)


def tolerance(figure: Figure, value: float) -> float:
    return 10.0**-figure.decimals / 2 + 1e-9 * max(1.0, abs(value))


def figure_found(figure: Figure, values: Values) -> bool:
    """Whether some value, scaled for the figure's unit, rounds to the figure as printed."""
    pools = [values.plain, values.ratios] if figure.unit in ("×", "%") else [values.plain]
    for scale in UNIT_SCALES.get(figure.unit, (1.0,)):
        low, high = sorted(
            (
                (figure.value - tolerance(figure, figure.value)) / scale,
                (figure.value + tolerance(figure, figure.value)) / scale,
            )
        )
        for pool in pools:
            i = bisect.bisect_left(pool, low)
            if i < len(pool) and pool[i] <= high:
                return True
    return False


def check_table(table: Table, repo: Path) -> list[str]:
    """The problems of one table: a numeric table without source or marker, a missing file, a figure not found."""
    numeric = any(figures(cell) for row in table.rows for cell in row[1:])
    if table.marker == "unverified" and not table.label_shown:
        return [f"{table.where()}: marked unverified, but the text above the table does not say so"]
    if table.marker or not numeric:
        return []
    row_files = [p for row in table.rows for p in linked_files(" ".join(row), table.path.parent)]
    if not table.sources and not any(is_result_file(p, repo) for p in row_files):
        return [f"{table.where()}: a numeric table with no Source line and no <!-- not-results --> marker"]
    problems = []
    for row in table.rows:
        own = [p for p in linked_files(" ".join(row), table.path.parent) if is_result_file(p, repo)]
        files = own or [p for p in table.sources if is_result_file(p, repo)]
        missing = [p for p in files if not p.is_file()]
        if missing:
            problems.append(f"{table.where()}: cites missing files {[str(p) for p in missing]}")
            continue
        values = values_of(tuple(p for p in files if p.suffix in RESULT_SUFFIXES))
        for column, cell in enumerate(row[1:], start=1):
            header = table.header[column] if column < len(table.header) else ""
            if TARGET.search(cell) or TARGET.search(header):
                continue
            for figure in figures(cell):
                if not figure_found(figure, values):
                    cited = [p.relative_to(repo).as_posix() if p.is_relative_to(repo) else str(p) for p in files]
                    problems.append(f"{table.where()}: {figure.text!r} in row {row[0][:50]!r} is in none of {cited}")
    return problems


def is_result_file(path: Path, repo: Path) -> bool:
    try:
        relative = path.relative_to(repo).as_posix()
    except ValueError:
        return False
    return relative.startswith(RESULT_FILES) and path.suffix in RESULT_SUFFIXES
