"""LoRA in the finetuning stages: adding adapters to a foundation, and writing a finished run's adapter
file beside its merged weights. Applying an adapter file to a base: gptcore.recipes.merge.

The adapter file (gptcore/training/adapter_file.py) records the SHA-256 of the weights file it was
trained on. A classifier's adapter also carries its new head (`out_head`, trained whole) and its
ClassifierInfo, so that the language-model foundation plus the adapter rebuild the classifier.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from gptcore.device import forked_rng
from gptcore.download import sha256_of
from gptcore.params.schema import LoraParams
from gptcore.training.adapter_file import save_adapter
from gptcore.training.lora import LoRAConfig, adapter_state_dict, apply_lora, mark_only_lora_as_trainable, merge_lora

CLASSIFIER_HEAD = ("out_head",)  # what a classifier's adapter carries beside A and B


def lora_config(params: LoraParams) -> LoRAConfig:
    """The LoRA config of a params.yaml `lora:` section."""
    return LoRAConfig(rank=params.rank, alpha=params.alpha, dropout=params.dropout, targets=tuple(params.targets))


def add_lora(model: nn.Module, config: LoRAConfig, device: torch.device, seed: int, also: Iterable[str] = ()):
    """Adapters on `model`'s targeted Linear layers, A drawn after `torch.manual_seed(seed)` on a fork of
    torch's generators (the caller's stay as they were); only A, B and the `also` parameters train.

    Returns:
        The trainable parameters, in model order.

    Raises:
        ConfigError: the config does not fit the model (gptcore.training.lora.apply_lora).
    """
    with forked_rng(device, seed):
        apply_lora(model, config)
    return mark_only_lora_as_trainable(model, also)


def finish_lora(
    model: nn.Module,
    config: LoRAConfig,
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    also: Iterable[str] = (),
    extra: dict[str, str] | None = None,
) -> nn.Module:
    """Write the adapter file of a finished LoRA run (its A, B and `also` tensors, the config, the base
    file's SHA-256), then merge the adapters into the weights in place: the model is a plain GPTModel
    again, ready to save as the stage's weights file. Returns the model."""
    tensors = adapter_state_dict(model, also)
    save_adapter(adapter_path, tensors, config, sha256_of(base_path), extra)
    return merge_lora(model)
