"""What each `precision` value means, for training and for inference (the names are Lightning's).

| value        | weights | matmuls                 | training                         | inference                  |
| ------------ | ------- | ----------------------- | -------------------------------- | -------------------------- |
| `fp32`       | fp32    | fp32                    | plain                            | plain (exact reference)    |
| `bf16-mixed` | fp32    | bf16 under autocast     | autocast over fp32 weights       | autocast over fp32 weights |
| `bf16-true`  | bf16    | bf16                    | weights, grads, AdamW state bf16 | weights in bf16            |
| `fp16-mixed` | fp32    | fp16 under autocast     | autocast + loss scaling          | autocast                   |
| `auto`       |         |                         | `bf16-mixed` where bf16 is native, else `fp32` | `bf16-true` where bf16 is native, else `fp32` |

"Native" bf16: a CUDA GPU that computes bf16 in hardware (`torch.cuda.is_bf16_supported(
including_emulation=False)`: Ampere and later), or a CPU with AVX512-BF16 or AMX. Elsewhere bf16 is
emulated and slower than fp32, so `auto` takes fp32. In inference the final LayerNorm computes in fp32
and the output head sums in fp32 (gptcore.inference.decoding.cast_for_inference), so greedy choices are never
made on bf16 logits.
fp16's narrow exponent range makes small gradients underflow: `fp16-mixed` scales the loss
(torch.amp.GradScaler) during training.
"""

from __future__ import annotations

import contextlib
import functools
import typing

import torch

from gptcore.errors import ConfigError
from gptcore.params.choices import PRECISIONS, RENAMED_PRECISIONS

RESOLVED = PRECISIONS[1:]  # what `auto` becomes
Purpose = typing.Literal["train", "inference"]

# The dtype the matmuls compute in, for each resolved value.
COMPUTE_DTYPES = {
    "fp32": torch.float32,
    "bf16-mixed": torch.bfloat16,
    "bf16-true": torch.bfloat16,
    "fp16-mixed": torch.float16,
}


def check_precision(value: str) -> str:
    """The value itself if it is a known precision; else ConfigError naming the valid ones."""
    if value in PRECISIONS:
        return value
    hint = f" (renamed: use {RENAMED_PRECISIONS[value]})" if value in RENAMED_PRECISIONS else ""
    raise ConfigError(f"precision: unknown value {value!r}{hint}; expected one of {', '.join(PRECISIONS)}")


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def has_native_bf16(device: torch.device) -> bool:
    """bf16 in hardware on this device (emulated bf16 does not count: it is slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and cpu_has_native_bf16()


def resolve_precision(value: str, device: torch.device, purpose: Purpose = "train") -> str:
    """The precision a run uses on `device`: `auto` resolved for the purpose, explicit values checked.

    Raises:
        ConfigError: an unknown (or renamed) value, or fp16-mixed training on a device without a
            GradScaler (only CUDA and CPU have one).
    """
    check_precision(value)
    if value == "auto":
        if not has_native_bf16(device):
            return "fp32"
        return "bf16-mixed" if purpose == "train" else "bf16-true"
    if value == "fp16-mixed" and purpose == "train" and device.type not in ("cuda", "cpu"):
        raise ConfigError(
            f"precision: fp16-mixed training needs loss scaling, which {device.type} lacks; use bf16-mixed or fp32"
        )
    return value


def weights_dtype(precision: str) -> torch.dtype:
    """The dtype the weights are held in: bf16 for bf16-true, fp32 otherwise."""
    return torch.bfloat16 if precision == "bf16-true" else torch.float32


def autocast(device: torch.device, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """The autocast context of a mixed precision (fp32 weights, low-precision matmuls); a no-op otherwise.

    cache_enabled=False: do not keep the low-precision copy of every weight until the context ends
    (with activation checkpointing nothing else holds them, which saves 2 bytes per parameter).
    """
    if not precision.endswith("-mixed"):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=COMPUTE_DTYPES[precision], cache_enabled=cache_enabled)


def make_grad_scaler(device: torch.device, precision: str, state: dict | None = None) -> torch.amp.GradScaler | None:
    """A GradScaler for fp16-mixed training (None for other precisions), restored from `state` if given."""
    if precision != "fp16-mixed":
        return None
    scaler = torch.amp.GradScaler(device.type)
    if state:
        scaler.load_state_dict(state)
    return scaler
