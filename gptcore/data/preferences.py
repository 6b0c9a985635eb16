"""Preference data (the book's ch. 7 DPO bonus): entries with a `chosen` and a `rejected` response,
their token pairs, the reference log-probabilities stored beside them, and the pair collate.

A pair is two Stage 4 examples that share the prompt: the Alpaca prompt + the chosen response, and
the same prompt + the rejected one, encoded as `encode_example` encodes an instruction (ids and
prompt length). The collate is Stage 4's (`collate_instructions` with `mask_prompt`: padding 50256,
ignored targets -100, the first end-of-text a target), over the 2B sequences of a batch padded to
one width, reshaped to [B, 2, T]: row b's chosen sequence at [b, 0], its rejected one at [b, 1].
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from gptcore.data.instructions import Example, _json_type, collate_instructions, encode_example, read_instructions
from gptcore.data.loader import ResumableBatchSampler
from gptcore.errors import DataError
from gptcore.tokenizer import EOT_ID

RESPONSES = ("chosen", "rejected")
REFERENCE = "reference_logprobs"  # per entry: {"chosen": sum, "rejected": sum} over the response tokens
REFERENCE_TOKENS = "reference_tokens"  # per entry: {"chosen": n, "rejected": n}, the tokens those sums cover

# A pair: the chosen and the rejected example, and the reference's summed log-probs of each (NaN: none).
Pair = tuple[Example, Example, tuple[float, float]]


def read_preferences(path, *, with_reference: bool = False) -> list[dict[str, Any]]:
    """The entries of a preference JSON file, validated: instruction/input/output and the string
    `chosen`/`rejected` (and, `with_reference`, the stored reference log-probs); one-line DataErrors."""
    entries = read_instructions(path)
    for i, entry in enumerate(entries):
        for key in RESPONSES:
            if key not in entry:
                raise DataError(f"{path}: entry {i}: missing key {key!r} (preference data needs chosen and rejected)")
            if not isinstance(entry[key], str):
                raise DataError(f"{path}: entry {i}: {key!r} must be a string, got {_json_type(entry[key])}")
        if with_reference:
            _check_reference(entry, f"{path}: entry {i}")
    return entries


def _check_reference(entry: dict, where: str) -> None:
    for field, kind in ((REFERENCE, (int, float)), (REFERENCE_TOKENS, int)):
        value = entry.get(field)
        if not isinstance(value, dict) or any(
            not isinstance(value.get(k), kind) or isinstance(value.get(k), bool) for k in RESPONSES
        ):
            raise DataError(
                f"{where}: no {field!r} with a number for chosen and rejected (it comes from stage prepare_preferences)"
            )


def encode_pair(entry: dict, tokenizer) -> tuple[Example, Example]:
    """The chosen and the rejected example of an entry: token ids and prompt length of each."""
    return tuple(encode_example({**entry, "output": entry[key]}, tokenizer) for key in RESPONSES)


def counted_targets(example: Example, allowed_max_length: int) -> int:
    """How many targets of the example the collate keeps with mask_prompt (its response tokens and the
    end-of-text, within the allowed length)."""
    ids, prompt_len = example
    return min(len(ids), allowed_max_length) - max(prompt_len - 1, 0)


class PreferenceDataset(Dataset):
    """Preference entries tokenized once; item i is (chosen example, rejected example, reference sums)."""

    def __init__(self, entries: Sequence[dict], tokenizer, allowed_max_length: int, source: str = "preferences"):
        self.pairs: list[Pair] = []
        for i, entry in enumerate(entries):
            chosen, rejected = encode_pair(entry, tokenizer)
            counts = [counted_targets(example, allowed_max_length) for example in (chosen, rejected)]
            if min(counts) < 1:
                raise DataError(
                    f"{source}: entry {i}: its prompt of {chosen[1]} tokens leaves no response token within "
                    f"allowed_max_length={allowed_max_length}; raise it (at most the context length)"
                )
            reference = (float("nan"), float("nan"))
            if REFERENCE in entry:
                stored = [entry[REFERENCE_TOKENS][key] for key in RESPONSES]
                if stored != counts:
                    raise DataError(
                        f"{source}: entry {i}: its reference log-probs cover {stored} tokens, the pair has {counts} "
                        f"with allowed_max_length={allowed_max_length}; run prepare_preferences again"
                    )
                reference = tuple(float(entry[REFERENCE][key]) for key in RESPONSES)
            self.pairs.append((chosen, rejected, reference))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> Pair:
        return self.pairs[i]


def collate_preferences(
    batch: Sequence[Pair], *, allowed_max_length: int | None = None, pad_id: int = EOT_ID
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs [B, 2, T], targets [B, 2, T], reference [B, 2]) of a batch of pairs, CPU tensors.

    Stage 4's collate with mask_prompt over the 2B sequences (chosen, rejected, chosen, ...), so both
    responses of a pair share the width; the reference is the stored summed log-probs (NaN: none).
    """
    sequences = [example for chosen, rejected, _ in batch for example in (chosen, rejected)]
    inputs, targets = collate_instructions(
        sequences, pad_id=pad_id, allowed_max_length=allowed_max_length, mask_prompt=True
    )  # [2B, T] each
    reference = torch.tensor([ref for _, _, ref in batch], dtype=torch.float32).reshape(len(batch), 2)
    return inputs.view(len(batch), 2, -1), targets.view(len(batch), 2, -1), reference


def preference_loader(
    dataset: PreferenceDataset, batch_size: int, *, shuffle: bool, seed: int, allowed_max_length: int
) -> DataLoader:
    """A loader over a ResumableBatchSampler: shuffled per epoch with the last partial batch dropped
    (training, as Stage 4), or in order and whole (evaluation, reference computation)."""
    sampler = ResumableBatchSampler(len(dataset), batch_size, shuffle=shuffle, drop_last=shuffle, seed=seed)
    collate = functools.partial(collate_preferences, allowed_max_length=allowed_max_length)
    # A private generator, as gptcore.data.instructions: the global RNG stays untouched (exact resume).
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, generator=torch.Generator().manual_seed(seed))
