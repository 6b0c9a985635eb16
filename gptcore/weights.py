"""The self-describing weights file: safetensors with the model config in its metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptcore.atomic import atomic_path
from gptcore.config import GPTConfig
from gptcore.errors import ConfigError, WeightsError
from gptcore.model import GPTModel

CONFIG_KEY = "gptcore_config"
FORMAT_VERSION = "1"


def save_model(model: GPTModel, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Write config + weights atomically. A tied output head is stored once (as the embedding)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and model.config.num_classes is None:
        state.pop("out_head.weight")
    metadata = {CONFIG_KEY: json.dumps(model.config.to_dict()), "gptcore_format": FORMAT_VERSION, **(extra or {})}
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=metadata)


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig stored in a weights file, without loading the tensors."""
    return _read_metadata(Path(path))[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """All metadata strings of a weights file: its config plus what save_model's `extra` added."""
    return _read_metadata(Path(path))[1]


def _read_metadata(path: Path) -> tuple[GPTConfig, dict[str, str]]:
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"{path}: not a readable gptcore weights file (safetensors): {_one_line(err)}") from None
    if CONFIG_KEY not in metadata:
        raise WeightsError(f"{path}: safetensors file carries no gptcore config; convert it with `gptcore convert`")
    try:
        config = GPTConfig.from_dict(json.loads(metadata[CONFIG_KEY]), where=f"{path} config")
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: bad model config in metadata: {_one_line(err)}") from None
    return config, metadata


def load_state(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPTConfig, dict[str, torch.Tensor]]:
    """Config and tensors of a weights file; never unpickles anything."""
    path = Path(path)
    config, _ = _read_metadata(path)
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            state = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: corrupt or truncated weights: {_one_line(err)}") from None
    return config, state


def load_model(path: str | os.PathLike, device: str | torch.device = "cpu") -> GPTModel:
    """Rebuild the GPTModel a weights file describes, in eval mode on `device`."""
    config, state = load_state(path, device)
    with torch.device(device):
        model = GPTModel(config)
    load_into(model, state, source=str(path))
    return model.eval()


def load_into(model: GPTModel, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly, with one-line errors that name the first bad tensor."""
    expected = model.state_dict()
    if model.config.tie_embeddings and model.config.num_classes is None:
        expected = {k: v for k, v in expected.items() if k != "out_head.weight"}
        state = {k: v for k, v in state.items() if k != "out_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing:
        raise WeightsError(f"{source}: missing tensor {missing[0]} ({len(missing)} missing)")
    if unexpected:
        raise WeightsError(f"{source}: unexpected tensor {unexpected[0]} ({len(unexpected)} unexpected)")
    for name, tensor in state.items():
        if tuple(tensor.shape) != tuple(expected[name].shape):
            raise WeightsError(
                f"{source}: tensor {name} has shape {tuple(tensor.shape)}, expected {tuple(expected[name].shape)}"
            )
    model.load_state_dict(state, strict=False)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())
