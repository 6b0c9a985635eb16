"""Linear layers under autocast that keep no low-precision copy of their weight for the backward pass.

Under bf16/fp16 autocast a Linear casts its fp32 weight to the low precision and autograd keeps that
copy until the layer's backward pass needs it (grad_input = grad_output @ weight): 2 bytes per
parameter, alive from the forward pass until the backward pass reaches the layer. For the 774M model
that is 1.5 GB of the training step's peak (measured with saved-tensor hooks: 3.5 GB saved for
backward in all, 1.54 GB of it such copies). `recast_weights_in_backward` makes each Linear keep its
fp32 weight (held anyway) and cast it again in backward instead: the same values, so the same
gradients, for one extra cast per weight per step (reading 4 and writing 2 bytes per parameter: for
124M about 3% of a CPU training step, where memory is no concern). `recast_pays_off` is the default
rule: recast where the copies would take RECAST_MIN_BYTES or more. `frozen_linears_in` is the other
side: frozen Linear weights held in the compute dtype once, instead of cast at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.precision import COMPUTE_DTYPES

# 1 GiB of low-precision copies: 537M trainable parameters in bf16/fp16 (gpt2-large and gpt2-xl finetuned
# whole; not gpt2-small/medium, not the classifier's last block), where training's memory, not its
# speed, is what decides whether a model can be trained on a machine.
RECAST_MIN_BYTES = 2**30


def recast_pays_off(model: nn.Module, dtype: torch.dtype) -> bool:
    """True when the `dtype` copies of `model`'s trainable fp32 Linear weights take RECAST_MIN_BYTES or more."""
    seen, total = set(), 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and weight.requires_grad
            and weight.dtype == torch.float32
            and id(weight) not in seen
        ):
            seen.add(id(weight))
            total += weight.numel() * dtype.itemsize
    return total >= RECAST_MIN_BYTES


class RecastLinear(torch.autograd.Function):
    """y = x @ W^T + b computed in `dtype`, saving x (in dtype) and the fp32 W, not W in dtype.

    forward(x [..., in] any float dtype, weight [out, in] fp32, bias [out] fp32 or None, dtype) -> [..., out] in dtype.
    The backward pass is the one autograd derives for autocast's linear (addmm on the flattened input):
    grad_x = grad @ W (in dtype, returned in x's dtype), grad_W = (grad^T @ x) in dtype then fp32,
    grad_b = the sum of grad over rows in dtype then fp32.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.x_dtype, ctx.dtype, ctx.has_bias = x.dtype, dtype, bias is not None
        x = x.to(dtype)
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        grad = grad.to(ctx.dtype)
        rows = grad.reshape(-1, grad.shape[-1])  # [N, out]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = rows.mm(weight.to(ctx.dtype)).view(*grad.shape[:-1], weight.shape[1]).to(ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            grad_w = rows.t().mm(x.reshape(-1, x.shape[-1])).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = rows.sum(0).float()
        return grad_x, grad_w, grad_b, None


def _recasting_forward(module: nn.Linear) -> Callable[[torch.Tensor], torch.Tensor]:
    def forward(x: torch.Tensor) -> torch.Tensor:
        weight, device = module.weight, x.device.type
        if (
            torch.is_grad_enabled()
            and weight.requires_grad
            and weight.dtype == torch.float32
            and torch.is_autocast_enabled(device)
        ):
            return RecastLinear.apply(x, weight, module.bias, torch.get_autocast_dtype(device))
        return F.linear(x, weight, module.bias)  # no autocast, no autograd or a frozen weight: as nn.Linear

    return forward


def recast_weights_in_backward(model: nn.Module) -> Callable[[], None]:
    """Make every nn.Linear of `model` (exactly that class) run RecastLinear when autocast is on and
    its fp32 weight trains; everything else runs as before. Returns a function that undoes it.

    The forward is set on each instance (state_dict keys and module classes unchanged); outside
    autocast, without autograd or for frozen weights the layer computes F.linear as nn.Linear does.
    """
    changed = []
    for module in model.modules():
        if type(module) is nn.Linear and "forward" not in vars(module):
            module.forward = _recasting_forward(module)
            changed.append(module)

    def undo() -> None:
        for module in changed:
            vars(module).pop("forward", None)

    return undo


def cast_frozen_linears(module: nn.Module, precision: str, keep: bool = True) -> dict[nn.Parameter, torch.Tensor]:
    """Cast the frozen weights and biases of `module`'s Linear layers to the compute dtype, in place.

    Under bf16/fp16 autocast every Linear casts its fp32 weight and bias at every forward pass; a
    frozen weight always casts to the same values, so casting it once gives the same outputs without
    the per-step copies (about 10% of a 774M classifier step on CPU). Only parameters that do not
    require grad are cast; LayerNorms and embeddings stay fp32, as autocast runs them. A no-op in fp32
    and bf16-true.

    keep: False frees each fp32 tensor as soon as it is replaced (peak: the model plus one layer's copy).

    Returns:
        The replaced fp32 tensors by parameter (empty unless `keep`; see frozen_linears_in).
    """
    dtype = COMPUTE_DTYPES[precision]
    originals: dict[nn.Parameter, torch.Tensor] = {}
    if precision.endswith("-mixed"):
        for layer in module.modules():
            if isinstance(layer, nn.Linear):
                for param in layer.parameters(recurse=False):
                    if not param.requires_grad and param.dtype != dtype:
                        if keep:
                            originals[param] = param.data
                        param.data = param.data.to(dtype)
    return originals


@contextlib.contextmanager
def frozen_linears_in(module: nn.Module, precision: str, enabled: bool = True):
    """cast_frozen_linears while inside; the fp32 tensors come back on exit (the saved model is unchanged)."""
    originals = cast_frozen_linears(module, precision) if enabled else {}
    try:
        yield module
    finally:
        for param, data in originals.items():
            param.data = data
