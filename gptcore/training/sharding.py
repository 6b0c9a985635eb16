"""Training across processes with FSDP2 (`fully_shard`): the strategy a run uses, the sharded copy of a
model that its steps run on, mixed precision through FSDP's MixedPrecisionPolicy, sharded progress
through torch.distributed.checkpoint (DCP), and the full weights gathered back once at the end.

Every process holds 1/N of the weights, gradients and AdamW moments (16 bytes per parameter in all
under fp32 or bf16-mixed, instead of DDP's 16 on every process) and all-gathers one block's weights at
a time for its forward and backward. The anchors are torchtune's `training/_distributed.py`
(`fully_shard` per transformer block, then the root) and `recipes/full_finetune_distributed.py` (DCP
for progress, a full state dict gathered for the final weights file).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gptcore.errors import ConfigError
from gptcore.params.choices import STRATEGIES
from gptcore.precision import COMPUTE_DTYPES

logger = logging.getLogger(__name__)

# Methods of a sharded unit that run its weights besides forward (TransformerBlock.forward_at: the
# classifier's last block at one position per row).
FORWARD_METHODS = ("forward_at",)


def resolve_strategy(strategy: str, world: int) -> str:
    """What a run of `world` processes does: "single" (one process), "ddp" or "fsdp".

    auto: DistributedDataParallel under torchrun, nothing on one process (Lightning's `auto`).

    Raises:
        ConfigError: an unknown strategy, or ddp / fsdp asked of one process (a single process has
            nothing to share the work with: launch it with torchrun, or use auto).
    """
    if strategy not in STRATEGIES:
        raise ConfigError(f"strategy: unknown value {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    if strategy == "auto":
        return "ddp" if world > 1 else "single"
    if world < 2:
        raise ConfigError(
            f"strategy: {strategy} needs several processes, this run has 1: launch the stage with "
            "`torchrun --nproc-per-node N` (N >= 2), or set strategy: auto"
        )
    return strategy


def mixed_precision_policy(precision: str):
    """FSDP's MixedPrecisionPolicy for a resolved precision value (gptcore.precision).

    `*-mixed`: the weights are all-gathered and computed in bf16 (fp16) while the sharded weights, the
    optimizer and the gradient reduce-scatter stay fp32 (the mixed recipe: low-precision compute,
    full-precision reduction and update). Inputs are not cast at each block (cast_forward_inputs
    False): the residual stream stays as autocast makes it, as on one process. fp32 and bf16-true
    compute and reduce in the weights' own dtype.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision.endswith("-mixed"):
        return MixedPrecisionPolicy(
            param_dtype=COMPUTE_DTYPES[precision], reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return MixedPrecisionPolicy()


class _Driver(nn.Module):
    """The root FSDP module: it runs any function of the model inside one forward pass of the root, so
    that FSDP gathers the parameters outside the blocks (final LayerNorm, head) however the function
    drives the model (a loss that calls the blocks one by one, a whole evaluation)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(self.model, *args)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that each become one FSDP unit under the root: every transformer block, and the
    embeddings that are not tied to the output head (a tied one stays with the head, in the root unit,
    since a weight must belong to one unit).

    Raises:
        ConfigError: the model has no transformer blocks (`trf_blocks`) to shard, or a unit's trainable
            parameters differ in dtype (FSDP reduces each unit's gradients in one dtype).
    """
    blocks = list(getattr(model, "trf_blocks", None) or [])
    if not blocks:
        raise ConfigError(
            f"strategy: fsdp shards transformer blocks (`trf_blocks`), and {type(model).__name__} has none; "
            "use strategy: ddp"
        )
    head = getattr(getattr(model, "out_head", None), "weight", None)
    embeddings = [getattr(model, name, None) for name in ("tok_emb", "pos_emb")]
    units = blocks + [e for e in embeddings if isinstance(e, nn.Embedding) and e.weight is not head]
    for unit in [*units, model]:
        dtypes = {p.dtype for p in unit.parameters() if p.requires_grad}
        if len(dtypes) > 1:
            raise ConfigError(
                f"strategy: fsdp needs one dtype for the trainable weights of {type(unit).__name__}, got "
                f"{sorted(str(d) for d in dtypes)}"
            )
    return units


class ShardedModel:
    """A copy of `model` sharded with FSDP2 across the process group, that the training steps run on.

    The copy shares nothing with `model` once sharded: each process keeps its 1/N of every weight
    (DTensors), and `model`'s own weights are freed (emptied) while it trains, so that no process
    holds the full model beside its shard. `gather()` puts the trained full weights back into `model`
    on every process (a collective: every process calls it). Until then, and for good if training
    fails, `model`'s parameters are empty tensors.

    The optimizer is rebuilt over the copy's parameters: the same class and param groups (names
    matched through `model.named_parameters()`); it must not have stepped yet. Frozen parameters
    (requires_grad False, e.g. a LoRA layer's base weight) are sharded too and get no gradient.

    Raises:
        ConfigError: the model cannot be sharded (shard_units).
        ValueError: the optimizer has state already (sharded progress is loaded with `load`).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

        units = shard_units(model)
        if optimizer.state:
            raise ValueError("strategy fsdp: the optimizer has stepped already; pass a fresh one")
        self.model = model
        copies = _copy_sharing_parameters(model)  # the same Parameters, new modules: FSDP replaces them in the copy
        self.root = _Driver(copies)
        index = {id(m): i for i, m in enumerate(model.modules())}
        modules = list(copies.modules())
        mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
        policy = mixed_precision_policy(precision)
        for unit in units:  # bottom-up: each block (and embedding), then the root takes the rest
            sharded = fully_shard(modules[index[id(unit)]], mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            for method in FORWARD_METHODS:  # entry points other than forward gather the weights too
                if hasattr(sharded, method):
                    register_fsdp_forward_method(sharded, method)
        # The root reshards after forward too: the evaluation's forward has no backward to do it.
        fully_shard(self.root, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
        self.optimizer = _optimizer_for(optimizer, model, copies)
        self._shapes = {name: (p.dtype, p.device) for name, p in model.named_parameters()}
        for param in model.parameters():
            param.data = param.data.new_empty(0)  # the shards hold the weights now

    @property
    def module(self) -> nn.Module:
        """The sharded copy of the model (what a loss or evaluation function is given)."""
        return self.root.model

    def __call__(self, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(sharded model, *args) inside the root's forward pass (every process must call it)."""
        return self.root(fn, *args)

    def _state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "model": get_model_state_dict(self.root),
            "optimizer": get_optimizer_state_dict(self.root, self.optimizer),
        }

    def save(self, folder: str | os.PathLike) -> None:
        """Write the model and optimizer shards with DCP: each process writes its own file, no gather.

        A collective. An existing folder of that name (left by a run killed mid-save) is replaced.
        """
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        if dist.get_rank() == 0:
            shutil.rmtree(folder, ignore_errors=True)
            Path(folder).mkdir(parents=True)
        dist.barrier()
        dcp.save(self._state(), checkpoint_id=os.fspath(folder))

    def load(self, folder: str | os.PathLike) -> None:
        """Read the shards `save` wrote (DCP reshards them when saved by another number of processes).

        A collective. Raises what DCP raises for a folder that does not fit (the caller names the file).
        """
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        state = self._state()
        dcp.load(state, checkpoint_id=os.fspath(folder))
        set_model_state_dict(self.root, state["model"])
        set_optimizer_state_dict(self.root, self.optimizer, state["optimizer"])

    def gather(self) -> None:
        """All-gather the full weights once and put them back into the original model, on every process
        (each may evaluate or sample with it; rank 0 writes it). A collective; the values are the
        shards' bit for bit."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.root, options=StateDictOptions(full_state_dict=True))
        for name, param in self.model.named_parameters():
            dtype, device = self._shapes[name]
            param.data = full[f"model.{name}"].to(device, dtype)


def _copy_sharing_parameters(model: nn.Module) -> nn.Module:
    """A deep copy of the module tree whose Parameters are the very objects of `model` (tied ones stay
    tied); buffers and plain attributes are copied."""
    memo = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def _optimizer_for(optimizer: torch.optim.Optimizer, model: nn.Module, copies: nn.Module) -> torch.optim.Optimizer:
    """An optimizer of the same class and param groups over the copy's parameters (matched by name)."""
    names = {id(p): name for name, p in model.named_parameters()}
    params = dict(copies.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        settings = {k: v for k, v in group.items() if k != "params"}
        groups.append({**settings, "params": [params[names[id(p)]] for p in group["params"]]})
    return type(optimizer)(groups)


def sharded_scaler(scaler, device: torch.device):
    """The fp16 loss scaler for sharded gradients: every process skips or takes a step together (the
    overflow check is all-reduced), with the given scaler's state; None stays None."""
    if scaler is None:
        return None
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    sharded = ShardedGradScaler(device.type)
    sharded.load_state_dict(scaler.state_dict())
    return sharded
