"""Weight-only int8 for decoding: each nn.Linear's weight as int8 with one scale per output feature.

Decoding one token reads every weight once, so at batch 1 its speed is the speed at which weights come
from memory: int8 halves bf16's bytes. The matrix product is torch's weight-only int8 kernel
(`torch.ops.aten._weight_int8pack_mm`, the kernel gpt-fast and torchao use on CPU), which multiplies by
the scales after the dot products. It runs with bf16 activations: with fp32 ones the same kernel was
7x slower (measured 2026-12-01, [1, 1280] x [5120, 1280]: 0.80 ms in bf16, 4.19 ms in fp32), so an
fp32 input is rounded to bf16 for the product and the output returned in fp32. The output head is
left as cast_for_inference made it (fp32), so logits are not rounded to bf16 and greedy choices keep
their fp32 resolution; it is 8% of GPT-2 large's weights. The scheme is symmetric
per-output-channel absmax quantization (as LLM.int8()'s vector-wise quantization, without its outlier
decomposition: Dettmers et al. 2022, arXiv:2208.07339, section 3.1):

    scale[n] = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / scale[n])  in [-127, 127]

For inference only (no gradients). What it costs in quality is measured by
benchmarks/int8_quality.py (docs/performance.md).
"""

from __future__ import annotations

import torch
from torch import nn

from gptcore.config import QUANTIZE
from gptcore.errors import ConfigError
from gptcore.model import GPTModel



class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 [out, in] with scales [out]: y = (x @ q^T) * scale + bias.

    Shapes: input [..., in_features] -> output [..., out_features], in the input's dtype; the product
    is computed with bf16 activations, scales and bias.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer("weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous())
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, {self.scales.dtype} scales"


@torch.no_grad()
def quantize_int8(model: GPTModel) -> GPTModel:
    """Replace every nn.Linear in the transformer blocks of a GPTModel (in place) by an Int8Linear; the
    output head stays as it is. Returns the model.

    Raises:
        ConfigError: a Linear on a device other than the CPU (the kernel used here is torch's CPU kernel).
    """
    for parent in list(model.trf_blocks.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                if child.weight.device.type != "cpu":
                    raise ConfigError(f"quantize int8: runs on the CPU only; the model is on {child.weight.device}")
                setattr(parent, name, Int8Linear(child))
    return model


def check_quantize(value: str) -> str:
    """Return value if it is one of QUANTIZE; raise ValueError otherwise."""
    if value not in QUANTIZE:
        raise ValueError(f"quantize: expected one of {', '.join(QUANTIZE)}, got {value!r}")
    return value
