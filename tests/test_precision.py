"""Precision values with one meaning each, fp32 logits in decoding, loss scaling, the finite-loss guard."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import gptcore.precision as precision_module
from gptcore.config import GPTConfig
from gptcore.data.loader import make_loader
from gptcore.errors import ConfigError, TrainingError
from gptcore.inference.decoding import cast_for_inference, decoding_weight_dtypes, generate, next_token_logits
from gptcore.model import GPTModel
from gptcore.params.schema import RunConfig
from gptcore.precision import resolve_precision
from gptcore.training.evaluation import lm_loss
from gptcore.training.loop import LoopOptions, train
from gptcore.training.progress import Progress
from gptcore.training.step import make_optimizer

CPU = torch.device("cpu")
TINY = GPTConfig(vocab_size=64, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)


@pytest.mark.parametrize(
    "native, purpose, expected",
    [
        (True, "train", "bf16-mixed"),
        (True, "inference", "bf16-true"),
        (False, "train", "fp32"),
        (False, "inference", "fp32"),
    ],
)
def test_auto_on_cpu(monkeypatch, native, purpose, expected):
    monkeypatch.setattr(precision_module, "cpu_has_native_bf16", lambda: native)
    assert resolve_precision("auto", CPU, purpose) == expected


def test_auto_on_cuda_counts_only_native_bf16(monkeypatch):
    seen = {}

    def is_bf16_supported(including_emulation=True):
        seen["including_emulation"] = including_emulation
        return including_emulation  # a V100/T4: bf16 only by emulation

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    assert resolve_precision("auto", torch.device("cuda"), "train") == "fp32"
    assert seen == {"including_emulation": False}


@pytest.mark.parametrize("value", ["fp32", "bf16-mixed", "bf16-true", "fp16-mixed"])
def test_explicit_values_are_kept(value):
    assert resolve_precision(value, CPU, "train") == value
    assert RunConfig.from_dict({"precision": value}).precision == value


@pytest.mark.parametrize("old, new", [("bf16", "bf16-mixed or bf16-true"), ("fp16", "fp16-mixed")])
def test_old_values_name_the_new_ones(old, new):
    with pytest.raises(ConfigError, match=f"renamed: use {new}"):
        resolve_precision(old, CPU)
    with pytest.raises(ConfigError, match=f"params.yaml: precision: unknown value '{old}' .*{new}"):
        RunConfig.from_dict({"precision": old}, where="params.yaml")


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_true_decoding_gives_fp32_logits(tie):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "drop_rate": 0.0, "tie_embeddings": tie})).eval()
    embedding = model.tok_emb.weight.detach().clone()
    cast_for_inference(model, "bf16-true")
    assert model.trf_blocks[0].att.qkv.weight.dtype == torch.bfloat16
    assert model.tok_emb.weight.dtype == torch.bfloat16 and model.final_norm.weight.dtype == torch.float32
    head_dtype = decoding_weight_dtypes("bf16-true", "none", torch.device("cpu"))[1]
    assert model.out_head.weight.dtype == head_dtype
    if head_dtype == torch.float32 and tie:  # untied for inference, with the embedding's exact fp32 values
        assert torch.equal(model.out_head.weight, embedding)
    elif tie:  # the gemv head reads the bf16 embedding itself
        assert model.out_head.weight.data_ptr() == model.tok_emb.weight.data_ptr()
    idx = torch.randint(0, 64, (2, 7))
    with torch.inference_mode():
        logits = next_token_logits(model, idx)
        hidden = model.hidden_states(idx)[:, -1]
        assert hidden.dtype == torch.bfloat16
        normed = torch.nn.functional.layer_norm(hidden.float(), (32,), model.final_norm.weight, model.final_norm.bias)
        if head_dtype == torch.bfloat16:  # bf16 products, summed in fp32 and never rounded to bf16
            normed = normed.bfloat16().float()
        expected = torch.nn.functional.linear(normed, model.out_head.weight.float())
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-5)
    assert generate(model, idx[:1], 4).shape == (1, 11)


def test_mixed_decoding_head_is_fp32_even_under_autocast():
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(**{**TINY.to_dict(), "drop_rate": 0.0})).eval()
    idx = torch.randint(0, 64, (1, 5))
    with torch.inference_mode(), precision_module.autocast(CPU, "bf16-mixed"):
        logits = next_token_logits(model, idx)
        hidden = model.hidden_states(idx)[:, -1]
    assert logits.dtype == torch.float32
    with torch.inference_mode():
        torch.testing.assert_close(logits, model.head(hidden.float()), rtol=0, atol=0)


def _rows(n=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 64, (16,), generator=g), torch.randint(0, 64, (16,), generator=g)) for _ in range(n)]


def _collate(batch):
    return torch.stack([r[0] for r in batch]), torch.stack([r[1] for r in batch])


def _train(precision, progress=None, epochs=3, loss_fn=lm_loss, lr=1e-2):
    torch.manual_seed(3)
    model = GPTModel(TINY).to(precision_module.weights_dtype(precision))
    optimizer = make_optimizer(model.parameters(), lr=lr, weight_decay=0.1)
    loader = make_loader(_rows(), 4, shuffle=True, drop_last=True, seed=5, collate_fn=_collate)
    evaluate = lambda m: {}  # noqa: E731
    options = LoopOptions(epochs=epochs, eval_every=100, show_progress=False)
    result = train(model, optimizer, loader, loss_fn, evaluate, CPU, options, precision, progress)
    return model, result


def test_bf16_true_trains_in_bf16():
    model, result = _train("bf16-true")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert result.steps == 9


def test_fp16_mixed_scales_the_loss_and_resumes_exactly(tmp_path):
    reference, _ = _train("fp16-mixed")
    # Stop after two epochs (progress saved at every step), then go on to three from the saved state.
    _train("fp16-mixed", Progress(tmp_path, "same", every_seconds=0.0), epochs=2)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step"] == 6 and saved["grad_scaler"]["scale"] > 0  # the scaler's state is kept
    resumed, result = _train("fp16-mixed", Progress(tmp_path, "same", every_seconds=0.0), epochs=3)
    assert result.resumed_at_step == 6
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_fp16_mixed_uses_a_grad_scaler(monkeypatch):
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or original(self, loss))
    _train("fp16-mixed", epochs=1)
    assert len(scaled) == 3


def test_a_non_finite_loss_stops_with_the_step_and_keeps_progress(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = lm_loss(model, batch)
        return loss * float("nan") if len(calls) == 5 else loss

    with pytest.raises(TrainingError, match=r"step 5: the loss is nan"):
        _train("fp32", Progress(tmp_path, "same", every_seconds=0.0), loss_fn=loss_fn)
    saved = torch.load(tmp_path / "state.pt", weights_only=True)
    assert saved["step"] == 4  # the last good step; the bad one never updated the weights
    assert all(torch.isfinite(v).all() for v in saved["model"].values())


def test_a_diverging_stage_prints_one_error_line(tmp_path, mirror_dir):
    import yaml

    from tests.conftest import REPO

    params = {
        "seed": 1,
        "device": "cpu",
        "precision": "fp32",
        "pretrain": {
            "model": {"context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0},
            "epochs": 1,
            "batch_size": 4,
            "lr": 1e38,
            "eval_every": 100,
            "eval_batches": 1,
            "sample_tokens": 2,
        },
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = [
        sys.executable,
        str(REPO / "stages/pretrain.py"),
        "--params",
        "params.yaml",
        "--corpus",
        str(mirror_dir / "the-verdict.txt"),
        "--out",
        "model.safetensors",
        "--metrics",
        "m.json",
        "--plots",
        "plots",
        "--sample",
        "sample.txt",
        "--progress-dir",
        "ck",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "step" in errors[0] and "not finite" in errors[0], proc.stderr[-2000:]
    assert not (tmp_path / "model.safetensors").exists()
    # The live metrics hold the evaluations made before the failure, each file whole (written atomically).
    assert json.loads((tmp_path / "m.json").read_text())["step"] >= 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_mixed_on_cuda_trains():
    torch.manual_seed(0)
    cuda = torch.device("cuda")
    model = GPTModel(TINY).to(cuda)
    optimizer = make_optimizer(model.parameters(), lr=1e-3, weight_decay=0.1)
    loader = make_loader(_rows(), 4, shuffle=True, drop_last=True, seed=5, collate_fn=_collate)
    options = LoopOptions(epochs=1, eval_every=100, show_progress=False)
    result = train(model, optimizer, loader, lm_loss, lambda m: {}, cuda, options, "fp16-mixed")
    assert result.steps == 3
