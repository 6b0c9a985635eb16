"""A block's decoding step in one kernel call (gptcore/inference/decode_block.py): it agrees with the modules, writes
the same cache, gives the same bytes whatever the thread count, and steps aside where it does not apply."""

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference import decode_block, kernels
from gptcore.inference.decode_block import DecodeBlock, decode_step
from gptcore.inference.decoding import cast_for_inference, generate_batch
from gptcore.model import KVCache, TransformerBlock, random_model

pytestmark = pytest.mark.skipif(kernels.load_kernels() is None, reason="no C compiler")
# Head sizes 16 and 24 (not multiples of the kernel's 16 lanes: 24), with and without qkv bias.
CONFIGS = [
    GPTConfig(vocab_size=50257, context_length=64, emb_dim=64, n_heads=4, n_layers=2, qkv_bias=True),
    GPTConfig(vocab_size=50257, context_length=64, emb_dim=72, n_heads=3, n_layers=3, qkv_bias=False),
]


def _model(config: GPTConfig, quantize: str):
    if quantize == "none" and not kernels.fast_bf16():
        pytest.skip("the CPU has no AVX512-BF16: bf16 blocks keep torch's kernels")
    return cast_for_inference(random_model(config, seed=7).eval(), "bf16-true", quantize)


def _decode(model, tokens: torch.Tensor, prompt: int, pads: list[int] | None = None) -> tuple[torch.Tensor, KVCache]:
    """Logits [B, steps, vocab] of one token at a time after a prompt of `prompt` tokens (row b's first
    pads[b] of them padding), and the cache."""
    pad_lengths = None if pads is None else torch.tensor(pads)
    cache = KVCache(model.config, tokens.shape[0], tokens.shape[1], dtype=torch.bfloat16, pad_lengths=pad_lengths)
    with torch.no_grad():
        model(tokens[:, :prompt], cache)
        steps = [model(tokens[:, i : i + 1], cache) for i in range(prompt, tokens.shape[1])]
    return torch.cat(steps, 1), cache


@pytest.mark.parametrize("config", CONFIGS, ids=["hd16", "hd24-nobias"])
@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("batch,pads", [(1, None), (3, None), (3, [0, 4, 8])], ids=["one", "three", "left-padded"])
def test_the_fused_step_agrees_with_the_modules(config, quantize, batch, pads, monkeypatch):
    model = _model(config, quantize)
    assert all(type(b) is DecodeBlock for b in model.trf_blocks)
    tokens = torch.randint(0, config.vocab_size, (batch, 20), generator=torch.Generator().manual_seed(batch))
    calls = []
    monkeypatch.setattr(decode_block, "decode_step", lambda *a: calls.append(decode_step(*a)) or calls[-1])
    fused, fused_cache = _decode(model, tokens, 9, pads)
    assert sum(c is not None for c in calls) == config.n_layers * 11  # every block of every step, not the prompt
    monkeypatch.setattr(decode_block, "decode_step", lambda *a: None)  # the modules only
    reference, cache = _decode(model, tokens, 9, pads)
    scale = reference.abs().max().item()
    assert fused.dtype == torch.float32 and (fused - reference).abs().max().item() < 0.05 * scale
    for ours, theirs in zip(fused_cache.keys + fused_cache.values, cache.keys + cache.values):
        assert torch.equal(ours[:, :, :9], theirs[:, :, :9])  # the prompt's: the same path
        torch.testing.assert_close(ours.float(), theirs.float(), rtol=0.02, atol=0.02)  # the decoded positions


@pytest.mark.parametrize("quantize", ["none", "int8"])
def test_same_bytes_whatever_the_thread_count(quantize):
    model = _model(CONFIGS[1], quantize)
    tokens = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(3))
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            results.append(_decode(model, tokens, 5))
    finally:
        torch.set_num_threads(threads)
    for logits, cache in results[1:]:
        assert torch.equal(logits, results[0][0])
        assert all(
            torch.equal(a, b) for a, b in zip(cache.keys + cache.values, results[0][1].keys + results[0][1].values)
        )


def test_where_it_does_not_apply_the_modules_run():
    model = _model(CONFIGS[0], "int8")
    block = model.trf_blocks[0]
    x = torch.randn(1, 1, 64).to(torch.bfloat16)
    cache = KVCache(model.config, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        assert decode_step(block, x, cache) is not None
        assert decode_step(block, x.float(), cache) is None  # not bf16
        assert decode_step(block, torch.randn(1, 2, 64).to(torch.bfloat16), cache) is None  # two positions
        padded = KVCache(model.config, 1, 8, dtype=torch.bfloat16, pad_lengths=torch.tensor([1, 2]))
        assert decode_step(block, x, padded) is None  # padding lengths for another batch
        assert decode_step(block, x, KVCache(model.config, 1, 8, dtype=torch.float32)) is None
        cache.length = 8
        assert decode_step(block, x, cache) is None  # full: the module path raises the error
        with pytest.raises(ValueError, match="KV cache holds 8 positions"):
            block(x, cache)
    assert decode_step(block, x, KVCache(model.config, 1, 8, dtype=torch.bfloat16)) is None  # autograd on


def test_a_padded_batch_decodes_each_prompt_as_alone():
    """generate_batch left-pads prompts of unequal length; with the padding masked in the kernel, each
    row gets the tokens that prompt gets alone (int8: the same arithmetic whatever the batch)."""
    model = _model(CONFIGS[0], "int8")
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16]]
    together = generate_batch(model, prompts, 12)
    assert together == [generate_batch(model, [p], 12)[0] for p in prompts]


def test_fusion_keeps_the_parameters_and_state_dict():
    plain = random_model(CONFIGS[0], seed=7).eval()
    block = plain.trf_blocks[1]
    fused = DecodeBlock.from_block(block)
    assert isinstance(fused, TransformerBlock) and fused.att.layer_idx == 1 and not fused.training
    assert {k: v.data_ptr() for k, v in fused.state_dict().items()} == {
        k: v.data_ptr() for k, v in block.state_dict().items()
    }
    fp32 = cast_for_inference(random_model(CONFIGS[0], seed=7).eval(), "fp32")
    assert all(type(b) is TransformerBlock for b in fp32.trf_blocks)  # fp32 keeps its modules


def test_what_the_kernel_cannot_read_as_it_is_goes_to_the_modules():
    """The kernel reads bare pointers: an input of another width, a strided parameter or a negative
    padding length must not reach it (found by review: they crashed or gave wrong keys)."""
    model = _model(CONFIGS[0], "int8")
    block = model.trf_blocks[0]
    cache = KVCache(model.config, 1, 8, dtype=torch.bfloat16)
    with torch.no_grad():
        for width in (48, 128):
            assert decode_step(block, torch.randn(1, 1, width).to(torch.bfloat16), cache) is None
        x = torch.randn(1, 1, 64).to(torch.bfloat16)
        weight = block.norm1.weight
        block.norm1.weight = torch.nn.Parameter(torch.ones(128, dtype=torch.bfloat16)[::2], requires_grad=False)
        assert decode_step(block, x, cache) is None
        block.norm1.weight = weight
        negative = KVCache(model.config, 1, 8, dtype=torch.bfloat16, pad_lengths=torch.tensor([-3]))
        reference = KVCache(model.config, 1, 8, dtype=torch.bfloat16)
        assert torch.equal(decode_step(block, x, negative), decode_step(block, x, reference))  # no padding
