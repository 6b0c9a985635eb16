"""GPT-2 as pure nn.Modules: attention, feed-forward, transformer block, the model, and its KV cache.

Classes are in forward order. No I/O, no prints, no device choice: callers move the model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from gptcore.config import GPTConfig
from gptcore.device import forked_rng


class KVCache:
    """Preallocated keys and values of every layer, for decoding one new position at a time.

    Rows may be left-padded (batched generation of prompts of unequal length): `pad_lengths[b]` pads
    lead row b, which are masked out as keys and shift that row's positions so that each prompt sees
    exactly the positions it would see alone.
    """

    def __init__(
        self,
        config: GPTConfig,
        batch_size: int,
        max_len: int | None = None,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        pad_lengths: torch.Tensor | None = None,
    ):
        self.max_len = min(max_len or config.context_length, config.context_length)
        shape = (batch_size, config.n_heads, self.max_len, config.head_dim)
        self.keys = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.values = [torch.empty(shape, device=device, dtype=dtype) for _ in range(config.n_layers)]
        self.length = 0
        self.pad_lengths = None if pad_lengths is None else pad_lengths.to(device=device, dtype=torch.long)

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new positions of one layer; return all keys and values so far."""
        end = self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        keys, values = self.keys[layer], self.values[layer]
        # narrow + copy_ (converting the dtype) rather than slice assignment: fewer tensor ops per token.
        keys.narrow(2, self.length, k.shape[2]).copy_(k)
        values.narrow(2, self.length, k.shape[2]).copy_(v)
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def positions(self, num_new: int, device: torch.device) -> torch.Tensor:
        """Position ids of the next `num_new` tokens: [T], or [B, T] with left padding."""
        pos = torch.arange(self.length, self.length + num_new, device=device)
        if self.pad_lengths is None:
            return pos
        return (pos[None, :] - self.pad_lengths[:, None]).clamp(min=0)

    def attention_mask(self, num_new: int, device: torch.device) -> torch.Tensor | None:
        """Boolean mask [B|1, 1, T, length+T] (True attends), or None where plain causal order will do."""
        if self.pad_lengths is None and (self.length == 0 or num_new == 1):
            return None
        q_pos = torch.arange(self.length, self.length + num_new, device=device)[:, None]  # [T, 1]
        k_pos = torch.arange(self.length + num_new, device=device)[None, :]  # [1, S]
        mask = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
        if self.pad_lengths is not None:
            real_key = k_pos >= self.pad_lengths[:, None]  # [B, S]
            # A padding query may see itself, so that no row of the softmax is empty (no NaNs).
            mask = mask & (real_key[:, None, None, :] | (k_pos == q_pos)[None, None])
        return mask

    def advance(self, num_new: int) -> None:
        self.length += num_new


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: softmax(QK^T / sqrt(head_dim)) V with attention dropout."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.n_heads = config.n_heads
        self.head_dim = config.head_dim
        self.layer_idx = layer_idx
        self.dropout = config.drop_rate
        # One projection for queries, keys and values: a single matmul instead of three.
        self.qkv = nn.Linear(config.emb_dim, 3 * config.emb_dim, bias=config.qkv_bias)
        self.out_proj = nn.Linear(config.emb_dim, config.emb_dim)
        self.fused = True  # scaled_dot_product_attention; False runs the explicit reference path

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, self.head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, hd]
        if cache is not None:
            k, v = cache.store(self.layer_idx, k, v)  # [B, H, S, hd], S = past + T
        if cache is not None and T == 1 and cache.pad_lengths is not None and not self.training:
            # A decoding step of left-padded rows: each row attends over its own keys only, as it would
            # alone (a masked softmax over the padding sums in another order: batch-dependent bits).
            rows = [
                self._attend(q[b : b + 1], k[b : b + 1, :, pad:], v[b : b + 1, :, pad:], None, False)
                for b, pad in enumerate(cache.pad_lengths.clamp(max=k.shape[2] - 1).tolist())
            ]
            y = torch.cat(rows).transpose(1, 2).reshape(B, T, C)  # [B, 1, C]
            return self.out_proj(y)
        causal = mask is None and T > 1 and k.shape[2] == T
        y = self._attend(q, k, v, mask, causal).transpose(1, 2).reshape(B, T, C)  # [B, T, C]
        return self.out_proj(y)

    def forward_at(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The output [B, C] at one position per row (position [B]), from x [B, T, C]: keys and values of
        every position, the query and the output projection of the chosen ones only."""
        B, T, C = x.shape
        x_at = x[torch.arange(B, device=x.device), position]  # [B, C]
        if type(self.qkv) is nn.Linear:
            weight, bias = self.qkv.weight, self.qkv.bias
            kv = F.linear(x, weight[C:], None if bias is None else bias[C:])  # [B, T, 2C]
            q = F.linear(x_at, weight[:C], None if bias is None else bias[:C])  # [B, C]
        else:  # a subclass (a LoRA layer) adds to the whole product: call it, and keep the chosen queries
            qkv = self.qkv(x)  # [B, T, 3C]
            q, kv = qkv[torch.arange(B, device=x.device), position, :C], qkv[..., C:]
        k, v = kv.reshape(B, T, 2, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)  # [B, H, T, hd]
        q = q.reshape(B, self.n_heads, 1, self.head_dim)
        mask = (torch.arange(T, device=x.device)[None, :] <= position[:, None])[:, None, None, :]  # [B, 1, 1, T]
        return self.out_proj(self._attend(q, k, v, mask, causal=False).reshape(B, C))

    def _attend(self, q, k, v, mask: torch.Tensor | None, causal: bool) -> torch.Tensor:
        """Weighted values [B, H, T, hd]: the fused kernel, or the explicit path where that is faster."""
        dropout = self.dropout if self.training else 0.0
        if self.fused and not explicit_is_faster(q, k):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal)
        return explicit_attention(q, k, v, mask, dropout, causal, self.training)


# Keys up to which the explicit path beats the fused kernel on CPU in bf16/fp16 training (torch 2.13, AVX512-BF16).
EXPLICIT_MAX_KEYS = 512


def explicit_is_faster(q: torch.Tensor, k: torch.Tensor) -> bool:
    """True where PyTorch's fused attention kernel loses to plain matmul + softmax + matmul: in training
    (autograd on) in bf16/fp16 on CPU up to EXPLICIT_MAX_KEYS keys.

    There the fused kernel's backward is slow: forward + backward of 8 x 12 heads x 120 tokens took
    52 ms fused and 21 ms explicit (2 threads, 2026-12-01); from ~1k keys it wins. Without autograd
    (decoding, evaluation) the fused kernel wins everywhere: one query against 60-1000 cached keys
    in 31-297 us where the explicit path took 236-2350 us (1 and 2 threads; the explicit path
    copies the cache's keys and values into contiguous matrices each step), a 50-token prompt 0.28 ms
    against 0.83 ms. fp32 and CUDA always take the fused kernel.
    """
    if q.device.type != "cpu" or q.dtype not in (torch.bfloat16, torch.float16) or not torch.is_grad_enabled():
        return False
    return k.shape[2] <= EXPLICIT_MAX_KEYS


def explicit_attention(q, k, v, mask, dropout: float, causal: bool, training: bool) -> torch.Tensor:
    """The textbook path: scaled scores, causal mask, softmax, dropout, weighted values."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])  # [B, H, T, S]
    if causal:
        T, S = scores.shape[-2:]
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    weights = F.dropout(weights, p=dropout, training=training)
    return weights @ v  # [B, H, T, hd]


class FeedForward(nn.Module):
    """Position-wise MLP: emb_dim -> 4 * emb_dim -> emb_dim with GELU (GPT-2's tanh approximation)."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.fc = nn.Linear(config.emb_dim, 4 * config.emb_dim)
        self.act = nn.GELU(approximate="tanh")
        self.proj = nn.Linear(4 * config.emb_dim, config.emb_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.act(self.fc(x)))


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: x + drop(attn(ln(x))), then x + drop(ff(ln(x)))."""

    def __init__(self, config: GPTConfig, layer_idx: int = 0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.att = CausalSelfAttention(config, layer_idx)
        self.norm2 = nn.LayerNorm(config.emb_dim, eps=1e-5)
        self.ff = FeedForward(config)
        self.drop_shortcut = nn.Dropout(config.drop_rate)

    def forward(self, x: torch.Tensor, cache: KVCache | None = None, mask: torch.Tensor | None = None):
        # Dropout is the identity in eval mode: not calling it there saves two module calls per block per
        # decoded token (with the cache store's narrow/copy_, ~5 ms of a 65 ms 774M int8 step).
        h = self.att(self.norm1(x), cache, mask)
        x = x + (self.drop_shortcut(h) if self.training else h)
        h = self.ff(self.norm2(x))
        return x + (self.drop_shortcut(h) if self.training else h)

    def forward_at(self, x: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """forward(x)[rows, position] [B, C], for one position per row, at a fraction of the compute:
        attention is causal and everything after it acts per position, so only the keys and values
        need every position. Equal up to float rounding; under active dropout equal in distribution
        (fewer random draws)."""
        rows = torch.arange(x.shape[0], device=x.device)
        h = x[rows, position] + self.drop_shortcut(self.att.forward_at(self.norm1(x), position))
        return h + self.drop_shortcut(self.ff(self.norm2(h)))


class GPTModel(nn.Module):
    """Token + position embeddings, a stack of transformer blocks, final LayerNorm, output head."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.emb_dim)
        self.pos_emb = nn.Embedding(config.context_length, config.emb_dim)
        self.drop_emb = nn.Dropout(config.drop_rate)
        self.trf_blocks = nn.ModuleList(TransformerBlock(config, i) for i in range(config.n_layers))
        self.final_norm = nn.LayerNorm(config.emb_dim, eps=1e-5)
        if config.num_classes is None:
            self.out_head = nn.Linear(config.emb_dim, config.vocab_size, bias=False)
            if config.tie_embeddings:
                self.out_head.weight = self.tok_emb.weight
        else:
            self.out_head = nn.Linear(config.emb_dim, config.num_classes)
        # True: in training, each block's activations are recomputed in the backward pass instead of
        # kept (set_activation_checkpointing): memory of one block instead of all, for ~1/3 more compute.
        self.activation_checkpointing = False

    def forward(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """Logits [B, T, vocab] (or [B, T, num_classes]) for token ids idx [B, T].

        With a cache, idx holds only the new positions; their keys and values are appended to it.
        """
        return self.head(self.hidden_states(idx, cache))

    def hidden_states(self, idx: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """The last block's output [B, T, C] for token ids idx [B, T] (before the final LayerNorm).

        Raises:
            ValueError: the cached and new positions together exceed the context length.
        """
        B, T = idx.shape
        past = cache.length if cache is not None else 0
        if past + T > self.config.context_length:
            raise ValueError(f"sequence of {past + T} tokens exceeds the context length {self.config.context_length}")
        if cache is None:
            pos, mask = torch.arange(T, device=idx.device), None
        else:
            pos, mask = cache.positions(T, idx.device), cache.attention_mask(T, idx.device)
        x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(pos))  # [B, T, C]
        recompute = self.activation_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for block in self.trf_blocks:
            if recompute:
                x = checkpoint(block, x, None, mask, use_reentrant=False)  # RNG state is replayed: same dropout
            else:
                x = block(x, cache, mask)
        if cache is not None:
            cache.advance(T)
        return x

    def logits_at(self, idx: torch.Tensor, position: torch.Tensor, frozen_blocks: int | None = None) -> torch.Tensor:
        """Logits [B, vocab or num_classes] at one position per row: position [B] indexes idx [B, T].

        Without frozen_blocks: forward(idx)[rows, position]. With them, the same up to float rounding
        for less work (the classifier's finetuning and inference): attention is causal
        and everything after it acts per position, so the last block runs its query, projections and MLP
        at the chosen position only (keys and values from every position; with active dropout the full
        block runs, keeping the random draws of the full forward). frozen_blocks k: the embeddings and
        the first k blocks run without autograd (their parameters must be frozen). The blocks between
        them and the last honour activation checkpointing, as forward does.

        Raises:
            ValueError: idx is longer than the context length.
        """
        B, T = idx.shape
        rows = torch.arange(B, device=idx.device)
        if frozen_blocks is None:  # everything may train: the full forward pass, as the book's
            return self(idx)[rows, position]
        if T > self.config.context_length:
            raise ValueError(f"sequence of {T} tokens exceeds the context length {self.config.context_length}")
        n = len(self.trf_blocks)
        frozen = min(frozen_blocks, n - 1)
        with torch.no_grad():
            x = self.drop_emb(self.tok_emb(idx) + self.pos_emb(torch.arange(T, device=idx.device)))  # [B, T, C]
            for block in self.trf_blocks[:frozen]:
                x = block(x)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for block in self.trf_blocks[frozen : n - 1]:
            x = checkpoint(block, x, None, None, use_reentrant=False) if recompute else block(x)
        last = self.trf_blocks[-1]
        with torch.set_grad_enabled(torch.is_grad_enabled() and frozen_blocks < n):
            if last.training and self.config.drop_rate > 0:
                x = last(x)[rows, position]  # [B, C]
            else:
                x = last.forward_at(x, position)  # [B, C]
        return self.head(x)

    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Final LayerNorm and output head: hidden states [..., C] -> logits [..., vocab or num_classes].

        The LayerNorm computes in its weights' dtype; after gptcore.inference.decoding.cast_for_inference the head
        returns fp32 logits whatever the blocks' dtype, so logits are not rounded to bf16.
        """
        return self.out_head(self.final_norm(x.to(self.final_norm.weight.dtype)))

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())


INIT_SCHEMES = ("gpt2", "pytorch")


@torch.no_grad()
def random_model(config: GPTConfig, init: str = "gpt2", *, seed: int | None = None) -> GPTModel:
    """A GPTModel with fresh random weights, drawn by one of two schemes.

    With a seed the weights are those drawn after `torch.manual_seed(seed)`, from a fork of torch's
    generator (the caller's stream is left as it was); without one they are drawn from torch's global
    generator, as any nn.Module's are.

    gpt2: OpenAI's GPT-2 initialisation, as nanoGPT, litgpt and Hugging Face use it: N(0, 0.02) for
    embeddings and Linear weights, N(0, 0.02 / sqrt(2 n_layers)) for the two projections that write
    into the residual stream (so that it does not grow with depth), zero biases, LayerNorm 1 and 0.
    Small embeddings matter when training from scratch on little data: a token never seen in training
    stays near zero instead of carrying noise as large as a learned embedding.
    pytorch: each module's own default (Embedding N(0, 1), Linear uniform in +-1/sqrt(fan_in)), as
    GPTModel(config) draws them: the book's models.
    """
    if init not in INIT_SCHEMES:
        raise ValueError(f"init: expected one of {', '.join(INIT_SCHEMES)}, got {init!r}")
    if seed is not None:
        with forked_rng(torch.get_default_device(), seed):
            return random_model(config, init)
    model = GPTModel(config)
    if init == "pytorch":
        return model
    for module in model.modules():
        if isinstance(module, (nn.Embedding, nn.Linear)):
            nn.init.normal_(module.weight, 0.0, 0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
    residual_std = 0.02 / math.sqrt(2 * config.n_layers)
    for block in model.trf_blocks:
        nn.init.normal_(block.att.out_proj.weight, 0.0, residual_std)
        nn.init.normal_(block.ff.proj.weight, 0.0, residual_std)
    return model


def set_activation_checkpointing(model: nn.Module, enabled: bool) -> None:
    """Recompute block activations in the backward pass (True) or keep them (False, the default)."""
    for module in model.modules():
        if isinstance(module, GPTModel):
            module.activation_checkpointing = enabled


def set_fused_attention(model: nn.Module, enabled: bool) -> None:
    """Switch every attention layer between fused SDPA and the explicit reference path."""
    for module in model.modules():
        if isinstance(module, CausalSelfAttention):
            module.fused = enabled
