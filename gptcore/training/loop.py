"""The one training loop every stage shares: evaluation on schedule, saved progress and exact resume."""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from gptcore.console import GuardedStream
from gptcore.device import forked_rng, is_main_process, world_size
from gptcore.errors import WeightsError
from gptcore.model import set_activation_checkpointing
from gptcore.training.evaluation import LossFn
from gptcore.training.interrupt import StopRequest
from gptcore.training.progress import Progress, all_rng_states, check_same_start, own_rng_state, set_rng_state
from gptcore.training.schedule import lr_factor
from gptcore.training.sharding import resolve_strategy
from gptcore.training.step import StepRunner, compile_blocks

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    """What a training run did; `history` has one row per evaluation.

    clipped_steps: the steps whose gradient norm before clipping exceeded max_grad_norm (resumed runs
    included; kept in the progress file).
    """

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    resumed_at_step: int = 0
    clipped_steps: int = 0
    max_grad_norm: float | None = None

    def clipping_metrics(self) -> dict[str, float]:
        """The stage metrics of gradient clipping: the clipped steps and their fraction of all steps;
        nothing when clipping was off."""
        if self.max_grad_norm is None:
            return {}
        fraction = self.clipped_steps / self.steps if self.steps else 0.0
        return {"clipped_steps": self.clipped_steps, "clipped_fraction": fraction}


@dataclass(frozen=True)
class LoopOptions:
    """How `train` runs. Every stage's params section gives these (e.g. TrainConfig.loop_options()).

    grad_accum cuts each process's share of a batch into micro-batches; activation_checkpointing
    recomputes each block's activations in the backward pass (less memory); compile runs the blocks
    through torch.compile; step_in_backward updates each parameter as soon as its gradient is complete
    and recast_weights keeps no low-precision weight copies for backward (less memory; see StepRunner).
    None of them changes the result beyond float rounding.
    max_grad_norm clips the global L2 norm of each step's gradients to that value (None: no clipping;
    gptcore.training.clipping); it turns step_in_backward "auto" off. Each evaluation row then holds
    `grad_norm`, the norm before clipping of that row's step, and the result counts the clipped steps.
    lr_schedule and warmup scale each param group's lr per step (gptcore.training.schedule, through
    torch.optim.lr_scheduler.LambdaLR): the optimizer's lr is the peak. seed: under torchrun, each
    process reseeds with seed + rank once the weights are in place. strategy: how torchrun's
    processes share the work (auto, ddp, fsdp: gptcore.training.sharding).
    """

    epochs: int
    eval_every: int
    lr_schedule: str = "constant"
    warmup: float = 0.0
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    step_in_backward: bool | str = "auto"
    recast_weights: bool | str = "auto"
    max_grad_norm: float | None = None
    seed: int | None = None
    strategy: str = "auto"
    show_progress: bool = True
    desc: str = "train"


def train(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    train_loader,
    loss_fn: LossFn,
    evaluate: Callable[[nn.Module], dict[str, float]],
    device: torch.device,
    options: LoopOptions,
    precision: str = "fp32",
    progress: Progress | None = None,
    report: Callable[[list[dict[str, float]]], None] | None = None,
) -> TrainResult:
    """Train for `options.epochs` over train_loader, evaluating after the first step and every `eval_every`.

    The loader must use a ResumableBatchSampler: a resumed run replays the same batch order, RNG,
    optimizer and lr-schedule state, so on CPU it ends bitwise equal to an uninterrupted run. Progress
    is saved at SIGINT/SIGTERM (then KeyboardInterrupt is raised) and every `progress.every_seconds`.

    Under torchrun every process runs this with the same arguments: each takes its share of every
    global batch (see StepRunner), the main process evaluates and alone saves the progress, and all
    of them return the same history. Randomness (dropout): one process draws from a fork of torch's
    global generators, starting where the caller left them (a resumed run: where the progress file
    left them); under torchrun each process reseeds it with `seed + rank` (as nanoGPT does), and the
    progress file keeps every process's RNG state. The caller's generators are as they were on return.
    fp16-mixed scales the loss (torch.amp.GradScaler, its state saved with the progress).

    strategy fsdp trains a sharded copy of the model (gptcore.training.sharding.ShardedModel; the
    optimizer is rebuilt over it): every process evaluates together, saves its shards of the model
    and optimizer with torch.distributed.checkpoint beside the progress file, and at the end the full
    weights are gathered once into `model` on every process. Until then `model`'s parameters are
    empty, and they stay so if training fails.

    report(history) is called with the whole history once the saved progress is restored (a resumed
    run's rows, or none) and again after every evaluation, so that a logger can rebuild what it wrote
    from the progress and then follow the run (gptcore.training.live.TrainingLog).

    Raises:
        TrainingError: a non-finite loss (the error names the step; saved progress is kept).
        WeightsError: progress that does not fit the model, or was made by another number of processes
            or another strategy.
        ConfigError: a strategy this launch cannot run, or a model fsdp cannot shard (one line, raised
            by every process alike before any collective of the run).
    """
    lr_factor(0, 1, options.lr_schedule, options.warmup)  # a bad schedule fails before any work
    resolve_strategy(options.strategy, world_size())  # and so does a strategy this launch cannot run
    run = _TrainingRun(model, optimizer, train_loader, loss_fn, evaluate, device, options, precision, progress, report)
    try:
        run.start()
        with StopRequest() as stop, run.bar:
            for epoch in range(run.start_epoch, options.epochs):
                run.run_epoch(epoch, stop)
        run.runner.gather()
        run.log_clipping()
    finally:
        run.close()
    return run.result


class _TrainingRun:
    """The state of one call of `train`, and its steps: restore, run an epoch, evaluate, save."""

    def __init__(self, model, optimizer, train_loader, loss_fn, evaluate, device, options, precision, progress, report):
        self.model, self.optimizer, self.loader = model, optimizer, train_loader
        self.loss_fn, self.evaluate_fn, self.device = loss_fn, evaluate, device
        self.options, self.precision, self.progress = options, precision, progress
        self.report = report
        self.batches_per_epoch = len(train_loader.batch_sampler.batches())
        self.total_steps = options.epochs * self.batches_per_epoch
        self.result = TrainResult(max_grad_norm=options.max_grad_norm)
        self.grad_norm: float | None = None  # the last step's, before clipping
        self.start_epoch, self.skip = 0, 0
        self.runner: StepRunner | None = None
        self.rng = contextlib.ExitStack()  # the fork of torch's generators the run draws from (start to close)
        self.output = GuardedStream(sys.stderr)
        self.bar = tqdm(
            total=self.total_steps,
            desc=options.desc,
            unit="step",
            # The ETA from the average step since the start, evaluations included (they recur), not
            # tqdm's moving average, which swings 2-3x between a step with an evaluation and one without.
            smoothing=0,
            file=self.output,
            disable=not options.show_progress or not is_main_process(),
        )
        self.started = time.perf_counter()

    def start(self) -> None:
        """Restore saved progress (if any), set up the speed options, the step runner and the schedule."""
        self.rng.enter_context(forked_rng(self.device))  # before resume or torchrun set the generators
        saved = self.restore()
        opts = self.options
        if opts.activation_checkpointing:
            set_activation_checkpointing(self.model, True)
        self.runner = StepRunner(
            self.model,
            self.optimizer,
            self.loss_fn,
            self.device,
            self.precision,
            grad_accum=opts.grad_accum,
            step_in_backward=opts.step_in_backward,
            max_grad_norm=opts.max_grad_norm,
            recast_weights=opts.recast_weights,
            strategy=opts.strategy,
        )
        self.optimizer = self.runner.optimizer  # under fsdp: the one over the sharded copy
        if saved is not None and saved.get("grad_scaler") and self.runner.scaler is not None:
            self.runner.scaler.load_state_dict(saved["grad_scaler"])
        if opts.compile:
            compile_blocks(self.runner.module)
        if self.runner.world > 1:
            check_same_start(self.result.steps, self.progress)
        if saved is not None:
            set_rng_state(own_rng_state(saved["rng"], self.runner.world, self.runner.rank, self.progress))
            self.restore_shards(saved)
        elif self.runner.world > 1 and opts.seed is not None:
            torch.manual_seed(opts.seed + self.runner.rank)  # after DDP's broadcast of the weights
        for group in self.optimizer.param_groups:  # progress saved by versions that kept the peak as peak_lr
            if "peak_lr" in group:
                group.setdefault("initial_lr", group.pop("peak_lr"))
        factor = functools.partial(
            lr_factor, total_steps=self.total_steps, schedule=opts.lr_schedule, warmup=opts.warmup
        )
        # last_epoch: the steps already taken (a resumed optimizer brings back each group's initial_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor, last_epoch=self.result.steps - 1)
        self.bar.reset(total=self.total_steps)
        # Resumed steps show as done but count for nothing in the rate (the ETA is this run's own speed).
        self.bar.n = self.bar.initial = self.result.steps
        self.bar.refresh()
        self.started = time.perf_counter() - self.result.seconds
        self.runner.module.train()
        if self.report is not None:
            self.report(self.result.history)

    def restore(self) -> dict[str, Any] | None:
        """Load the saved history and position, and the model and optimizer unless they were saved
        sharded (restore_shards loads those once the model is sharded); None when starting afresh."""
        saved = self.progress.load() if self.progress is not None else None
        if saved is None:
            return None
        sharded = resolve_strategy(self.options.strategy, world_size()) == "fsdp"
        if ("shards" in saved) != sharded:
            made, now = ("fsdp", "another strategy") if "shards" in saved else ("another strategy", "fsdp")
            raise WeightsError(
                f"{self.progress.path}: progress saved under {made} cannot resume under {now}; "
                "delete it to start afresh"
            )
        if not sharded:
            try:
                self.model.load_state_dict(saved["model"])
                self.optimizer.load_state_dict(saved["optimizer"])
            except (RuntimeError, ValueError, KeyError) as err:
                raise WeightsError(f"{self.progress.path}: does not fit this model: {err}") from None
        r = self.result
        r.history, r.steps, r.tokens_seen = list(saved["history"]), saved["step"], saved["tokens_seen"]
        r.seconds, r.resumed_at_step = saved["seconds"], saved["step"]
        r.clipped_steps = saved.get("clipped_steps", 0)
        self.start_epoch, self.skip = divmod(r.steps, self.batches_per_epoch)
        return saved

    def restore_shards(self, saved: dict[str, Any]) -> None:
        """fsdp: load the model and optimizer shards (torch.distributed.checkpoint) into the sharded copy."""
        if "shards" not in saved:
            return
        from torch.distributed.checkpoint.api import CheckpointException

        folder = self.progress.folder / saved["shards"]
        # DCP loads only the keys the fresh state holds: give each group the key the lr schedule saved
        # (the peak lr, which the fresh group's lr is), so that the saved value is read into it.
        for group in self.optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        try:
            self.runner.sharded.load(folder)
        except (RuntimeError, ValueError, KeyError, CheckpointException) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise WeightsError(f"{folder}: does not fit this model: {first}") from None

    def run_epoch(self, epoch: int, stop: StopRequest) -> None:
        """The epoch's remaining steps: a step, its evaluation when due, a save when due, a stop when asked."""
        self.loader.batch_sampler.set_epoch(epoch, self.skip if epoch == self.start_epoch else 0)
        r = self.result
        for batch in self.loader:
            with warnings.catch_warnings():  # a skipped fp16 step (overflow) is not a misordered call
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
                self.grad_norm = self.runner.step(batch, r.steps + 1)
                self.scheduler.step()
            r.steps += 1
            if self.grad_norm is not None and self.grad_norm > self.options.max_grad_norm:
                r.clipped_steps += 1  # inf / nan (a step fp16's scaler skipped) compare False
            r.tokens_seen += batch[0].numel()
            if (r.steps - 1) % self.options.eval_every == 0 or r.steps == self.total_steps:
                self.evaluate(epoch)
            r.seconds = time.perf_counter() - self.started
            # Every process takes part in a save (their RNG states are gathered) and in a stop. Nothing
            # is printed between a stop request and the save: the reader of our output may be gone.
            stopping = self.runner.agree(stop.requested or self.output.broken)
            if self.progress is not None and self.runner.agree(stopping or (is_main_process() and self.progress.due())):
                self.save()
            self.bar.update(1)
            if stopping:
                saved = "progress saved, re-run to resume" if self.progress is not None else "no progress folder"
                logger.info(f"interrupted at step {r.steps}; {saved}")
                raise KeyboardInterrupt

    def evaluate(self, epoch: int) -> None:
        """One history row: step, epoch, tokens seen and the evaluate callback's values."""
        row = {"step": self.result.steps, "epoch": epoch + 1, "tokens_seen": self.result.tokens_seen}
        if self.grad_norm is not None:
            row["grad_norm"] = self.grad_norm
        row.update(self.runner.evaluate(self.evaluate_fn))
        self.result.history.append(row)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("loss")}, refresh=False)
        if self.report is not None:
            self.report(self.result.history)

    def save(self) -> None:
        """Write the progress file (main process); every process's RNG state goes in it. Under fsdp
        every process first writes its shards of the model and optimizer (`shards-<step>/`, DCP)."""
        states = all_rng_states(self.runner.world)
        r = self.result
        weights: dict[str, Any] = {}
        if self.runner.sharded is not None:
            weights["shards"] = f"shards-{r.steps:08d}"
            self.runner.sharded.save(self.progress.folder / weights["shards"])
        if not is_main_process():
            return
        if not weights:
            weights = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()}
        self.progress.save(
            {
                **weights,
                "rng": states,  # one per process, in rank order
                "grad_scaler": self.runner.scaler.state_dict() if self.runner.scaler is not None else {},
                "history": r.history,
                "step": r.steps,
                "tokens_seen": r.tokens_seen,
                "seconds": r.seconds,
                "clipped_steps": r.clipped_steps,
            }
        )

    def log_clipping(self) -> None:
        """One line: how many steps were clipped (main process, clipping on)."""
        r = self.result
        if r.max_grad_norm is None or not is_main_process():
            return
        share = r.clipped_steps / r.steps if r.steps else 0.0
        logger.info(
            f"gradient clipping: {r.clipped_steps} of {r.steps} steps ({share:.1%}) over max_grad_norm {r.max_grad_norm:g}"
        )

    def close(self) -> None:
        """The model leaves as it came: no hooks, no recomputation, not compiled, in eval mode (under
        fsdp, with the trained weights if train() gathered them)."""
        self.rng.close()  # the caller's generator states come back
        if self.runner is not None:
            self.runner.close()
        if self.options.activation_checkpointing:
            set_activation_checkpointing(self.model, False)
        if self.options.compile and self.runner is not None:
            compile_blocks(self.runner.module, False)
        self.model.eval()
        self.result.seconds = time.perf_counter() - self.started
