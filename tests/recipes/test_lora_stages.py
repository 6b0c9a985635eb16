"""LoRA in the finetuning stages, as a user runs them: the stage scripts write the merged weights and the
adapter; `gptcore merge` and `--adapter` rebuild the same model from the foundation; bad inputs get one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.recipes.test_resume_stages import _classifier_run, _env, _instructions_run

LORA = {"rank": 4, "alpha": 8.0}
TARGETS = ("att.qkv.weight", "att.out_proj.weight", "ff.fc.weight", "ff.proj.weight")


def _gptcore(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptcore", *args], capture_output=True, text=True, env=env)


def _run_stage(run, env) -> None:
    proc = subprocess.run(run.cmd, cwd=run.workdir, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def lora_classifier(tmp_path_factory, mirror_dir, stage_inputs):
    workdir = tmp_path_factory.mktemp("lora_classifier")
    run = _classifier_run(workdir, stage_inputs, epochs=1, trainable="lora", lora=LORA, progress_minutes=10.0)
    _run_stage(run, _env(mirror_dir))
    return workdir


@pytest.fixture(scope="module")
def lora_instructions(tmp_path_factory, mirror_dir, stage_inputs):
    workdir = tmp_path_factory.mktemp("lora_instructions")
    run = _instructions_run(workdir, stage_inputs, epochs=1, method="lora", lora=LORA, progress_minutes=10.0)
    _run_stage(run, _env(mirror_dir))
    return workdir


def test_the_lm_stage_changes_only_the_targeted_matrices_by_rank_r(lora_instructions, stage_inputs):
    base = load_file(stage_inputs / "lm.safetensors")
    merged = load_file(lora_instructions / "model.safetensors")
    assert merged.keys() == base.keys()
    changed = {name for name in base if not torch.equal(base[name], merged[name])}
    assert changed == {name for name in base if name.endswith(TARGETS)}
    for name in changed:
        delta = merged[name].double() - base[name].double()
        assert 1 <= torch.linalg.matrix_rank(delta, rtol=1e-4).item() <= LORA["rank"], name


def test_the_classifier_stage_trains_adapters_and_the_head(lora_classifier, stage_inputs):
    base = load_file(stage_inputs / "lm.safetensors")
    merged = load_file(lora_classifier / "model.safetensors")
    adapter = load_file(lora_classifier / "adapter.safetensors")
    assert {n for n in adapter if not n.endswith(("lora_A", "lora_B"))} == {"out_head.weight", "out_head.bias"}
    for name, value in merged.items():
        if name.startswith("out_head."):
            assert value.shape[0] == 2
        elif name.endswith(TARGETS):
            assert not torch.equal(value, base[name]), name
        else:  # embeddings, LayerNorms, biases: frozen
            assert torch.equal(value, base[name]), name


@pytest.mark.parametrize("stage", ["lora_classifier", "lora_instructions"])
def test_merge_writes_the_stages_weights_file(stage, request, stage_inputs, tmp_path):
    workdir = request.getfixturevalue(stage)
    out = tmp_path / "merged.safetensors"
    proc = _gptcore("merge", str(stage_inputs / "lm.safetensors"), str(workdir / "adapter.safetensors"), str(out))
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes() == (workdir / "model.safetensors").read_bytes()


def test_adapter_at_load_time_equals_the_merged_file(lora_classifier, lora_instructions, stage_inputs):
    lm = str(stage_inputs / "lm.safetensors")
    texts = ["WINNER!! Claim your prize now", "see you at lunch?"]
    merged = _gptcore("classify", "--model", str(lora_classifier / "model.safetensors"), *texts)
    loaded = _gptcore("classify", "--model", lm, "--adapter", str(lora_classifier / "adapter.safetensors"), *texts)
    assert merged.returncode == loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == merged.stdout and len(merged.stdout.splitlines()) == 2
    prompt = ["--prompt", "Every effort moves you", "--max-new-tokens", "8"]
    merged = _gptcore("generate", "--model", str(lora_instructions / "model.safetensors"), *prompt)
    loaded = _gptcore("generate", "--model", lm, "--adapter", str(lora_instructions / "adapter.safetensors"), *prompt)
    assert merged.returncode == loaded.returncode == 0, loaded.stderr
    assert loaded.stdout == merged.stdout


def test_an_adapter_on_another_base_is_refused_in_one_line(lora_instructions, lora_classifier, stage_inputs, tmp_path):
    other = str(stage_inputs / "lm-no-dropout.safetensors")
    out = tmp_path / "merged.safetensors"
    proc = _gptcore("merge", other, str(lora_instructions / "adapter.safetensors"), str(out))
    assert proc.returncode == 1 and not out.exists()
    assert proc.stderr.count("\n") == 1 and "was trained on base" in proc.stderr
    proc = _gptcore(
        "generate", "--model", other, "--adapter", str(lora_instructions / "adapter.safetensors"), "--prompt", "x"
    )
    assert proc.returncode == 1 and proc.stderr.startswith("error:") and proc.stderr.count("\n") == 1
    lm = str(stage_inputs / "lm.safetensors")
    proc = _gptcore("classify", "--model", lm, "--adapter", str(lora_instructions / "adapter.safetensors"), "hi")
    assert proc.returncode == 1 and "not a classifier's" in proc.stderr and proc.stderr.count("\n") == 1
    proc = _gptcore("merge", lm, str(stage_inputs / "lm.safetensors"), str(out))  # a weights file, not an adapter
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not out.exists()


def test_a_classifier_base_of_another_head_size_is_refused(lora_classifier, stage_inputs, tmp_path):
    """The adapter's head has 2 classes; a 3-class classifier of the same body is not its base (digest), and
    even with the digest check passed the head's shape is refused."""
    from gptcore.errors import WeightsError
    from gptcore.recipes.classifier import build_classifier
    from gptcore.training.adapter_file import apply_adapter, read_adapter
    from gptcore.weights import load_state

    config, state = load_state(stage_inputs / "lm.safetensors")
    three = build_classifier(config, state, 3)
    with pytest.raises(WeightsError, match=r"out_head\.(weight|bias) has shape \(2[,)]"):
        apply_adapter(three, read_adapter(lora_classifier / "adapter.safetensors"), None)


@pytest.mark.parametrize(
    "lora, message",
    [
        ({"rank": 0}, "classifier.lora.rank: must be >= 1, got 0"),
        ({"targets": ["qkv", "attn"]}, "classifier.lora.targets.1: expected one of qkv, out_proj, fc, proj, out_head"),
        ({"targets": ["out_head"]}, "out_head: a classifier's new head trains whole"),
        ({"rank": 64}, "lora rank 64 is larger than trf_blocks.0.att.qkv's 32 inputs"),
    ],
)
def test_bad_lora_params_stop_the_stage_in_one_line(lora, message, tmp_path, mirror_dir, stage_inputs):
    run = _classifier_run(tmp_path, stage_inputs, trainable="lora", lora=lora)
    proc = subprocess.run(run.cmd, cwd=run.workdir, capture_output=True, text=True, env=_env(mirror_dir))
    assert proc.returncode == 1 and proc.stderr.startswith("error:"), proc.stderr[-2000:]
    assert message in proc.stderr and proc.stderr.count("\n") == 1
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "adapter.safetensors").exists()


def test_peft_round_trip_through_the_cli(lora_classifier, lora_instructions, stage_inputs, tmp_path):
    """export --format peft, then convert the folder back: the same adapter file, byte for byte (the
    logits through PeftModel are compared in tests/convert/test_peft.py)."""
    lm = str(stage_inputs / "lm.safetensors")
    for name, workdir in (("lm", lora_instructions), ("classifier", lora_classifier)):
        folder, back = tmp_path / f"{name}-peft", tmp_path / f"{name}-back.safetensors"
        adapter = workdir / "adapter.safetensors"
        proc = _gptcore("export", "--format", "peft", str(adapter), str(folder), "--base", lm)
        if name == "classifier":  # token_position last: GPT2ForSequenceClassification cannot read it that way
            assert proc.returncode == 1 and "last_non_pad" in proc.stderr and not folder.exists(), proc.stderr
            continue
        assert proc.returncode == 0, proc.stderr
        assert (folder / "adapter_config.json").is_file() and (folder / "adapter_model.safetensors").is_file()
        proc = _gptcore("convert", str(folder), str(back), "--base", lm)
        assert proc.returncode == 0, proc.stderr
        assert back.read_bytes() == adapter.read_bytes()


def test_serve_with_an_adapter_answers_as_the_merged_file(lora_instructions, stage_inputs):
    import requests

    from gptcore.serve import LoadOptions, Server

    body = {"model": "m", "prompt": "Every effort moves you", "stream": False}
    body["options"] = {"temperature": 0, "num_predict": 8}
    replies = []
    adapter = LoadOptions(adapter=lora_instructions / "adapter.safetensors")
    for path, load in (
        (lora_instructions / "model.safetensors", LoadOptions()),
        (stage_inputs / "lm.safetensors", adapter),
    ):
        server = Server(path, "127.0.0.1", 0, name="m", device="cpu", quiet=True, load=load).start()
        try:
            reply = requests.post(server.url + "/api/generate", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            replies.append(reply.json()["response"])
        finally:
            server.close()
    assert replies[0] == replies[1]
