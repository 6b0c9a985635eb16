"""The speed a task could reach on this machine: its matrix multiplications alone, and the memory it reads.

`gptcore bench` measures these roofs in the same run as the task, so each row reports the fraction of
its roof it reached (a figure from another day or another load says nothing about this run):

- training (train, classify): the step's nn.Linear matrix multiplications (forward; backward: the
  input gradient and the weight gradient), each timed alone at its own shape, dtype and weight layout,
  into a preallocated output. Their sum is the step's time if nothing else cost anything; attention,
  LayerNorm, GELU, the loss and the optimizer are what the fraction leaves out.
- decoding (generate): the bytes of weights one step reads (every Linear weight once, in the dtype
  decoding stores it), over the machine's memory read bandwidth; and the same step's matrix-vector
  products alone at the kernels decoding uses (gptcore.inference.gemv's where it takes them, else torch's),
  which says how much of the gap is the kernels and how much is everything around them (Python,
  small ops, the KV cache).

The roofline model: S. Williams, A. Waterman, D. Patterson, "Roofline: an insightful visual
performance model for multicore architectures", CACM 52(4), 2009.
"""

from __future__ import annotations

import statistics
import time
from collections import Counter
from dataclasses import dataclass

import torch

from gptcore.config import GPTConfig
from gptcore.inference import gemv, kernels


@dataclass(frozen=True)
class Matmul:
    """y[m, n] = x[m, k] @ w[k, n]; `weight_layout` is how the model stores the [n, k] weight
    ("row": nn.Linear's own; "column": transposed in memory, as fp32 decoding stores it; "int8":
    int8 with per-row scales, gptcore.inference.quantize)."""

    m: int
    k: int
    n: int
    weight_layout: str = "row"

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def linear_shapes(config: GPTConfig) -> list[tuple[int, int]]:
    """(in_features, out_features) of every nn.Linear one forward pass runs, blocks then head."""
    c = config.emb_dim
    block = [(c, 3 * c), (c, c), (c, 4 * c), (4 * c, c)]  # qkv, attention out, fc1, fc2
    head = (c, config.num_classes or config.vocab_size)
    return block * config.n_layers + [head]


def training_matmuls(config: GPTConfig, tokens: int, trained_blocks: int | None = None) -> Counter[Matmul]:
    """The matmuls of one training step on `tokens` = batch x seq_len tokens, with their counts.

    Every Linear runs forward; those that train (the last `trained_blocks` blocks and the head; all
    when None) also run the input gradient dX = dY @ W and the weight gradient dW = dY^T @ X. (The
    first trained layer's dX is not needed; counted anyway, an upper bound of less than 1%.)
    """
    shapes = linear_shapes(config)
    first_trained = 0 if trained_blocks is None else 4 * (config.n_layers - trained_blocks)
    work: Counter[Matmul] = Counter()
    for i, (k, n) in enumerate(shapes):
        work[Matmul(tokens, k, n)] += 1
        if i >= first_trained:
            work[Matmul(tokens, n, k)] += 1  # dX[tokens, k] = dY[tokens, n] @ W[n, k]
            work[Matmul(n, tokens, k)] += 1  # dW[n, k] = dY^T[n, tokens] @ X[tokens, k]
    return work


def decoding_matmuls(
    config: GPTConfig, rows: int, weight_layout: str = "row"
) -> tuple[Counter[Matmul], Counter[Matmul]]:
    """The matrix products of one decoding step of `rows` sequences (one new token each): the blocks'
    and the head's (both with weights in `weight_layout`), apart, as they may differ in dtype."""
    *blocks, (k, n) = linear_shapes(config)
    return Counter(Matmul(rows, k_, n_, weight_layout) for k_, n_ in blocks), Counter(
        [Matmul(rows, k, n, weight_layout)]
    )


def decoding_weight_bytes(config: GPTConfig, block_dtype: torch.dtype, head_dtype: torch.dtype) -> int:
    """Bytes of Linear weights one decoding step reads: the blocks' in `block_dtype`, the head's in
    `head_dtype` (gptcore.inference.decoding.decoding_weight_dtypes; int8 weights also read one scale per output
    feature, in bf16, counted as 2 bytes)."""
    *blocks, head = linear_shapes(config)

    def nbytes(k: int, n: int, dtype: torch.dtype) -> int:
        size = torch.empty((), dtype=dtype).element_size()
        return k * n * size + (2 * n if dtype == torch.int8 else 0)

    return sum(nbytes(k, n, block_dtype) for k, n in blocks) + nbytes(*head, head_dtype)


# Matmuls whose weights would sit in the caches if one weight were timed again and again (a decoding
# step's matrix-vector products read each weight once) get distinct weights, this many bytes of them.
STREAM_BYTES = 256 << 20


def time_matmuls(work: Counter[Matmul], dtype: torch.dtype, device: torch.device, repeats: int = 3) -> float:
    """Seconds the matmuls in `work` take at the kernels the model uses: each distinct shape timed alone
    (median of `repeats` after one warm-up, into a preallocated output where the kernel takes one),
    times its count. A shape with few rows (m <= 16: decoding) cycles through up to `count` distinct
    weights, at most STREAM_BYTES of them, so that its weights come from memory as in the model, and
    runs through gptcore.inference.gemv's kernel where decoding does."""
    total = 0.0
    for mm, count in work.items():
        total += count * _time_one(mm, dtype, device, repeats, count if mm.m <= 16 else 1)
    return total


def _time_one(mm: Matmul, dtype: torch.dtype, device: torch.device, repeats: int, count: int) -> float:
    x = torch.randn(mm.m, mm.k, dtype=dtype, device=device)
    itemsize = 1 if mm.weight_layout == "int8" else torch.empty((), dtype=dtype).element_size()
    copies = max(1, min(count, STREAM_BYTES // (mm.n * mm.k * itemsize)))
    weights = [torch.randn(mm.n, mm.k, dtype=dtype, device=device) for _ in range(copies)]  # [out, in]
    cpu = device.type == "cpu"
    if mm.weight_layout == "int8":  # the kernels allocate their output (a row per decoded sequence)
        weights = [w.clamp(-1, 1).mul(127).to(torch.int8) for w in weights]
        scales = torch.rand(mm.n, dtype=torch.bfloat16, device=device)
        if cpu and mm.m <= gemv.MAX_ROWS[torch.int8] and kernels.fast_int8():

            def run():
                for q in weights:
                    gemv.gemv_int8(x, q, scales)
        else:

            def run():
                for q in weights:
                    torch.ops.aten._weight_int8pack_mm(x, q, scales)
    elif cpu and dtype == torch.bfloat16 and mm.m <= gemv.MAX_ROWS[torch.bfloat16] and kernels.fast_bf16():

        def run():
            for w in weights:
                gemv.gemv_bf16(x, w)
    else:
        if mm.weight_layout == "column":
            weights = [w.t().contiguous().t() for w in weights]
        out = torch.empty(mm.m, mm.n, dtype=dtype, device=device)

        def run():
            for w in weights:
                torch.mm(x, w.t(), out=out)

    times = []
    for _ in range(repeats + 1):
        _sync(device)
        started = time.perf_counter()
        run()
        _sync(device)
        times.append(time.perf_counter() - started)
    return statistics.median(times[1:]) / copies


def memory_read_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes per second read from `nbytes` of fp32 (far beyond the caches), the faster of two readers:
    a sum, and a matrix-vector product over it as a [4096, n] column-major matrix (on the CPU of
    2026-12-01 the product read 26 GB/s where the sum read 18-24). The best of `repeats` after one
    warm-up, into preallocated outputs."""
    data = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    total = torch.empty((), dtype=torch.float32, device=device)
    x = torch.ones(1, 4096, dtype=torch.float32, device=device)
    matrix = data[: data.numel() // 4096 * 4096].view(4096, -1)  # x @ matrix reads it row by row
    product = torch.empty(1, matrix.shape[1], dtype=torch.float32, device=device)
    best = float("inf")
    for read in (lambda: torch.sum(data, dim=0, out=total), lambda: torch.mm(x, matrix, out=product)):
        for i in range(repeats + 1):
            _sync(device)
            started = time.perf_counter()
            read()
            _sync(device)
            if i:
                best = min(best, time.perf_counter() - started)
    return nbytes / best


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
