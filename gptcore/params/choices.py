"""The names of the choices that params.yaml, the CLI and the library share, declared without torch
or pydantic so that every one of them can import them cheaply."""

from __future__ import annotations

import typing
from typing import Literal

# The `precision` values (Lightning's names), declared here so that reading params needs no torch;
# gptcore.precision says what each one means for training and inference.
Precision = Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)

# The `strategy` values (Lightning's word): how the processes of a torchrun launch share the training
# (gptcore/training/sharding.py). auto: DistributedDataParallel under torchrun, nothing on one process.
Strategy = Literal["auto", "ddp", "fsdp"]
STRATEGIES: tuple[str, ...] = typing.get_args(Strategy)

Quantize = Literal[
    "none", "int8"
]  # decoding weights: as they are, or int8 as llama.cpp's q8_0 (gptcore/inference/quantize.py)
QUANTIZE: tuple[str, ...] = typing.get_args(Quantize)
# Values of earlier versions, whose meaning differed between training and generation.
RENAMED_PRECISIONS = {"bf16": "bf16-mixed or bf16-true", "fp16": "fp16-mixed"}


def is_device_name(value: str) -> bool:
    """Whether value names a device gptcore accepts: auto, cpu, cuda, cuda:N or mps (usable or not)."""
    name, _, index = value.partition(":")
    return value in ("auto", "cpu", "cuda", "mps") or (name == "cuda" and index.isdigit())
