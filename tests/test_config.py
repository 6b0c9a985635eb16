"""Typed configs: presets, the GPTConfig of weights files, and the params model read from a file."""

import pytest

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.params.load import load_params
from gptcore.params.schema import Params, RunConfig


def test_presets():
    large = GPTConfig.from_name("gpt2-large")
    assert (large.emb_dim, large.n_layers, large.n_heads, large.context_length) == (1280, 36, 20, 1024)
    assert GPTConfig.from_name("gpt2-xl").n_heads == 25
    with pytest.raises(ConfigError, match="gpt2-huge"):
        GPTConfig.from_name("gpt2-huge")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"emb_dim": 30, "n_heads": 4}, r"^cfg: emb_dim \(30\) must be divisible by n_heads \(4\)$"),
        ({"n_layers": 0}, r"^cfg: n_layers must be positive, got 0$"),
        ({"drop_rate": 1.5}, r"^cfg: drop_rate must be in \[0, 1\), got 1.5$"),
        ({"emb_dims": 32}, r"^cfg: emb_dims: unknown key; did you mean emb_dim\?$"),
        ({"n_layers": "two"}, r"^cfg: n_layers: expected an integer, got 'two'$"),
        ({"n_layers": 2.0}, r"^cfg: n_layers: expected an integer, got 2.0$"),
        ({"qkv_bias": 1}, r"^cfg: qkv_bias: expected true or false, got 1$"),
        ({"num_classes": 1}, r"^cfg: num_classes must be at least 2, got 1$"),
    ],
)
def test_invalid_model_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_dict(data, where="cfg")


def test_model_config_round_trip():
    config = GPTConfig(context_length=64, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1, num_classes=2)
    assert GPTConfig.from_dict(config.to_dict()) == config
    assert type(GPTConfig.from_dict({})) is GPTConfig  # a plain dataclass, as the library builds it


def test_params_file_sections(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 7\npretrain:\n  epochs: 2\n  lr: 1\n  model: {n_layers: 2, emb_dim: 64, n_heads: 4}\n")
    params = load_params(path)
    cfg = params.pretrain
    assert cfg.epochs == 2 and cfg.lr == 1.0 and cfg.model.n_layers == 2 and cfg.model.context_length == 1024
    assert isinstance(cfg.model, GPTConfig) and isinstance(cfg.lr, float)
    assert params.run == RunConfig(seed=7) and params.classifier.epochs == 5  # left out: the model's defaults


@pytest.mark.parametrize(
    "text,message",
    [
        ("pretrain:\n  epoch: 2\n", r"pretrain.epoch: unknown key; did you mean epochs\?"),
        ("pretrain:\n  epochs: ten\n", r"pretrain.epochs: expected an integer, got 'ten'"),
        ("pretrain:\n  model: {n_heads: 5}\n", "pretrain.model: emb_dim .* divisible"),
        ("pretrain: [1, 2]\n", r"pretrain: expected a mapping, got \[1, 2\]"),
        ("pretrain: {epochs: 2\n", "not valid YAML"),
        ("pretrain:\n  lr_schedule: linear\n", "pretrain.lr_schedule: expected one of constant, cosine, got 'linear'"),
        ("pretrain:\n  warmup: 1.5\n", "pretrain.warmup: must be < 1"),
        ("- 1\n", "expected a mapping of sections"),
    ],
)
def test_bad_params_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_params(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path))


def test_precision_is_checked(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("precision: fp8\n")
    with pytest.raises(
        ConfigError, match="precision: expected one of auto, fp32, bf16-mixed, bf16-true, fp16-mixed, got 'fp8'"
    ):
        load_params(path)


def test_missing_params_file(tmp_path):
    with pytest.raises(ConfigError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")


def test_params_model_defaults_are_params_yaml():
    """The model's defaults and the shipped params.yaml agree: one source of truth, written out in full."""
    from tests.conftest import REPO

    assert load_params(REPO / "params.yaml") == Params()
