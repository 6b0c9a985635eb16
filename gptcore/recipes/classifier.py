"""The spam classifier as a model (the book's chapter 6): a GPT foundation whose 50,257-way output head
is replaced by Linear(emb_dim, 2); the logits at one position (the last, or the last real token)
classify the whole text. Building it, choosing what trains, its weights file, and classifying texts.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from gptcore.config import GPTConfig
from gptcore.data.sms import LABELS, PAD_ID, encode_texts, pad_ids
from gptcore.device import forked_rng
from gptcore.errors import WeightsError
from gptcore.model import GPTModel
from gptcore.training.mixed_linear import frozen_linears_in
from gptcore.weights import load_into, load_model, load_state, read_metadata, save_model

if TYPE_CHECKING:
    pass

METADATA_KEY = "gptcore_classifier"
TRAINABLE = ("last_block", "last_two_blocks", "all", "head")  # and lora: gptcore.recipes.adapters.add_lora
CLASSIFIER_HEAD = ("out_head",)  # the new head: trains whole beside LoRA's adapters, saved in the adapter file
TOKEN_POSITIONS = ("last", "last_non_pad")


@dataclass
class ClassifierInfo:
    """How a classifier reads its input; saved in the weights file so inference pads as training did."""

    labels: tuple[str, ...] = LABELS
    max_length: int | None = None  # texts are cut to it and right-padded to it; None: each text as is
    token_position: str = "last"
    pad_id: int = PAD_ID

    def to_metadata(self) -> dict[str, str]:
        return {METADATA_KEY: json.dumps(dataclasses.asdict(self))}


# --- the model ---------------------------------------------------------------------------------------


def build_classifier(
    config: GPTConfig,
    state: dict[str, torch.Tensor],
    num_classes: int = 2,
    *,
    seed: int = 123,
    device: torch.device | str = "cpu",
    source: str = "foundation",
) -> GPTModel:
    """A GPTModel with a fresh Linear(emb_dim, num_classes) head and every other weight from `state`.

    The head's weights are those drawn after `torch.manual_seed(seed)`, as the book's
    `torch.manual_seed(123)` + `nn.Linear(emb_dim, 2)`: the same head as the book's for the same seed.
    Every draw is made on a fork of torch's generators; the caller's stream is left as it was.
    """
    config = dataclasses.replace(config, num_classes=num_classes)
    with forked_rng(device), torch.device(device):
        model = GPTModel(config)  # every weight but the head's is replaced below
    with forked_rng(device, seed):
        model.out_head.reset_parameters()
    body = {k: v for k, v in state.items() if not k.startswith("out_head.")}
    head = {k: v for k, v in model.state_dict().items() if k.startswith("out_head.")}
    load_into(model, {**body, **head}, source)
    return model


def load_foundation(path: str | os.PathLike, num_classes: int = 2, *, seed: int = 123, device="cpu") -> GPTModel:
    """The classifier built on the weights file at `path` (a language model, or another classifier)."""
    config, state = load_state(path, device)
    return build_classifier(config, state, num_classes, seed=seed, device=device, source=str(path))


def set_trainable(model: GPTModel, trainable: str) -> list[nn.Parameter]:
    """Freeze everything, then unfreeze what `trainable` names; return the trainable parameters.

    last_block: the last transformer block + final LayerNorm + head (the book's choice);
    last_two_blocks: the last two blocks + final LayerNorm + head; head: the head only; all: everything.
    (`trainable: lora`, adapters on the frozen blocks + the head whole, is gptcore.recipes.adapters.add_lora
    with CLASSIFIER_HEAD: an adapter on a freshly drawn head would save nothing, as PEFT's modules_to_save.)

    Raises:
        ValueError: an unknown `trainable`.
    """
    if trainable not in TRAINABLE:
        raise ValueError(f"trainable: expected one of {', '.join(TRAINABLE)}, got {trainable!r}")
    if trainable == "all":
        modules = [model]
    else:
        blocks = {"last_block": 1, "last_two_blocks": 2, "head": 0}[trainable]
        modules = [model.out_head]
        if blocks:
            modules += [model.final_norm, *list(model.trf_blocks)[-blocks:]]
    for p in model.parameters():
        p.requires_grad_(False)
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(True)
    return [p for p in model.parameters() if p.requires_grad]


def frozen_prefix(model: GPTModel) -> int | None:
    """How many leading blocks are frozen along with the embeddings; None when the embeddings train."""
    embeddings = itertools.chain(model.tok_emb.parameters(), model.pos_emb.parameters())
    if any(p.requires_grad for p in embeddings):
        return None
    count = 0
    for block in model.trf_blocks:
        if any(p.requires_grad for p in block.parameters()):
            break
        count += 1
    return count


def frozen_linears_cast(model: GPTModel, frozen_blocks: int | None, precision: str):
    """Hold the blocks' frozen Linear weights in the low precision while inside (a no-op when
    frozen_blocks is None: the embeddings train): gptcore.training.mixed_linear.frozen_linears_in."""
    return frozen_linears_in(model.trf_blocks, precision, enabled=frozen_blocks is not None)


def token_index(idx: torch.Tensor, token_position: str, pad_id: int = PAD_ID) -> torch.Tensor:
    """Per row of idx [B, T], the position whose logits classify: LongTensor [B]."""
    B, T = idx.shape
    if token_position == "last":
        return torch.full((B,), T - 1, dtype=torch.long, device=idx.device)
    if token_position == "last_non_pad":
        # Rows are right-padded and texts never contain the pad id (encode_texts), so this counts real tokens.
        return ((idx != pad_id).sum(dim=1) - 1).clamp(min=0)
    raise ValueError(f"token_position: expected one of {', '.join(TOKEN_POSITIONS)}, got {token_position!r}")


def class_logits(
    model: GPTModel,
    idx: torch.Tensor,
    token_position: str = "last",
    pad_id: int = PAD_ID,
    frozen_blocks: int | None = None,
) -> torch.Tensor:
    """Class logits [B, num_classes] of token ids idx [B, T], read at the chosen position.

    frozen_blocks k: the embeddings and the first k blocks run under torch.no_grad() (their
    parameters must be frozen), and the last block only where the chosen position needs it; the
    result equals model(idx) at that position up to float rounding.
    """
    position = token_index(idx, token_position, pad_id)  # [B]
    if token_position == "last_non_pad":
        # Attention is causal: pads after the longest text of the batch reach no classified position,
        # so cutting them is exact and saves their compute.
        idx = idx[:, : int(position.max()) + 1]
    return model.logits_at(idx, position, frozen_blocks)  # [B, num_classes]


def save_classifier(model: GPTModel, info: ClassifierInfo, path: str | os.PathLike) -> None:
    """The weights file, with how to pad and read inputs (ClassifierInfo) in its metadata."""
    save_model(model, path, extra=info.to_metadata())


def parse_info(text: str, source: str | os.PathLike) -> ClassifierInfo:
    """The ClassifierInfo stored as JSON in a weights or adapter file's metadata.

    Raises:
        WeightsError: one line naming `source`: not JSON, missing or unknown fields, an unknown token position.
    """
    try:
        raw = json.loads(text)
        info = ClassifierInfo(**{**raw, "labels": tuple(raw["labels"])})
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise WeightsError(f"{source}: bad {METADATA_KEY} metadata: {err}") from None
    if info.token_position not in TOKEN_POSITIONS:
        raise WeightsError(f"{source}: {METADATA_KEY} metadata does not fit the model ({info})")
    return info


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPTModel, ClassifierInfo]:
    """A classifier weights file and its ClassifierInfo (defaults for files that carry none)."""
    model = load_model(path, device)
    if model.config.num_classes is None:
        raise WeightsError(
            f"{path}: is a language model, not a classifier; finetune it with `dvc repro finetune_classifier`"
        )
    metadata = read_metadata(path)
    if METADATA_KEY not in metadata:
        labels = LABELS if model.config.num_classes == len(LABELS) else tuple(map(str, range(model.config.num_classes)))
        return model, ClassifierInfo(labels=labels)
    info = parse_info(metadata[METADATA_KEY], path)
    if len(info.labels) != model.config.num_classes:
        raise WeightsError(f"{path}: {METADATA_KEY} metadata does not fit the model ({info})")
    return model, info


@torch.no_grad()
def classify_texts(
    model: GPTModel, info: ClassifierInfo, tokenizer, texts: Sequence[str], batch_size: int = 32
) -> list[tuple[str, float]]:
    """(label, probability) per text, each text cut and padded exactly as in training."""
    device = next(model.parameters()).device
    context = model.config.context_length
    ids = [seq or [info.pad_id] for seq in encode_texts(tokenizer, texts)]  # an empty text is one pad
    results: list[tuple[str, float]] = []
    # With a stored max_length all texts share one padded length (batches); without, each goes alone.
    step = batch_size if info.max_length else 1
    for start in range(0, len(ids), step):
        chunk = ids[start : start + step]
        length = min(info.max_length or len(chunk[0]), context)
        inputs = pad_ids(chunk, length, info.pad_id).to(device)  # [B, length]
        probs = torch.softmax(class_logits(model, inputs, info.token_position, info.pad_id).float(), dim=-1)
        best = probs.argmax(dim=-1)
        results += [(info.labels[int(k)], float(probs[i, k])) for i, k in enumerate(best)]
    return results
