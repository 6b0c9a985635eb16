"""Metrics and plots: DVCLive outputs that are whole at every moment and exact on resume, figures drawn
without pyplot, every `dvc plots` chart declared once with a title and axis names, an offline page."""

from __future__ import annotations

import configparser
import hashlib
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

from gptcore.training.live import TrainingLog
from tests.conftest import REPO

DVC_YAML = yaml.safe_load((REPO / "dvc.yaml").read_text())
COLUMNS = ["epoch", "tokens_seen", "train_loss", "val_loss"]


def _history(n: int) -> list[dict]:
    return [
        {
            "step": 1 + 5 * i,
            "epoch": 1 + i // 3,
            "tokens_seen": 512 * (1 + 5 * i),
            "train_loss": 10.0 / (i + 1) + 1e-9 * i,
            "val_loss": 11.0 / (i + 1),
        }
        for i in range(n)
    ]


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _figure():
    from gptcore.training.plots import line_figure

    return line_figure(
        _history(5),
        "tokens_seen",
        ["train_loss", "val_loss"],
        title="loss",
        xlabel="tokens seen",
        ylabel="loss (nats per token)",
    )


def _run(folder: Path, restored: int, total: int, killed_at: int | None = None) -> None:
    """A stage's logging: the restored rows first (as train's first report), then one row per evaluation."""
    history = _history(total)
    with TrainingLog(folder / "metrics.json", folder / "plots", COLUMNS) as log:
        log.update(history[:restored])
        for n in range(restored + 1, (killed_at or total) + 1):
            log.update(history[:n])
        if killed_at is None:
            log.finish(
                {"train_loss": history[-1]["train_loss"], "steps": history[-1]["step"]}, images={"loss.png": _figure()}
            )


def test_a_resumed_log_writes_what_an_uninterrupted_one_writes(tmp_path):
    _run(tmp_path / "whole", restored=0, total=6)
    # Killed after logging 5 rows whose progress was saved at row 3: the re-run restores 3 rows and
    # makes rows 4 and 5 again (DVCLive's own resume would log them twice, numbered as steps 6 and 7).
    _run(tmp_path / "resumed", restored=0, total=6, killed_at=5)
    (tmp_path / "resumed/plots/metrics/stale.tsv").write_text("step\tstale\n1\t0\n")  # an older run's table
    _run(tmp_path / "resumed", restored=3, total=6)
    assert _files(tmp_path / "resumed") == _files(tmp_path / "whole")

    whole = tmp_path / "whole"
    assert (whole / "plots/metrics/val_loss.tsv").read_text().splitlines() == (
        ["step\tval_loss"] + [f"{row['step']}\t{row['val_loss']}" for row in _history(6)]
    )
    summary = json.loads((whole / "metrics.json").read_text())
    assert summary["step"] == summary["steps"] == 26 and summary["epoch"] == 2
    assert (whole / "plots/images/loss.png").read_bytes()[:4] == b"\x89PNG"


def test_readers_never_see_a_partial_file(tmp_path):
    """`dvc exp show` reads the metrics while the stage writes them: every read must parse."""
    metrics = tmp_path / "metrics.json"
    errors, reads, done = [], [0], threading.Event()

    def read() -> None:
        while not done.is_set():
            try:
                json.loads(metrics.read_text())
                reads[0] += 1
            except FileNotFoundError:
                pass
            except json.JSONDecodeError as err:
                errors.append(err)

    reader = threading.Thread(target=read)
    reader.start()
    history = _history(150)
    try:
        with TrainingLog(metrics, tmp_path / "plots", COLUMNS) as log:
            for n in range(1, len(history) + 1):
                log.update(history[:n])
    finally:
        done.set()
        reader.join()
    assert reads[0] > 0 and not errors


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    with TrainingLog(tmp_path / "metrics.json", tmp_path / "plots", COLUMNS) as log:
        log.update(_history(2))
        log.finish({"steps": 6})
    assert not any(tmp_path.iterdir())


def test_figures_are_titled_and_leave_pyplot_alone(tmp_path):
    from gptcore.training.plots import bar_figure

    with pytest.raises(ValueError, match="title"):
        bar_figure(["a"], [1], title="", xlabel="x", ylabel="y")
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
from tests.training.test_plots import _run
from gptcore.training.plots import bar_figure, save_png
from pathlib import Path
_run(Path({str(tmp_path)!r}), restored=0, total=3)
save_png(bar_figure(["0-9", "10-19"], [3, 1], title="t", xlabel="score", ylabel="entries"), {str(tmp_path / "bars.png")!r})
assert "matplotlib.pyplot" not in sys.modules, "pyplot was imported"
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "bars.png").read_bytes()[:4] == b"\x89PNG"


# --- dvc.yaml --------------------------------------------------------------------------------------


def _definitions() -> dict[str, dict]:
    return {name: props for entry in DVC_YAML["plots"] for name, props in entry.items()}


def _stage_outs() -> set[str]:
    outs = set()
    for stage in DVC_YAML["stages"].values():
        body = stage.get("do", stage)
        outs |= {next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])}
    return outs


def test_every_plot_is_declared_once_with_a_title_and_axis_names():
    sources = []
    for name, props in _definitions().items():
        assert props.get("title") and props.get("x_label") and props.get("y_label"), name
        assert re.search(r"\(.+\)", props["title"] + props["x_label"] + props["y_label"]), f"{name}: no unit"
        for path, fields in props["y"].items():
            sources += [(path, field) for field in ([fields] if isinstance(fields, str) else fields)]
    assert len(sources) == len(set(sources)), "a table column is drawn twice"
    for name, stage in DVC_YAML["stages"].items():
        assert "plots" not in stage.get("do", stage), f"{name}: stage plots are drawn again, untitled"
    outs = _stage_outs()
    for path, _ in sources:
        assert any(path == out or path.startswith(out + "/") for out in outs), f"{path}: no stage writes it"


def test_metrics_are_the_json_files_of_one_folder():
    """A folder, not a list of files: a stage that has not run (the judge) leaves nothing missing."""
    assert DVC_YAML["metrics"] == ["metrics"]
    for name, stage in DVC_YAML["stages"].items():
        assert "metrics" not in stage.get("do", stage), name
    assert all(out.endswith(".json") for out in _stage_outs() if out.startswith("metrics/"))
    assert all(path.suffix == ".json" for path in (REPO / "metrics").iterdir())


def test_the_plots_page_template_works_offline():
    config = configparser.ConfigParser()
    config.read(REPO / ".dvc" / "config")
    template = (REPO / ".dvc" / config["plots"]["html_template"]).resolve()
    assert template == REPO / "vendor" / "vega" / "offline.html"
    page = template.read_text(encoding="utf-8")
    assert "{plot_divs}" in page and "{scripts}" not in page  # DVC adds its CDN links only at {scripts}
    assert not re.search(r"<script[^>]*\ssrc=", page)
    manifest = re.search(r"<!-- (.*?) -->", page).group(1)
    expected = re.findall(r"(vega(?:-lite|-embed)?)@[\d.]+ \S+ sha256:([0-9a-f]{64})", manifest)
    inlined = re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)
    assert [name for name, _ in expected] == ["vega", "vega-lite", "vega-embed"]
    assert [hashlib.sha256(code.encode()).hexdigest() for code in inlined] == [digest for _, digest in expected]


def test_the_confusion_matrix_shows_its_counts():
    """DVC's confusion template hides the counts behind a checkbox; ours is the same template with the
    box ticked from the start (.dvc/plots/, where `dvc plots` looks for templates by name)."""
    import copy

    from dvc_render.vega_templates import ConfusionTemplate

    plots = yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
    (confusion,) = [spec for plot in plots for name, spec in plot.items() if name == "classifier_confusion"]
    ours = json.loads((REPO / ".dvc" / "plots" / f"{confusion['template']}.json").read_text())
    theirs = copy.deepcopy(ConfusionTemplate.DEFAULT_CONTENT)
    theirs["params"][0]["value"] = True
    assert ours == theirs and ours["params"][0]["name"] == "showValues"
