"""The weights file: round trip, self-description, and safe refusal of bad files."""

import pickle

import pytest
import torch

from gptcore import load_model, save_model
from gptcore.config import GPTConfig
from gptcore.errors import WeightsError
from gptcore.model import GPTModel
from gptcore.weights import read_config


def test_round_trip_rebuilds_the_same_model(tmp_path, tiny_config):
    model = GPTModel(tiny_config).eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = load_model(path)
    assert loaded.config == tiny_config
    assert not loaded.training
    idx = torch.randint(0, 1000, (2, 9))
    assert torch.equal(model(idx), loaded(idx))
    assert [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]  # no temporary left behind


def test_tied_head_is_stored_once_and_stays_tied(tmp_path):
    config = GPTConfig(vocab_size=64, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_embeddings=True)
    save_model(GPTModel(config), tmp_path / "t.safetensors")
    loaded = load_model(tmp_path / "t.safetensors")
    assert loaded.out_head.weight is loaded.tok_emb.weight
    assert read_config(tmp_path / "t.safetensors").tie_embeddings


def test_truncated_file_is_a_clear_error(tmp_path, tiny_config):
    path = tmp_path / "m.safetensors"
    save_model(GPTModel(tiny_config), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="m.safetensors"):
        load_model(path)


class _Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_pickle_with_code_is_refused_without_running_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps({"model": _Evil()}))
    with pytest.raises(WeightsError, match="evil.safetensors"):
        load_model(path)
    assert not (tmp_path / "pwned").exists()


def test_missing_file_and_foreign_safetensors(tmp_path):
    with pytest.raises(WeightsError, match="not found"):
        load_model(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(WeightsError, match="no gptcore config"):
        load_model(tmp_path / "foreign.safetensors")


def test_missing_tensor_is_named(tmp_path, tiny_config):
    from safetensors.torch import save_file

    model = GPTModel(tiny_config)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "final_norm.bias"}
    import json

    save_file(state, str(tmp_path / "m.safetensors"), metadata={"gptcore_config": json.dumps(tiny_config.to_dict())})
    with pytest.raises(WeightsError, match="final_norm.bias"):
        load_model(tmp_path / "m.safetensors")


def test_files_are_byte_identical_across_processes(tmp_path):
    """safetensors orders metadata per process at random; our files must not depend on it."""
    import subprocess
    import sys

    code = (
        "import sys, torch; from gptcore import GPTModel, GPTConfig, save_model; torch.manual_seed(0); "
        "save_model(GPTModel(GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=1)), "
        "sys.argv[1], extra={'b': '1', 'a': '2', 'c': '3'})"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path in paths:
        subprocess.run([sys.executable, "-c", code, str(path)], check=True)
    assert len({p.read_bytes() for p in paths}) == 1
