"""Plot tables (CSV, for `dvc plots`) and PNG figures of training histories."""

from __future__ import annotations

import csv
import io
import os
from typing import Sequence

from gptcore.atomic import atomic_path, write_text


def write_table(path: str | os.PathLike, rows: Sequence[dict], columns: Sequence[str] | None = None) -> None:
    """A CSV with one row per dict; columns default to the keys of the first row."""
    columns = list(columns or (rows[0].keys() if rows else []))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def plot_curves(
    path: str | os.PathLike,
    rows: Sequence[dict],
    keys: Sequence[str],
    *,
    x: str = "step",
    ylabel: str = "loss",
    title: str = "",
) -> None:
    """A PNG line plot of `keys` against `x`, written atomically."""
    import matplotlib

    matplotlib.use("Agg")  # files only; never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key in keys:
        points = [(r[x], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax.plot(*zip(*points), label=key.replace("_", " "))
    ax.set_xlabel(x.replace("_", " "))
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
