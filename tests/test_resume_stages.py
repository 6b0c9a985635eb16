"""Kill a long stage at a random moment, re-run it, and get exactly what an uninterrupted run gives."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

PRETRAIN = {
    "seed": 123,
    "device": "cpu",
    "precision": "fp32",
    "pretrain": {
        "model": {"context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.1},
        "epochs": 3,
        "batch_size": 4,
        "eval_every": 3,
        "eval_batches": 2,
        "sample_tokens": 5,
        "checkpoint_minutes": 0.0,
    },
}


def _pretrain_cmd(workdir: Path, corpus: Path) -> list[str]:
    return [
        sys.executable, str(REPO / "stages/pretrain.py"), "--params", str(workdir / "params.yaml"),
        "--corpus", str(corpus), "--out", str(workdir / "model.safetensors"),
        "--metrics", str(workdir / "metrics.json"), "--plot-table", str(workdir / "loss.csv"),
        "--plot-png", str(workdir / "loss.png"), "--sample", str(workdir / "sample.txt"),
        "--checkpoint-dir", str(workdir / "ck"),
    ]


def _setup(tmp_path: Path, name: str, mirror_dir: Path) -> tuple[Path, list[str]]:
    workdir = tmp_path / name
    workdir.mkdir()
    (workdir / "params.yaml").write_text(yaml.safe_dump(PRETRAIN))
    return workdir, _pretrain_cmd(workdir, mirror_dir / "the-verdict.txt")


def _comparable(workdir: Path) -> dict:
    metrics = json.loads((workdir / "metrics.json").read_text())
    metrics.pop("train_seconds")
    return {
        "weights": (workdir / "model.safetensors").read_bytes(),
        "metrics": metrics,
        "table": (workdir / "loss.csv").read_text(),
        "sample": (workdir / "sample.txt").read_text(),
    }


def _wait_for_progress(workdir: Path, proc: subprocess.Popen, polls: int, timeout: float = 300) -> None:
    """Wait until progress has been saved, then `polls` more 0.2 s ticks: a random moment mid-training."""
    state = workdir / "ck" / "state.pt"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"stage ended before it was interrupted:\n{proc.stderr.read()}")
        if state.is_file():
            polls -= 1
            if polls <= 0:
                return
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


def _env(mirror_dir: Path) -> dict[str, str]:
    """The environment at call time, offline: downloads come from the mirror."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "GPTCORE_MIRROR": str(mirror_dir)}


@pytest.fixture(scope="module")
def pretrain_reference(tmp_path_factory, mirror_dir):
    ref_dir, ref_cmd = _setup(tmp_path_factory.mktemp("pretrain"), "reference", mirror_dir)
    subprocess.run(ref_cmd, check=True, capture_output=True, env=_env(mirror_dir))
    return _comparable(ref_dir)


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
def test_pretrain_resumes_exactly(tmp_path, mirror_dir, sig, pretrain_reference):
    env = _env(mirror_dir)
    run_dir, cmd = _setup(tmp_path, "interrupted", mirror_dir)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    _wait_for_progress(run_dir, proc, polls=random.randint(1, 8))
    proc.send_signal(sig)
    proc.wait(timeout=60)
    assert proc.returncode != 0
    if sig != signal.SIGKILL:
        assert proc.returncode == 130 and "progress saved" in proc.stdout.read() + proc.stderr.read()
    assert not (run_dir / "model.safetensors").exists()  # nothing half-written
    assert (run_dir / "ck" / "state.pt").is_file()

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _comparable(run_dir) == pretrain_reference
