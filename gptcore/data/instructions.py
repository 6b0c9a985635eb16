"""Instruction data: validation, the book's split, the tokenized dataset, padding collate, length buckets."""

from __future__ import annotations

import functools
import json
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gptcore.data.loader import ResumableBatchSampler
from gptcore.errors import DataError
from gptcore.prompt import RESPONSE_MARKER, format_example, format_input
from gptcore.tokenizer import EOT_ID, encode_text
from gptcore.training.cross_entropy import IGNORE_INDEX

FIELDS = ("instruction", "input", "output")

# An example: its token ids and how many of them are the prompt (instruction, input, response marker).
Example = tuple[list[int], int]


def read_instructions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The entries of an instruction JSON file, validated; any problem is a one-line DataError."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: instruction data not found") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    validate_instructions(data, str(path))
    return data


def validate_instructions(data: Any, source: str) -> None:
    """Check that data is a non-empty list of objects with string instruction, input and output."""
    if not isinstance(data, list):
        raise DataError(f"{source}: expected a JSON list of entries, got {_json_type(data)}")
    if not data:
        raise DataError(f"{source}: the list holds no entries")
    for i, entry in enumerate(data):
        if not isinstance(entry, dict):
            raise DataError(f"{source}: entry {i}: expected an object, got {_json_type(entry)}")
        for key in FIELDS:
            if key not in entry:
                raise DataError(f"{source}: entry {i}: missing key {key!r}")
            if not isinstance(entry[key], str):
                raise DataError(f"{source}: entry {i}: {key!r} must be a string, got {_json_type(entry[key])}")


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def split_instructions(
    entries: Sequence[dict],
    train_ratio: float = 0.85,
    test_ratio: float = 0.1,
    shuffle_seed: int | None = None,
    source: str = "instructions",
) -> dict[str, list[dict]]:
    """The book's split: the first int(n * train_ratio) train, the next int(n * test_ratio) test, the rest
    validate (1,100 entries: 935 / 110 / 55). With a shuffle seed the entries are shuffled first."""
    entries = list(entries)
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(entries)
    n_train = int(len(entries) * train_ratio)
    n_test = int(len(entries) * test_ratio)
    splits = {
        "train": entries[:n_train],
        "validation": entries[n_train + n_test :],
        "test": entries[n_train : n_train + n_test],
    }
    empty = [name for name, part in splits.items() if not part]
    if empty:
        raise DataError(f"{source}: {len(entries)} entries leave the {' and '.join(empty)} split(s) empty")
    return splits


def encode_example(entry: dict, tokenizer) -> Example:
    """Token ids of the Alpaca-formatted entry and the length of its prompt part."""
    ids = encode_text(tokenizer, format_example(entry))
    prompt = encode_text(tokenizer, format_input(entry) + RESPONSE_MARKER)
    # BPE could merge across the prompt/response boundary; count only the tokens both encodings share.
    prompt_len = 0
    while prompt_len < min(len(ids), len(prompt)) and ids[prompt_len] == prompt[prompt_len]:
        prompt_len += 1
    return ids, prompt_len


class InstructionDataset(Dataset):
    """Alpaca-formatted entries, tokenized once; item i is (token ids, prompt length)."""

    def __init__(self, entries: Iterable[dict], tokenizer):
        self.examples = [encode_example(entry, tokenizer) for entry in entries]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> Example:
        return self.examples[i]

    def lengths(self) -> list[int]:
        return [len(ids) for ids, _ in self.examples]


def collate_instructions(
    batch: Sequence[Example | Sequence[int]],
    *,
    pad_id: int = EOT_ID,
    ignore_index: int = IGNORE_INDEX,
    allowed_max_length: int | None = None,
    mask_prompt: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad a batch to its longest sequence + 1 and build (inputs, targets) [B, T], CPU tensors.

    Each sequence gets one end-of-text (`pad_id`) appended, which stays a target so the model learns
    to stop; the padding after it is ignored (-100) in the targets. Targets are the inputs shifted by
    one. With `mask_prompt`, the targets inside the prompt are ignored too (loss on the response only).
    Both are cut to `allowed_max_length` positions. Items are (ids, prompt_length) or plain id lists.
    """
    items = [item if isinstance(item, tuple) else (list(item), 0) for item in batch]
    if not items or any(len(ids) == 0 for ids, _ in items):
        raise ValueError("collate_instructions needs a non-empty batch of non-empty sequences")
    width = max(len(ids) for ids, _ in items)  # + 1 (the end-of-text) - 1 (the shift)
    inputs = torch.full((len(items), width), pad_id, dtype=torch.long)
    targets = torch.full((len(items), width), ignore_index, dtype=torch.long)
    for row, (ids, prompt_len) in enumerate(items):
        n = len(ids)
        inputs[row, :n] = torch.tensor(ids)
        targets[row, : n - 1] = torch.tensor(ids[1:])
        targets[row, n - 1] = pad_id  # the first end-of-text: a target, not padding
        if mask_prompt and prompt_len > 1:
            # Target t predicts token t + 1: the prompt's tokens 1..P-1 are targets 0..P-2.
            targets[row, : prompt_len - 1] = ignore_index
    if allowed_max_length is not None:
        if allowed_max_length < 1:
            raise ValueError(f"allowed_max_length must be positive, got {allowed_max_length}")
        inputs, targets = inputs[:, :allowed_max_length], targets[:, :allowed_max_length]
    return inputs, targets


class LengthBucketBatchSampler(ResumableBatchSampler):
    """Batches of examples of similar length: less padding, and still every example once per epoch.

    Each epoch's shuffled order is cut into pools of `pool_batches` batches; each pool is sorted by
    length and cut into batches, and the batches are shuffled. Everything derives from seed + epoch,
    so a resumed run replays the same batches (the ResumableBatchSampler contract).
    """

    def __init__(
        self,
        lengths: Sequence[int],
        batch_size: int,
        *,
        shuffle: bool,
        drop_last: bool,
        seed: int = 0,
        pool_batches: int = 16,
    ):
        super().__init__(len(lengths), batch_size, shuffle=shuffle, drop_last=drop_last, seed=seed)
        if pool_batches < 1:
            raise ValueError("pool_batches must be positive")
        self.lengths = list(lengths)
        self.pool_batches = pool_batches

    def batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        n = self.num_items
        order = torch.randperm(n, generator=generator).tolist() if self.shuffle else list(range(n))
        if self.drop_last:  # drop the remainder before bucketing, so every batch is full
            order = order[: n - n % self.batch_size]
        size, pool = self.batch_size, self.batch_size * self.pool_batches
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start : start + pool], key=self.lengths.__getitem__)  # stable: ties keep order
            batches += [chunk[i : i + size] for i in range(0, len(chunk), size)]
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        return batches


def build_instruction_loaders(
    train_entries: Sequence[dict],
    val_entries: Sequence[dict],
    tokenizer,
    *,
    batch_size: int,
    seed: int,
    allowed_max_length: int,
    mask_prompt: bool = False,
    bucket_by_length: bool = False,
) -> tuple[DataLoader, DataLoader]:
    """Train loader (shuffled per epoch, last partial batch dropped, as the book) and validation loader
    (in order, all), both over resumable batch samplers."""
    train, val = InstructionDataset(train_entries, tokenizer), InstructionDataset(val_entries, tokenizer)
    if len(train) < batch_size:
        raise DataError(f"the training split holds {len(train)} entries, fewer than one batch of {batch_size}")
    if mask_prompt:
        _check_response_fits(train, allowed_max_length, "training")
        _check_response_fits(val, allowed_max_length, "validation")
    collate = functools.partial(collate_instructions, allowed_max_length=allowed_max_length, mask_prompt=mask_prompt)
    if bucket_by_length:
        train_sampler = LengthBucketBatchSampler(train.lengths(), batch_size, shuffle=True, drop_last=True, seed=seed)
    else:
        train_sampler = ResumableBatchSampler(len(train), batch_size, shuffle=True, drop_last=True, seed=seed)
    val_sampler = ResumableBatchSampler(len(val), batch_size, shuffle=False, drop_last=False, seed=seed)
    return _loader(train, train_sampler, collate, seed), _loader(val, val_sampler, collate, seed)


def _check_response_fits(dataset: InstructionDataset, allowed_max_length: int, split: str) -> None:
    """With mask_prompt, an example whose prompt fills the allowed length has no target left to learn
    (and a batch of only such examples has a loss of 0/0)."""
    too_long = [i for i, (_, prompt_len) in enumerate(dataset.examples) if prompt_len > allowed_max_length]
    if too_long:
        i = too_long[0]
        raise DataError(
            f"{split} entry {i}: its prompt of {dataset.examples[i][1]} tokens leaves no response token within "
            f"allowed_max_length={allowed_max_length} with mask_prompt ({len(too_long)} such entries); "
            "raise allowed_max_length (at most the context length) or turn mask_prompt off"
        )


def _loader(dataset: Dataset, sampler: ResumableBatchSampler, collate, seed: int) -> DataLoader:
    # A private generator, as make_loader: drawing the DataLoader's base seed from the global RNG would
    # shift the dropout masks of a run resumed mid-epoch.
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator().manual_seed(seed))
