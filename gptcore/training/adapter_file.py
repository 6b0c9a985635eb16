"""The adapter file: one safetensors file with a LoRA adapter's tensors, its config, and the digest of
the base weights file it was trained on, so that it is never applied to another base by mistake."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from gptcore.errors import ConfigError, WeightsError
from gptcore.training.lora import LoRAConfig, apply_lora, load_adapter_state
from gptcore.weights import write_safetensors

FORMAT = "gptcore-lora"
RESERVED = ("format", "lora", "base_sha256")


@dataclass
class Adapter:
    """A LoRA adapter as read from its file."""

    config: LoRAConfig
    tensors: dict[str, torch.Tensor]  # qualified parameter name -> fp32 tensor
    base_sha256: str  # hex digest of the base weights file
    extra: dict[str, str] = field(default_factory=dict)  # the other metadata strings
    source: str = "adapter"  # where it was read from, for messages


def save_adapter(
    path: str | os.PathLike,
    tensors: dict[str, torch.Tensor],
    config: LoRAConfig,
    base_sha256: str,
    extra: dict[str, str] | None = None,
) -> None:
    """Write the tensors (as fp32, in name order) and the metadata to one safetensors file, atomically.

    The same inputs give the same bytes: tensors and metadata are written in sorted order.

    Raises:
        ValueError: `extra` uses one of the reserved keys format, lora, base_sha256.
    """
    extra = dict(extra or {})
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"adapter metadata key {clash[0]!r} is reserved")
    metadata = {"format": FORMAT, "lora": json.dumps(config.to_dict()), "base_sha256": base_sha256, **extra}
    shapes = {name: tuple(tensors[name].shape) for name in sorted(tensors)}
    # fp32 is exact for fp32 adapters and for bf16/fp16 parameters saved beside them.
    write_safetensors(
        path, shapes, lambda name: tensors[name].detach().float().cpu().numpy(), dict(sorted(metadata.items()))
    )


def read_adapter(path: str | os.PathLike, device: str | torch.device = "cpu") -> Adapter:
    """Read and validate an adapter file; never unpickles anything.

    Raises:
        WeightsError: one line: the file is missing, unreadable, not a gptcore adapter, lacks metadata, or
            holds a bad config.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: adapter file not found")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            metadata = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file: {' '.join(str(err).split())}") from None
    if metadata.get("format") != FORMAT:
        raise WeightsError(f"{path}: not a gptcore LoRA adapter (metadata format is {metadata.get('format')!r})")
    for key in RESERVED[1:]:
        if key not in metadata:
            raise WeightsError(f"{path}: adapter metadata lacks {key!r}")
    try:
        config = LoRAConfig.from_dict(json.loads(metadata["lora"]))
    except (json.JSONDecodeError, ConfigError) as err:
        raise WeightsError(f"{path}: bad lora config in metadata: {' '.join(str(err).split())}") from None
    extra = {k: v for k, v in metadata.items() if k not in RESERVED}
    return Adapter(config, tensors, metadata["base_sha256"], extra, source=str(path))


def apply_adapter(model: nn.Module, adapter: Adapter, base_sha256: str | None) -> nn.Module:
    """Add the adapter's LoRA layers to `model` and load its tensors; returns the model.

    base_sha256: the digest of the base weights file the model was loaded from; None skips the check.

    Raises:
        WeightsError: the adapter was trained on another base, or its tensors do not fit the model.
        ConfigError: its config does not fit the model (apply_lora).
    """
    if base_sha256 is not None and base_sha256 != adapter.base_sha256:
        raise WeightsError(
            f"adapter {adapter.source} was trained on base {adapter.base_sha256[:12]}, not {base_sha256[:12]}"
        )
    apply_lora(model, adapter.config)
    load_adapter_state(model, adapter.tensors, source=adapter.source)
    return model
