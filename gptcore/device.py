"""Choosing the device a run uses, its random number generators, and the processes that train together
(torchrun).

What each numeric precision means lives in gptcore.precision."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


# --- random number generators ---------------------------------------------------------------------------
# Dropout and nn.Module initialisation draw from torch's global generators, which belong to the caller:
# a library call that seeds or restores them works on a fork and gives the caller's states back.


@contextlib.contextmanager
def forked_rng(device: torch.device | str = "cpu", seed: int | None = None) -> Iterator[None]:
    """Run the block on a copy of torch's generators, seeded with `seed` when given; on exit the
    caller's generator states are back as they were, whatever the block drew, seeded or restored.

    The CPU generator is always forked. The accelerator's (every CUDA device, or MPS) are forked when
    the block runs there, or when CUDA is already in use; a CPU run never starts CUDA, and never leaves
    a seed queued for it. With a seed, the draws equal those after `torch.manual_seed(seed)`.
    """
    device = torch.device(device)
    kind = device.type if device.type in ("cuda", "mps") else "cuda" if torch.cuda.is_initialized() else None
    module = torch.get_device_module(kind) if kind else None
    devices = list(range(module.device_count())) if module else []
    with torch.random.fork_rng(devices=devices, device_type=kind or "cpu"):
        if seed is not None:
            torch.random.default_generator.manual_seed(seed)
            if module is not None:
                (getattr(module, "manual_seed_all", None) or module.manual_seed)(seed)
        yield


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
    """True for the one process that writes outputs, metrics and saved progress (rank 0)."""
    return rank() == 0


def init_distributed(device: torch.device) -> bool:
    """Join the process group torchrun set up (NCCL on GPUs, gloo on CPU); False for a single process.

    Idempotent. The group stays for the process's life: the entry point leaves it (gptcore.entry's
    run_entry does, for every stage script and CLI verb; a script of your own calls
    torch.distributed.destroy_process_group() at its end, as PyTorch's DDP tutorials do).
    """
    if world_size() <= 1:
        return False
    import torch.distributed as dist

    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return True
