"""Sampling on hand-written logits, and KV-cache generation equal to the no-cache path."""

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference.decoding import generate, make_generator, sample_next
from gptcore.model import GPTModel


def test_greedy_picks_the_argmax():
    logits = torch.tensor([[0.1, 3.0, -1.0, 2.9], [5.0, 0.0, 0.0, 0.0]])
    assert sample_next(logits).tolist() == [[1], [0]]


def test_top_k_never_samples_outside_the_k_best():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]])
    gen = make_generator(0)
    draws = {sample_next(logits, temperature=5.0, top_k=2, generator=gen).item() for _ in range(300)}
    assert draws == {0, 1}


def test_temperature_flattens_and_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0]])
    gen = make_generator(1)
    cold = [sample_next(logits, temperature=0.05, generator=gen).item() for _ in range(200)]
    hot = [sample_next(logits, temperature=100.0, generator=gen).item() for _ in range(600)]
    assert set(cold) == {0}
    assert all(hot.count(i) > 120 for i in range(3))  # close to uniform (200 each)


def test_seeded_sampling_is_reproducible():
    logits = torch.randn(1, 50)
    a = [sample_next(logits, 1.0, 10, make_generator(7)).item() for _ in range(5)]
    b = [sample_next(logits, 1.0, 10, make_generator(7)).item() for _ in range(5)]
    assert a == b


def test_invalid_arguments():
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 3), temperature=-1)
    with pytest.raises(ValueError):
        sample_next(torch.zeros(1, 3), temperature=1, top_k=0)


@pytest.fixture
def model():
    torch.manual_seed(3)
    config = GPTConfig(vocab_size=300, context_length=24, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    return GPTModel(config).eval()


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 20), (0.7, None)])
def test_cache_equals_no_cache(model, temperature, top_k):
    idx = torch.randint(0, 300, (2, 5))
    outs = [
        generate(model, idx, 40, temperature, top_k, generator=make_generator(11), use_cache=use_cache)
        for use_cache in (True, False)
    ]
    # 5 + 40 > context 24: the window slides and both paths must still agree token for token
    assert outs[0].shape == (2, 45)
    assert torch.equal(outs[0], outs[1])


def test_stops_at_eos(model):
    idx = torch.randint(0, 300, (1, 4))
    free = generate(model, idx, 10)
    eos = free[0, 6].item()  # the third new token
    stopped = generate(model, idx, 10, eos_id=eos)
    first = (free[0, 4:] == eos).nonzero()[0].item()
    assert stopped.shape[1] == 4 + first  # eos itself is not appended
    assert torch.equal(stopped, free[:, : 4 + first])


def test_seeded_generation_gives_exact_tokens(model):
    idx = torch.tensor([[1, 2, 3]])
    a = generate(model, idx, 8, temperature=1.0, top_k=5, generator=make_generator(123))
    b = generate(model, idx, 8, temperature=1.0, top_k=5, generator=make_generator(123))
    assert torch.equal(a, b)
    assert a[0, :3].tolist() == [1, 2, 3]


def test_bad_prompt_and_temperature_are_clear_errors(tiny_config):
    model = GPTModel(tiny_config).eval()
    with pytest.raises(ValueError, match="prompt is empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    for temperature in (float("nan"), float("inf"), -0.5):
        with pytest.raises(ValueError, match="temperature must be a finite number"):
            generate(model, torch.tensor([[1, 2]]), 3, temperature=temperature)


def test_tiny_temperature_samples_the_argmax_without_nan():
    logits = torch.tensor([[1.0, 3.0, 2.0, 3.0 - 1e-3]])
    draws = {int(sample_next(logits, temperature=1e-40, generator=torch.Generator().manual_seed(s))) for s in range(20)}
    assert draws == {1}
    negative = torch.tensor([[-5.0, -1.0, -3.0]])
    assert int(sample_next(negative, temperature=1e-40, generator=torch.Generator().manual_seed(0))) == 1
    huge = sample_next(
        torch.tensor([[1.0, 2.0, 3.0]]), temperature=1e308, top_k=2, generator=torch.Generator().manual_seed(0)
    )
    assert int(huge) in (1, 2)  # uniform over the top 2, no NaN from -inf / inf
