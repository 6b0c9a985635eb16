"""Weight-only int8 decoding (gptcore/inference/quantize.py): the arithmetic, the model path, the CLI and the server."""

import subprocess
import sys

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.inference import gemv
from gptcore.inference.decoding import cast_for_inference, generate
from gptcore.inference.quantize import Int8Linear, quantize_int8
from gptcore.model import random_model
from gptcore.params.schema import Params
from gptcore.weights import save_model

CONFIG = GPTConfig(
    vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=True
)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_linear_is_the_rounded_weight_times_its_scale(dtype, monkeypatch):
    torch.manual_seed(0)
    linear = torch.nn.Linear(96, 40).to(dtype)
    layer = Int8Linear(linear, dtype)
    w = linear.weight.float()
    scales = w.abs().amax(dim=1) / 127
    assert layer.weight.dtype == torch.int8 and layer.weight.shape == (40, 96)
    assert int(layer.weight.abs().max()) == 127  # each row's largest weight maps to +-127
    # Every weight is within half a step of its int8 value (absmax rounding).
    assert ((layer.weight.float() * scales[:, None] - w).abs() <= scales[:, None] / 2 + 1e-6).all()
    x = torch.randn(3, 5, 96, dtype=dtype)
    expected = x.float() @ (layer.weight.float() * layer.scales.float()[:, None]).t() + linear.bias.float()
    magnitude = (x.float().abs() @ (layer.weight.float().abs() * layer.scales.float()[:, None]).t()).max().item()
    out = layer(x)  # 15 rows: gptcore.inference.gemv's kernel, activations rounded to int8 per block of 32
    assert out.shape == (3, 5, 40) and out.dtype == dtype
    assert (out.float() - expected).abs().max().item() <= 1e-2 * magnitude
    monkeypatch.setitem(gemv.MAX_ROWS, torch.int8, 0)  # torch's weight-only kernel, bf16 activations
    out = layer(x)
    tolerance = 1e-4 if dtype == torch.float32 else 5e-2 * expected.abs().max().item()
    assert out.dtype == dtype and (out.float() - expected).abs().max().item() <= tolerance


def test_an_all_zero_row_stays_zero():
    linear = torch.nn.Linear(32, 4, bias=False)
    with torch.no_grad():
        linear.weight[1] = 0
    layer = Int8Linear(linear, torch.float32)
    assert torch.isfinite(layer.scales).all() and not layer.weight[1].any()
    assert torch.equal(layer(torch.ones(1, 32))[0, 1], torch.tensor(0.0))


def _dequantized_twin(model):
    """A model like `model` whose Linears hold the int8 weights times their scales (bf16-true)."""
    twin = random_model(CONFIG, seed=1).eval()
    twin.out_head.weight = torch.nn.Parameter(twin.out_head.weight.detach().clone())  # untied: the head is quantized
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, Int8Linear):
                twin.get_submodule(name).weight.copy_(module.weight.float() * module.scales.float()[:, None])
    return cast_for_inference(twin, "bf16-true")


def test_quantized_model_decodes_like_its_dequantized_twin():
    """int8 changes the weights (and, in the kernel, rounds activations per 32): a model holding the
    dequantized weights gives the same tokens."""
    model = cast_for_inference(random_model(CONFIG, seed=1).eval(), "bf16-true", "int8")
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 4 * CONFIG.n_layers + 1  # and the head
    assert model.out_head.out_dtype == torch.float32  # fp32 logits
    twin = _dequantized_twin(model)
    idx = torch.randint(0, CONFIG.vocab_size, (1, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, expected = model(idx), twin(idx)
    assert logits.dtype == torch.float32 and (logits - expected).abs().max().item() < 0.05
    assert generate(model, idx, 10).tolist() == generate(twin, idx, 10).tolist()


def test_fp32_decoding_with_int8_blocks():
    """At fp32 the residual stream stays fp32; the int8 products run with bf16 activations."""
    model = cast_for_inference(random_model(CONFIG, seed=1).eval(), "fp32", "int8")
    twin = _dequantized_twin(model)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, expected = model(idx), twin(idx)
    assert logits.dtype == torch.float32 and (logits - expected).abs().max().item() < 0.05 * expected.abs().max().item()


def test_bad_quantize_values_are_refused():
    model = random_model(CONFIG, seed=1)
    with pytest.raises(ValueError, match="quantize: expected one of none, int8"):
        cast_for_inference(model, "fp32", "int4")
    with torch.device("meta"):
        meta = random_model(CONFIG)
    with pytest.raises(ConfigError, match="CPU only"):
        quantize_int8(meta)
    with pytest.raises(Exception, match="generate.quantize"):
        Params.model_validate({"generate": {"quantize": "int4"}})


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("int8") / "tiny.safetensors"
    save_model(random_model(CONFIG, seed=5), path)
    return path


def test_cli_generate_with_int8(weights, mirror_dir):
    import os

    env = {**os.environ, "GPTCORE_MIRROR": str(mirror_dir)}
    runs = [
        subprocess.run(
            [
                sys.executable,
                "-m",
                "gptcore",
                "generate",
                "--model",
                str(weights),
                "--prompt",
                "Every effort",
                "--max-new-tokens",
                "6",
                "--precision",
                "bf16-true",
                *extra,
            ],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        for extra in ([], ["--quantize", "int8"])
    ]
    for proc in runs:
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert proc.stdout.startswith("Every effort") and len(proc.stdout) > len("Every effort")


def test_server_serves_int8(weights, mirror_dir, monkeypatch):
    import httpx

    from gptcore.serve import LoadOptions, Server

    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror_dir))
    server = Server(
        weights, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True, load=LoadOptions(quantize="int8")
    ).start()
    try:
        reply = httpx.post(
            server.url + "/api/generate",
            json={"model": "tiny", "prompt": "Hello", "stream": False, "options": {"temperature": 0, "num_predict": 5}},
            timeout=60,
        )
        assert reply.status_code == 200 and reply.json()["eval_count"] == 5
        show = httpx.post(server.url + "/api/show", json={"model": "tiny"}, timeout=60).json()
        assert show["details"]["quantization_level"] == "INT8"
        assert show["model_info"]["general.parameter_count"] == random_model(CONFIG, seed=5).num_parameters()
    finally:
        server.close()
