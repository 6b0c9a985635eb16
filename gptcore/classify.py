"""Stage 3: finetune a GPT foundation into a spam classifier (the book's chapter 6), and classify with it.

The 50,257-way output head is replaced by Linear(emb_dim, 2); the logits at one position (the last,
or the last real token) classify the whole text. Training goes through the shared loop
`gptcore.train.train`; when only the top of the network trains, the frozen prefix runs without
autograd (the same numbers, less memory and time).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.config import ClassifierParams, GPTConfig, RunConfig
from gptcore.data.loader import make_loader
from gptcore.data.sms import LABELS, PAD_ID, SmsDataset, encode_texts, pad_ids, read_split
from gptcore.device import forked_rng, resolve_device
from gptcore.precision import COMPUTE_DTYPES, autocast, resolve_precision, weights_dtype
from gptcore.errors import DataError, WeightsError
from gptcore.metrics import confusion_rows, split_metrics
from gptcore.model import GPTModel
from gptcore.tokenizer import get_tokenizer
from gptcore.train import LoopOptions, Progress, TrainResult, open_progress, to_device, train
from gptcore.weights import load_into, load_model, load_state, read_metadata, save_model

METADATA_KEY = "gptcore_classifier"
TRAINABLE = ("last_block", "last_two_blocks", "all", "head")
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


@contextlib.contextmanager
def frozen_linears_cast(model: GPTModel, frozen_blocks: int | None, precision: str):
    """Hold the Linear weights of the first `frozen_blocks` blocks in the low precision while inside.

    Under bf16/fp16 autocast every Linear casts its fp32 weight and bias at every forward pass; a
    frozen weight always casts to the same values, so casting it once gives the same outputs without
    the per-step copies (about 10% of a 774M classifier step on CPU). LayerNorms and embeddings stay
    fp32, as autocast runs them. The fp32 tensors come back on exit (the saved model is unchanged).
    A no-op in fp32 or when nothing is frozen.
    """
    dtype = COMPUTE_DTYPES[precision]
    originals: dict[nn.Parameter, torch.Tensor] = {}
    if precision.endswith("-mixed") and frozen_blocks:
        for block in model.trf_blocks[:frozen_blocks]:
            for module in block.modules():
                if isinstance(module, nn.Linear):
                    for param in module.parameters():
                        originals[param] = param.data
                        param.data = param.data.to(dtype)
    try:
        yield model
    finally:
        for param, data in originals.items():
            param.data = data


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


def classification_loss(token_position: str = "last", pad_id: int = PAD_ID, frozen_blocks: int | None = None):
    """A loss_fn for gptcore.train.train: cross-entropy of the class logits against the labels."""

    def loss_fn(model: GPTModel, batch) -> torch.Tensor:
        inputs, labels = batch
        logits = class_logits(model, inputs, token_position, pad_id, frozen_blocks)
        return F.cross_entropy(logits.float(), labels)

    return loss_fn


# --- evaluation --------------------------------------------------------------------------------------


@dataclass
class Evaluation:
    loss: float
    accuracy: float
    labels: list[int] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)


@torch.no_grad()
def evaluate_classifier(
    model: GPTModel,
    loader,
    device: torch.device,
    precision: str = "fp32",
    *,
    token_position: str = "last",
    pad_id: int = PAD_ID,
    num_batches: int | None = None,
) -> Evaluation:
    """Mean cross-entropy and accuracy over the first num_batches batches of loader (all when None)."""
    was_training = model.training
    model.eval()
    total, labels, predictions = 0.0, [], []
    try:
        for batch in itertools.islice(loader, num_batches):
            inputs, targets = to_device(batch, device)
            with autocast(device, precision):
                logits = class_logits(model, inputs, token_position, pad_id).float()  # [B, classes]
            total += F.cross_entropy(logits, targets, reduction="sum").item()
            labels += targets.tolist()
            predictions += logits.argmax(dim=-1).tolist()
    finally:
        model.train(was_training)
    n = len(labels)
    if n == 0:
        return Evaluation(float("nan"), float("nan"))
    accuracy = sum(y == p for y, p in zip(labels, predictions)) / n
    return Evaluation(total / n, accuracy, labels, predictions)


def classifier_evaluator(train_loader, val_loader, device, precision, num_batches, token_position, pad_id=PAD_ID):
    """An evaluate(model) callback for the training loop: loss and accuracy on a few batches of each split."""

    def evaluate(model: GPTModel) -> dict[str, float]:
        row = {}
        for name, loader in (("train", train_loader), ("val", val_loader)):
            ev = evaluate_classifier(
                model, loader, device, precision, token_position=token_position, pad_id=pad_id, num_batches=num_batches
            )
            row[f"{name}_loss"], row[f"{name}_accuracy"] = ev.loss, ev.accuracy
        return row

    return evaluate


# --- the recipe ---------------------------------------------------------------------------------------


def make_optimizer(parameters: list[nn.Parameter], params: ClassifierParams, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused where PyTorch has a fused kernel: on CPU the per-tensor loop costs about as much as
    the forward pass of a small model, most of it on the 50,257-row token embedding."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(parameters, lr=params.lr, weight_decay=params.weight_decay, fused=fused or None)


@dataclass
class ClassifierOutcome:
    model: GPTModel
    info: ClassifierInfo
    result: TrainResult
    metrics: dict[str, float]
    confusion: list[dict[str, str]]  # test set: one {actual, predicted} row per message
    progress: Progress | None  # call .finish() once the outputs are written


def finetune_classifier(
    foundation: str | os.PathLike,
    splits: dict[str, str | os.PathLike],
    params: ClassifierParams,
    run: RunConfig,
    progress_dir: str | os.PathLike | None = None,
    *,
    show_progress: bool = True,
    no_grad_prefix: bool = True,
    report: Callable[[list[dict]], None] | None = None,
) -> ClassifierOutcome:
    """Finetune the foundation weights file on the prepared splits (keys train, validation, test).

    no_grad_prefix: run the frozen embeddings and blocks without autograd (exact; saves time and memory).
    report: called with the history so far (rows with examples_seen), on start and after every
    evaluation (gptcore.train.train).
    """
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    frames = {name: read_split(splits[name]) for name in ("train", "validation", "test")}
    tokenizer = get_tokenizer()
    model = load_foundation(foundation, len(LABELS), seed=run.seed, device=device).to(weights_dtype(precision))
    trainable = set_trainable(model, params.trainable)

    context = model.config.context_length
    train_set = SmsDataset(encode_texts(tokenizer, frames["train"]["Text"]), frames["train"]["Label"], context_length=context)
    if len(train_set) < params.batch_size:
        raise DataError(f"{splits['train']}: {len(train_set)} messages, fewer than one batch of {params.batch_size}")
    datasets = {"train": train_set} | {
        name: SmsDataset(encode_texts(tokenizer, frames[name]["Text"]), frames[name]["Label"], max_length=train_set.max_length)
        for name in ("validation", "test")
    }
    train_loader = make_loader(train_set, params.batch_size, shuffle=True, drop_last=True, seed=run.seed)
    in_order = {name: make_loader(ds, params.batch_size, shuffle=False, drop_last=False) for name, ds in datasets.items()}
    info = ClassifierInfo(max_length=train_set.max_length, token_position=params.token_position)

    optimizer = make_optimizer(trainable, params, device)
    inputs = [foundation] + [splits[name] for name in frames]
    progress = open_progress(progress_dir, params, run.to_dict(), precision, inputs=inputs)
    frozen = frozen_prefix(model) if no_grad_prefix else None
    evaluate = classifier_evaluator(
        in_order["train"], in_order["validation"], device, precision, params.eval_batches, params.token_position
    )

    def with_examples(rows: list[dict]) -> list[dict]:
        return [{**row, "examples_seen": row["step"] * params.batch_size} for row in rows]  # drop_last: full batches

    # Dropout draws from a fork of torch's generators seeded with run.seed; the caller's stay as they were.
    with frozen_linears_cast(model, frozen, precision), forked_rng(device, run.seed):
        options = LoopOptions(epochs=params.epochs, eval_every=params.eval_every, seed=run.seed, show_progress=show_progress,
                              desc="finetune_classifier", **params.loop_options())
        result = train(model, optimizer, train_loader, classification_loss(params.token_position, PAD_ID, frozen), evaluate, device, options, precision, progress,
                       report=(lambda rows: report(with_examples(rows))) if report is not None else None)
    result.history = with_examples(result.history)

    final = {
        name: evaluate_classifier(model, loader, device, precision, token_position=params.token_position)
        for name, loader in in_order.items()
    }
    test = final["test"]
    metrics = split_metrics(final["train"].accuracy, final["validation"].accuracy, test.labels, test.predictions, test.loss)
    metrics.update(
        steps=result.steps,
        examples_seen=result.steps * params.batch_size,
        train_seconds=round(result.seconds, 2),
        max_length=train_set.max_length,
        trainable_parameters=sum(p.numel() for p in trainable),
    )
    confusion = confusion_rows(test.labels, test.predictions, LABELS)
    return ClassifierOutcome(model.cpu(), info, result, metrics, confusion, progress)


# --- inference ----------------------------------------------------------------------------------------


def save_classifier(model: GPTModel, info: ClassifierInfo, path: str | os.PathLike) -> None:
    """The weights file, with how to pad and read inputs (ClassifierInfo) in its metadata."""
    save_model(model, path, extra=info.to_metadata())


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[GPTModel, ClassifierInfo]:
    """A classifier weights file and its ClassifierInfo (defaults for files that carry none)."""
    model = load_model(path, device)
    if model.config.num_classes is None:
        raise WeightsError(f"{path}: is a language model, not a classifier; finetune it with `dvc repro finetune_classifier`")
    metadata = read_metadata(path)
    if METADATA_KEY not in metadata:
        labels = LABELS if model.config.num_classes == len(LABELS) else tuple(map(str, range(model.config.num_classes)))
        return model, ClassifierInfo(labels=labels)
    try:
        raw = json.loads(metadata[METADATA_KEY])
        info = ClassifierInfo(**{**raw, "labels": tuple(raw["labels"])})
    except (json.JSONDecodeError, TypeError, KeyError) as err:
        raise WeightsError(f"{path}: bad {METADATA_KEY} metadata: {err}") from None
    if len(info.labels) != model.config.num_classes or info.token_position not in TOKEN_POSITIONS:
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
