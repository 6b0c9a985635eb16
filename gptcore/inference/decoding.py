"""Autoregressive generation with a KV cache (one prompt row or a left-padded batch), every row sampled by
its own gptcore.inference.sampling.RowSampler; the model prepared for decoding (cast_for_inference)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from gptcore.inference import kernels
from gptcore.inference.decode_block import fuse_blocks
from gptcore.inference.gemv import use_gemv, use_gemv_f32
from gptcore.inference.quantize import check_quantize, quantize_int8
from gptcore.inference.sampling import RowSampler, SamplingOptions
from gptcore.model import GPTModel, KVCache
from gptcore.precision import RESOLVED, resolve_precision, weights_dtype
from gptcore.tokenizer import encode_text


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Next token ids [B, 1] from last-position logits [B, V] with temperature and top-k only (the other
    options: gptcore.inference.sampling). Temperature 0 is greedy (argmax); rows draw in order from `generator`.
    """
    sampler = RowSampler(SamplingOptions(temperature=temperature, top_k=top_k), generator)
    return torch.tensor([[sampler.sample(row)] for row in logits], dtype=torch.long, device=logits.device)


def check_sampling(temperature: float, top_k: int | None = None) -> None:
    """Raise ValueError unless temperature is a finite number >= 0 and top_k is None or >= 1."""
    SamplingOptions(temperature=temperature, top_k=top_k)


def row_options(
    rows: int, temperature: float, top_k: int | None, sampling: SamplingOptions | Sequence[SamplingOptions] | None
) -> list[SamplingOptions]:
    """Each row's options: `sampling` (one for all rows, or one per row), else temperature and top-k."""
    if sampling is None:
        return [SamplingOptions(temperature=temperature, top_k=top_k)] * rows
    if temperature != 0.0 or top_k is not None:
        raise ValueError("pass temperature and top_k inside sampling (SamplingOptions), not beside it")
    if isinstance(sampling, SamplingOptions):
        return [sampling] * rows
    if len(sampling) != rows:
        raise ValueError(f"sampling: {len(sampling)} options for {rows} rows")
    return list(sampling)


@torch.inference_mode()
def generate(
    model: GPTModel,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    on_token: Callable[[torch.Tensor], bool | None] | None = None,
    sampling: SamplingOptions | Sequence[SamplingOptions] | None = None,
) -> torch.Tensor:
    """Extend token ids idx [B, T] by up to max_new_tokens; returns idx with the new tokens appended.

    Generation stops early once every row has produced `eos_id` (which is not appended for a single
    row, as in the book; in a batch, finished rows are filled with eos_id). The context is cropped to
    the model's context length; with the cache, each new token costs one position until the context
    is full, after which the window slides and is recomputed (exactly as the no-cache path).
    `on_token`, if given, sees each appended token column [B, 1] as soon as it is sampled (streaming);
    when it returns True, generation stops there. `sampling` (every option, gptcore.inference.sampling;
    one for all rows or one per row) replaces temperature and top_k; a row whose options carry a seed
    draws from its own generator, the others from `generator` in row order.
    """
    if idx.ndim != 2 or idx.shape[1] == 0:
        raise ValueError(f"the prompt is empty: generation needs at least one token (ids of shape {list(idx.shape)})")
    samplers = [RowSampler(o, generator, idx.device) for o in row_options(idx.shape[0], temperature, top_k, sampling)]
    ctx = model.config.context_length
    device = idx.device
    seqs = idx.tolist()
    done = torch.zeros(idx.shape[0], dtype=torch.bool, device=device)
    cache = None
    for _ in range(max_new_tokens):
        if not use_cache:
            logits = next_token_logits(model, idx[:, -ctx:])
        elif cache is None or cache.length >= ctx:
            window = idx[:, -ctx:]
            cache = KVCache(model.config, idx.shape[0], device=device, dtype=_cache_dtype(model))
            logits = next_token_logits(model, window, cache)
        else:
            logits = next_token_logits(model, idx[:, -1:], cache)
        tokens = [s.sample(row, seq[-ctx:]) for s, row, seq in zip(samplers, logits, seqs)]
        next_id = torch.tensor(tokens, dtype=torch.long, device=device)[:, None]  # [B, 1]
        if eos_id is not None:
            next_id = next_id.masked_fill(done[:, None], eos_id)
            done |= next_id[:, 0] == eos_id
            if bool(done.all()):
                if idx.shape[0] > 1:
                    idx = torch.cat([idx, next_id], dim=1)
                break
        idx = torch.cat([idx, next_id], dim=1)
        for seq, token in zip(seqs, next_id[:, 0].tolist()):
            seq.append(token)
        if on_token is not None and on_token(next_id):
            break
    return idx


@torch.inference_mode()
def generate_batch(
    model: GPTModel,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    eos_id: int | None = None,
    generator: torch.Generator | None = None,
    pad_id: int = 0,
    sampling: SamplingOptions | Sequence[SamplingOptions] | None = None,
) -> list[list[int]]:
    """The new token ids for each prompt, generated together in one left-padded batch with the KV cache.

    The cache masks each row's padding and shifts its positions, so row b gets the tokens `generate`
    gives for prompts[b] alone (greedy, or with seeded `sampling`; up to floating-point rounding). A row
    stops at eos_id, which is not returned, and leaves the batch; generation ends when every row has
    stopped. Once the longest row fills the context, the window slides as in `generate` (every row
    recomputed from its last context_length tokens). `pad_id` only fills masked positions; its value
    does not matter. `sampling`: as `generate`'s (one SamplingOptions for all rows or one per prompt).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    ctx = model.config.context_length
    device = model.tok_emb.weight.device
    samplers = [RowSampler(o, generator, device) for o in row_options(len(prompts), temperature, top_k, sampling)]
    seqs = [list(p) for p in prompts]
    outputs: list[list[int]] = [[] for _ in prompts]
    active = list(range(len(prompts)))  # the prompt index of each row of the cache
    cache, last = None, None
    for step in range(max_new_tokens):
        if not active:
            break
        if cache is None or cache.length >= ctx:
            cache, logits = _prefill_rows(model, [seqs[b][-ctx:] for b in active], max_new_tokens - step, pad_id)
        else:
            logits = next_token_logits(model, last, cache)
        keep = []
        for row, b in enumerate(active):
            token = samplers[b].sample(logits[row], seqs[b][-ctx:])
            if eos_id is not None and token == eos_id:
                continue
            seqs[b].append(token)
            outputs[b].append(token)
            keep.append(row)
        if len(keep) < len(active):
            active = [active[row] for row in keep]
            if keep:
                _keep_rows(cache, torch.tensor(keep, device=device))
        last = torch.tensor([[seqs[b][-1]] for b in active], device=device, dtype=torch.long)  # [B, 1]
    return outputs


def _prefill_rows(model: GPTModel, windows: list[list[int]], remaining: int, pad_id: int):
    """A fresh left-padded cache holding windows (one per row) and the logits [B, V] after each."""
    device = model.tok_emb.weight.device
    width = max(len(w) for w in windows)
    pads = [width - len(w) for w in windows]
    idx = torch.tensor([[pad_id] * p + w for p, w in zip(pads, windows)], device=device)  # [B, T]
    cache = KVCache(
        model.config,
        len(windows),
        min(model.config.context_length, width + remaining),
        device=device,
        dtype=_cache_dtype(model),
        pad_lengths=torch.tensor(pads) if any(pads) else None,
    )
    return cache, next_token_logits(model, idx, cache)


def _keep_rows(cache: KVCache, rows: torch.Tensor) -> None:
    """Drop the cache rows of finished sequences, so that they cost nothing in later steps."""
    cache.keys = [k[rows] for k in cache.keys]
    cache.values = [v[rows] for v in cache.values]
    if cache.pad_lengths is not None:
        cache.pad_lengths = cache.pad_lengths[rows]


def _cache_dtype(model: GPTModel) -> torch.dtype:
    return model.tok_emb.weight.dtype


def next_token_logits(model: GPTModel, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
    """fp32 logits [B, vocab] for the position after the last of idx [B, T] (appended to cache if given).

    The final LayerNorm and the head run on that one position only, outside any autocast; after
    cast_for_inference the head's sums are fp32 (over fp32, bf16 or int8 weights): the token choice is
    made on fp32 logits at every precision.
    """
    h = model.hidden_states(idx, cache)[:, -1]  # [B, C]
    with torch.autocast(h.device.type, enabled=False):
        return model.head(h).float()  # [B, vocab]


def cast_for_inference(model: GPTModel, precision: str, quantize: str = "none") -> GPTModel:
    """Prepare the model (in place, once: it then decodes at that precision) for decoding at a resolved
    precision (gptcore.precision), then,
    with quantize="int8", every Linear, the head's too, to int8 (gptcore.inference.quantize; CPU only).

    bf16-true: the embeddings and blocks are cast to bf16 (decoding one token reads every weight
    once, so it is bound by memory traffic, which bf16 halves). Where gptcore's kernels multiply bf16
    with vector instructions (AVX512-BF16, or AVX2 + FMA widening to fp32: gptcore.inference.kernels) the
    blocks' Linears decode through gptcore.inference.gemv's kernel (about twice torch's speed at batch 1
    on AVX512-BF16), and the head too, over bf16 weights (a tied head shares the bf16 embedding, as llama.cpp's f16 files do)
    with fp32 logits: the sums of its products are never rounded to bf16. Elsewhere the head keeps
    fp32 weights (a tied head gets its own fp32 copy). The final LayerNorm stays fp32. Wherever the
    kernels build, each block then decodes one position per row in one C call (gptcore.inference.decode_block:
    LayerNorms, attention, GELU and residual adds with the Linears' products; a 774M step 76 ms
    against 85 through the modules, 2026-12-01). *-mixed: the
    weights stay fp32 and the caller decodes under gptcore.precision.autocast. fp32 on CPU: the values
    stay; where the kernels build, every Linear decodes through gemv.c's fp32 kernel (the same reduction
    order per row whatever the batch: batch-invariant); elsewhere each Linear weight is stored transposed in memory (column-major, same shape): a matmul
    then reads it as x @ W, the layout of GPT-2's Conv1D. Measured 2026-11-30 (torch 2.13, 2 threads,
    load 1.0-1.7): a 124M decoding step of 8 rows took 55 ms instead of 84 ms, one row 30-34 ms either
    way; `gptcore bench --task generate-batch --precision fp32` went from 91.6 to 134.9 tokens/s. (In
    bf16 the same layout was 10-50% slower, so bf16 weights keep nn.Linear's own.)

    Raises:
        ValueError: precision is not a resolved value (fp32, bf16-mixed, bf16-true, fp16-mixed), or
            quantize is not none or int8.
        ConfigError: int8 on a device other than the CPU.
    """
    if precision not in RESOLVED:
        raise ValueError(f"precision: expected one of {', '.join(RESOLVED)}, got {precision!r}")
    check_quantize(quantize)
    device = next(model.parameters()).device
    on_cpu = device.type == "cpu"
    if precision == "bf16-true":
        head = model.out_head
        bf16_head = decoding_weight_dtypes(precision, quantize, device)[1] == torch.bfloat16
        if head.weight is model.tok_emb.weight and not bf16_head:  # untie: the head keeps fp32
            head.weight = torch.nn.Parameter(head.weight.detach().clone(), requires_grad=False)
        for module in (model.tok_emb, model.pos_emb, model.trf_blocks):
            module.to(weights_dtype(precision))
        if bf16_head:  # a tied head shares the bf16 embedding
            _, model.out_head = use_gemv(model.trf_blocks, head)
    elif precision == "fp32" and on_cpu and quantize == "none" and kernels.load_kernels() is not None:
        use_gemv_f32(model)  # decoding steps through gemv.c's fp32 kernel: batch-invariant
    elif precision == "fp32" and on_cpu:
        for module in model.modules():
            if isinstance(module, torch.nn.Linear):  # same shape and values; column-major storage
                module.weight.data = module.weight.data.t().contiguous().t()
    if quantize == "int8":
        quantize_int8(model)
    if precision == "bf16-true" and on_cpu:
        fuse_blocks(model)  # a block's decoding step in one kernel call where it applies
    return model


def resolve_decoding_precision(value: str, device: torch.device) -> tuple[str, str]:
    """The precision decoding uses on `device` (gptcore.precision's values; `auto` resolved), and why.

    `auto` follows gptcore.precision (bf16-true where the device computes bf16 in hardware), and on a CPU
    without it also takes bf16-true wherever gptcore's kernels multiply bf16 weights with vector
    instructions (AVX2 + FMA, widening to fp32 in registers: gptcore.inference.kernels): one decoded
    token reads every weight once, so half the bytes per weight is the faster path, with fp32 sums.

    Raises:
        ConfigError: an unknown (or renamed) value.
    """
    resolved = resolve_precision(value, device, "inference")
    if value != "auto":
        return resolved, "set explicitly"
    if resolved == "bf16-true":
        return resolved, f"auto: the {device.type} computes bf16 in hardware"
    if device.type == "cpu":
        found = kernels.paths()
        if found is not None and found["bf16"] != "scalar":
            return "bf16-true", (
                f"auto: decoding reads half of fp32's bytes per weight, and gemv.c's {found['bf16']} "
                "kernel sums bf16 weights in fp32"
            )
    return resolved, f"auto: no bf16 in hardware on the {device.type} and no vector 16-bit kernel for it"


def decoding_weight_dtypes(precision: str, quantize: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(the blocks' Linear weights, the head's weight): the dtypes cast_for_inference stores them in."""
    if quantize == "int8":
        return torch.int8, torch.int8
    if precision == "bf16-true":
        return torch.bfloat16, torch.bfloat16 if device.type == "cpu" and kernels.fast_bf16() else torch.float32
    return torch.float32, torch.float32


def text_to_ids(text: str, tokenizer, device: torch.device | str = "cpu") -> torch.Tensor:
    """Encode user text (ordinary text, any length) to a batch of one: [1, T]; T may be 0."""
    return torch.tensor([encode_text(tokenizer, text)], dtype=torch.long, device=device)


def ids_to_text(ids: torch.Tensor, tokenizer) -> str:
    """Decode a batch of one [1, T] (or a flat [T]) to text."""
    return tokenizer.decode(ids.reshape(-1).tolist())


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A seeded generator on `device` for reproducible sampling, or None for torch's global one."""
    if seed is None:
        return None
    return torch.Generator(device=device).manual_seed(seed)
