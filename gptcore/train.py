"""The one training loop every stage shares: losses, evaluation, saved progress and exact resume."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from gptcore.atomic import atomic_path, write_json
from gptcore.cross_entropy import IGNORE_INDEX, cross_entropy
from gptcore.device import forked_rng, init_distributed, is_main_process, rank, world_size
from gptcore.errors import TrainingError, WeightsError
from gptcore.mixed_linear import recast_pays_off, recast_weights_in_backward
from gptcore.model import set_activation_checkpointing
from gptcore.precision import COMPUTE_DTYPES, autocast, make_grad_scaler
from gptcore.schedule import lr_factor

Batch = tuple[torch.Tensor, torch.Tensor]
LossFn = Callable[[nn.Module, Batch], torch.Tensor]


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy over every position; targets of -100 are ignored (padding)."""
    inputs, targets = batch
    logits = model(inputs)  # [B, T, V]
    return cross_entropy(logits.flatten(0, 1), targets.flatten(), IGNORE_INDEX)


def perplexity(loss: float) -> float:
    """exp(loss), capped to stay a finite JSON number for untrained models."""
    return math.exp(min(loss, 700.0))


def to_device(batch: Iterable[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    return tuple(t.to(device, non_blocking=True) for t in batch)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    loader,
    loss_fn: LossFn,
    device: torch.device,
    precision: str = "fp32",
    num_batches: int | None = None,
) -> float:
    """Mean loss over the first `num_batches` batches of loader (all when None), in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i, batch in enumerate(loader):
            if num_batches is not None and i >= num_batches:
                break
            with autocast(device, precision):
                total += loss_fn(model, to_device(batch, device)).item()
            count += 1
    finally:
        model.train(was_training)
    return total / count if count else float("nan")


def loss_evaluator(train_loader, val_loader, loss_fn: LossFn, device, precision: str, num_batches: int):
    """An evaluate(model) callback giving train_loss and val_loss on a few batches, as the book does."""

    def evaluate(model: nn.Module) -> dict[str, float]:
        return {
            "train_loss": evaluate_loss(model, _in_order(train_loader), loss_fn, device, precision, num_batches),
            "val_loss": evaluate_loss(model, val_loader, loss_fn, device, precision, num_batches),
        }

    return evaluate


def _in_order(loader):
    """Evaluate on the train set's batches in a fixed order that does not disturb the sampler's epoch."""
    sampler = getattr(loader, "batch_sampler", None)
    if sampler is None or not hasattr(sampler, "batches"):
        return loader
    dataset, collate = loader.dataset, loader.collate_fn
    return (collate([dataset[i] for i in batch]) for batch in sampler.batches())


@dataclass
class TrainResult:
    """What a training run did; `history` has one row per evaluation."""

    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0
    resumed_at_step: int = 0


class Progress:
    """Training progress in a folder: `state.pt` (model, optimizer, data position, RNG, history).

    Loaded with weights_only=True (no code is unpickled). A fingerprint of the params and inputs that
    produced it guards against mixing stale progress into a changed run. `finish()` drops the heavy
    state once the stage's outputs are written and leaves a small `done.json`.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str, every_seconds: float = 600.0):
        self.folder = Path(folder)
        self.path = self.folder / "state.pt"
        self.fingerprint = fingerprint
        self.every_seconds = every_seconds
        self.last_saved = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt progress file must not block a fresh start
            _note(f"note: ignoring unreadable progress file {self.path} ({type(err).__name__}); starting afresh")
            return None
        if state.get("fingerprint") != self.fingerprint:
            _note(f"note: {self.path} was made with other params, inputs or code; starting afresh")
            return None
        _note(f"resuming from {self.path} at step {state['step']}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        (self.folder / "done.json").unlink(missing_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        self.last_saved = time.monotonic()

    def due(self) -> bool:
        return time.monotonic() - self.last_saved >= self.every_seconds

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete: keep a summary, drop the (large) resumable state."""
        write_json(self.folder / "done.json", {"fingerprint": self.fingerprint, **summary})
        self.path.unlink(missing_ok=True)


class _GuardedStream:
    """A text stream that survives its reader going away: a write to a closed pipe (EPIPE, e.g. the
    `tee` of `dvc repro | tee log` exited on the same Ctrl-C) is dropped and sets `broken`, which
    the loop treats as a stop request, so progress is saved rather than lost to a BrokenPipeError."""

    def __init__(self, stream):
        self.stream = stream
        self.broken = False

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except (BrokenPipeError, ValueError):  # ValueError: the stream was closed
                self.broken = True
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (BrokenPipeError, ValueError):
                self.broken = True


def _note(message: str) -> None:
    """One line on stderr, around any progress bar; dropped if stderr's reader is gone."""
    tqdm.write(message, file=_GuardedStream(sys.stderr))


class _StopRequest:
    """Turns SIGINT/SIGTERM into a flag checked between steps, so progress is saved consistently."""

    def __init__(self):
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: stop at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


def _rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _all_rng_states(world: int) -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order (a collective under torchrun: all processes call it)."""
    if world == 1:
        return [_rng_state()]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, _rng_state())
    return states


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def make_optimizer(
    params, lr: float, weight_decay: float, device: torch.device | str | None = None
) -> torch.optim.Optimizer:
    """AdamW as every stage uses it: fused into one kernel per step where PyTorch has one (CPU, CUDA).

    The fused step reads each parameter, gradient and moment once and makes no full-size temporaries
    (PyTorch's default is a Python loop over tensors on CPU, and multi-tensor steps with full-size
    temporaries on CUDA): faster, and less peak memory. The update is AdamW's (equal up to rounding).
    """
    params = list(params)
    if device is None:
        tensors = [p for p in params if isinstance(p, torch.Tensor)]
        device = tensors[0].device if tensors else "cpu"
    fused = True if torch.device(device).type in ("cpu", "cuda") else None
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


class _LossModule(nn.Module):
    """The model and its loss_fn as one module, so that DistributedDataParallel's forward covers the loss
    however loss_fn drives the model (some call its blocks directly)."""

    def __init__(self, model: nn.Module, loss_fn: LossFn):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, (inputs, targets))


class StepRunner:
    """One optimizer step on one global batch, however many processes and micro-batches share it.

    The loader yields the global batch (`batch_size` rows) on every process. With torchrun each
    process takes its contiguous share of the rows (DistributedDataParallel averages the gradients),
    and each share may be cut into `grad_accum` micro-batches to save memory. Every piece's mean loss
    is weighted by its share of the batch's targets that are not IGNORE_INDEX (loss_fn must return the
    mean over those), so the gradient equals that of the whole batch in one piece, up to float rounding:
    the number of processes and micro-batches changes speed and memory, not the result.

    step_in_backward: update each parameter inside backward(), as soon as its gradient is complete, and
    free that gradient, so that the gradients of the whole model never exist at once (up to 4 bytes
    per parameter less at the peak). The same update bit for bit, for optimizers that update each
    parameter on its own (AdamW, SGD); one process, grad_accum 1 and no fp16 loss scaling only, since
    there gradients must be summed or unscaled before any update. "auto": wherever that holds.

    recast_weights: under mixed precision, make the model's nn.Linear layers keep their fp32 weights
    for the backward pass and cast them again there (gptcore.mixed_linear), instead of autograd keeping
    autocast's low-precision copies: 2 bytes per parameter less at the peak, the same gradients, one more
    cast per weight per step. "auto": where those copies would take 1 GiB or more (recast_pays_off) and
    activation checkpointing is off (then no such copy outlives a block anyway).
    Call close() when done: it undoes both.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: LossFn,
        device: torch.device,
        precision: str = "fp32",
        grad_accum: int = 1,
        step_in_backward: bool | str = False,
        scaler: torch.amp.GradScaler | None = None,
        recast_weights: bool | str = "auto",
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be positive, got {grad_accum}")
        if step_in_backward not in (True, False, "auto"):
            raise ValueError(f"step_in_backward: expected true, false or auto, got {step_in_backward!r}")
        if step_in_backward is True and scaler is not None:
            raise ValueError("step_in_backward cannot unscale gradients: use it without fp16-mixed")
        self.scaler = scaler
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.device, self.precision, self.grad_accum = device, precision, grad_accum
        self.world = world_size() if init_distributed(device) else 1
        if step_in_backward == "auto":
            step_in_backward = grad_accum == 1 and self.world == 1 and scaler is None
        self.step_in_backward = step_in_backward
        if recast_weights not in (True, False, "auto"):
            raise ValueError(f"recast_weights: expected true, false or auto, got {recast_weights!r}")
        mixed = precision.endswith("-mixed")
        if recast_weights == "auto":
            recast_weights = (mixed and not getattr(model, "activation_checkpointing", False)
                              and recast_pays_off(model, COMPUTE_DTYPES[precision]))
        self.recast_weights = bool(recast_weights and mixed)
        self._undo_recast = recast_weights_in_backward(model) if self.recast_weights else None
        self._hooks = []
        self._own: dict[torch.Tensor, torch.optim.Optimizer] = {}  # step_in_backward: one optimizer per parameter
        self._lr_of: dict[torch.Tensor, dict] = {}
        if step_in_backward:
            if grad_accum > 1 or self.world > 1:
                raise ValueError("step_in_backward needs grad_accum 1 and a single process")
            self._own = per_parameter_optimizers(optimizer)
            self._lr_of = {p: group for group in optimizer.param_groups for p in group["params"]}
            self._hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self._own]
        self.rank = rank() if self.world > 1 else 0
        self.ddp = None
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                _LossModule(model, loss_fn),
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )

    def _step_one(self, param: torch.Tensor) -> None:
        """The optimizer step of one parameter whose gradient is complete; then its gradient goes (PyTorch's
        "optimizer step in backward" recipe: one optimizer per parameter, stepped by a gradient hook)."""
        self._own[param].step()
        self._own[param].zero_grad(set_to_none=True)

    def close(self) -> None:
        """Detach the step-in-backward hooks (a later backward() updates nothing by itself) and give the
        Linear layers back their own forward."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []
        if self._undo_recast is not None:
            self._undo_recast()
            self._undo_recast = None

    def pieces(self, batch: Batch) -> list[tuple[Batch, float | None]]:
        """This process's micro-batches of a global batch, each with its loss weight (None: as is)."""
        inputs, targets = batch
        if self.world * self.grad_accum == 1:
            return [((inputs, targets), None)]
        rows = inputs.shape[0]
        counts = (targets != IGNORE_INDEX).reshape(rows, -1).sum(dim=1)  # [B] targets that count per row
        if int(counts.sum()) == 0:  # nothing to learn from: weigh rows equally (the loss is NaN anyway)
            counts = torch.ones_like(counts)
        total = int(counts.sum())
        out = []
        for index in torch.arange(rows).tensor_split(self.world)[self.rank].tensor_split(self.grad_accum):
            n = int(counts[index].sum())
            if n == 0:
                if self.world == 1:
                    continue
                # Every process must run as many forward/backward passes as the others (the gradient
                # all-reduce waits for them): a row that counts stands in, with weight zero.
                index = torch.nonzero(counts)[:1, 0]
            out.append(((inputs[index], targets[index]), n / total * self.world))
        return out

    def step(self, batch: Batch, number: int = 0) -> None:
        """Forward and backward over this process's pieces of the global batch, then the optimizer step.

        Raises:
            TrainingError: the loss is not finite (on any process); the optimizer has not stepped.
        """
        pieces = self.pieces(batch)
        self.optimizer.zero_grad(set_to_none=True)
        for param, own in self._own.items():  # this step's lr (the schedule sets the main optimizer's)
            own.param_groups[0]["lr"] = self._lr_of[param]["lr"]
        total = torch.zeros((), device=self.device)
        for i, (piece, weight) in enumerate(pieces):
            inputs, targets = to_device(piece, self.device)
            last = i == len(pieces) - 1
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync:
                # Checkpointed blocks recast their weights when recomputed: no need to cache the casts.
                cache = not getattr(self.model, "activation_checkpointing", False)
                with autocast(self.device, self.precision, cache_enabled=cache):
                    if self.ddp is not None:
                        loss = self.ddp(inputs, targets)
                    else:
                        loss = self.loss_fn(self.model, (inputs, targets))
                if weight is not None:
                    loss = loss * weight
                total += loss.detach().float()
                if self._hooks:  # the hooks update the weights during backward: check before it
                    self._check_finite(total, number)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._check_finite(total, number)
        if self._hooks:
            return
        if self.scaler is not None:  # skips the update when the scaled gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()

    def _check_finite(self, loss: torch.Tensor, number: int) -> None:
        """Stop every process together when any one's loss is inf or NaN (one would hang the others)."""
        bad = (~torch.isfinite(loss)).float()
        if self.world > 1:
            import torch.distributed as dist

            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        if bool(bad):
            raise TrainingError(
                f"step {number}: the loss is {loss.item()} (not finite); lower the lr, or use bf16-mixed or fp32 "
                "instead of fp16-mixed; progress saved before this step is kept"
            )

    def agree(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any (a stop signal, a due save)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        value = torch.tensor([float(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def evaluate(self, evaluate: Callable[[nn.Module], dict[str, float]]) -> dict[str, float]:
        """evaluate(model) on the main process, shared with the others (they wait, then get its row)."""
        if self.world == 1:
            return evaluate(self.model)
        import torch.distributed as dist

        row = [evaluate(self.model) if self.rank == 0 else None]
        dist.broadcast_object_list(row, src=0)
        return row[0]


def per_parameter_optimizers(optimizer: torch.optim.Optimizer) -> dict[torch.Tensor, torch.optim.Optimizer]:
    """One optimizer of the same kind per trainable parameter, with its group's settings, sharing the
    given optimizer's state: stepping them updates what `optimizer.state_dict()` saves."""
    own = {}
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        for param in group["params"]:
            if param.requires_grad:
                own[param] = type(optimizer)([{**settings, "params": [param]}])
                own[param].state = optimizer.state  # keyed by parameter: one state for both views
    return own


def compile_blocks(model: nn.Module, enabled: bool = True) -> None:
    """torch.compile each transformer block's forward in place, or undo it (state_dict keys unchanged).

    The compiled function is set on the instance, shadowing the class's forward; deleting it restores it.
    """
    for block in getattr(model, "trf_blocks", []):
        if enabled:
            block.forward = torch.compile(block.forward)
        elif "forward" in vars(block):
            del block.forward


@dataclass(frozen=True)
class LoopOptions:
    """How `train` runs. Every stage's params section gives these (e.g. TrainConfig.loop_options()).

    grad_accum cuts each process's share of a batch into micro-batches; activation_checkpointing
    recomputes each block's activations in the backward pass (less memory); compile runs the blocks
    through torch.compile; step_in_backward updates each parameter as soon as its gradient is complete
    and recast_weights keeps no low-precision weight copies for backward (less memory; see StepRunner).
    None of them changes the result beyond float rounding.
    lr_schedule and warmup scale each param group's lr per step (gptcore.schedule, through
    torch.optim.lr_scheduler.LambdaLR): the optimizer's lr is the peak. seed: under torchrun, each
    process reseeds with seed + rank once the weights are in place.
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
    seed: int | None = None
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

    report(history) is called with the whole history once the saved progress is restored (a resumed
    run's rows, or none) and again after every evaluation, so that a logger can rebuild what it wrote
    from the progress and then follow the run (gptcore.live.TrainingLog).

    Raises:
        TrainingError: a non-finite loss (the error names the step; saved progress is kept).
        WeightsError: progress that does not fit the model, or was made by another number of processes.
    """
    lr_factor(0, 1, options.lr_schedule, options.warmup)  # a bad schedule fails before any work
    run = _TrainingRun(model, optimizer, train_loader, loss_fn, evaluate, device, options, precision, progress, report)
    try:
        run.start()
        with _StopRequest() as stop, run.bar:
            for epoch in range(run.start_epoch, options.epochs):
                run.run_epoch(epoch, stop)
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
        self.result = TrainResult()
        self.start_epoch, self.skip = 0, 0
        self.runner: StepRunner | None = None
        self.rng = contextlib.ExitStack()  # the fork of torch's generators the run draws from (start to close)
        self.output = _GuardedStream(sys.stderr)
        self.bar = tqdm(total=self.total_steps, desc=options.desc, unit="step", file=self.output,
                        disable=not options.show_progress or not is_main_process())
        self.started = time.perf_counter()

    def start(self) -> None:
        """Restore saved progress (if any), set up the speed options, the step runner and the schedule."""
        self.rng.enter_context(forked_rng(self.device))  # before resume or torchrun set the generators
        saved = self.restore()
        opts = self.options
        if opts.activation_checkpointing:
            set_activation_checkpointing(self.model, True)
        if opts.compile:
            compile_blocks(self.model)
        scaler = make_grad_scaler(self.device, self.precision, saved.get("grad_scaler") if saved else None)
        self.runner = StepRunner(self.model, self.optimizer, self.loss_fn, self.device, self.precision,
                                 opts.grad_accum, opts.step_in_backward, scaler, opts.recast_weights)
        if self.runner.world > 1:
            _check_same_start(self.result.steps, self.progress)
        if saved is not None:
            _set_rng_state(_own_rng_state(saved["rng"], self.runner.world, self.runner.rank, self.progress))
        elif self.runner.world > 1 and opts.seed is not None:
            torch.manual_seed(opts.seed + self.runner.rank)  # after DDP's broadcast of the weights
        for group in self.optimizer.param_groups:  # progress saved by versions that kept the peak as peak_lr
            if "peak_lr" in group:
                group.setdefault("initial_lr", group.pop("peak_lr"))
        factor = functools.partial(lr_factor, total_steps=self.total_steps, schedule=opts.lr_schedule, warmup=opts.warmup)
        # last_epoch: the steps already taken (a resumed optimizer brings back each group's initial_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, factor, last_epoch=self.result.steps - 1)
        self.bar.reset(total=self.total_steps)
        self.bar.update(self.result.steps)
        self.started = time.perf_counter() - self.result.seconds
        self.model.train()
        if self.report is not None:
            self.report(self.result.history)

    def restore(self) -> dict[str, Any] | None:
        """Load the saved model, optimizer, history and position; None when starting afresh."""
        saved = self.progress.load() if self.progress is not None else None
        if saved is None:
            return None
        try:
            self.model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise WeightsError(f"{self.progress.path}: does not fit this model: {err}") from None
        r = self.result
        r.history, r.steps, r.tokens_seen = list(saved["history"]), saved["step"], saved["tokens_seen"]
        r.seconds, r.resumed_at_step = saved["seconds"], saved["step"]
        self.start_epoch, self.skip = divmod(r.steps, self.batches_per_epoch)
        return saved

    def run_epoch(self, epoch: int, stop: _StopRequest) -> None:
        """The epoch's remaining steps: a step, its evaluation when due, a save when due, a stop when asked."""
        self.loader.batch_sampler.set_epoch(epoch, self.skip if epoch == self.start_epoch else 0)
        r = self.result
        for batch in self.loader:
            with warnings.catch_warnings():  # a skipped fp16 step (overflow) is not a misordered call
                warnings.filterwarnings("ignore", re.escape("Detected call of `lr_scheduler.step()`"))
                self.runner.step(batch, r.steps + 1)
                self.scheduler.step()
            r.steps += 1
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
                tqdm.write(f"interrupted at step {r.steps}; {saved}", file=self.output)
                raise KeyboardInterrupt

    def evaluate(self, epoch: int) -> None:
        """One history row: step, epoch, tokens seen and the evaluate callback's values."""
        row = {"step": self.result.steps, "epoch": epoch + 1, "tokens_seen": self.result.tokens_seen}
        row.update(self.runner.evaluate(self.evaluate_fn))
        self.result.history.append(row)
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in row.items() if k.endswith("loss")}, refresh=False)
        if self.report is not None:
            self.report(self.result.history)

    def save(self) -> None:
        """Write the progress file (main process); every process's RNG state goes in it."""
        states = _all_rng_states(self.runner.world)
        if not is_main_process():
            return
        r = self.result
        self.progress.save({
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "rng": states,  # one per process, in rank order
            "grad_scaler": self.runner.scaler.state_dict() if self.runner.scaler is not None else {},
            "history": r.history,
            "step": r.steps,
            "tokens_seen": r.tokens_seen,
            "seconds": r.seconds,
        })

    def close(self) -> None:
        """The model leaves as it came: no hooks, no recomputation, not compiled, in eval mode."""
        self.rng.close()  # the caller's generator states come back
        if self.runner is not None:
            self.runner.close()
        if self.options.activation_checkpointing:
            set_activation_checkpointing(self.model, False)
        if self.options.compile:
            compile_blocks(self.model, False)
        self.model.eval()
        self.result.seconds = time.perf_counter() - self.started


def _own_rng_state(saved: Any, world: int, rank_: int, progress: Progress | None) -> dict[str, Any]:
    """This process's RNG state from the progress file (a list in rank order; one dict in older files)."""
    states = [saved] if isinstance(saved, dict) else list(saved)
    if len(states) != world:
        where = progress.path if progress is not None else "the progress file"
        raise WeightsError(f"{where}: progress of {len(states)} process(es) cannot resume in {world}; "
                           f"launch {len(states)} or delete it to start afresh")
    return states[rank_]


def _check_same_start(step: int, progress: Progress | None) -> None:
    """Every process must start from the step the main one starts from, or their collectives pair up
    wrongly and the run hangs or crashes far from the cause (e.g. workers of an earlier launch, still
    alive, rewrote the progress file while this launch's processes read it)."""
    import torch.distributed as dist

    steps = [None] * world_size()
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        where = progress.path if progress is not None else "the progress file"
        raise WeightsError(f"{where}: the processes resumed from different steps {steps}; is an earlier run "
                           "still writing it? Stop it and launch again")


def open_progress(folder: str | os.PathLike | None, params, *identity: Any, inputs: Iterable[str | os.PathLike] = ()) -> Progress | None:
    """The progress folder of a training stage, or None without one.

    Progress belongs to one run: its params section (all but how often it saves), whatever else
    identifies it (run config, precision), the digests of its input files, and the library's code
    (progress made by other code is not resumed: the result would mix two versions).
    """
    if folder is None:
        return None
    from gptcore.download import sha256_of

    knobs = {k: v for k, v in params.to_dict().items() if k != "progress_minutes"}
    key = fingerprint(knobs, *identity, [sha256_of(path) for path in inputs], code_digest())
    return Progress(folder, key, every_seconds=60 * params.progress_minutes)


def code_digest() -> str:
    """SHA-256 over the source of every module of the gptcore package (file names and bytes, sorted)."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A digest of the params and inputs of a run: progress made under another one is not resumed."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
