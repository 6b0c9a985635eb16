"""Typed configs: presets, validation, strict params sections."""

import pytest

from gptcore.config import GPTConfig, PretrainParams
from gptcore.errors import ConfigError
from gptcore.params import read_params, run_config, section


def test_presets():
    large = GPTConfig.from_name("gpt2-large")
    assert (large.emb_dim, large.n_layers, large.n_heads, large.context_length) == (1280, 36, 20, 1024)
    assert GPTConfig.from_name("gpt2-xl").n_heads == 25
    with pytest.raises(ConfigError, match="gpt2-huge"):
        GPTConfig.from_name("gpt2-huge")


@pytest.mark.parametrize(
    "data,message",
    [
        ({"emb_dim": 30, "n_heads": 4}, "divisible"),
        ({"n_layers": 0}, "positive"),
        ({"drop_rate": 1.5}, "drop_rate"),
        ({"emb_dims": 32}, "unknown key"),
        ({"n_layers": "two"}, "n_layers: expected int"),
        ({"qkv_bias": 1}, "qkv_bias: expected bool"),
    ],
)
def test_invalid_model_configs(data, message):
    with pytest.raises(ConfigError, match=message):
        GPTConfig.from_dict(data)


def test_params_file_sections(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("seed: 7\npretrain:\n  epochs: 2\n  lr: 1\n  model: {n_layers: 2, emb_dim: 64, n_heads: 4}\n")
    params = read_params(path)
    cfg = section(params, "pretrain", PretrainParams)
    assert cfg.epochs == 2 and cfg.lr == 1.0 and cfg.model.n_layers == 2 and cfg.model.context_length == 1024
    assert run_config(params).seed == 7


@pytest.mark.parametrize(
    "text,message",
    [
        ("pretrain:\n  epoch: 2\n", "unknown key"),
        ("pretrain:\n  epochs: ten\n", "pretrain.epochs"),
        ("pretrain:\n  model: {n_heads: 5}\n", "divisible"),
        ("pretrain: [1, 2]\n", "expected a mapping"),
        ("pretrain: {epochs: 2\n", "not valid YAML"),
        ("pretrain:\n  lr_schedule: linear\n", "lr_schedule"),
        ("pretrain:\n  warmup: 1.5\n", "warmup"),
    ],
)
def test_bad_params_are_one_line_errors(tmp_path, text, message):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        section(read_params(path), "pretrain", PretrainParams)
    assert "\n" not in str(info.value)


def test_precision_is_checked(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("precision: fp8\n")
    with pytest.raises(ConfigError, match="precision"):
        run_config(read_params(path))
