"""The `export` pipeline stage: `dvc repro` ends with a deployable model in models/export/."""

from __future__ import annotations

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.export import ExportParams
from gptcore.model import random_model
from gptcore.weights import load_model, save_model


def test_dvc_repro_export(repo_copy):
    torch.manual_seed(0)
    config = GPTConfig(context_length=24, emb_dim=32, n_heads=2, n_layers=1, qkv_bias=True, tie_embeddings=True)
    model_path = repo_copy.root / "models/instruct/model.safetensors"
    model_path.parent.mkdir(parents=True)
    save_model(random_model(config), model_path)
    repo_copy.set_params({"export": {"formats": ["gguf", "hf"], "dtype": "q8_0"}})

    repo_copy.dvc("repro", "--single-item", "export")
    out = repo_copy.root / "models/export"
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "gptcore-instruct.gguf", "hf"]
    assert "FROM ./gptcore-instruct.gguf" in (out / "Modelfile").read_text().splitlines()
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "config.json").is_file()
    assert "up to date" in repo_copy.dvc("status", "export").stdout

    # formats: [hf] rewrites the folder whole: no stale GGUF left behind
    repo_copy.set_params({"export": {"formats": ["hf"]}})
    repo_copy.dvc("repro", "--single-item", "export")
    assert sorted(p.name for p in out.iterdir()) == ["hf"]
    from gptcore.convert.hf import convert_hf_folder

    convert_hf_folder(out / "hf", repo_copy.root / "back.safetensors")
    back, ours = load_model(repo_copy.root / "back.safetensors"), load_model(model_path)
    for (name, a), b in zip(ours.state_dict().items(), back.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "section, pattern",
    [
        ({"formats": ["gguf", "onnx"]}, "formats"),
        ({"formats": []}, "formats"),
        ({"formats": ["gguf", "gguf"]}, "at most once"),
        ({"dtype": "q4_0"}, "dtype"),
        ({"name": "x"}, "name"),
    ],
)
def test_params_section_is_checked(section, pattern):
    with pytest.raises(ConfigError, match=pattern):
        ExportParams.from_dict(section, where="params.yaml export")
