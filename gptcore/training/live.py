"""A training stage's metrics through DVCLive, live while it trains, atomic, and exact on resume.

DVCLive (`dvclive.Live`) writes, in DVC's conventions, one TSV per logged value (`metrics/<name>.tsv`:
step, value), images (`images/<name>`), scikit-learn style plots (`sklearn/<name>.json`) and a
summary (`metrics.json`: the latest value of each, plus `step`). Two things it does not do, and this
module adds:

- **Atomic files.** DVCLive rewrites `metrics.json` in place and appends to the TSVs, so a kill can
  leave a file cut in the middle. Here DVCLive writes into a private staging folder, and after every
  evaluation each of its files is copied to the stage's outputs by write-beside-and-rename: a reader
  (`dvc exp show` while the stage trains) or a kill sees a whole file, old or new.
- **Exact resume.** `Live(resume=True)` continues from the step in the existing `metrics.json`. Under
  DVC that file is gone (DVC removes a stage's outputs before running it), and by hand it may hold
  evaluations made after the last saved progress, which the resumed run makes again: their rows
  would be written twice. Here every run starts DVCLive afresh and first replays the history restored
  from the progress file, so a resumed run writes the same bytes as one that was never interrupted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gptcore.atomic import atomic_path
from gptcore.device import is_main_process

if TYPE_CHECKING:
    from matplotlib.figure import Figure


class TrainingLog:
    """One row per evaluation while a stage trains, then its final summary and figures, through DVCLive.

    Args:
        metrics: where DVCLive's summary goes (a flat JSON object: `dvc metrics`, `dvc exp show`).
        plots: where DVCLive's plots folder goes (`metrics/*.tsv`, `images/*`, `sklearn/*`).
        columns: the history keys logged at each evaluation (`step` is DVCLive's step).

    Only the main process writes (under torchrun the others' calls do nothing). Use it as a context
    manager: leaving it removes the staging folder.
    """

    def __init__(self, metrics: str | os.PathLike, plots: str | os.PathLike, columns: Sequence[str]):
        self.metrics, self.plots, self.columns = Path(metrics), Path(plots), list(columns)
        self.enabled = is_main_process()
        self._staging: tempfile.TemporaryDirectory | None = None
        self._live = None
        self._logged = 0

    def __enter__(self) -> TrainingLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._staging is not None:
            self._staging.cleanup()
            self._staging, self._live = None, None

    def _open(self):
        if self._live is None:
            from dvclive import Live

            self._staging = tempfile.TemporaryDirectory(prefix="gptcore-live-")
            # No dvc.yaml of its own (the project's declares the plots), no report, no experiment
            # commit (a stage under `dvc exp run` is already part of one).
            self._live = Live(dir=self._staging.name, resume=False, report=None, save_dvc_exp=False, dvcyaml=None)
        return self._live

    def update(self, history: Sequence[dict[str, Any]]) -> None:
        """Log the rows of `history` not logged yet, then publish (the `report` callback of gptcore.training.loop.train).

        The first call gets the history restored from saved progress (or nothing): those rows are
        logged first, as the interrupted run logged them.
        """
        if not self.enabled:
            return
        if len(history) < self._logged:
            raise ValueError(f"the history shrank from {self._logged} to {len(history)} rows")
        rows = history[self._logged :]
        if not rows:
            return
        live = self._open()
        for row in rows:
            live.step = int(row["step"])
            for key in self.columns:
                live.log_metric(key, row[key])
            live.next_step()
        self._logged = len(history)
        self._publish()

    def finish(
        self,
        summary: dict[str, Any],
        images: dict[str, Figure] | None = None,
        confusion: tuple[Sequence[str], Sequence[str]] | None = None,
    ) -> None:
        """Add the final metrics to the summary, log the figures (PNG) and the confusion table, publish.

        confusion: (actual, predicted) labels, one pair per example (DVC's confusion template).
        """
        if not self.enabled:
            return
        from gptcore.training.plots import figure_pixels

        live = self._open()
        live.summary.update(summary)
        for name, figure in (images or {}).items():
            live.log_image(name, figure_pixels(figure))
        if confusion is not None:
            live.log_sklearn_plot("confusion_matrix", list(confusion[0]), list(confusion[1]))
        live.end()
        self._publish()

    def _publish(self) -> None:
        """Copy DVCLive's files to the outputs, each written beside its target and renamed onto it;
        files of an earlier run that this one has not written are removed. Plots first, summary last."""
        source = Path(self._live.plots_dir)
        written = set()
        for path in sorted(p for p in source.rglob("*") if p.is_file()):
            target = self.plots / path.relative_to(source)
            with atomic_path(target) as tmp:
                shutil.copyfile(path, tmp)
            written.add(target)
        if self.plots.is_dir():
            for path in self.plots.rglob("*"):
                if path.is_file() and path not in written:
                    path.unlink()
        with atomic_path(self.metrics) as tmp:
            shutil.copyfile(self._live.metrics_file, tmp)
