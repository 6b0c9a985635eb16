"""`gptcore doctor`: the default params name the missing 774M checkpoint and the quick start as the way out
(exit 1); the quick start's params with the mirror pass (exit 0); without network or mirror every source
names GPTCORE_MIRROR; a judge in the plan with no server is a problem, one line with its fix."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gptcore.doctor import Finding, stages_in_plan
from gptcore.errors import ConfigError
from tests.conftest import REPO, _merge

QUICK_START_TARGETS = ["pretrain", "baseline_classifier", "finetune_classifier", "generate_responses", "export"]


def _doctor(cwd, *args: str, mirror: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "GPTCORE_DEBUG": ""}
    env.pop("GPTCORE_MIRROR", None)
    if mirror is not None:
        env["GPTCORE_MIRROR"] = mirror
    # A copy of dvc.yaml in a folder with no outputs yet, as in a fresh clone: the files a stage would fetch
    # are looked for beside it (this checkout's data/ may hold them already).
    (Path(cwd) / "dvc.yaml").write_text((REPO / "dvc.yaml").read_text())
    return subprocess.run(
        [sys.executable, "-m", "gptcore", "doctor", "--dvc-yaml", str(Path(cwd) / "dvc.yaml"), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _lines(proc: subprocess.CompletedProcess, status: str, topic: str) -> list[str]:
    return [line for line in proc.stdout.splitlines() if line.startswith(f"{status:4}  {topic}:")]


def test_default_params_name_the_missing_checkpoint_and_the_quick_start(tmp_path, mirror_dir):
    proc = _doctor(tmp_path, "--params", str(REPO / "params.yaml"), mirror=str(mirror_dir))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    (checkpoint,) = [line for line in _lines(proc, "fail", "source") if "774M" in line]
    assert "gpt2/models/774M/" in checkpoint and "quick start" in checkpoint and "foundation: scratch" in checkpoint
    assert _lines(proc, "ok", "params") and _lines(proc, "ok", "torch")
    assert proc.stdout.splitlines()[-1].endswith("problem(s)")


def test_quick_start_params_with_the_mirror_pass(tmp_path, mirror_dir):
    proc = _doctor(
        tmp_path, "--params", str(REPO / "params-quickstart.yaml"), *QUICK_START_TARGETS, mirror=str(mirror_dir)
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [line.split(":")[0] for line in proc.stdout.splitlines()[:-1]] == [
        "ok    params",
        "ok    source",
        "ok    disk",
        *(["ok    kernels"] if _lines(proc, "ok", "kernels") else ["warn  kernels"]),
        "ok    torch",
    ]
    # The Verdict, the SMS collection, the instruction and the preference data (+ the tokenizer's two):
    assert "4 file(s) to fetch" in proc.stdout or "6 file(s) to fetch" in proc.stdout


def test_without_network_or_mirror_every_source_names_the_mirror_and_the_judge_its_fix(tmp_path):
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    closed = "http://127.0.0.1:9"  # the discard port: nothing listens, so the connection is refused
    _merge(
        params,
        {
            "download_corpus": {"url": f"{closed}/the-verdict.txt"},
            "download_sms": {"url": f"{closed}/sms.zip", "backup_url": None},
            "download_instructions": {"url": f"{closed}/instruction-data.json"},
            "download_gpt2": {"base_url": f"{closed}/gpt-2/models"},
            "judge": {"url": closed},
        },
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    proc = _doctor(tmp_path, "--params", "params.yaml")
    assert proc.returncode == 1
    sources = _lines(proc, "fail", "source")
    assert len([s for s in sources if "cannot reach http://127.0.0.1:9" in s]) == 4  # 3 data files + checkpoint
    assert all("set GPTCORE_MIRROR" in s for s in sources)
    (judge,) = _lines(proc, "fail", "judge")
    assert "no Ollama server answers at http://127.0.0.1:9" in judge and "ollama serve" in judge


def test_a_bad_params_file_is_one_fail_line_and_the_machine_is_still_checked(tmp_path):
    (tmp_path / "params.yaml").write_text("seed: abc\nprecision: fp8\n")
    proc = _doctor(tmp_path, "--params", "params.yaml")
    assert proc.returncode == 1
    (line,) = _lines(proc, "fail", "params")
    assert "seed: expected an integer" in line and "precision: expected one of" in line
    assert _lines(proc, "ok", "torch")


def test_the_plan_is_the_targets_and_what_they_need_upstream():
    quick_params = yaml.safe_load((REPO / "params-quickstart.yaml").read_text())
    quick = stages_in_plan(REPO / "dvc.yaml", QUICK_START_TARGETS, quick_params)
    assert "judge" not in quick and {"download_corpus", "foundation", "init_scratch", "prepare_sms"} <= set(quick)
    assert {"finetune_preferences", "generate_responses@instruct", "generate_responses@preferences"} <= set(quick)
    # What `dvc repro` runs for them: every stage but the two judges and download_gpt2 (`foundation: scratch`).
    assert len(quick) == 17 and "download_gpt2" not in quick
    # The foundation stage's dep is models/${foundation}: the plan follows the foundation in params.
    assert set(stages_in_plan(REPO / "dvc.yaml", ["foundation"], {**quick_params, "foundation": "gpt2-xl"})) == {
        "download_gpt2",
        "foundation",
    }
    assert set(stages_in_plan(REPO / "dvc.yaml", ["foundation"], {**quick_params, "foundation": "pretrained"})) == {
        "download_corpus",
        "pretrain",
        "foundation",
    }
    assert "download_gpt2" in stages_in_plan(REPO / "dvc.yaml", ["foundation"])  # params.yaml's gpt2-large
    assert set(stages_in_plan(REPO / "dvc.yaml", ["download_sms"])) == {"download_sms"}
    assert "judge" in stages_in_plan(REPO / "dvc.yaml")
    with pytest.raises(ConfigError, match="no stage pretrian"):
        stages_in_plan(REPO / "dvc.yaml", ["pretrian"])


def test_a_finding_is_one_line_with_its_fix():
    assert Finding("fail", "disk", "2 GB free", "free space").line() == "fail  disk: 2 GB free; fix: free space"
    assert Finding("ok", "torch", "torch 2").line() == "ok    torch: torch 2"
