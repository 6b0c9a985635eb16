"""The self-describing weights file: safetensors with the model config in its metadata."""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gptcore.atomic import atomic_path
from gptcore.config import GPTConfig
from gptcore.device import forked_rng
from gptcore.errors import ConfigError, WeightsError
from gptcore.model import GPTModel

CONFIG_KEY = "gptcore_config"
FORMAT_VERSION = "1"


def save_model(model: GPTModel, path: str | os.PathLike, extra: dict[str, str] | None = None) -> None:
    """Write config + weights atomically. A tied output head is stored once (as the embedding)."""
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings and model.config.num_classes is None:
        state.pop("out_head.weight")
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata=_metadata(model.config, extra))
        _sort_metadata(tmp)


def _sort_metadata(path: Path) -> None:
    """Put the header's metadata in sorted order: safetensors writes it in a per-process random order,
    which would make identical weights hash differently (DVC, resume checks)."""
    with open(path, "r+b") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header.get("__metadata__", {}).items()))
        blob = json.dumps(header, separators=(",", ":")).encode()
        if len(blob) > size:  # cannot happen for a reordering; never corrupt the file if it does
            return
        f.seek(8)
        f.write(blob + b" " * (size - len(blob)))


def _metadata(config: GPTConfig, extra: dict[str, str] | None) -> dict[str, str]:
    return {CONFIG_KEY: json.dumps(config.to_dict()), "gptcore_format": FORMAT_VERSION, **(extra or {})}


def read_config(path: str | os.PathLike) -> GPTConfig:
    """The GPTConfig stored in a weights file, without loading the tensors."""
    return _read_metadata(Path(path))[0]


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """All metadata strings of a weights file: its config plus what save_model's `extra` added."""
    return _read_metadata(Path(path))[1]


def _read_metadata(path: Path) -> tuple[GPTConfig, dict[str, str]]:
    if path.is_dir():
        hint = " (a Hugging Face folder: convert it with `gptcore convert`)" if (path / "config.json").is_file() else ""
        raise WeightsError(f"{path}: is a folder, not a weights file{hint}")
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


def load_state(
    path: str | os.PathLike, device: str | torch.device = "cpu"
) -> tuple[GPTConfig, dict[str, torch.Tensor]]:
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
    # Every weight is replaced by the file's: the modules' random init draws on a fork of torch's generators.
    with forked_rng(device), torch.device(device):
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


def save_streaming(
    path: str | os.PathLike,
    config: GPTConfig,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    extra: dict[str, str] | None = None,
) -> None:
    """Write a weights file one tensor at a time, atomically: the same file as save_model, but peak
    memory is one tensor rather than the whole model (a 774M conversion never holds 3 GB twice).

    Args:
        shapes: every tensor of GPTModel(config) (a tied head left out), in the order to write them.
        read: called once per name, in that order; returns the tensor as a float array of its shape.
    """
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in GPTModel(config).state_dict().items()}
    if config.tie_embeddings and config.num_classes is None:
        expected.pop("out_head.weight")
    shapes = {name: tuple(shape) for name, shape in shapes.items()}
    if shapes != expected:
        bad = sorted(set(shapes) ^ set(expected)) or [k for k in shapes if shapes[k] != expected[k]]
        raise WeightsError(f"{path}: tensor layout does not match the model config (first difference: {bad[0]})")
    write_safetensors(path, shapes, read, _metadata(config, extra))


def write_safetensors(
    path: str | os.PathLike,
    shapes: Mapping[str, tuple[int, ...]],
    read: Callable[[str], np.ndarray],
    metadata: dict[str, str],
) -> None:
    """Write a float32 safetensors file one tensor at a time, atomically, in the order of `shapes`.

    `read(name)` is called once per name and must return an array of that shape; a wrong shape is a
    WeightsError and leaves nothing behind. Peak memory is one tensor.
    """
    # safetensors: u64 little-endian header size, JSON header (padded to 8 bytes), then raw tensors.
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for name, shape in shapes.items():
        size = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape in shapes.items():
            array = np.ascontiguousarray(read(name), dtype="<f4")
            if array.shape != tuple(shape):
                raise WeightsError(f"{path}: tensor {name} has shape {array.shape}, expected {tuple(shape)}")
            f.write(array.data)
