"""Language-modelling data: a text cut into overlapping (input, next-token target) windows."""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader, Dataset

from gptcore.data.loader import make_loader
from gptcore.errors import DataError
from gptcore.tokenizer import encode_text


class TokenWindowDataset(Dataset):
    """Windows of `max_length` token ids every `stride` tokens; the target is the input shifted by one."""

    def __init__(self, token_ids: list[int], max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ValueError("max_length and stride must be positive")
        ids = torch.tensor(token_ids, dtype=torch.long)
        starts = range(0, len(ids) - max_length, stride)
        self.inputs = [ids[i : i + max_length] for i in starts]
        self.targets = [ids[i + 1 : i + max_length + 1] for i in starts]

    def __len__(self) -> int:
        return len(self.inputs)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.targets[i]


def split_text(text: str, train_ratio: float) -> tuple[str, str]:
    """The leading `train_ratio` of the characters for training, the rest for validation (as the book)."""
    cut = int(train_ratio * len(text))
    return text[:cut], text[cut:]


def build_text_loaders(
    text: str,
    tokenizer,
    *,
    max_length: int,
    stride: int,
    batch_size: int,
    train_ratio: float,
    seed: int,
    source: str = "text",
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled, last partial batch dropped) and validation loader (in order, all)."""
    train_text, val_text = split_text(text, train_ratio)
    train = TokenWindowDataset(encode_text(tokenizer, train_text), max_length, stride)
    val = TokenWindowDataset(encode_text(tokenizer, val_text), max_length, stride)
    if len(train) < batch_size:
        raise DataError(
            f"{source}: the training split holds {len(train)} windows of {max_length} tokens, "
            f"fewer than one batch of {batch_size}; use a longer text or a smaller context_length"
        )
    if len(val) == 0:
        raise DataError(
            f"{source}: the validation split is shorter than one window of {max_length} tokens; "
            "lower train_ratio or context_length"
        )
    return (
        make_loader(train, batch_size, shuffle=True, drop_last=True, seed=seed),
        make_loader(val, batch_size, shuffle=False, drop_last=False, seed=seed),
    )
