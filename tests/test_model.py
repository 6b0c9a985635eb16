"""GPTModel: shapes, fused attention == explicit attention, KV cache == full recomputation."""

import math

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.model import GPTModel, KVCache, random_model, set_fused_attention


def _model(config: GPTConfig) -> GPTModel:
    torch.manual_seed(0)
    return GPTModel(config).eval()


def test_shapes_and_parameter_count(tiny_config):
    model = _model(tiny_config)
    idx = torch.randint(0, tiny_config.vocab_size, (3, 7))
    assert model(idx).shape == (3, 7, tiny_config.vocab_size)
    # 124M preset: GPT-2 small has 124,439,808 parameters with the head tied to the embedding.
    with torch.device("meta"):
        small = GPTModel(GPTConfig.from_name("gpt2-small"))
    assert small.num_parameters() == 124_439_808


def test_classifier_head_shape(tiny_config):
    config = GPTConfig(**{**tiny_config.to_dict(), "num_classes": 2})
    model = _model(config)
    assert model(torch.randint(0, 100, (2, 5))).shape == (2, 5, 2)


@pytest.mark.parametrize("n_heads,emb_dim", [(4, 32), (3, 24), (1, 16)])
def test_fused_attention_equals_explicit(n_heads, emb_dim):
    config = GPTConfig(vocab_size=97, context_length=16, emb_dim=emb_dim, n_heads=n_heads, n_layers=2, qkv_bias=True)
    model = _model(config)
    idx = torch.randint(0, 97, (2, 16))
    fused = model(idx)
    set_fused_attention(model, False)
    explicit = model(idx)
    assert (fused - explicit).abs().max().item() < 1e-5


def test_explicit_attention_is_causal(tiny_config):
    """Changing a later token must not change earlier logits."""
    model = _model(tiny_config)
    set_fused_attention(model, False)
    idx = torch.randint(0, 1000, (1, 10))
    changed = idx.clone()
    changed[0, 7] = (changed[0, 7] + 1) % 1000
    a, b = model(idx), model(changed)
    assert torch.allclose(a[:, :7], b[:, :7], atol=1e-6)
    assert not torch.allclose(a[:, 7:], b[:, 7:], atol=1e-6)


def test_attention_dropout_is_active_in_training():
    config = GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, drop_rate=0.5)
    model = _model(config).train()
    idx = torch.randint(0, 50, (1, 8))
    assert not torch.allclose(model(idx), model(idx))
    model.eval()
    assert torch.allclose(model(idx), model(idx))


def test_kv_cache_step_by_step_equals_full_forward(tiny_config):
    model = _model(tiny_config)
    idx = torch.randint(0, 1000, (2, 12))
    full = model(idx)
    cache = KVCache(tiny_config, batch_size=2)
    prefill = model(idx[:, :5], cache)
    steps = [model(idx[:, t : t + 1], cache) for t in range(5, 12)]
    incremental = torch.cat([prefill, *steps], dim=1)
    assert (full - incremental).abs().max().item() < 1e-5
    # several new positions at once against a non-empty cache take the masked path
    cache = KVCache(tiny_config, batch_size=2)
    model(idx[:, :4], cache)
    chunk = model(idx[:, 4:9], cache)
    assert (full[:, 4:9] - chunk).abs().max().item() < 1e-5


def test_left_padded_rows_match_unpadded(tiny_config):
    model = _model(tiny_config)
    short = torch.randint(0, 1000, (1, 4))
    long = torch.randint(0, 1000, (1, 9))
    pad = 5
    batch = torch.cat([torch.cat([torch.full((1, pad), 50256), short], dim=1), long])
    cache = KVCache(tiny_config, batch_size=2, pad_lengths=torch.tensor([pad, 0]))
    logits = model(batch, cache)
    assert torch.allclose(logits[0, pad:], model(short)[0], atol=1e-5)
    assert torch.allclose(logits[1], model(long)[0], atol=1e-5)
    assert torch.isfinite(logits).all()


def test_context_length_is_enforced(tiny_config):
    model = _model(tiny_config)
    with pytest.raises(ValueError, match="context length"):
        model(torch.zeros(1, tiny_config.context_length + 1, dtype=torch.long))


def test_tied_head_shares_the_embedding():
    model = _model(GPTConfig(vocab_size=50, context_length=8, emb_dim=16, n_heads=2, n_layers=1, tie_embeddings=True))
    assert model.out_head.weight is model.tok_emb.weight


def test_untrained_loss_is_near_uniform(tiny_config):
    """A sanity check of the whole forward pass: a fresh model is close to ln(vocab) (book: ~10.99)."""
    config = GPTConfig(**{**tiny_config.to_dict(), "vocab_size": 50257})
    model = _model(config)
    torch.nn.init.normal_(model.out_head.weight, std=0.002)
    idx = torch.randint(0, 50257, (2, 16))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    assert abs(loss.item() - math.log(50257)) < 0.1


def test_random_model_schemes():
    config = GPTConfig(vocab_size=2000, context_length=64, emb_dim=128, n_heads=4, n_layers=4, qkv_bias=True)
    torch.manual_seed(5)
    book = GPTModel(config)
    torch.manual_seed(5)
    same = random_model(config, "pytorch")
    assert all(torch.equal(a, b) for a, b in zip(book.state_dict().values(), same.state_dict().values()))
    assert float(book.tok_emb.weight.detach().std()) == pytest.approx(1.0, rel=0.05)  # the module default: N(0, 1)

    torch.manual_seed(5)
    gpt2 = random_model(config, "gpt2")
    assert float(gpt2.tok_emb.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    assert float(gpt2.pos_emb.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    block = gpt2.trf_blocks[0]
    assert float(block.att.qkv.weight.detach().std()) == pytest.approx(0.02, rel=0.05)
    residual = 0.02 / math.sqrt(2 * config.n_layers)
    assert float(block.att.out_proj.weight.detach().std()) == pytest.approx(residual, rel=0.05)
    assert float(block.ff.proj.weight.detach().std()) == pytest.approx(residual, rel=0.05)
    assert not block.att.qkv.bias.any() and not block.ff.fc.bias.any()
    assert torch.equal(block.norm1.weight, torch.ones(128)) and not block.norm1.bias.any()
    torch.manual_seed(5)
    assert torch.equal(random_model(config, "gpt2").tok_emb.weight, gpt2.tok_emb.weight)  # seeded: reproducible
    with pytest.raises(ValueError, match="init"):
        random_model(config, "xavier")


@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_at_chosen_positions_equals_the_full_block(qkv_bias, fused, dtype):
    torch.manual_seed(0)
    model = GPTModel(GPTConfig(vocab_size=97, context_length=16, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=qkv_bias))
    set_fused_attention(model, fused)
    block = model.trf_blocks[0].to(dtype)
    x = torch.randn(5, 11, 32, dtype=dtype)
    position = torch.tensor([10, 0, 3, 10, 7])  # one per row, anywhere in the sequence
    full = block(x)[torch.arange(5), position]
    at = block.forward_at(x, position)
    assert at.shape == (5, 32) and at.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert torch.allclose(at.float(), full.float(), atol=tolerance, rtol=tolerance)
    # Gradients reach the same weights: the keys and values of every position count.
    grads = []
    for out in (block(x)[torch.arange(5), position], block.forward_at(x, position)):
        block.zero_grad()
        out.float().square().sum().backward()
        grads.append([p.grad.float().clone() for p in block.parameters()])
    assert all(torch.allclose(a, b, atol=tolerance * 10, rtol=tolerance * 10) for a, b in zip(*grads))
