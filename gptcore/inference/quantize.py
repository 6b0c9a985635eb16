"""int8 for decoding: each nn.Linear's weight as int8 with one scale per output feature, the head's too.

Decoding one token reads every weight once, so at batch 1 its speed is the speed at which weights come
from memory: int8 halves bf16's bytes. The weights are quantized by symmetric per-output-channel absmax
(as LLM.int8()'s vector-wise quantization, without its outlier decomposition: Dettmers et al. 2022,
arXiv:2208.07339, section 3.1):

    scale[n] = max_k |W[n, k]| / 127,   q[n, k] = round(W[n, k] / scale[n])  in [-127, 127]

Up to gemv.MAX_ROWS[int8] rows (decoding, prompts), wherever gptcore.inference.kernels has a vector int8
path (AVX512-VNNI, AVX-VNNI, AVX2), the product is gptcore.inference.gemv's kernel, which
quantizes the activations too, in blocks of 32 as llama.cpp's q8_0 does, and sums the int8 products
exactly: it runs at memory speed where float dequantization did not (measured 2026-12-01: 144 block
products of GPT-2 large in 44-60 ms; torch's weight-only `_weight_int8pack_mm` with bf16 activations
took ~73 ms, the same loop dequantizing to fp32 in C ~58). More rows go through
`_weight_int8pack_mm` (bf16 activations: with fp32 ones it was 7x slower). The output head is
quantized as well (8% of GPT-2 large's weights, as in llama.cpp's q8_0 files) and returns fp32 logits,
never rounded to bf16. For inference only (no gradients). What it costs in quality is measured by
benchmarks/int8_quality.py (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.errors import ConfigError
from gptcore.inference import gemv, kernels
from gptcore.model import GPTModel
from gptcore.params.choices import QUANTIZE


class Int8Linear(nn.Module):
    """An nn.Linear whose weight is int8 [out, in] with scales [out]: y = (x @ q^T) * scale + bias.

    Shapes: input [..., in_features] -> output [..., out_features], in out_dtype (an output head: fp32
    logits), else in the input's dtype. Up to gemv.MAX_ROWS[int8] rows run through gemv.gemv_int8
    (activations quantized per 32), more through torch's kernel with bf16 activations, scales and bias.
    """

    def __init__(self, linear: nn.Linear, dtype: torch.dtype = torch.bfloat16, out_dtype: torch.dtype | None = None):
        super().__init__()
        weight = linear.weight.detach().float()
        self.in_features, self.out_features, self.out_dtype = linear.in_features, linear.out_features, out_dtype
        scales = weight.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        self.register_buffer(
            "weight", torch.round(weight / scales[:, None]).clamp(-127, 127).to(torch.int8).contiguous()
        )
        self.register_buffer("scales", scales.to(dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out_dtype = self.out_dtype or x.dtype
        y = gemv.layer_product(self, x)  # decoding, prompts
        if y is None and 0 < gemv.rows(x) <= gemv.MAX_ROWS[torch.int8] and kernels.fast_int8():
            kernel_dtype = torch.float32 if out_dtype == torch.float32 else torch.bfloat16
            y = gemv.gemv_int8(x, self.weight, self.scales, self.bias, kernel_dtype)  # a non-contiguous x
        if y is not None:
            return y if y.dtype == out_dtype else y.to(out_dtype)
        if self.out_dtype == torch.float32:  # logits of many rows: the int8 weights times their scales, in fp32
            weight = self.weight.float() * self.scales.float()[:, None]
            return F.linear(x.float(), weight, None if self.bias is None else self.bias.float())
        flat = x.reshape(-1, self.in_features).to(self.scales.dtype)
        y = torch.ops.aten._weight_int8pack_mm(flat, self.weight, self.scales)
        if self.bias is not None:
            y += self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def extra_repr(self) -> str:
        out = f", {self.out_dtype} output" if self.out_dtype else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight, {self.scales.dtype} scales{out}"


@torch.no_grad()
def quantize_int8(model: GPTModel) -> GPTModel:
    """Replace every nn.Linear of a GPTModel (in place) by an Int8Linear: the transformer blocks' and the
    output head's, which gives fp32 logits (as llama.cpp's q8_0 files quantize the head too). Returns
    the model.

    Raises:
        ConfigError: a Linear on a device other than the CPU (the kernels used here are CPU kernels).
    """
    for parent in list(model.trf_blocks.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(_on_cpu(child)))
    if isinstance(model.out_head, nn.Linear):
        model.out_head = Int8Linear(_on_cpu(model.out_head), out_dtype=torch.float32)
    return model


def _on_cpu(linear: nn.Linear) -> nn.Linear:
    if linear.weight.device.type != "cpu":
        raise ConfigError(f"quantize int8: runs on the CPU only; the model is on {linear.weight.device}")
    return linear


def check_quantize(value: str) -> str:
    """Return value if it is one of QUANTIZE; raise ValueError otherwise."""
    if value not in QUANTIZE:
        raise ValueError(f"quantize: expected one of {', '.join(QUANTIZE)}, got {value!r}")
    return value
