"""Choosing the device a run uses, and the processes that train together (torchrun).

What each numeric precision means lives in gptcore.precision."""

from __future__ import annotations

import atexit
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
