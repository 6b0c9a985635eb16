"""One transformer block's decoding step in one call of gptcore/inference/gemv.c's kernel (`gptcore_block_decode`).

At batch 1 a decoded token runs each block as some twenty small torch operations (two LayerNorms, four
Linear kernels, the KV cache's copies, attention, GELU, two residual adds), each with its own dispatch,
checks and allocation. Measured 2026-12-01 (gpt2-large, bf16, 2 threads, quiet): a 78.5 ms step of
which the 145 matrix-vector products took 62 ms; the other 16 ms were those operations. DecodeBlock
runs the block's whole step in one C call, one OpenMP region, with the same arithmetic in the same
dtypes and rounded to bf16 where the modules round (LayerNorm, Linear, attention and GELU outputs,
residual adds). The sums are fp32 like torch's, in another order (LayerNorm's moments, attention's
scores and softmax, GELU's tanh from the C library), so outputs may differ from the module path in
the last bf16 bit; the tests bound the difference.

The step is taken where it applies, else the block's own forward runs: eval mode, autograd off, one
new position per row (x [B, 1, C] bf16, contiguous, on the CPU) for any number of rows (each row's
arithmetic is the same whatever the batch: batch-invariant decoding, docs/serving.md), a bf16
KV cache (its left padding masked as KVCache.attention_mask masks it), and Linears that are gemv's
GemvLinear (bf16) or quantize's Int8Linear (weights int8, activations quantized per 32 as llama.cpp's
q8_0), a tanh GELU and LayerNorms with bias.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from gptcore.inference import gemv, kernels
from gptcore.inference.quantize import Int8Linear
from gptcore.model import GPTModel, KVCache, TransformerBlock


class DecodeBlock(TransformerBlock):
    """A TransformerBlock (the same submodules, parameters and state dict) whose decoding step of one
    position per row runs in one kernel call where it applies (see the module docstring).

    Shapes: x [B, T, C] -> [B, T, C], as TransformerBlock.
    """

    @classmethod
    def from_block(cls, block: TransformerBlock) -> DecodeBlock:
        """A DecodeBlock sharing block's submodules."""
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.training = block.training
        for name, child in block.named_children():
            setattr(fused, name, child)
        return fused

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        # With left padding the model passes the cache's mask, which the kernel applies from pad_lengths.
        if cache is not None and (mask is None or cache.pad_lengths is not None) and not self.training:
            out = decode_step(self, x, cache)
            if out is not None:
                return out
        return super().forward(x, cache, mask)


def _plain(t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> bool:
    """t is what the kernel reads through a bare pointer: a contiguous CPU tensor of this shape and dtype."""
    return t is not None and t.dtype == dtype and t.shape == shape and t.is_contiguous() and t.is_cpu


def _linear_params(layer: nn.Module, weight_dtype: torch.dtype, out: int, inp: int) -> list[int] | None:
    """[weight, scales or 0, bias or 0] data pointers of one of the block's Linears (weight [out, inp])
    if the kernel reads it as it is (weight_dtype weights, bf16 scales and bias, bf16 outputs); else None."""
    weight, bias = layer.weight, layer.bias
    if not _plain(weight, (out, inp), weight_dtype) or (bias is not None and not _plain(bias, (out,), torch.bfloat16)):
        return None
    if weight_dtype == torch.int8:
        if (
            not kernels.fast_int8()  # torch's kernel is faster than the portable loop
            or not isinstance(layer, Int8Linear)
            or layer.out_dtype is not None
            or not _plain(layer.scales, (out,), torch.bfloat16)
        ):
            return None
        scales = layer.scales.data_ptr()
    elif isinstance(layer, gemv.GemvLinear) and layer.out_dtype == torch.bfloat16:
        scales = 0
    else:
        return None
    return [weight.data_ptr(), scales, 0 if bias is None else bias.data_ptr()]


def _norm_params(norm: nn.Module, emb: int) -> list[int] | None:
    if not isinstance(norm, nn.LayerNorm) or norm.normalized_shape != (emb,):
        return None
    if not _plain(norm.weight, (emb,), torch.bfloat16) or not _plain(norm.bias, (emb,), torch.bfloat16):
        return None
    return [norm.weight.data_ptr(), norm.bias.data_ptr()]


def decode_step(block: TransformerBlock, x: torch.Tensor, cache: KVCache) -> torch.Tensor | None:
    """block(x, cache) [B, 1, C] for one new position per row through the kernel, the new keys and
    values written into `cache` (which the caller advances, as for the module path); None where the
    kernel does not apply (see the module docstring), and then nothing is written."""
    if torch.is_grad_enabled() or x.dim() != 3 or x.shape[1] != 1 or x.dtype != torch.bfloat16 or not x.is_cpu:
        return None
    att, ff = block.att, block.ff
    weight_dtype = att.qkv.weight.dtype
    batch, _, emb = x.shape
    if (
        batch == 0
        or weight_dtype not in (torch.bfloat16, torch.int8)
        or not x.is_contiguous()
        or att.n_heads * att.head_dim != emb
        or att.training
        or ff.training
    ):
        return None
    keys, values = cache.keys[att.layer_idx], cache.values[att.layer_idx]
    shape = (batch, att.n_heads, cache.max_len, att.head_dim)
    pad = cache.pad_lengths
    if (
        cache.length >= cache.max_len
        or (pad is not None and not _plain(pad, (batch,), torch.long))
        or not _plain(keys, shape, torch.bfloat16)
        or not _plain(values, shape, torch.bfloat16)
        or (keys.is_inference() and not torch.is_inference_mode_enabled())
    ):  # the modules raise there
        return None
    params = _block_params(block, weight_dtype, emb)
    if params is None:
        return None
    library = kernels.load_kernels()
    if library is None:
        return None
    out = torch.empty_like(x)
    status = library.gptcore_block_decode(
        (ctypes.c_void_p * len(params))(*params),
        weight_dtype == torch.int8,
        x.data_ptr(),
        out.data_ptr(),
        keys.data_ptr(),
        values.data_ptr(),
        batch,
        emb,
        att.n_heads,
        cache.max_len,
        cache.length,
        None if pad is None else pad.data_ptr(),
        block.norm1.eps,
        torch.get_num_threads(),
    )
    if status:
        raise MemoryError("decode_block: out of memory for the block's activations")
    return out


def _block_params(block: TransformerBlock, weight_dtype: torch.dtype, emb: int) -> list[int] | None:
    """The kernel's pointers to the block's LayerNorm and Linear tensors, in order; None if it computes otherwise."""
    att, ff = block.att, block.ff
    if not (isinstance(ff.act, nn.GELU) and ff.act.approximate == "tanh") or block.norm1.eps != block.norm2.eps:
        return None
    params: list[int] = []
    for part in (
        _norm_params(block.norm1, emb),
        _linear_params(att.qkv, weight_dtype, 3 * emb, emb),
        _linear_params(att.out_proj, weight_dtype, emb, emb),
        _norm_params(block.norm2, emb),
        _linear_params(ff.fc, weight_dtype, 4 * emb, emb),
        _linear_params(ff.proj, weight_dtype, emb, 4 * emb),
    ):
        if part is None:
            return None
        params += part
    return params


def fuse_blocks(model: GPTModel) -> GPTModel:
    """Replace (in place) each of the model's TransformerBlocks by a DecodeBlock sharing its
    submodules, when the kernels can be built; returns the model. Decoding then takes the one-call step
    wherever it applies (see the module docstring); everything else runs as before."""
    if kernels.load_kernels() is None:
        return model
    for i, block in enumerate(model.trf_blocks):
        if type(block) is TransformerBlock:
            model.trf_blocks[i] = DecodeBlock.from_block(block)
    return model
