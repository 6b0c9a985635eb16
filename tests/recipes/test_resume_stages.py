"""Kill a long stage at a random moment, re-run it, and get exactly what an uninterrupted run gives.

Every long stage (pretrain, finetune_classifier, finetune_instructions, generate_responses, judge)
runs as a real process on tiny real data, is interrupted once its progress file exists, and is run
again; its outputs must then equal those of a run that was never interrupted (bitwise on CPU, with
wall-clock fields dropped), the DVCLive metrics and plots folder included: the killed run left live
values there, and the resumed run rebuilt them from its saved progress.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

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
        "progress_minutes": 0.0,
    },
}


def _pretrain_cmd(workdir: Path, corpus: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "stages/pretrain.py"),
        "--params",
        str(workdir / "params.yaml"),
        "--corpus",
        str(corpus),
        "--out",
        str(workdir / "model.safetensors"),
        "--metrics",
        str(workdir / "metrics.json"),
        "--plots",
        str(workdir / "plots"),
        "--sample",
        str(workdir / "sample.txt"),
        "--progress-dir",
        str(workdir / "ck"),
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
        "plots": _folder(workdir / "plots"),
        "sample": (workdir / "sample.txt").read_text(),
    }


def _folder(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path (tables, figures: compared byte for byte)."""
    return {path.relative_to(root).as_posix(): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def _live_outputs_are_whole(metrics: Path, plots: Path) -> None:
    """What a killed training stage leaves of its DVCLive outputs: nothing, or whole files (JSON that
    parses, tables whose every row has its two fields), never a file cut in the middle."""
    if metrics.exists():
        assert json.loads(metrics.read_text())["step"] >= 1
    for table in plots.glob("metrics/*.tsv"):
        rows = table.read_text().splitlines()
        assert rows[0] == f"step\t{table.stem}" and all(len(row.split("\t")) == 2 for row in rows), table


def _wait_for_progress(
    workdir: Path, proc: subprocess.Popen, polls: int, timeout: float = 300, progress: str = "ck/state.pt"
) -> None:
    """Wait until progress has been saved, then `polls` more 0.2 s ticks: a random moment mid-training."""
    state = workdir / progress
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"stage ended before it was interrupted:\n{proc.stderr.read()}")
        if state.is_file():
            polls -= 1
            if polls <= 0:
                return
        time.sleep(0.2)
    raise AssertionError("no saved progress appeared")


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
    _live_outputs_are_whole(run_dir / "metrics.json", run_dir / "plots")
    assert (run_dir / "ck" / "state.pt").is_file()

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert _comparable(run_dir) == pretrain_reference


@pytest.mark.slow
def test_piped_ctrl_c_saves_progress(tmp_path, mirror_dir):
    """`dvc repro 2>&1 | tee log` and Ctrl-C: the terminal sends SIGINT to the stage and its reader at
    once, so the stage's next write meets a closed pipe. Progress must still be saved (here only at the
    stop: no periodic saves), the exit must be the interrupt's, and a re-run must resume exactly."""
    env = _env(mirror_dir)
    params = {**PRETRAIN, "pretrain": {**PRETRAIN["pretrain"], "eval_every": 1, "progress_minutes": 60.0}}
    reference_dir, reference_cmd = _setup(tmp_path, "reference", mirror_dir)
    (reference_dir / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(reference_cmd, check=True, capture_output=True, env=env)

    run_dir, cmd = _setup(tmp_path, "interrupted", mirror_dir)
    (run_dir / "params.yaml").write_text(yaml.safe_dump(params))
    log = run_dir / "log.txt"
    stage = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, process_group=0)
    with log.open("wb") as sink:  # `tee`: copies its input until the Ctrl-C ends it
        reader = subprocess.Popen(
            [sys.executable, "-c", "import shutil, sys; shutil.copyfileobj(sys.stdin.buffer, sys.stdout.buffer, 16)"],
            stdin=stage.stdout,
            stdout=sink,
            process_group=stage.pid,
        )
    stage.stdout.close()  # the reader holds the pipe's only read end
    deadline = time.monotonic() + 300
    while b"train:" not in log.read_bytes() or b"loss" not in log.read_bytes():  # training has started
        assert stage.poll() is None and time.monotonic() < deadline, "stage ended before it was interrupted"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    os.killpg(stage.pid, signal.SIGINT)  # the terminal's Ctrl-C: the whole foreground process group
    assert stage.wait(timeout=60) == 130
    reader.wait(timeout=60)
    assert not (run_dir / "model.safetensors").exists()  # nothing half-written
    assert (run_dir / "ck" / "state.pt").is_file()

    resumed = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming from" in resumed.stderr
    assert _comparable(run_dir) == _comparable(reference_dir)


# --- the finetuning, generation and judge stages ------------------------------------------------
# One kill each (SIGKILL: nothing runs after it, the hardest case); the signal handling itself is
# covered by the pretrain cases above, since every training stage shares that loop.

RUN = {"seed": 123, "device": "cpu", "precision": "fp32"}


@dataclass
class StageRun:
    """One stage as a process: its command, where it keeps progress, and what it writes."""

    workdir: Path
    cmd: list[str]
    started: Callable[[Path], bool]  # progress has been saved (so a kill now interrupts real work)
    outputs: list[str]  # files (or folders) compared with an uninterrupted run
    volatile: dict[str, set[str]] = field(default_factory=dict)  # JSON file -> wall-clock keys to drop
    live: tuple[str, ...] = ()  # DVCLive outputs (metrics JSON, plots folder): written while it runs

    def comparable(self) -> dict[str, object]:
        seen: dict[str, object] = {}
        for name in self.outputs:
            path = self.workdir / name
            if path.is_dir():
                seen[name] = _folder(path)
            elif name in self.volatile:
                seen[name] = {k: v for k, v in json.loads(path.read_text()).items() if k not in self.volatile[name]}
            elif name.endswith(".jsonl"):  # judge records carry the time they were made
                seen[name] = [
                    {k: v for k, v in json.loads(line).items() if k != "time"} for line in path.read_text().splitlines()
                ]
            else:
                seen[name] = path.read_bytes()
        return seen


def _stage(name: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{name}.py"), "--params", "params.yaml"]


def _progress_saved(workdir: Path) -> bool:
    return (workdir / "ck" / "state.pt").is_file()


def _lines_at_least(name: str, n: int) -> Callable[[Path], bool]:
    def started(workdir: Path) -> bool:
        path = workdir / name
        return path.is_file() and len(path.read_text().splitlines()) >= n

    return started


def _classifier_run(workdir: Path, inputs: Path, foundation: str = "lm.safetensors", **overrides) -> StageRun:
    params = {
        **RUN,
        "classifier": {
            "epochs": 3,
            "batch_size": 8,
            "lr": 1e-3,
            "eval_every": 5,
            "eval_batches": 2,
            "trainable": "all",
            "progress_minutes": 0.0,
            **overrides,
        },
    }
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("finetune_classifier") + [
        "--foundation",
        str(inputs / foundation),
        "--train",
        str(inputs / "train.csv"),
        "--validation",
        str(inputs / "validation.csv"),
        "--test",
        str(inputs / "test.csv"),
        "--out",
        "model.safetensors",
        "--adapter-out",
        "adapter.safetensors",
        "--metrics",
        "metrics.json",
        "--plots",
        "plots",
        "--progress-dir",
        "ck",
    ]
    lora = overrides.get("trainable") == "lora" or overrides.get("method") == "lora"
    return StageRun(
        workdir,
        cmd,
        _progress_saved,
        ["model.safetensors", "metrics.json", "plots", *(["adapter.safetensors"] if lora else [])],
        {"metrics.json": {"train_seconds"}},
        live=("metrics.json", "plots"),
    )


def _instructions_run(workdir: Path, inputs: Path, foundation: str = "lm.safetensors", **overrides) -> StageRun:
    params = {
        **RUN,
        "instructions": {
            "epochs": 2,
            "batch_size": 4,
            "lr": 1e-3,
            "eval_every": 3,
            "eval_batches": 2,
            "allowed_max_length": 96,
            "progress_minutes": 0.0,
            **overrides,
        },
    }
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("finetune_instructions") + [
        "--model",
        str(inputs / foundation),
        "--train",
        str(inputs / "train.json"),
        "--val",
        str(inputs / "val.json"),
        "--out",
        "model.safetensors",
        "--adapter-out",
        "adapter.safetensors",
        "--metrics",
        "metrics.json",
        "--plots",
        "plots",
        "--progress-dir",
        "ck",
    ]
    lora = overrides.get("trainable") == "lora" or overrides.get("method") == "lora"
    return StageRun(
        workdir,
        cmd,
        _progress_saved,
        ["model.safetensors", "metrics.json", "plots", *(["adapter.safetensors"] if lora else [])],
        {"metrics.json": {"train_seconds"}},
        live=("metrics.json", "plots"),
    )


def _generation_run(workdir: Path, inputs: Path) -> StageRun:
    params = {**RUN, "generate": {"max_new_tokens": 24, "temperature": 1.0, "top_k": 20, "seed": 7, "batch_size": 2}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("generate_responses") + [
        "--model",
        str(inputs / "lm.safetensors"),
        "--test",
        str(inputs / "test.json"),
        "--out",
        "responses.json",
        "--metrics",
        "metrics.json",
        "--progress-dir",
        "ck",
    ]
    # The log's first line is its header; a second line is a finished batch.
    return StageRun(
        workdir,
        cmd,
        _lines_at_least("ck/partial.jsonl", 2),
        ["responses.json", "metrics.json"],
        {"metrics.json": {"generation_seconds", "tokens_per_second"}},
    )


def _judge_run(workdir: Path, inputs: Path, url: str) -> StageRun:
    responses = [
        {**entry, "model_response": f"answer {i}"}
        for i, entry in enumerate(json.loads((inputs / "test.json").read_text()))
    ]
    (workdir / "responses.json").write_text(json.dumps(responses))
    params = {"judge": {"url": url, "retries": 1, "backoff": 0.0, "timeout": 10.0}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("judge") + [
        "--responses",
        "responses.json",
        "--scores",
        "scores.jsonl",
        "--metrics",
        "metrics.json",
        "--scores-table",
        "scores.csv",
        "--histogram-table",
        "histogram.csv",
        "--histogram-png",
        "histogram.png",
    ]
    return StageRun(workdir, cmd, _lines_at_least("scores.jsonl", 1), ["scores.jsonl", "metrics.json", "scores.csv"])


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once (torchrun puts its workers in sessions of
    their own, out of reach of a kill of its process group). Linux /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(todo.pop())
        todo += children.get(tree[-1], [])
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _kill_and_resume(
    make: Callable[[Path], StageRun], tmp_path: Path, env: dict[str, str], launcher: Sequence[str] = ()
) -> str:
    """Run uninterrupted; run again, SIGKILL it at a random moment after it saved progress, re-run; compare.

    launcher: arguments between the interpreter and the stage script (torchrun's); the kill takes the
    launcher and all its workers at once.
    """

    def command(run: StageRun) -> list[str]:
        return [run.cmd[0], *launcher, *run.cmd[1:]]

    (tmp_path / "reference").mkdir()
    reference = make(tmp_path / "reference")
    whole = subprocess.run(command(reference), cwd=reference.workdir, capture_output=True, text=True, env=env)
    assert whole.returncode == 0, whole.stderr

    (tmp_path / "interrupted").mkdir()
    stage = make(tmp_path / "interrupted")
    proc = subprocess.Popen(
        command(stage), cwd=stage.workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.monotonic() + 300
    while not stage.started(stage.workdir):
        if proc.poll() is not None:
            raise AssertionError(f"stage ended before it saved progress:\n{proc.stderr.read()}")
        assert time.monotonic() < deadline, "no progress was saved"
        time.sleep(0.05)
    time.sleep(random.uniform(0.0, 0.5))
    assert proc.poll() is None, "stage finished before it could be interrupted; give it more work"
    _kill_tree(proc.pid)
    proc.wait(timeout=60)
    assert not any(
        (stage.workdir / name).exists()
        for name in stage.outputs
        if not name.endswith(".jsonl") and name not in stage.live
    ), "a half-run left an output behind"
    if stage.live:
        _live_outputs_are_whole(*(stage.workdir / name for name in stage.live))

    resumed = subprocess.run(command(stage), cwd=stage.workdir, capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert stage.comparable() == reference.comparable()
    return resumed.stdout + resumed.stderr


def _lora_classifier_run(workdir: Path, inputs: Path) -> StageRun:
    return _classifier_run(workdir, inputs, trainable="lora", lora={"rank": 4, "alpha": 8.0, "dropout": 0.1})


def _lora_instructions_run(workdir: Path, inputs: Path) -> StageRun:
    return _instructions_run(workdir, inputs, method="lora", lora={"rank": 4, "alpha": 8.0, "dropout": 0.1})


@pytest.mark.slow
@pytest.mark.parametrize(
    "make, says",
    [
        (_classifier_run, "resuming from"),
        (_instructions_run, "resuming from"),
        (_generation_run, "responses already generated"),
        (_lora_classifier_run, "resuming from"),
        (_lora_instructions_run, "resuming from"),
    ],
    ids=["finetune_classifier", "finetune_instructions", "generate_responses", "lora_classifier", "lora_instructions"],
)
def test_stage_resumes_exactly(tmp_path, mirror_dir, stage_inputs, make, says):
    log = _kill_and_resume(lambda d: make(d, stage_inputs), tmp_path, _env(mirror_dir))
    assert says in log


@pytest.mark.slow
def test_torchrun_stage_resumes_exactly(tmp_path, mirror_dir, stage_inputs):
    """Two gloo processes killed together mid-run, as a lost machine would leave them, then launched
    again: rank 0's saved progress brings both back, and the outputs equal an uninterrupted two-process run."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**_env(mirror_dir), "OMP_NUM_THREADS": "1"}
    make = lambda d: _classifier_run(d, stage_inputs, "lm-no-dropout.safetensors", grad_accum=2)  # noqa: E731
    log = _kill_and_resume(make, tmp_path, env, launcher=torchrun)
    assert "resuming from" in log


@pytest.mark.slow
def test_torchrun_with_dropout_resumes_exactly(tmp_path, mirror_dir, stage_inputs):
    """Per-rank randomness: two gloo processes, dropout 0.1 (each rank draws its own masks from seed +
    rank), a global batch of 3 that two processes cannot split evenly; killed together mid-run and
    launched again, each rank restores its own RNG state and the outputs equal an uninterrupted run."""
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**_env(mirror_dir), "OMP_NUM_THREADS": "1"}
    make = lambda d: _instructions_run(d, stage_inputs, "lm.safetensors", batch_size=3)  # noqa: E731
    log = _kill_and_resume(make, tmp_path, env, launcher=torchrun)
    assert "resuming from" in log


@pytest.mark.slow
def test_judge_resumes_without_asking_twice(tmp_path, mirror_dir, stage_inputs):
    from tests.recipes.test_judge import FakeOllama

    n = len(json.loads((stage_inputs / "test.json").read_text()))
    # Each answer takes a moment (as a real judge's would), so that the kill lands mid-run.
    script = {f"answer {i}": [("stall", 0.15), str(10 + 3 * i)] for i in range(n)}
    with FakeOllama(script) as fake:
        _kill_and_resume(lambda d: _judge_run(d, stage_inputs, fake.url), tmp_path, _env(mirror_dir))
        chats = len(fake.chats())
    # n for the reference run; the interrupted run and its re-run ask each entry once, plus at
    # most the one request that was in flight when the kill landed.
    assert 2 * n <= chats <= 2 * n + 1
