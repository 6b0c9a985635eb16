"""The `foundation` stage depends only on what the chosen foundation reads (issue 31): its one source dep,
`models/${foundation}`, is Stage 1's folder for `pretrained`/`scratch` and the download_gpt2 stage's
checkpoint folder for an OpenAI GPT-2. So with an OpenAI foundation a Stage 1 change re-runs Stage 1
alone, and `dvc repro finetune_classifier` neither trains Stage 1 nor builds the scratch model; with
`pretrained` a Stage 1 change makes `foundation` stale; `dvc repro` alone still runs Stage 1.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import yaml

from gptcore.config import OPENAI_SIZES
from gptcore.convert.openai import prepare_foundation
from gptcore.convert.openai_download import CHECKPOINT_FILES, STAGE1_FOUNDATIONS, fetch_openai_foundation
from gptcore.errors import ConfigError, WeightsError
from gptcore.params.schema import FOUNDATIONS
from tests.conftest import REPO
from tests.tf_checkpoints import hf_model, openai_arrays, write_checkpoint

STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
STAGE1 = {"download_corpus", "pretrain", "init_scratch"}


def test_dvc_yaml_reads_the_foundations_folder_and_download_gpt2_writes_the_openai_ones():
    foundation, download = STAGES["foundation"], STAGES["download_gpt2"]
    assert "models/${foundation}" in foundation["deps"] and "--source models/${foundation}" in foundation["cmd"]
    assert not [d for d in foundation["deps"] if isinstance(d, str) and d.startswith("models/") and "${" not in d]
    assert [next(iter(o)) for o in download["outs"]] == [f"models/{name}" for name in OPENAI_SIZES]
    assert all(o[next(iter(o))] == {"cache": False, "persist": True} for o in download["outs"])
    # Every foundation's folder is written by exactly the stage it comes from.
    writers = {next(iter(o)) if isinstance(o, dict) else o: n for n, s in STAGES.items() for o in s.get("outs", [])}
    assert {f: writers.get(f"models/{f}/model.safetensors", writers.get(f"models/{f}")) for f in FOUNDATIONS} == {
        **dict.fromkeys(OPENAI_SIZES, "download_gpt2"),
        "pretrained": "pretrain",
        "scratch": "init_scratch",
    }


def _upstream(repo_copy, target: str) -> dict[str, set[str]]:
    """DVC's own graph of `dvc dag TARGET` (its ${...} interpolation, not ours): each stage with every
    stage upstream of it."""
    dot = repo_copy.dvc("dag", "--dot", target).stdout
    nodes = set(re.findall(r'^"([^"]+)";$', dot, re.MULTILINE))
    parents = {node: set() for node in nodes}
    for parent, child in re.findall(r'^"([^"]+)" -> "([^"]+)";$', dot, re.MULTILINE):
        parents[child].add(parent)
    closed = {}
    for node in nodes:
        seen, todo = set(), [node]
        while todo:
            for parent in parents[todo.pop()] - seen:
                seen.add(parent)
                todo.append(parent)
        closed[node] = seen
    return closed


def test_dvc_links_the_foundation_to_its_own_source_only(repo_copy):
    sources = {**dict.fromkeys(OPENAI_SIZES, {"download_gpt2"}), "pretrained": STAGE1 - {"init_scratch"}}
    sources["scratch"] = {"init_scratch"}
    for name in FOUNDATIONS:
        repo_copy.set_params({"foundation": name})
        upstream = _upstream(repo_copy, "finetune_classifier")
        assert upstream["foundation"] == sources[name], name
        assert STAGE1 & upstream["finetune_classifier"] == (set() if name in OPENAI_SIZES else sources[name]), name


def test_download_gpt2_fetches_the_chosen_size_and_keeps_every_openai_folder(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    for name in CHECKPOINT_FILES:
        (mirror / "gpt2/models/124M").mkdir(parents=True, exist_ok=True)
        (mirror / "gpt2/models/124M" / name).write_text(f"124M/{name}")
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))
    models = tmp_path / "models"
    args = dict(base_url="https://example.invalid/gpt-2/models", partial_dir=tmp_path / "partial", show_progress=False)

    assert fetch_openai_foundation("pretrained", models, **args) is None
    assert sorted(p.name for p in models.iterdir()) == sorted(OPENAI_SIZES)
    assert not any(any((models / name).iterdir()) for name in OPENAI_SIZES)  # empty: nothing fetched

    (models / "gpt2-xl" / "kept.txt").write_text("fetched earlier")
    assert fetch_openai_foundation("gpt2-small", models, **args) == models / "gpt2-small"
    assert sorted(p.name for p in (models / "gpt2-small").iterdir()) == sorted([*CHECKPOINT_FILES, ".source"])
    assert (models / "gpt2-small" / "vocab.bpe").read_text() == "124M/vocab.bpe"
    assert (models / "gpt2-xl" / "kept.txt").read_text() == "fetched earlier"  # another size is left alone

    with pytest.raises(ConfigError, match=r"^foundation: 'gpt3' is not one of gpt2-small, .*, pretrained, scratch$"):
        fetch_openai_foundation("gpt3", tmp_path / "other", **args)
    assert not (tmp_path / "other").exists()


def test_prepare_foundation_copies_stage1_weights_from_the_folder(tmp_path):
    for name in STAGE1_FOUNDATIONS:
        (tmp_path / name).mkdir()
        (tmp_path / name / "model.safetensors").write_bytes(name.encode())
        out = tmp_path / "foundation" / f"{name}.safetensors"
        assert prepare_foundation(name, tmp_path / name, out) == str(tmp_path / name / "model.safetensors")
        assert out.read_bytes() == name.encode()
    with pytest.raises(
        WeightsError, match=r"model\.safetensors: no such file; run Stage 1 first \(dvc repro pretrain\)"
    ):
        prepare_foundation("pretrained", tmp_path / "empty", tmp_path / "out.safetensors")
    with pytest.raises(ConfigError, match="'gpt3' is not one of"):
        prepare_foundation("gpt3", tmp_path / "pretrained", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def _ran(proc) -> list[str]:
    return re.findall(r"Running stage '([^']+)'", proc.stdout)


def _status(repo_copy, *targets: str) -> set[str]:
    return set(json.loads(repo_copy.dvc("status", "--json", *targets).stdout or "{}"))


@pytest.mark.slow
def test_stage1_is_upstream_of_the_finetuning_only_for_a_stage1_foundation(
    repo_copy, tmp_path, mirror_dir, monkeypatch
):
    """With `foundation: gpt2-small` (a TensorFlow-written checkpoint in the mirror's 124M slot):
    `dvc repro finetune_classifier` from clean runs no Stage 1 stage (`dvc repro` alone still would), and
    a Stage 1 experiment re-runs Stage 1 alone. With `foundation: pretrained`, a Stage 1
    params change makes `foundation` stale and `dvc repro finetune_classifier` re-runs the chain."""
    mirror = tmp_path / "mirror"
    shutil.copytree(mirror_dir, mirror)
    hparams = dict(n_vocab=50257, n_ctx=24, n_embd=8, n_head=2, n_layer=1)
    write_checkpoint(
        mirror / "gpt2/models/124M", hparams, openai_arrays(hf_model(hparams, seed=7), 1), mirror_dir / "gpt2"
    )
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))
    shutil.copy2(REPO / "params-quickstart.yaml", repo_copy.root / "params.yaml")
    repo_copy.set_params({"foundation": "gpt2-small", "classifier": {"epochs": 1}})
    repo_copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qam", "gpt2-small")

    clean = _ran(repo_copy.dvc("repro", "finetune_classifier"))
    assert sorted(clean) == ["download_gpt2", "download_sms", "finetune_classifier", "foundation", "prepare_sms"]
    assert not (repo_copy.root / "models/pretrained").exists() and not (repo_copy.root / "models/scratch").exists()
    # `dvc repro` alone runs every stage `dvc status` names (its --dry stops at the first dep not made yet).
    assert STAGE1 <= _status(repo_copy)

    repo_copy.dvc("repro", "pretrain", "init_scratch")
    repo_copy.run("git", "add", "-A")
    repo_copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "Stage 1")
    experiment = repo_copy.dvc("exp", "run", "-S", "pretrain.lr=0.001", "pretrain", "finetune_classifier")
    assert _ran(experiment) == ["pretrain"], experiment.stdout
    assert not {"foundation", "finetune_classifier"} & _status(repo_copy)

    switched = repo_copy.dvc("exp", "run", "-S", "foundation=pretrained", "finetune_classifier")
    assert _ran(switched) == ["foundation", "finetune_classifier"], switched.stdout
    repo_copy.set_params({"pretrain": {"lr": 0.002}})
    assert _status(repo_copy, "foundation") == set()  # not yet: Stage 1's weights are unchanged
    repo_copy.dvc("repro", "pretrain")
    assert "foundation" in _status(repo_copy)  # now its source folder changed
    assert _ran(repo_copy.dvc("repro", "finetune_classifier")) == ["foundation", "finetune_classifier"]

    # An unknown value: DVC stops on the missing folder, in one line, before the stage runs.
    repo_copy.set_params({"foundation": "gpt3"})
    failed = repo_copy.dvc("repro", "foundation", check=False)
    errors = [line for line in failed.stderr.splitlines() if line.startswith("ERROR")]
    assert failed.returncode != 0 and len(errors) == 1 and "models/gpt3" in errors[0], failed.stderr
