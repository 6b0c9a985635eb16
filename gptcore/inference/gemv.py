"""Matrix-vector products for decoding on the CPU (GEMV): y = x W^T + b for a few rows of x.

Decoding one token reads every weight once, so at batch 1 it runs at the speed weights stream from
memory. torch's CPU kernels for this shape do not reach it: measured 2026-12-01 (2 threads, Xeon with
AVX512-BF16, quiet), the 144 block products of GPT-2 large read 10-13 GB/s of bf16 weights through
F.linear and 20-25 GB/s through this module's kernel, where a plain C read of the same bytes ran at 21.
The kernel is C (gptcore/inference/gemv.c), compiled on first use for the machine it runs on (`cc -O3
-march=native -fopenmp`, about a second) into the user's cache directory, keyed by the source, the
compiler and the CPU, and loaded with ctypes; it shares torch's OpenMP runtime and thread count.
Without a C compiler decoding keeps torch's kernels, with one warning. The same library holds a whole
block's decoding step (gptcore/inference/decode_block.py), which calls these products inside one OpenMP region.

Same inputs give the same bytes whatever the thread count (each output is one sum in a fixed order).
The sums are fp32 like torch's, in another order, so outputs may differ from F.linear's in the last
bf16 bit.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("gemv.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")
# Up to this many rows (sequences decoded together, or prompt tokens) the kernels beat torch's products
# of GPT-2 large's [5120, 1280] weight (2 threads, 2026-12-01): bf16 1.03-1.26 ms against 1.31-1.73 for
# 1-4 rows, about even at 6-8; int8 0.68 ms against 1.22 for 1 row, 6.5 against 10.4 for 50, even at 256.
MAX_ROWS = {torch.bfloat16: 4, torch.int8: 64, torch.float32: 0}
# A decoding step (one position per row) always takes the kernels, whatever the number of rows: each row's
# sums are then the same code in the same order whether it is decoded alone or beside others (batch-invariant
# decoding, docs/serving.md); MAX_ROWS only decides for prompts (many positions of one row).


def cache_dir() -> Path:
    """Where compiled kernels are kept: $XDG_CACHE_HOME/gptcore, else ~/.cache/gptcore."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gptcore"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: -march=native code is only valid on a CPU that has them."""
    try:
        lines = Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines()
    except OSError:
        return platform.processor()
    return "\n".join(sorted({line for line in lines if line.startswith(("model name", "flags"))}))


def _compiler() -> str:
    return os.environ.get("CC", "cc")


@functools.cache
def load_kernels() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use and kept in cache_dir() for later processes; None, with
    one warning, when they cannot be built (no C compiler, a compile error). $CC names the compiler."""
    compiler = _compiler()
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
        key = hashlib.sha256("\0".join([SOURCE.read_text(), version, " ".join(FLAGS), _cpu_identity()]).encode())
        library = cache_dir() / f"gemv-{key.hexdigest()[:16]}.so"
        if not library.exists():
            library.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=library.parent) as tmp:  # atomic: no half-written library
                built = Path(tmp) / library.name
                subprocess.run(
                    [compiler, *FLAGS, "-o", str(built), str(SOURCE)], capture_output=True, text=True, check=True
                )
                os.replace(built, library)
        kernels = ctypes.CDLL(str(library))
    except (OSError, subprocess.CalledProcessError) as exc:
        detail = (
            exc.stderr.strip().splitlines()[-1:]
            if isinstance(exc, subprocess.CalledProcessError) and exc.stderr
            else [str(exc)]
        )
        logger.warning(
            f"decoding keeps torch's slower matrix-vector products: cannot build gemv.c with {compiler}: {' '.join(detail)}"
        )
        return None
    pointer, size = ctypes.c_void_p, ctypes.c_int64
    kernels.gptcore_gemv_bf16.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int] * 2
    kernels.gptcore_gemv_int8.argtypes = [pointer, ctypes.c_int] + [pointer] * 4 + [size] * 3 + [ctypes.c_int] * 2
    kernels.gptcore_gemv_bf16.restype = None
    kernels.gptcore_gemv_int8.restype = ctypes.c_int
    kernels.gptcore_block_decode.argtypes = (
        [pointer, ctypes.c_int] + [pointer] * 4 + [size] * 5 + [pointer, ctypes.c_float, ctypes.c_int]
    )
    kernels.gptcore_block_decode.restype = ctypes.c_int
    kernels.gptcore_gemv_f32.argtypes = [pointer] * 4 + [size] * 3 + [ctypes.c_int]
    kernels.gptcore_gemv_f32.restype = None
    return kernels


def native_bf16() -> bool:
    """True when the loaded kernel computes bf16 products in hardware (AVX512-BF16)."""
    kernels = load_kernels()
    return kernels is not None and bool(kernels.gptcore_gemv_native_bf16())


def _check(
    x: torch.Tensor, weight: torch.Tensor, weight_dtype: torch.dtype, *vectors: torch.Tensor | None
) -> torch.Tensor:
    """x as a contiguous [rows, in_features] matrix, after checking what the kernels assume: CPU
    tensors, a contiguous [out, in] weight of weight_dtype, bf16 vectors [out] (None allowed)."""
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
        if v is not None and (
            v.dtype != torch.bfloat16
            or v.shape != (weight.shape[0],)
            or not v.is_contiguous()
            or v.device.type != "cpu"
        ):
            raise ValueError(f"gemv: scales and bias must be contiguous bf16 [{weight.shape[0]}] on the CPU")
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


def layer_product(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """x [..., in] through a decoding layer's kernel (a GemvLinear's or an Int8Linear's, with its own
    out_dtype) when it takes x: a decoding step (any number of rows: batch-invariant) or up to MAX_ROWS
    rows of a contiguous CPU x (bf16 for bf16 weights, fp32 for fp32 ones, bf16 or fp32 for int8), autograd
    off, the layer's tensors still as checked when it was made (CPU, dtypes); else None, and the caller
    computes the product its other way. The per-token path: no other checks.
    """
    weight, bias = layer.weight, layer.bias
    n = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (
        n == 0
        or weight.dtype not in MAX_ROWS
        or (n > MAX_ROWS[weight.dtype] and not one_position_per_row(x))
        or torch.is_grad_enabled()
        or not x.is_cpu
        or not weight.is_cpu
        or not x.is_contiguous()
        or (bias is not None and bias.dtype != (torch.float32 if weight.dtype == torch.float32 else torch.bfloat16))
    ):
        return None
    kernels = load_kernels()
    if kernels is None:
        return None
    flat = x.view(n, x.shape[-1])
    out_dtype = torch.float32 if layer.out_dtype == torch.float32 else torch.bfloat16
    if weight.dtype == torch.int8:
        if x.dtype not in (torch.bfloat16, torch.float32) or layer.scales.dtype != torch.bfloat16:
            return None
        out = _product_int8(kernels, flat, weight, layer.scales, bias, out_dtype)
    elif weight.dtype == torch.float32:
        if x.dtype != torch.float32:
            return None
        out = torch.empty(n, weight.shape[0], dtype=torch.float32)
        kernels.gptcore_gemv_f32(
            flat.data_ptr(),
            weight.data_ptr(),
            None if bias is None else bias.data_ptr(),
            out.data_ptr(),
            n,
            weight.shape[0],
            weight.shape[1],
            torch.get_num_threads(),
        )
    else:
        if x.dtype != torch.bfloat16:
            return None
        out = _product_bf16(kernels, flat, weight, bias, out_dtype)
    return out.view(*x.shape[:-1], weight.shape[0])


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
        if self.weight.dtype == torch.bfloat16 and small and not torch.is_grad_enabled() and self.weight.is_cpu:
            return gemv_bf16(x, self.weight, self.bias, self.out_dtype)  # an fp32 x (the head's) or a strided one
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
    """Where the CPU computes bf16 in hardware (elsewhere torch's bf16 kernels are no slower): every
    bf16 nn.Linear on the CPU inside `blocks` replaced (in place) by a GemvLinear sharing its
    parameters, and `head`, if given, returned as a GemvLinear over a bf16 copy of its weight with fp32
    logits (decoding reads half the bytes). Returns (blocks, head), head unchanged where not native.
    """
    if not native_bf16():
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
