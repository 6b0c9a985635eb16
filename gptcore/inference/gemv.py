"""Matrix-vector products for decoding on the CPU (GEMV): y = x W^T + b for a few rows of x.

Decoding one token reads every weight once, so at batch 1 it runs at the speed weights stream from
memory. torch's CPU kernels for this shape do not reach it: measured 2026-12-01 (2 threads, Xeon with
AVX512-BF16, quiet), the 144 block products of GPT-2 large read 10-13 GB/s of bf16 weights through
F.linear and 20-25 GB/s through this module's kernel, where a plain C read of the same bytes ran at 21.
The kernels are C (gptcore/inference/gemv.c), built, loaded and chosen by what the CPU can do in
gptcore/inference/kernels.py: bf16 weights through AVX512-BF16, or widened to fp32 in registers on AVX2 +
FMA; int8 weights through AVX512-VNNI, AVX-VNNI or AVX2. They share torch's OpenMP runtime and thread
count. Without a C compiler decoding keeps torch's kernels, with one warning. The same library holds a
whole block's decoding step (gptcore/inference/decode_block.py), which calls these products inside one
OpenMP region. Every call is preceded by checks that the kernel's bare pointers can read what they are
given (shapes, dtypes, contiguity, device): a wrong input is a Python error, never a read past its end.

Same inputs give the same bytes whatever the thread count (each output is one sum in a fixed order).
The sums are fp32 like torch's, in another order, so outputs may differ from F.linear's in the last
bf16 bit.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from gptcore.inference.kernels import fast_bf16, fast_int8, load_kernels

# Up to this many rows (sequences decoded together, or prompt tokens) the kernels beat torch's products
# of GPT-2 large's [5120, 1280] weight (2 threads, 2026-12-01): bf16 1.03-1.26 ms against 1.31-1.73 for
# 1-4 rows, about even at 6-8; int8 0.68 ms against 1.22 for 1 row, 6.5 against 10.4 for 50, even at 256.
MAX_ROWS = {torch.bfloat16: 4, torch.int8: 64, torch.float32: 0}
# A decoding step (one position per row) always takes the kernels, whatever the number of rows: each row's
# sums are then the same code in the same order whether it is decoded alone or beside others (batch-invariant
# decoding, docs/serving.md); MAX_ROWS only decides for prompts (many positions of one row).


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    weight_dtype: torch.dtype,
    *vectors: torch.Tensor | None,
    vector_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x as a contiguous [rows, in_features] matrix, after checking what the kernels assume: CPU
    tensors, a contiguous [out, in] weight of weight_dtype, vectors [out] of vector_dtype (None allowed)."""
    if x.device.type != "cpu" or weight.device.type != "cpu":
        raise ValueError("gemv: CPU tensors only")
    if (
        weight.dim() != 2
        or x.shape[-1] != weight.shape[1]
        or not weight.is_contiguous()
        or weight.dtype != weight_dtype
    ):
        raise ValueError(
            f"gemv: x [..., {x.shape[-1]}] does not match a contiguous {weight_dtype} weight {list(weight.shape)}"
        )
    for v in vectors:
        if v is not None and not _vector(v, weight.shape[0], vector_dtype):
            name = "bf16" if vector_dtype == torch.bfloat16 else "fp32"
            raise ValueError(f"gemv: scales and bias must be contiguous {name} [{weight.shape[0]}] on the CPU")
    return x.reshape(-1, x.shape[-1]).contiguous()


def _check_out_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float32):
        raise ValueError(f"gemv: the output is bf16 or fp32, not {dtype}")


def gemv_bf16(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16
) -> torch.Tensor:
    """x [..., in] @ weight [out, in] + bias [out] -> [..., out] in out_dtype (bf16, or fp32 for logits:
    the fp32 sums unrounded); x, weight and bias bf16 (x of another dtype is rounded to bf16 first),
    weight and bias contiguous.

    Raises:
        RuntimeError: the kernels could not be built (check load_kernels() first).
        ValueError: tensors not on the CPU, or shapes that do not match.
    """
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError("gemv: the kernels are not available")
    flat = _check(x, weight, torch.bfloat16, bias).to(torch.bfloat16)
    _check_out_dtype(out_dtype)
    return _product_bf16(kernels, flat, weight, bias, out_dtype).view(*x.shape[:-1], weight.shape[0])


def _product_bf16(
    kernels: ctypes.CDLL, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out_dtype: torch.dtype
) -> torch.Tensor:
    """gemv_bf16 on a contiguous bf16 [rows, in] x whose weight and bias the caller checked: [rows, out]."""
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=out_dtype)
    kernels.gptcore_gemv_bf16(
        flat.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        flat.shape[0],
        weight.shape[0],
        weight.shape[1],
        torch.get_num_threads(),
        out_dtype == torch.float32,
    )
    return out


def gemv_f32(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in] @ weight [out, in] + bias [out] -> [..., out], all fp32 (x of another dtype is converted
    first), weight and bias contiguous: each row's sums in one fixed order whatever the number of rows
    (batch-invariant, unlike torch's GEMM).

    Raises:
        RuntimeError: the kernels could not be built.
        ValueError: tensors not on the CPU, or shapes that do not match.
    """
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError("gemv: the kernels are not available")
    flat = _check(x, weight, torch.float32, bias, vector_dtype=torch.float32).float()
    return _product_f32(kernels, flat, weight, bias).view(*x.shape[:-1], weight.shape[0])


def _product_f32(
    kernels: ctypes.CDLL, flat: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    """gemv_f32 on a contiguous fp32 [rows, in] x whose weight and bias the caller checked: [rows, out] fp32."""
    out = torch.empty(flat.shape[0], weight.shape[0], dtype=torch.float32)
    kernels.gptcore_gemv_f32(
        flat.data_ptr(),
        weight.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        flat.shape[0],
        weight.shape[0],
        weight.shape[1],
        torch.get_num_threads(),
    )
    return out


def gemv_int8(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None = None,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """x [..., in] (any float dtype) @ (qweight [out, in] int8 * scales [out, 1]) + bias [out] -> [..., out]
    in out_dtype (bf16, or fp32 for logits); scales and bias are used in bf16. x is quantized to int8 in blocks of
    32 as llama.cpp's q8_0 (gemv.c; from fp32 or bf16 values, others are converted to fp32 first), and
    the int8 products summed exactly.

    Raises:
        RuntimeError: the kernels could not be built.
        ValueError: tensors not on the CPU, or shapes that do not match.
    """
    kernels = load_kernels()
    if kernels is None:
        raise RuntimeError("gemv: the kernels are not available")
    if scales.dtype != torch.bfloat16 or (bias is not None and bias.dtype != torch.bfloat16):
        scales, bias = scales.to(torch.bfloat16), None if bias is None else bias.to(torch.bfloat16)
    flat = _check(x, qweight, torch.int8, scales, bias)
    if flat.dtype not in (torch.float32, torch.bfloat16):
        flat = flat.float()
    _check_out_dtype(out_dtype)
    return _product_int8(kernels, flat, qweight, scales, bias, out_dtype).view(*x.shape[:-1], qweight.shape[0])


def _product_int8(
    kernels: ctypes.CDLL,
    flat: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """gemv_int8 on a contiguous fp32 or bf16 [rows, in] x whose other tensors the caller checked: [rows, out]."""
    out = torch.empty(flat.shape[0], qweight.shape[0], dtype=out_dtype)
    if kernels.gptcore_gemv_int8(
        flat.data_ptr(),
        flat.dtype == torch.float32,
        qweight.data_ptr(),
        scales.data_ptr(),
        None if bias is None else bias.data_ptr(),
        out.data_ptr(),
        flat.shape[0],
        qweight.shape[0],
        qweight.shape[1],
        torch.get_num_threads(),
        out_dtype == torch.float32,
    ):
        raise MemoryError("gemv: out of memory for the quantized activations")
    return out


def one_position_per_row(x: torch.Tensor) -> bool:
    """x [B, C] or [B, 1, C]: a decoding step's activations (not a prompt's)."""
    return x.dim() == 2 or (x.dim() == 3 and x.shape[1] == 1)


def _vector(v: torch.Tensor, length: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """v is what the kernels read as scales or bias: a contiguous bf16 (fp32 for fp32 weights) [length] on the CPU."""
    return v.dtype == dtype and v.shape == (length,) and v.is_contiguous() and v.is_cpu


def layer_product(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] through a decoding layer's kernel (a GemvLinear's or an Int8Linear's, with its own
    out_dtype) when it takes x: a decoding step (one position per row, any number of rows: batch-invariant)
    or up to MAX_ROWS rows of a contiguous CPU x (bf16 for bf16 weights, fp32 for fp32 ones, bf16 or fp32
    for int8), autograd off; else None, and the caller computes the product its other way. The per-token
    path: one comparison for each thing the kernel's pointers rely on.

    Raises:
        ValueError: x's last dimension is not the weight's input width.
    """
    weight, bias = layer.weight, layer.bias
    out_features, width = weight.shape[0], x.shape[-1]
    if weight.dim() != 2 or width != weight.shape[1]:
        raise ValueError(f"gemv: x [..., {width}] does not match the weight {list(weight.shape)}")
    n = x.numel() // width if width else 0
    vector_dtype = torch.float32 if weight.dtype == torch.float32 else torch.bfloat16
    if (
        n == 0
        or weight.dtype not in MAX_ROWS
        or (n > MAX_ROWS[weight.dtype] and not one_position_per_row(x))
        or torch.is_grad_enabled()
        or not x.is_cpu
        or not weight.is_cpu
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or (bias is not None and not _vector(bias, out_features, vector_dtype))
    ):
        return None
    kernels = load_kernels()
    if kernels is None:
        return None
    flat = x.view(n, width)
    out_dtype = torch.float32 if layer.out_dtype == torch.float32 else torch.bfloat16
    if weight.dtype == torch.int8:
        scales = layer.scales
        if (
            not fast_int8()  # torch's kernel is faster than the portable loop
            or x.dtype not in (torch.bfloat16, torch.float32)
            or not _vector(scales, out_features)
        ):
            return None
        out = _product_int8(kernels, flat, weight, scales, bias, out_dtype)
    elif weight.dtype == torch.float32:
        if x.dtype != torch.float32:
            return None
        out = _product_f32(kernels, flat, weight, bias)
    else:
        if x.dtype != torch.bfloat16:
            return None
        out = _product_bf16(kernels, flat, weight, bias, out_dtype)
    return out.view(*x.shape[:-1], out_features)


def rows(x: torch.Tensor) -> int:
    """How many vectors x [..., in] holds."""
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


class GemvLinear(nn.Linear):
    """An nn.Linear with bf16 (or fp32) weights on the CPU whose decoding steps (one position per row,
    any number of rows) and products of up to MAX_ROWS rows run through the kernels, larger ones (a
    prompt) through F.linear. Same parameters and state dict. fp32 weights: fp32 in and out.

    out_dtype bf16: input [..., in_features] bf16 -> output [..., out_features] bf16. out_dtype fp32 (an
    output head): any float input -> fp32 logits, the sums of bf16 products never rounded to bf16.
    """

    out_dtype: torch.dtype = torch.bfloat16

    @classmethod
    def from_linear(cls, linear: nn.Linear, out_dtype: torch.dtype = torch.bfloat16) -> GemvLinear:
        """A GemvLinear sharing linear's weight and bias (contiguous bf16 [out, in] required)."""
        gemv = cls.__new__(cls)
        nn.Module.__init__(gemv)
        gemv.in_features, gemv.out_features, gemv.out_dtype = linear.in_features, linear.out_features, out_dtype
        gemv.weight, gemv.bias = linear.weight, linear.bias
        return gemv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = layer_product(self, x)
        if y is not None:
            return y
        small = 0 < rows(x) <= MAX_ROWS[torch.bfloat16] or one_position_per_row(x)
        if small and not torch.is_grad_enabled() and self.weight.is_cpu:
            if self.weight.dtype == torch.bfloat16:
                return gemv_bf16(x, self.weight, self.bias, self.out_dtype)  # an fp32 x (the head's) or a strided one
            if self.weight.dtype == torch.float32:
                return gemv_f32(x, self.weight, self.bias)  # a strided or 16-bit x
        if self.out_dtype == torch.float32:
            return F.linear(x.float(), self.weight.float(), None if self.bias is None else self.bias.float())
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, {self.out_dtype} output"


@torch.no_grad()
def use_gemv_f32(model: nn.Module) -> nn.Module:
    """Every fp32 nn.Linear on the CPU inside `model` replaced (in place) by a GemvLinear sharing its
    parameters (row-major weights), so that decoding steps are batch-invariant; a no-op without the kernels."""
    if load_kernels() is None:
        return model
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.float32 and child.weight.is_cpu:
                if child.weight.is_contiguous():
                    setattr(parent, name, GemvLinear.from_linear(child, torch.float32))
    return model


@torch.no_grad()
def use_gemv(blocks: nn.Module, head: nn.Linear | None = None) -> tuple[nn.Module, nn.Linear | None]:
    """Where the kernels multiply bf16 with vector instructions (kernels.fast_bf16: AVX512-BF16, or AVX2 +
    FMA widening to fp32): every bf16 nn.Linear on the CPU inside `blocks` replaced (in place) by a
    GemvLinear sharing its parameters, and `head`, if given, returned as a GemvLinear over a bf16 copy of
    its weight with fp32 logits (decoding reads half the bytes). Returns (blocks, head), unchanged elsewhere.
    """
    if not fast_bf16():
        return blocks, head
    for parent in list(blocks.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.weight.dtype == torch.bfloat16 and child.weight.device.type == "cpu":
                if child.weight.is_contiguous():
                    setattr(parent, name, GemvLinear.from_linear(child))
    if head is not None and head.weight.device.type == "cpu":
        bf16 = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
        bf16.weight = nn.Parameter(head.weight.detach().to(torch.bfloat16).contiguous(), requires_grad=False)
        if head.bias is not None:
            bf16.bias = nn.Parameter(head.bias.detach().to(torch.bfloat16), requires_grad=False)
        head = GemvLinear.from_linear(bf16, torch.float32)
    return blocks, head
