"""Stage 4: finetune a foundation model to follow instructions, and answer the test instructions with it."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from gptcore.atomic import write_json, write_text
from gptcore.data.instructions import build_instruction_loaders, read_instructions
from gptcore.device import forked_rng, resolve_device
from gptcore.download import sha256_of
from gptcore.errors import WeightsError
from gptcore.inference.decoding import cast_for_inference, generate_batch, make_generator, resolve_decoding_precision
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.params.schema import GenerateParams, InstructionsParams, RunConfig
from gptcore.precision import autocast, resolve_precision, weights_dtype
from gptcore.prompt import RESPONSE_MARKER, format_input
from gptcore.recipes.adapters import add_lora, lora_config
from gptcore.tokenizer import EOT_ID, encode_text, get_tokenizer
from gptcore.training.evaluation import lm_loss, loss_evaluator, perplexity
from gptcore.training.loop import LoopOptions, TrainResult, train
from gptcore.training.lora import LoRAConfig
from gptcore.training.progress import Progress, code_digest, fingerprint, open_progress
from gptcore.training.step import make_optimizer
from gptcore.weights import load_model

logger = logging.getLogger(__name__)


def load_language_model(path: str | os.PathLike, device: torch.device | str = "cpu") -> GPTModel:
    """A weights file's model, which must have a language-model head (not a classifier's)."""
    model = load_model(path, device)
    if model.config.num_classes is not None:
        raise WeightsError(
            f"{path}: is a classifier ({model.config.num_classes} classes); instruction finetuning and "
            "generation need a language model"
        )
    return model


@dataclass
class FinetuneOutcome:
    model: GPTModel
    result: TrainResult
    history: list[dict[str, float]]  # one row per evaluation, the one before training first (step 0)
    metrics: dict[str, float]
    progress: Progress | None  # call .finish() once the outputs are written
    lora: LoRAConfig | None = None  # the adapters' config (method: lora): finish with recipes.adapters.finish_lora


def finetune_instructions(
    foundation: str | os.PathLike,
    train_path: str | os.PathLike,
    val_path: str | os.PathLike,
    params: InstructionsParams,
    run: RunConfig,
    progress_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
    report: Callable[[list[dict]], None] | None = None,
) -> FinetuneOutcome:
    """Finetune the foundation LM on the training entries (book ch. 7); resumes from progress_dir.

    report: called with the history so far (the row before training first), on start and after every
    evaluation (gptcore.training.loop.train).
    """
    device = resolve_device(run.device)
    precision = resolve_precision(run.precision, device)
    tokenizer = get_tokenizer()
    train_entries, val_entries = read_instructions(train_path), read_instructions(val_path)
    model = load_language_model(foundation, device).to(weights_dtype(precision))
    lora = lora_config(params.lora) if params.method == "lora" else None
    trainable = add_lora(model, lora, device, run.seed, precision) if lora else list(model.parameters())
    train_loader, val_loader = build_instruction_loaders(
        train_entries,
        val_entries,
        tokenizer,
        batch_size=params.batch_size,
        seed=run.seed,
        allowed_max_length=min(params.allowed_max_length, model.config.context_length),
        mask_prompt=params.mask_prompt,
        bucket_by_length=params.bucket_by_length,
    )
    optimizer = make_optimizer(trainable, params.lr, params.weight_decay, device)
    progress = open_progress(progress_dir, params, run.to_dict(), precision, inputs=[foundation, train_path, val_path])
    evaluate = loss_evaluator(train_loader, val_loader, lm_loss, device, precision, params.eval_batches)
    # The foundation's losses on the same batches, before any update (a resumed run recomputes them:
    # the progress is loaded inside train()).
    before = {"step": 0, "epoch": 0, "tokens_seen": 0, **evaluate(model)}
    options = LoopOptions(
        epochs=params.epochs,
        eval_every=params.eval_every,
        seed=run.seed,
        strategy=run.strategy,
        show_progress=show_progress,
        desc="finetune_instructions",
        **params.loop_options(),
    )
    with_before = (lambda rows: report([before, *rows])) if report is not None else None
    with forked_rng(device, run.seed):  # dropout's draws; the caller's generators stay as they were
        result = train(
            model, optimizer, train_loader, lm_loss, evaluate, device, options, precision, progress, report=with_before
        )
    final = result.history[-1]
    metrics = {
        "train_loss": final["train_loss"],
        "val_loss": final["val_loss"],
        "val_perplexity": perplexity(final["val_loss"]),
        "train_loss_before": before["train_loss"],
        "val_loss_before": before["val_loss"],
        "val_perplexity_before": perplexity(before["val_loss"]),
        "tokens_seen": result.tokens_seen,
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        **result.clipping_metrics(),
    }
    return FinetuneOutcome(model.cpu(), result, [before, *result.history], metrics, progress, lora)


def prompt_ids(entry: dict, tokenizer) -> list[int]:
    """The tokens a response is generated from: the Alpaca prompt up to and including the marker."""
    return encode_text(tokenizer, format_input(entry) + RESPONSE_MARKER)


def extract_response(text: str) -> str:
    """The generated text without surrounding whitespace or a repeated leading "### Response:"."""
    text = text.strip()
    marker = RESPONSE_MARKER.strip()
    if text.startswith(marker):
        text = text[len(marker) :].strip()
    return text


class ResponseLog:
    """Generation progress as JSON lines (one per finished batch), so an interrupted run continues.

    The first line holds the fingerprint of the model, data and params; progress made under another
    fingerprint is discarded. A line torn by a kill is ignored. `finish()` drops the log once the
    responses file is written and leaves a small `done.json` beside it.
    """

    def __init__(self, path: str | os.PathLike, fingerprint: str):
        self.path = Path(path)
        self.fingerprint = fingerprint

    def load(self) -> list[dict[str, Any]]:
        """The batches recorded under this fingerprint; starts a fresh log when there are none."""
        records = self._read()
        if records is None:
            write_text(self.path, json.dumps({"fingerprint": self.fingerprint}) + "\n")
            (self.path.parent / "done.json").unlink(missing_ok=True)
            return []
        if records:
            done = sum(len(r["indices"]) for r in records)
            logger.info(f"resuming from {self.path}: {done} responses already generated")
        return records

    def _read(self) -> list[dict[str, Any]] | None:
        if not self.path.is_file():
            return None
        lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        try:
            header = json.loads(lines[0]) if lines else {}
        except json.JSONDecodeError:
            header = {}
        if header.get("fingerprint") != self.fingerprint:
            logger.info(f"note: {self.path} was made with another model, data or params; starting afresh")
            return None
        records = []
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
                if len(record["indices"]) != len(record["responses"]) or len(record["indices"]) != len(
                    record["tokens"]
                ):
                    raise ValueError
            except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                if number == len(lines):  # the last line, cut short by a kill: redo that batch
                    break
                logger.info(f"note: {self.path} line {number} is unreadable; starting afresh")
                return None
            records.append(record)
        return records

    def append(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, summary: dict[str, Any]) -> None:
        write_json(self.path.parent / "done.json", {"fingerprint": self.fingerprint, **summary})
        self.path.unlink(missing_ok=True)


@dataclass
class GenerationOutcome:
    responses: list[dict[str, Any]]  # the test entries, each with `model_response` added
    metrics: dict[str, float]
    log: ResponseLog | None  # call .finish() once the responses file is written


def generate_responses(
    model_path: str | os.PathLike,
    test_path: str | os.PathLike,
    params: GenerateParams,
    run: RunConfig,
    log_path: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> GenerationOutcome:
    """Answer every test entry with the model, `params.batch_size` prompts at a time.

    Prompts are batched in order of length (less padding); the result keeps the file's order. With
    `log_path`, finished batches are recorded there and a rerun generates only the missing ones
    (the same tokens as an uninterrupted run: each batch samples from a generator seeded with
    `params.seed` + its number). `run.precision` is resolved for decoding (gptcore.inference.decoding).
    """
    device = resolve_device(run.device)
    precision, _ = resolve_decoding_precision(run.precision, device)
    entries = read_instructions(test_path)
    model = cast_for_inference(load_language_model(model_path, device), precision, params.quantize)  # the bench's path
    tokenizer = get_tokenizer()
    prompts = [prompt_ids(entry, tokenizer) for entry in entries]
    log, records = _open_response_log(log_path, model_path, test_path, params, precision)
    responses: dict[int, str] = {}
    for record in records:
        responses.update(zip(record["indices"], record["responses"]))
    bar = tqdm(
        total=len(entries),
        initial=len(responses),
        desc="generate_responses",
        unit="entry",
        smoothing=0,  # the ETA from the average batch so far (as the training loop's)
        disable=not show_progress,
    )
    with bar:
        for number, batch in enumerate(_batch_schedule(prompts, params.batch_size)):
            if all(i in responses for i in batch):
                continue
            record = _answer_batch(model, tokenizer, prompts, batch, number, params, device, precision)
            responses.update(zip(batch, record["responses"]))
            records.append(record)
            if log is not None:
                log.append(record)
            bar.update(len(batch))
    metrics = _generation_metrics(records, len(entries), params, precision)
    results = [{**entry, "model_response": responses[i]} for i, entry in enumerate(entries)]
    return GenerationOutcome(results, metrics, log)


def _open_response_log(
    log_path: str | os.PathLike | None,
    model_path: str | os.PathLike,
    test_path: str | os.PathLike,
    params: GenerateParams,
    precision: str,
) -> tuple[ResponseLog | None, list[dict[str, Any]]]:
    """The response log (None without `log_path`) and the batches it holds from an earlier run."""
    # The batch size is part of the run's identity even for greedy decoding: in exact arithmetic a
    # prompt's tokens do not depend on its batch (tests/inference/test_generate_batch.py), but in floating point
    # the kernels differ by shape (in bf16 enough to flip near-tied choices), so progress made with
    # another batch size is not mixed in.
    knobs = params.to_dict()
    if log_path is None:
        return None, []
    log = ResponseLog(
        log_path, fingerprint(knobs, precision, sha256_of(model_path), sha256_of(test_path), code_digest())
    )
    return log, log.load()


def _batch_schedule(prompts: list[list[int]], batch_size: int) -> list[list[int]]:
    """The entries' indices in batches of `batch_size`, shortest prompts first."""
    # The whole schedule is fixed up front and each batch samples from its own seeded generator, so
    # a resumed run draws for the missing batches exactly the numbers an uninterrupted run would.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def _answer_batch(
    model: GPTModel,
    tokenizer,
    prompts: list[list[int]],
    batch: list[int],
    number: int,
    params: GenerateParams,
    device: torch.device,
    precision: str,
) -> dict[str, Any]:
    """Generate for the prompts of one batch (the `number`th of the schedule): the log's record of it."""
    began = time.perf_counter()
    generator = make_generator(params.seed + number, device)
    with autocast(device, precision):
        new_ids = generate_batch(
            model,
            [prompts[i] for i in batch],
            params.max_new_tokens,
            eos_id=EOT_ID,
            generator=generator,
            sampling=sampling_options(params),
        )
    return {
        "indices": batch,
        "responses": [extract_response(tokenizer.decode(ids)) for ids in new_ids],
        "tokens": [len(ids) for ids in new_ids],
        "seconds": time.perf_counter() - began,
    }


def sampling_options(params: GenerateParams) -> SamplingOptions:
    """params.yaml `generate:` as the sampler's options (the seed is the batch's generator's)."""
    names = ("temperature", "top_k", "top_p", "min_p", "typical_p", "repeat_penalty", "repeat_last_n")
    names += ("presence_penalty", "frequency_penalty")
    return SamplingOptions(**{name: getattr(params, name) for name in names})


def _generation_metrics(
    records: list[dict[str, Any]], entries: int, params: GenerateParams, precision: str
) -> dict[str, Any]:
    """Throughput and response length over every batch's record (those of an earlier run included).

    `responses_at_max_new_tokens` counts the responses cut by the cap rather than ended by the model
    (end-of-text is not returned, so a capped response has exactly max_new_tokens tokens): a mean length
    only compares two models when this is below `entries`.
    """
    tokens = sum(sum(r["tokens"]) for r in records)
    capped = sum(n >= params.max_new_tokens for r in records for n in r["tokens"])
    seconds = sum(r["seconds"] for r in records)
    return {
        "entries": entries,
        "batch_size": params.batch_size,
        "precision": precision,
        "tokens_generated": tokens,
        "generation_seconds": round(seconds, 2),
        "tokens_per_second": round(tokens / seconds, 2) if seconds > 0 else 0.0,
        "mean_response_tokens": round(tokens / entries, 2),
        "responses_at_max_new_tokens": capped,
    }
