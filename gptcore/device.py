"""Choosing the device and the numeric precision a run uses."""

from __future__ import annotations

import atexit
import contextlib
import functools
import os

import torch

from gptcore.errors import ConfigError


def resolve_device(name: str = "auto") -> torch.device:
    """`auto` picks CUDA, then Apple MPS, then CPU; anything else is checked to be usable.

    Under torchrun (WORLD_SIZE > 1) a CUDA device without an index becomes cuda:LOCAL_RANK, one GPU
    per process.
    """
    device = _resolve_device(name)
    if device.type == "cuda" and device.index is None and world_size() > 1:
        device = torch.device("cuda", local_rank())
        torch.cuda.set_device(device)
    return device


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device: {name!r} requested but CUDA is not available")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device: {name!r} requested but MPS is not available")
    return device


@functools.cache
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 matmuls in hardware (AVX512-BF16 or AMX), where bf16 pays off."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_precision(precision: str, device: torch.device) -> str:
    """Map `auto` to bf16 where the hardware runs it natively, else fp32; validate explicit choices."""
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
        if device.type == "cpu" and cpu_has_native_bf16():
            return "bf16"
        return "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise ConfigError(f"precision: expected auto, fp32, bf16 or fp16, got {precision!r}")
    if precision == "fp16" and device.type != "cuda":
        raise ConfigError("precision: fp16 is only supported on CUDA; use bf16 or fp32")
    return precision


# The dtype each resolved precision computes in (fp32: no autocast; bf16/fp16: autocast's low precision).
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device, precision: str, cache_enabled: bool = True) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes: weights stay fp32, matmuls run in low precision.

    cache_enabled=False: do not keep the low-precision copy of every weight until the context ends
    (with activation checkpointing nothing else holds them, which saves 2 bytes per parameter).
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=PRECISION_DTYPES[precision], cache_enabled=cache_enabled)


# --- several processes (torchrun) ----------------------------------------------------------------------
# torchrun starts one process per GPU (or CPU worker) and tells each its place through the environment;
# outside torchrun these read as a single process of rank 0.


def world_size() -> int:
    """How many processes train together (torchrun's WORLD_SIZE; 1 without torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's index among them (torchrun's RANK; 0 without torchrun)."""
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's index on its machine (torchrun's LOCAL_RANK), which picks its GPU."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    """True for the one process that writes outputs, metrics and checkpoints (rank 0)."""
    return rank() == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); False for a single process.

    Idempotent; the group is destroyed at exit.
    """
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
        atexit.register(_destroy_process_group)
    return True


def _destroy_process_group() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
