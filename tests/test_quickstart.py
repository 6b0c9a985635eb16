"""The quick start of docs/quickstart.md, run verbatim: every stage but the judge finishes offline with
the mirror and writes the responses; the judge without Ollama stops with one line and records nothing."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
import yaml

from gptcore.params.schema import Params
from tests.conftest import REPO

DOC = REPO / "docs" / "quickstart.md"


def _sh_blocks(section: str) -> list[str]:
    """The ```sh blocks under a `## section` heading of the quick start page."""
    text = DOC.read_text(encoding="utf-8")
    body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", body, flags=re.DOTALL)


def _key_paths(data: dict, prefix: str = "") -> set[str]:
    paths = set()
    for key, value in data.items():
        paths.add(prefix + key)
        if isinstance(value, dict):
            paths |= _key_paths(value, f"{prefix}{key}.")
    return paths


def test_quickstart_params_are_valid_and_shaped_like_params_yaml():
    """Copied over params.yaml, the file must hold every key dvc.yaml declares, and validate."""
    quick = yaml.safe_load((REPO / "params-quickstart.yaml").read_text())
    full = yaml.safe_load((REPO / "params.yaml").read_text())
    assert _key_paths(quick) == _key_paths(full)
    params = Params.from_dict(quick, where="params-quickstart.yaml")
    assert params.foundation == "scratch"
    assert params.pretrain.model.context_length <= 256  # the Verdict's validation split holds ~510 tokens


def _ollama_answers(port: int = 11434) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_the_readme_and_the_page_give_the_same_three_lines():
    readme = (REPO / "README.md").read_text(encoding="utf-8").split("<!-- quickstart -->", 1)[1]
    (readme_block,) = re.findall(r"```bash\n(.*?)```", readme, flags=re.DOTALL)[:1]
    (page_block,) = _sh_blocks("Run it")[:1]
    assert readme_block == page_block and len(page_block.strip().splitlines()) == 3


@pytest.mark.slow
def test_quickstart_runs_as_documented_and_its_restore_line_leaves_git_clean(repo_copy, mirror_dir):
    # What a clone holds beside the code: the committed results that the quick start rewrites.
    for rel in ("params-quickstart.yaml", "dvc.lock", "metrics", "plots", "samples", ".gitignore", ".dvc/.gitignore"):
        src = REPO / rel
        shutil.copytree(src, repo_copy.root / rel) if src.is_dir() else shutil.copy2(src, repo_copy.root / rel)
    repo_copy.run("git", "add", "-A")
    repo_copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "results")
    (repo_copy.root.parent / "shared").mkdir()
    (repo_copy.root.parent / "shared" / "mirror").symlink_to(mirror_dir)  # ../shared/mirror, as in a clone
    *run_lines, restore_line = _sh_blocks("Run it")[0].strip().splitlines()
    env = {**os.environ, "PYTHONPATH": str(repo_copy.root), "PYTHONUNBUFFERED": "1"}
    env.pop("GPTCORE_MIRROR")  # the block sets it
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]  # dvc, gptcore, python
    proc = subprocess.run(
        ["bash", "-e", "-c", "\n".join(run_lines)],
        cwd=repo_copy.root,
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "ready: nothing in the way of the plan" in proc.stdout  # gptcore doctor's last line

    for name in ("test", "preferences"):  # Stage 4's responses and the preference-tuned model's
        responses = json.loads((repo_copy.root / "data" / "responses" / f"{name}.json").read_text())
        assert len(responses) == 55 and all(isinstance(r["model_response"], str) for r in responses)
    metrics = ["pretrain", "classifier", "classifier_baseline", "instructions", "generation", "preferences"]
    for name in [*metrics, "generation_preferences"]:
        assert (repo_copy.root / "metrics" / f"{name}.json").is_file(), name
    status = json.loads(repo_copy.dvc("status", "--json").stdout or "{}")
    # Every stage is done and recorded but the judges and download_gpt2 (`foundation: scratch` fetches nothing).
    assert set(status) == {"judge", "judge_pairwise", "download_gpt2"}, status
    assert repo_copy.run("git", "status", "--porcelain").stdout.strip()  # the run changed committed files

    ollama = _ollama_answers()
    if not ollama:
        _check_the_judge_stops_without_a_server(repo_copy)
    repo_copy.run("bash", "-e", "-c", restore_line)
    assert repo_copy.run("git", "status", "--porcelain").stdout == ""
    if ollama:
        pytest.skip("an Ollama server answers on this machine: the no-server path cannot be checked")


def _check_the_judge_stops_without_a_server(repo_copy) -> None:
    (judge_block,) = _sh_blocks("The judge (needs Ollama)")[:1]
    assert judge_block.strip().splitlines()[-1] == "dvc repro judge"
    proc = repo_copy.dvc("repro", "judge", check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode != 0
    assert errors == [line for line in DOC.read_text().splitlines() if line.startswith("error: no Ollama")]
    assert not (repo_copy.root / "metrics" / "judge.json").exists()
    assert not (repo_copy.root / "data" / "judge").exists()
