"""End to end through DVC, offline: download_corpus -> pretrain with a tiny model, then the DVC workflow
a user follows (nothing to do on a second run; an experiment; metrics diff, exp show, plots show)."""

import json
import re

import pytest
import yaml

from tests.conftest import REPO

TINY = {
    "precision": "fp32",
    "pretrain": {
        "model": {"context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.1},
        "epochs": 2,
        "batch_size": 4,
        "eval_every": 5,
        "eval_batches": 2,
        "sample_tokens": 8,
    },
}


@pytest.mark.slow
def test_pretrain_stage_through_dvc(repo_copy):
    repo_copy.set_params(TINY)
    repo_copy.dvc("repro", "pretrain")
    root = repo_copy.root
    assert (root / "data/raw/the-verdict.txt").stat().st_size == 20479
    metrics = repo_copy.read_json("metrics/pretrain.json")
    assert set(metrics) >= {"train_loss", "val_loss", "train_perplexity", "val_perplexity", "tokens_seen", "step"}
    rows = (root / "plots/pretrain/metrics/train_loss.tsv").read_text().splitlines()
    assert rows[0] == "step\ttrain_loss" and rows[1].startswith("1\t")
    assert rows[-1] == f"{metrics['steps']}\t{metrics['train_loss']}"
    assert float(rows[-1].split("\t")[1]) < float(rows[1].split("\t")[1])
    assert (root / "plots/pretrain/images/loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "samples/pretrain.txt").read_text().startswith("Every effort moves you")
    assert (root / "progress/pretrain/done.json").is_file()
    assert not (root / "progress/pretrain/state.pt").exists()

    again = repo_copy.dvc("repro", "pretrain")
    assert "up to date" in again.stdout or "didn't change" in again.stdout

    from gptcore import load_model

    model = load_model(root / "models/pretrained/model.safetensors")
    assert model.config.context_length == 64

    repo_copy.run("git", "add", "-A")
    repo_copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "baseline")
    repo_copy.dvc("exp", "run", "-S", "pretrain.epochs=1", "pretrain")
    diff = repo_copy.dvc("metrics", "diff", "--json")
    changed = json.loads(diff.stdout)["metrics/pretrain.json"]
    assert changed["tokens_seen"]["diff"] < 0
    # The other stages' metrics (the judge's among them) do not exist here: nothing to fail to load.
    assert "failed to load" not in diff.stderr + repo_copy.dvc("metrics", "diff").stderr

    # The README's experiment table: the changed param and the kept metrics, no noise columns.
    command = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show"))
    table = repo_copy.run("bash", "-c", command.split("#")[0]).stdout
    header = table.splitlines()[0]
    assert "pretrain.epochs" in header and "val_loss" in header
    assert not re.search(r"Created|gptcore/|perplexity|seconds|pretrain\.lr", header), header

    # Plots: each declared once, titled, offline (the page carries its scripts; no CDN).
    shown = repo_copy.dvc("plots", "show", "--json", "pretrain_loss").stdout
    spec = json.loads(shown)["data"]["pretrain_loss"][0]["content"]
    assert spec["title"]["text"] == "Stage 1 pretraining: loss"
    axis_titles = set(re.findall(r'"title": "([^"]*)"', json.dumps(spec)))
    assert {"tokens seen", "cross-entropy loss (nats per token)"} <= axis_titles
    repo_copy.dvc("plots", "show", "-o", "page")
    page = (root / "page" / "index.html").read_text()
    assert "cdn.jsdelivr" not in page and not re.search(r"<script[^>]*\ssrc=", page)
    definitions = len(yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"])
    assert (
        page.count("vegaEmbed('#") == definitions == 12
    )  # one chart per definition in dvc.yaml, the not-yet-run stages' empty


def test_cli_generate_and_errors(tmp_path, tiny_config):
    import subprocess
    import sys

    from gptcore import GPTModel, save_model

    path = tmp_path / "m.safetensors"
    save_model(GPTModel(tiny_config), path)

    def run(*a):
        return subprocess.run([sys.executable, "-m", "gptcore", *a], capture_output=True, text=True)

    out = run(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "5",
        "--temperature",
        "1",
        "--top-k",
        "4",
        "--seed",
        "3",
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("Hello there")
    again = run(
        "generate",
        "--model",
        str(path),
        "--prompt",
        "Hello there",
        "--max-new-tokens",
        "5",
        "--temperature",
        "1",
        "--top-k",
        "4",
        "--seed",
        "3",
    )
    assert again.stdout == out.stdout
    bad = run("generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x")
    assert bad.returncode == 1
    assert bad.stderr.strip().count("\n") == 0 and "missing.safetensors" in bad.stderr
    assert "Traceback" not in bad.stderr
