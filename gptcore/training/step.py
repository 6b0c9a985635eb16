"""One optimizer step on one global batch: AdamW, DistributedDataParallel or FSDP2 across processes,
gradient accumulation, gradient clipping, updates inside the backward pass, weights recast for backward,
finiteness checks."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import torch
from torch import nn

from gptcore.device import init_distributed, rank, world_size
from gptcore.errors import TrainingError
from gptcore.precision import COMPUTE_DTYPES, autocast, make_grad_scaler
from gptcore.training.clipping import clip_gradients, trainable_parameters
from gptcore.training.cross_entropy import IGNORE_INDEX
from gptcore.training.evaluation import Batch, LossFn, to_device
from gptcore.training.mixed_linear import recast_pays_off, recast_weights_in_backward
from gptcore.training.sharding import ShardedModel, resolve_strategy, sharded_scaler

logger = logging.getLogger(__name__)


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

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


class StepRunner:
    """One optimizer step on one global batch, however many processes and micro-batches share it.

    The loader yields the global batch (`batch_size` rows) on every process. With torchrun each
    process takes its contiguous share of the rows, and each share may be cut into `grad_accum`
    micro-batches to save memory. Every piece's mean loss is weighted by its share of the batch's
    targets that are not IGNORE_INDEX (loss_fn must return the mean over those), so the gradient equals
    that of the whole batch in one piece, up to float rounding: the number of processes and
    micro-batches changes speed and memory, not the result. A loss_fn whose `mean_over` attribute is
    "rows" returns the mean over the batch's rows instead (DPO's pairs), and its pieces are weighted by
    their share of the rows. A batch is (inputs, targets, ...): every tensor has the batch's rows in
    dimension 0.

    strategy (gptcore.training.sharding.resolve_strategy): how the processes share the work.
    DistributedDataParallel (`ddp`, and `auto` under torchrun) keeps the whole model on every process
    and averages the gradients; `fsdp` trains a copy sharded with FSDP2 (sharding.ShardedModel): read
    `module` and `optimizer` for what the steps update, and call `gather()` at the end to put the
    trained weights back into `model` (until then its parameters are empty).

    step_in_backward: update each parameter inside backward(), as soon as its gradient is complete, and
    free that gradient, so that the gradients of the whole model never exist at once (up to 4 bytes
    per parameter less at the peak). The same update bit for bit, for optimizers that update each
    parameter on its own (AdamW, SGD); one process, grad_accum 1, no fp16 loss scaling and no gradient
    clipping only, since there gradients must be summed, unscaled or measured together before any
    update. "auto": wherever that holds (clipping on turns it off, with a log line saying so).

    max_grad_norm: clip the global L2 norm of the trainable parameters' gradients to this value once
    per step, after accumulation, the all-reduce (ddp) or across the shards (fsdp), and fp16's unscaling
    (gptcore.training.clipping); None: no clipping. `step` returns the norm before clipping.
    fp16-mixed scales the loss with a GradScaler of its own (`scaler`; its state is the caller's to
    save and restore).

    recast_weights: under mixed precision, make the model's nn.Linear layers keep their fp32 weights
    for the backward pass and cast them again there (gptcore.training.mixed_linear), instead of autograd keeping
    autocast's low-precision copies: 2 bytes per parameter less at the peak, the same gradients, one more
    cast per weight per step. "auto": where those copies would take 1 GiB or more (recast_pays_off) and
    activation checkpointing is off (then no such copy outlives a block anyway); never under fsdp,
    whose gathered weights are already in the low precision.
    Call close() when done: it undoes both.

    Raises:
        ConfigError: a strategy this launch cannot run (resolve_strategy), a model fsdp cannot shard.
        ValueError: a speed option that does not apply (step_in_backward with several processes,
            grad_accum, fp16 loss scaling or max_grad_norm; recast_weights under fsdp); a max_grad_norm
            that is not positive.
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
        max_grad_norm: float | None = None,
        recast_weights: bool | str = "auto",
        strategy: str = "auto",
    ):
        if grad_accum < 1:
            raise ValueError(f"grad_accum must be positive, got {grad_accum}")
        if step_in_backward not in (True, False, "auto"):
            raise ValueError(f"step_in_backward: expected true, false or auto, got {step_in_backward!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"max_grad_norm must be positive (or None: no clipping), got {max_grad_norm!r}")
        scaler = make_grad_scaler(device, precision)
        if step_in_backward is True and scaler is not None:
            raise ValueError("step_in_backward cannot unscale gradients: use it without fp16-mixed")
        if step_in_backward is True and max_grad_norm is not None:
            raise ValueError(
                "step_in_backward cannot clip gradients (the global norm needs every gradient before any "
                "update): set max_grad_norm to None, or step_in_backward to auto or false"
            )
        if recast_weights not in (True, False, "auto"):
            raise ValueError(f"recast_weights: expected true, false or auto, got {recast_weights!r}")
        self.scaler, self.max_grad_norm = scaler, max_grad_norm
        self.model, self.module, self.optimizer, self.loss_fn = model, model, optimizer, loss_fn
        self.device, self.precision, self.grad_accum = device, precision, grad_accum
        self.world = world_size() if init_distributed(device) else 1
        self.strategy = resolve_strategy(strategy, self.world)
        self.rank = rank() if self.world > 1 else 0
        if step_in_backward == "auto":
            step_in_backward = grad_accum == 1 and self.world == 1 and scaler is None
            if step_in_backward and max_grad_norm is not None:
                step_in_backward = False
                logger.info(
                    f"step_in_backward: off, since max_grad_norm {max_grad_norm:g} clips the gradients "
                    "(the global norm needs every gradient first; max_grad_norm: null turns it back on)"
                )
        self.step_in_backward = step_in_backward
        self._set_recast(recast_weights)
        self._hooks = []
        self._own: dict[torch.Tensor, torch.optim.Optimizer] = {}  # step_in_backward: one optimizer per parameter
        self._lr_of: dict[torch.Tensor, dict] = {}
        if step_in_backward:
            if grad_accum > 1 or self.world > 1:
                raise ValueError("step_in_backward needs grad_accum 1 and a single process")
            self._own = per_parameter_optimizers(optimizer)
            self._lr_of = {p: group for group in optimizer.param_groups for p in group["params"]}
            self._hooks = [p.register_post_accumulate_grad_hook(self._step_one) for p in self._own]
        self.ddp = self.sharded = None
        if self.strategy == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(
                _LossModule(model, loss_fn),
                device_ids=[device.index] if device.type == "cuda" else None,
                broadcast_buffers=False,
            )
        elif self.strategy == "fsdp":
            self.sharded = ShardedModel(model, optimizer, device, precision)
            self.module, self.optimizer = self.sharded.module, self.sharded.optimizer
            self.scaler = sharded_scaler(scaler, device)

    def _set_recast(self, recast_weights: bool | str) -> None:
        """Decide recast_weights (see the class) and patch the Linear layers when it is on."""
        mixed = self.precision.endswith("-mixed")
        if recast_weights is True and mixed and self.strategy == "fsdp":
            raise ValueError("recast_weights: not with strategy fsdp (its gathered weights are already bf16/fp16)")
        if recast_weights == "auto":
            recast_weights = (
                mixed
                and self.strategy != "fsdp"
                and not getattr(self.model, "activation_checkpointing", False)
                and recast_pays_off(self.model, COMPUTE_DTYPES[self.precision])
            )
        self.recast_weights = bool(recast_weights and mixed)
        self._undo_recast = recast_weights_in_backward(self.model) if self.recast_weights else None

    def gather(self) -> None:
        """fsdp: put the trained full weights back into the model on every process (a collective, once,
        at the end of training); nothing to do otherwise."""
        if self.sharded is not None:
            self.sharded.gather()

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
        batch = tuple(batch)
        if self.world * self.grad_accum == 1:
            return [(batch, None)]
        rows = batch[0].shape[0]
        counts = (batch[1] != IGNORE_INDEX).reshape(rows, -1).sum(dim=1)  # [B] targets that count per row
        if getattr(self.loss_fn, "mean_over", "targets") == "rows":
            counts = (counts > 0).long()  # a row with nothing to learn from does not count either
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
            out.append((tuple(t[index] for t in batch), n / total * self.world))
        return out

    def step(self, batch: Batch, number: int = 0) -> float | None:
        """Forward and backward over this process's pieces of the global batch, then the optimizer step.

        Returns the global L2 norm of the gradients before clipping (the same on every process; inf or
        nan for an fp16 step the scaler skipped), or None without max_grad_norm.

        Raises:
            TrainingError: the loss is not finite (on any process); the optimizer has not stepped.
        """
        pieces = self.pieces(batch)
        self.optimizer.zero_grad(set_to_none=True)
        for param, own in self._own.items():  # this step's lr (the schedule sets the main optimizer's)
            own.param_groups[0]["lr"] = self._lr_of[param]["lr"]
        total = torch.zeros((), device=self.device)
        for i, (piece, weight) in enumerate(pieces):
            piece = to_device(piece, self.device)
            last = i == len(pieces) - 1
            no_sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with no_sync:
                # Checkpointed blocks recast their weights when recomputed: no need to cache the casts.
                cache = not getattr(self.model, "activation_checkpointing", False)
                with autocast(self.device, self.precision, cache_enabled=cache):
                    if self.ddp is not None:
                        loss = self.ddp(*piece)
                    elif self.sharded is not None:  # FSDP reduce-scatters every piece's gradient
                        loss = self.sharded(self.loss_fn, piece)
                    else:
                        loss = self.loss_fn(self.model, piece)
                if weight is not None:
                    loss = loss * weight
                total += loss.detach().float()
                if self._hooks:  # the hooks update the weights during backward: check before it
                    self._check_finite(total, number)
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        self._check_finite(total, number)
        if self._hooks:
            return None
        norm = None
        if self.max_grad_norm is not None:
            if self.scaler is not None:  # the limit is on the true gradients: unscale them first
                self.scaler.unscale_(self.optimizer)
            norm = clip_gradients(trainable_parameters(self.optimizer), self.max_grad_norm)
        if self.scaler is not None:  # skips the update when the scaled gradients overflowed
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return norm

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
        """evaluate(model) on the main process, shared with the others (they wait, then get its row).

        Under fsdp every process evaluates the sharded model together (each forward all-gathers its
        weights), and the main process's row is shared: every history is the same.
        """
        if self.world == 1:
            return evaluate(self.model)
        import torch.distributed as dist

        if self.sharded is not None:
            with torch.no_grad():
                row = [self.sharded(evaluate)]
        else:
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
