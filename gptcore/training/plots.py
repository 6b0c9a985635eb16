"""Plot tables (CSV, for `dvc plots`) and PNG figures, drawn with matplotlib's object-oriented API.

Figures are `matplotlib.figure.Figure` objects rendered by the Agg canvas: no pyplot, no global
backend or figure registry, nothing a long-lived process has to close. Every figure has a title and
both axis names (with units), since a PNG is read without the table beside it.
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

from gptcore.atomic import atomic_path, write_text

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure

SIZE = (6.4, 4.0)  # inches, at 100 dpi: 640 x 400 pixels


def write_table(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A CSV with one row per dict; columns default to the keys of the first row."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def _axes(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    if not (title and xlabel and ylabel):
        raise ValueError("a figure needs a title and both axis names")
    fig = Figure(figsize=SIZE, dpi=100, layout="tight")
    ax = fig.add_subplot()
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def line_figure(rows: Sequence[dict], x: str, keys: Sequence[str], *, title: str, xlabel: str, ylabel: str) -> Figure:
    """Lines of `keys` against `x` over the rows (a history table), one per key, with a legend."""
    fig, ax = _axes(title, xlabel, ylabel)
    for key in keys:
        points = [(row[x], row[key]) for row in rows if row.get(key) is not None]
        if points:
            ax.plot(*zip(*points), marker=".", label=key.replace("_", " "))
    ax.legend()
    return fig


def bar_figure(labels: Sequence[str], values: Sequence[float], *, title: str, xlabel: str, ylabel: str) -> Figure:
    """One vertical bar per label."""
    fig, ax = _axes(title, xlabel, ylabel)
    ax.bar(list(labels), list(values), color="tab:blue")
    ax.tick_params(axis="x", labelrotation=45)
    return fig


def save_png(fig: Figure, path: str | os.PathLike) -> None:
    """Write the figure as a PNG, atomically."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")


def figure_pixels(fig: Figure) -> np.ndarray:
    """The figure rendered by the Agg canvas: an RGBA array [height, width, 4] (what DVCLive's log_image takes)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()
