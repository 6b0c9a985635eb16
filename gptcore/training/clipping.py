"""Gradient clipping by the global L2 norm, once per optimizer step, on one process or many.

The norm is taken over every trainable parameter's gradient as one vector (the parameters an
optimizer updates: under LoRA only the adapters and what trains whole), and when it exceeds
`max_norm` every gradient is scaled by max_norm / (norm + 1e-6), so the update keeps its direction
and its norm is the limit. This is `torch.nn.utils.clip_grad_norm_` (get_total_norm then
clip_grads_with_norm_), the clipping of nanoGPT (`grad_clip = 1.0`), of the reference book's
appendix D and of litgpt (`max_norm`), called where those recipes call it:

- after every micro-batch's backward (gradient accumulation clips the summed gradient, not each piece);
- after DistributedDataParallel's all-reduce (every process holds the averaged gradient: the same
  norm everywhere, with no further communication);
- under FSDP2 on the sharded gradients (DTensors): PyTorch sums the shards' squares across the
  processes, so the norm is the whole model's, the same on every process;
- under fp16-mixed after GradScaler.unscale_ (the limit applies to the true gradient, not the scaled
  one); a step whose gradients overflowed is skipped by the scaler anyway.

Clipping keeps no state: a resumed run clips as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch


def trainable_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters `optimizer` updates, each once, in its param groups' order."""
    seen: dict[int, torch.Tensor] = {}
    for group in optimizer.param_groups:
        for param in group["params"]:
            seen.setdefault(id(param), param)
    return list(seen.values())


def clip_gradients(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients of `params` in place so that their global L2 norm is at most `max_norm`.

    params: tensors whose `.grad` is set (those without a gradient are left out), plain or DTensor
        (FSDP2's shards: the norm is then global across the process group, and every process calls
        this together).
    Returns the norm before clipping, a Python float (inf or nan when a gradient is not finite: the
    gradients are then scaled by nan, and the caller must skip the update, as GradScaler does).

    Raises:
        ValueError: max_norm is not a positive finite number.
    """
    if not (isinstance(max_norm, (int, float)) and 0 < max_norm < math.inf):
        raise ValueError(f"max_norm must be a positive number, got {max_norm!r}")
    params = [p for p in params if p.grad is not None]
    if not params:
        return 0.0
    total = torch.nn.utils.clip_grad_norm_(params, max_norm)  # a DTensor when the gradients are
    if hasattr(total, "full_tensor"):
        total = total.full_tensor()  # reduced across the processes: every process gets the same value
    return float(total)
