"""Stage 1: train GPTModel from scratch on a plain-text corpus, as the book's chapter 5 does."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gptcore.data.text import build_text_loaders
from gptcore.device import forked_rng, resolve_device
from gptcore.errors import DataError
from gptcore.inference.decoding import generate, ids_to_text, text_to_ids
from gptcore.model import GPTModel, random_model
from gptcore.params.schema import PretrainParams, RunConfig
from gptcore.precision import resolve_precision, weights_dtype
from gptcore.tokenizer import EOT_ID, get_tokenizer
from gptcore.training.evaluation import lm_loss, loss_evaluator, perplexity
from gptcore.training.loop import LoopOptions, TrainResult, train
from gptcore.training.progress import Progress, open_progress
from gptcore.training.step import make_optimizer


@dataclass
class PretrainOutcome:
    model: GPTModel
    result: TrainResult
    metrics: dict[str, float]
    sample: str
    progress: Progress | None  # call .finish() once the outputs are written


def read_corpus(path: str | os.PathLike) -> str:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DataError(f"{path}: corpus not found; run `dvc repro download_corpus`") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (byte {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: the corpus is empty")
    return text


def pretrain(
    corpus: str | os.PathLike,
    params: PretrainParams,
    run: RunConfig,
    progress_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    report: Callable[[list[dict]], None] | None = None,
) -> PretrainOutcome:
    """Train a fresh GPTModel on the corpus; resumes from progress_dir when it holds this run's progress.

    report: called with the history so far, on start and after every evaluation (gptcore.training.loop.train).
    """
    text = read_corpus(corpus)
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    tokenizer = get_tokenizer()
    context = params.model.context_length
    train_loader, val_loader = build_text_loaders(
        text,
        tokenizer,
        max_length=context,
        stride=params.stride or context,
        batch_size=params.batch_size,
        train_ratio=params.train_ratio,
        seed=run.seed,
        source=str(corpus),
    )
    # The init's draws, then dropout's, from a fork of torch's generators seeded with run.seed (the same
    # numbers as after torch.manual_seed); the caller's generators stay as they were.
    with forked_rng(device, run.seed):
        model = random_model(params.model, params.init).to(device, weights_dtype(precision))
        optimizer = make_optimizer(model.parameters(), params.lr, params.weight_decay, device)
        progress = open_progress(progress_dir, params, run.to_dict(), precision, inputs=[corpus])
        evaluate = loss_evaluator(train_loader, val_loader, lm_loss, device, precision, params.eval_batches)
        options = LoopOptions(
            epochs=params.epochs,
            eval_every=params.eval_every,
            seed=run.seed,
            strategy=run.strategy,
            show_progress=show_progress,
            desc="pretrain",
            **params.loop_options(),
        )
        result = train(
            model, optimizer, train_loader, lm_loss, evaluate, device, options, precision, progress, report=report
        )
    final = result.history[-1]
    metrics = {
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "train_perplexity": perplexity(final["train_loss"]),
        "val_perplexity": perplexity(final["val_loss"]),
        "tokens_seen": result.tokens_seen,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        **result.clipping_metrics(),
    }
    prompt = text_to_ids(params.sample_prompt, tokenizer, device)
    sample = ids_to_text(generate(model, prompt, params.sample_tokens, eos_id=EOT_ID), tokenizer)
    return PretrainOutcome(model.cpu(), result, metrics, sample, progress)
