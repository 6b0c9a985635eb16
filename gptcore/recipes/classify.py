"""Stage 3: finetune a GPT foundation into a spam classifier (the book's chapter 6).

Training goes through the shared loop `gptcore.training.loop.train`; when only the top of the network
trains, the frozen prefix runs without autograd (the same numbers, less memory and time). The
classifier itself (head, trainable parts, weights file, classifying texts): gptcore.recipes.classifier.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from gptcore.data.loader import make_loader
from gptcore.data.sms import LABELS, PAD_ID, SmsDataset, encode_texts, read_split
from gptcore.device import forked_rng, resolve_device
from gptcore.errors import DataError
from gptcore.model import GPTModel
from gptcore.params.schema import ClassifierParams, RunConfig
from gptcore.precision import autocast, resolve_precision, weights_dtype
from gptcore.recipes.adapters import add_lora, lora_config
from gptcore.recipes.classifier import (
    CLASSIFIER_HEAD,
    ClassifierInfo,
    class_logits,
    frozen_linears_cast,
    frozen_prefix,
    load_foundation,
    set_trainable,
)
from gptcore.recipes.metrics import confusion_rows, split_metrics
from gptcore.tokenizer import get_tokenizer
from gptcore.training.evaluation import to_device
from gptcore.training.loop import LoopOptions, TrainResult, train
from gptcore.training.lora import LoRAConfig
from gptcore.training.progress import Progress, open_progress

if TYPE_CHECKING:
    import pandas as pd


def classification_loss(token_position: str = "last", pad_id: int = PAD_ID, frozen_blocks: int | None = None):
    """A loss_fn for gptcore.training.loop.train: cross-entropy of the class logits against the labels."""

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
    lora: LoRAConfig | None = None  # the adapters' config (trainable: lora): finish with recipes.adapters.finish_lora


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
    evaluation (gptcore.training.loop.train).
    """
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    frames = {name: read_split(splits[name]) for name in ("train", "validation", "test")}
    tokenizer = get_tokenizer()
    model = load_foundation(foundation, len(LABELS), seed=run.seed, device=device).to(weights_dtype(precision))
    lora = lora_config(params.lora) if params.trainable == "lora" else None
    if lora is None:
        trainable = set_trainable(model, params.trainable)
    else:
        trainable = add_lora(model, lora, device, run.seed, precision, also=CLASSIFIER_HEAD)
    data = _classifier_data(frames, tokenizer, splits, params, run.seed, model.config.context_length)
    info = ClassifierInfo(max_length=data.train_set.max_length, token_position=params.token_position)
    job = _Finetuning(model, trainable, data, params, device, precision, run.seed, run.strategy)

    optimizer = make_optimizer(trainable, params, device)
    inputs = [foundation] + [splits[name] for name in frames]
    progress = open_progress(progress_dir, params, run.to_dict(), precision, inputs=inputs)
    frozen = frozen_prefix(model) if no_grad_prefix else None
    result = _train_classifier(job, optimizer, progress, frozen, show_progress, report)
    metrics, confusion = _final_metrics(job, result)
    return ClassifierOutcome(model.cpu(), info, result, metrics, confusion, progress, lora)


@dataclass
class _ClassifierData:
    """The encoded splits: the training set and its shuffled loader, and every split's loader in file order."""

    train_set: SmsDataset
    train_loader: DataLoader  # shuffled, full batches only (drop_last)
    in_order: dict[str, DataLoader]  # train, validation, test: unshuffled, every message


def _classifier_data(
    frames: dict[str, pd.DataFrame],
    tokenizer,
    splits: dict[str, str | os.PathLike],
    params: ClassifierParams,
    seed: int,
    context_length: int,
) -> _ClassifierData:
    """Encode the splits (validation and test padded to the training set's length) and make their loaders."""
    train_set = SmsDataset(
        encode_texts(tokenizer, frames["train"]["Text"]), frames["train"]["Label"], context_length=context_length
    )
    if len(train_set) < params.batch_size:
        raise DataError(f"{splits['train']}: {len(train_set)} messages, fewer than one batch of {params.batch_size}")
    datasets = {"train": train_set} | {
        name: SmsDataset(
            encode_texts(tokenizer, frames[name]["Text"]), frames[name]["Label"], max_length=train_set.max_length
        )
        for name in ("validation", "test")
    }
    train_loader = make_loader(train_set, params.batch_size, shuffle=True, drop_last=True, seed=seed)
    in_order = {
        name: make_loader(ds, params.batch_size, shuffle=False, drop_last=False) for name, ds in datasets.items()
    }
    return _ClassifierData(train_set, train_loader, in_order)


@dataclass
class _Finetuning:
    """What the training and the final evaluation share: the model, its data, and where and how it runs."""

    model: GPTModel
    trainable: list[nn.Parameter]
    data: _ClassifierData
    params: ClassifierParams
    device: torch.device
    precision: str
    seed: int
    strategy: str = "auto"


def _with_examples(rows: list[dict], batch_size: int) -> list[dict]:
    """History rows with examples_seen added (drop_last: every step is a full batch)."""
    return [{**row, "examples_seen": row["step"] * batch_size} for row in rows]


def _train_classifier(
    job: _Finetuning,
    optimizer: torch.optim.Optimizer,
    progress: Progress | None,
    frozen: int | None,
    show_progress: bool,
    report: Callable[[list[dict]], None] | None,
) -> TrainResult:
    """Run the shared training loop on the classification loss; its history rows gain examples_seen."""
    params, device, precision = job.params, job.device, job.precision
    evaluate = classifier_evaluator(
        job.data.in_order["train"],
        job.data.in_order["validation"],
        device,
        precision,
        params.eval_batches,
        params.token_position,
    )
    with_examples = (lambda rows: report(_with_examples(rows, params.batch_size))) if report is not None else None
    # Dropout draws from a fork of torch's generators seeded with run.seed; the caller's stay as they were.
    with frozen_linears_cast(job.model, frozen, precision), forked_rng(device, job.seed):
        options = LoopOptions(
            epochs=params.epochs,
            eval_every=params.eval_every,
            seed=job.seed,
            strategy=job.strategy,
            show_progress=show_progress,
            desc="finetune_classifier",
            **params.loop_options(),
        )
        result = train(
            job.model,
            optimizer,
            job.data.train_loader,
            classification_loss(params.token_position, PAD_ID, frozen),
            evaluate,
            device,
            options,
            precision,
            progress,
            report=with_examples,
        )
    result.history = _with_examples(result.history, params.batch_size)
    return result


def _final_metrics(job: _Finetuning, result: TrainResult) -> tuple[dict[str, float], list[dict[str, str]]]:
    """Evaluate every split in full: the metrics, and the test set's confusion rows."""
    params = job.params
    final = {
        name: evaluate_classifier(job.model, loader, job.device, job.precision, token_position=params.token_position)
        for name, loader in job.data.in_order.items()
    }
    test = final["test"]
    metrics = split_metrics(
        final["train"].accuracy, final["validation"].accuracy, test.labels, test.predictions, test.loss
    )
    metrics.update(
        steps=result.steps,
        examples_seen=result.steps * params.batch_size,
        train_seconds=round(result.seconds, 2),
        max_length=job.data.train_set.max_length,
        trainable_parameters=sum(p.numel() for p in job.trainable),
        **result.clipping_metrics(),
    )
    confusion = confusion_rows(test.labels, test.predictions, LABELS)
    return metrics, confusion


# --- inference ----------------------------------------------------------------------------------------
