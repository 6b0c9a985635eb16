"""LoRA in the finetuning stages: adding adapters to a foundation, writing a finished run's adapter file,
and its merged weights file made from the foundation's file (as `gptcore merge` makes it).

The adapter file (gptcore/training/adapter_file.py) records the SHA-256 of the weights file it was
trained on. A classifier's adapter also carries its new head (`out_head`, trained whole) and its
ClassifierInfo, so that the language-model foundation plus the adapter rebuild the classifier
(gptcore.recipes.merge).
"""

from __future__ import annotations

import os
from collections.abc import Iterable

import torch
from torch import nn

from gptcore.device import forked_rng
from gptcore.download import sha256_of
from gptcore.params.lora import LoraParams
from gptcore.precision import COMPUTE_DTYPES
from gptcore.training.adapter_file import apply_adapter, read_adapter, save_adapter
from gptcore.training.lora import LoRAConfig, adapter_state_dict, apply_lora, mark_only_lora_as_trainable, merge_lora
from gptcore.training.mixed_linear import cast_frozen_linears
from gptcore.weights import load_model, save_model


def lora_config(params: LoraParams) -> LoRAConfig:
    """The LoRA config of a params.yaml `lora:` section."""
    return LoRAConfig(rank=params.rank, alpha=params.alpha, dropout=params.dropout, targets=tuple(params.targets))


def add_lora(
    model: nn.Module, config: LoRAConfig, device: torch.device, seed: int, precision: str, also: Iterable[str] = ()
) -> list[nn.Parameter]:
    """Adapters on `model`'s targeted Linear layers; only A, B and the `also` parameters train.

    A is drawn after `torch.manual_seed(seed)` on a fork of torch's generators (the caller's stay as they
    were). Under bf16/fp16-mixed the frozen Linear weights of the blocks are cast to the compute dtype for
    good, as autocast would cast them at every step (the same values): the frozen base then takes 2 bytes
    per parameter instead of 4 plus autocast's copies. The fp32 base stays in its file, from which the
    stage's merged weights are made (`write_merged_lm`, gptcore.recipes.merge.merge_adapter).

    Returns:
        The trainable parameters, in model order.

    Raises:
        ConfigError: the config does not fit the model (gptcore.training.lora.apply_lora).
    """
    with forked_rng(device, seed):
        apply_lora(model, config)
    trainable = mark_only_lora_as_trainable(model, also)
    cast_frozen_linears(model.trf_blocks, precision, keep=False)
    cast_frozen_token_embedding(model, precision)
    return trainable


def cast_frozen_token_embedding(model: nn.Module, precision: str) -> None:
    """Under bf16/fp16-mixed, store a frozen token embedding [vocab, emb] in the compute dtype, in place.

    A tied head (GPT-2's out_head shares the matrix) then multiplies the values autocast would cast it to,
    without the copy that autocast makes, and keeps for backward, at every step (128 MB at 774M); the
    lookup gives the rows rounded to the compute dtype, which the model adds to the fp32 position
    embedding in fp32 (type promotion), so the residual stream stays fp32. A 774M LoRA r=16 step
    (8 x 120 tokens) peaks 167 MiB lower with it (docs/performance.md#lora). A no-op for a trained
    embedding, in fp32 and in bf16-true.
    """
    weight = model.tok_emb.weight
    if precision.endswith("-mixed") and not weight.requires_grad:
        weight.data = weight.data.to(COMPUTE_DTYPES[precision])


def write_adapter(
    model: nn.Module,
    config: LoRAConfig,
    base_path: str | os.PathLike,
    adapter_path: str | os.PathLike,
    also: Iterable[str] = (),
    extra: dict[str, str] | None = None,
) -> None:
    """The adapter file of a finished LoRA run: its A, B and `also` tensors, the config, and the SHA-256
    of the base weights file it was trained on."""
    save_adapter(adapter_path, adapter_state_dict(model, also), config, sha256_of(base_path), extra)


def write_merged_lm(base_path: str | os.PathLike, adapter_path: str | os.PathLike, out_path: str | os.PathLike) -> None:
    """A language model's base weights file with the adapter merged in (fp32 arithmetic on the file's
    weights), written as one weights file with the adapter's extra metadata (e.g. the prompt format of an
    instruction model): what `gptcore merge` writes for it.

    Raises:
        WeightsError: the adapter was trained on another base, or does not fit it (one line).
    """
    model = load_model(base_path)
    adapter = read_adapter(adapter_path)
    apply_adapter(model, adapter, sha256_of(base_path))
    save_model(merge_lora(model), out_path, extra=adapter.extra or None)
