"""Preference tuning (the book's ch. 7 bonus): the split and the reference log-probs (prepare_preferences),
and DPO from the Stage 4 model through the one training loop (finetune_preferences).

The reference model is the Stage 4 model itself, frozen: `prepare_preferences` runs it once over every
pair and stores the summed log-probabilities of each response with the prepared data, so training holds
one model (TRL's precompute_ref_log_probs; its issue #2421). The policy trains with its dropout off
(TRL's disable_dropout: the policy's log-probs at step 0 equal the reference's, and the loss is ln 2).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptcore.data.instructions import split_instructions
from gptcore.data.preferences import (
    REFERENCE,
    REFERENCE_TOKENS,
    RESPONSES,
    PreferenceDataset,
    preference_loader,
    read_preferences,
)
from gptcore.device import forked_rng, resolve_device
from gptcore.download import sha256_of
from gptcore.errors import DataError
from gptcore.params.schema import PreferencesParams, PrepareInstructionsParams, RunConfig
from gptcore.precision import autocast, resolve_precision, weights_dtype
from gptcore.recipes.adapters import add_lora, lora_config
from gptcore.recipes.instruct import FinetuneOutcome, load_language_model
from gptcore.tokenizer import get_tokenizer
from gptcore.training.dpo import DpoObjective, evaluate_pairs, sequence_logprobs
from gptcore.training.evaluation import to_device
from gptcore.training.loop import LoopOptions, train
from gptcore.training.progress import open_progress
from gptcore.training.step import make_optimizer

logger = logging.getLogger(__name__)

SPLITS = ("train", "validation", "test")
INFO = "reference.json"  # beside the splits: which model and settings the reference log-probs come from
# The values of each evaluation (and of the test split at the end), with a prefix per split.
EVALUATED = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "chosen_logprob")


def prepare_preferences(
    data_path: str | os.PathLike,
    model_path: str | os.PathLike,
    split: PrepareInstructionsParams,
    params: PreferencesParams,
    run: RunConfig,
) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """The book's split of the preference data, each entry with the reference's log-probs of its two
    responses (REFERENCE, REFERENCE_TOKENS), and the info file's content (model digest, settings)."""
    entries = read_preferences(data_path)
    splits = split_instructions(entries, split.train_ratio, split.test_ratio, split.shuffle_seed, source=str(data_path))
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    model = load_language_model(model_path, device).to(weights_dtype(precision)).eval()
    length = min(params.allowed_max_length, model.config.context_length)
    tokenizer = get_tokenizer()
    prepared = {}
    for name in SPLITS:
        dataset = PreferenceDataset(splits[name], tokenizer, length, source=f"{data_path} ({name} split)")
        sums, counts = reference_logprobs(model, dataset, params.batch_size, length, device, precision)
        prepared[name] = [
            {
                **entry,
                REFERENCE: dict(zip(RESPONSES, map(float, s))),
                REFERENCE_TOKENS: dict(zip(RESPONSES, map(int, c))),
            }
            for entry, s, c in zip(splits[name], sums.tolist(), counts.tolist())
        ]
    info = {"model_sha256": sha256_of(model_path), "allowed_max_length": length, "precision": precision}
    return prepared, info


@torch.no_grad()
def reference_logprobs(
    model: nn.Module,
    dataset: PreferenceDataset,
    batch_size: int,
    allowed_max_length: int,
    device: torch.device,
    precision: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's summed log-probs of every pair's chosen and rejected response, and their token
    counts: ([N, 2], [N, 2]), in dataset order, the model in eval mode (no dropout)."""
    loader = preference_loader(dataset, batch_size, shuffle=False, seed=0, allowed_max_length=allowed_max_length)
    model.eval()
    sums, counts = [], []
    for inputs, targets, _ in loader:
        inputs, targets = to_device((inputs, targets), device)
        with autocast(device, precision):
            s, c = sequence_logprobs(model, inputs, targets)  # [B, 2] each
        sums.append(s.float().cpu())
        counts.append(c.cpu())
    return torch.cat(sums), torch.cat(counts)


def read_prepared(data_dir: str | os.PathLike, model_path: str | os.PathLike) -> tuple[dict[str, list[dict]], dict]:
    """The prepared splits and their info file; the reference must come from `model_path`'s weights."""
    data_dir = Path(data_dir)
    info_path = data_dir / INFO
    if not info_path.is_file():
        raise DataError(f"{info_path}: not found (it comes from stage prepare_preferences)")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    if info.get("model_sha256") != sha256_of(model_path):
        raise DataError(
            f"{data_dir}: the reference log-probs were computed with another model than {model_path}; "
            "run prepare_preferences again"
        )
    splits = {name: read_preferences(data_dir / f"{name}.json", with_reference=True) for name in SPLITS}
    return splits, info


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of the GPT model off (its nn.Dropout layers and the attention's dropout_p)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        elif isinstance(getattr(module, "dropout", None), float):
            module.dropout = 0.0


def finetune_preferences(
    model_path: str | os.PathLike,
    data_dir: str | os.PathLike,
    params: PreferencesParams,
    run: RunConfig,
    progress_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    report: Callable[[list[dict]], None] | None = None,
) -> FinetuneOutcome:
    """DPO from the Stage 4 model on the prepared pairs; resumes from progress_dir.

    The history's rows (the one before training first) hold train_/val_ loss, chosen_reward,
    rejected_reward, margin, accuracy and chosen_logprob over `eval_batches` batches; the metrics add
    the test split's, over all its pairs. report: as gptcore.recipes.instruct.finetune_instructions.
    """
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    splits, info = read_prepared(data_dir, model_path)
    model = load_language_model(model_path, device).to(weights_dtype(precision))
    length = info["allowed_max_length"]
    if length != min(params.allowed_max_length, model.config.context_length):
        raise DataError(f"{data_dir}: prepared with allowed_max_length={length}; run prepare_preferences again")
    disable_dropout(model)
    lora = lora_config(params.lora) if params.method == "lora" else None
    trainable = add_lora(model, lora, device, run.seed, precision) if lora else list(model.parameters())
    loaders = _loaders(splits, data_dir, params.batch_size, run.seed, length)
    objective = DpoObjective(params.beta, params.nll_weight, params.logprob)
    evaluate = pair_evaluator(objective, loaders, device, precision, params.eval_batches)
    optimizer = make_optimizer(trainable, params.lr, params.weight_decay, device)
    inputs = [model_path, *(Path(data_dir) / f"{name}.json" for name in SPLITS)]
    progress = open_progress(progress_dir, params, run.to_dict(), precision, inputs=inputs)
    before = {"step": 0, "epoch": 0, "tokens_seen": 0, **evaluate(model)}
    options = LoopOptions(
        epochs=params.epochs,
        eval_every=params.eval_every,
        seed=run.seed,
        show_progress=show_progress,
        desc="finetune_preferences",
        **params.loop_options(),
    )
    with_before = (lambda rows: report([before, *rows])) if report is not None else None
    with forked_rng(device, run.seed):
        result = train(
            model, optimizer, loaders["train"], objective, evaluate, device, options, precision, progress, with_before
        )
    test = evaluate_pairs(objective, model, loaders["test"], device, precision)
    metrics = _summary(before, result, test)
    return FinetuneOutcome(model.cpu(), result, [before, *result.history], metrics, progress, lora)


def _loaders(splits: dict[str, list[dict]], data_dir, batch_size: int, seed: int, length: int) -> dict:
    """The train loader (shuffled, last partial batch dropped) and the validation and test loaders (in order)."""
    tokenizer = get_tokenizer()
    data = {name: PreferenceDataset(splits[name], tokenizer, length, f"{data_dir}/{name}.json") for name in SPLITS}
    if len(data["train"]) < batch_size:
        raise DataError(f"the training split holds {len(data['train'])} pairs, fewer than one batch of {batch_size}")
    return {
        name: preference_loader(dataset, batch_size, shuffle=name == "train", seed=seed, allowed_max_length=length)
        for name, dataset in data.items()
    }


def pair_evaluator(objective: DpoObjective, loaders: dict, device, precision: str, num_batches: int):
    """An evaluate(model) callback: the first `num_batches` batches of the train split (a fixed order that
    leaves the sampler alone) and of the validation split, each value prefixed train_ / val_."""

    def first(loader):
        dataset, collate = loader.dataset, loader.collate_fn
        batches = loader.batch_sampler.batches()[:num_batches]  # the epoch's order; the sampler stays put
        return (collate([dataset[i] for i in batch]) for batch in batches)

    def evaluate(model: nn.Module) -> dict[str, float]:
        row = {}
        for prefix, name in (("train", "train"), ("val", "validation")):
            values = evaluate_pairs(objective, model, first(loaders[name]), device, precision)
            row.update({f"{prefix}_{key}": value for key, value in values.items()})
        return row

    return evaluate


def _summary(before: dict, result, test: dict[str, float]) -> dict[str, Any]:
    final = result.history[-1]
    metrics: dict[str, Any] = {}
    for prefix in ("train", "val"):
        metrics.update({f"{prefix}_{key}": final[f"{prefix}_{key}"] for key in EVALUATED})
    metrics.update({f"test_{key}": value for key, value in test.items()})
    metrics.update(
        {
            "val_loss_before": before["val_loss"],
            "val_chosen_logprob_before": before["val_chosen_logprob"],
            "tokens_seen": result.tokens_seen,
            "steps": result.steps,
            "train_seconds": round(result.seconds, 2),
            **result.clipping_metrics(),
        }
    )
    return metrics
