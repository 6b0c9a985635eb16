"""Batch order that is a pure function of (seed, epoch), so that training can resume mid-epoch."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class ResumableBatchSampler(Sampler[list[int]]):
    """Yields batches of indices; shuffled per epoch from seed + epoch; can skip batches already done."""

    def __init__(self, num_items: int, batch_size: int, *, shuffle: bool, drop_last: bool, seed: int = 0):
        if batch_size < 1:
            raise ValueError("batch_size must be positive")
        self.num_items = num_items
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.epoch = 0
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order and how many of its leading batches to skip (already trained on)."""
        self.epoch, self.skip = epoch, skip

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_items))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_items, generator=generator).tolist()

    def batches(self) -> list[list[int]]:
        order = self.order()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self.batches()[self.skip :]

    def __len__(self) -> int:
        full, rest = divmod(self.num_items, self.batch_size)
        return max(0, (full + (0 if self.drop_last or not rest else 1)) - self.skip)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    drop_last: bool,
    seed: int = 0,
    collate_fn: Callable | None = None,
) -> DataLoader:
    """A DataLoader over a ResumableBatchSampler (in `loader.batch_sampler`), single-process."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
    # A private generator: each new DataLoader iterator draws a base seed, and drawing it from the global
    # RNG would shift the dropout masks of a run resumed mid-epoch.
    return DataLoader(
        dataset, batch_sampler=sampler, collate_fn=collate_fn, generator=torch.Generator().manual_seed(seed)
    )
