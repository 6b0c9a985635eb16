"""Losses and their evaluation: next-token cross-entropy, perplexity, and the mean loss over a few
batches that every training stage reports (train_loss, val_loss)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from gptcore.precision import autocast
from gptcore.training.cross_entropy import IGNORE_INDEX, cross_entropy

Batch = tuple[torch.Tensor, ...]  # (inputs, targets, ...): every tensor has the rows in dimension 0
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy over every position; targets of -100 are ignored (padding)."""
    inputs, targets = batch
    logits = model(inputs)  # [B, T, V]
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay a finite JSON number for untrained models."""
    return math.exp(min(loss, 700.0))


def to_device(batch: Iterable[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader,
    loss_fn: LossFn,
    device: torch.device,
    precision: str = "fp32",
    num_batches: int | None = None,
) -> float:
    """Mean loss over the first `num_batches` batches of loader (all when None), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            with autocast(device, precision):
                total += loss_fn(model, to_device(batch, device)).item()
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def loss_evaluator(train_loader, val_loader, loss_fn: LossFn, device, precision: str, num_batches: int):
    """An evaluate(model) callback giving train_loss and val_loss on a few batches, as the book does."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {
            "train_loss": evaluate_loss(model, _in_order(train_loader), loss_fn, device, precision, num_batches),
            "val_loss": evaluate_loss(model, val_loader, loss_fn, device, precision, num_batches),
        }

    return evaluate


def _in_order(loader):
    """Evaluate on the train set's batches in a fixed order that does not disturb the sampler's epoch."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or not hasattr(sampler, "batches"):
        return loader
    dataset, collate = loader.dataset, loader.collate_fn
    return (collate([dataset[i] for i in batch]) for batch in sampler.batches())
