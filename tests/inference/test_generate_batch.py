"""Batched generation: left-padded rows give exactly the tokens each prompt gets alone."""

from __future__ import annotations

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference.decoding import generate, generate_batch
from gptcore.model import GPTModel


def make_model(dtype=torch.float64, context_length=24, seed=0) -> GPTModel:
    # float64: batched and sequential paths round differently, and a near tie between two logits
    # must not flip a greedy choice; in float64 the differences are far below any real margin.
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=60, context_length=context_length, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    return GPTModel(config).to(dtype).eval()


def random_prompts(lengths, vocab=60, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=gen).tolist() for n in lengths]


def one_at_a_time(model, prompt, max_new_tokens, eos_id=None):
    out = generate(model, torch.tensor([prompt]), max_new_tokens, eos_id=eos_id)
    return out[0, len(prompt) :].tolist()  # generate returns the whole prompt, then the new tokens


@pytest.mark.parametrize("max_new_tokens", [1, 10, 30])  # 30: rows outgrow the 24-token context and slide
def test_batched_equals_sequential_greedy(max_new_tokens):
    model = make_model()
    # Very different lengths, the longest beyond the context (cropped to its last 24 tokens).
    prompts = random_prompts([1, 2, 5, 17, 23, 24, 40])
    batched = generate_batch(model, prompts, max_new_tokens)
    for prompt, tokens in zip(prompts, batched):
        assert tokens == one_at_a_time(model, prompt, max_new_tokens)
        assert tokens == generate_batch(model, [prompt], max_new_tokens)[0]
        assert len(tokens) == max_new_tokens


def test_rows_stop_at_end_of_text_and_match_sequential():
    model = make_model(seed=3)
    prompts = random_prompts([3, 9, 1, 15, 6, 20], seed=4)
    plain = generate_batch(model, prompts, 20)
    # Pick as end-of-text a token that some rows produce early and others late or never.
    counts = torch.bincount(torch.tensor([t for row in plain for t in row]), minlength=60)
    for eos in counts.argsort(descending=True)[:3].tolist():
        batched = generate_batch(model, prompts, 20, eos_id=eos)
        lengths = []
        for prompt, tokens, full in zip(prompts, batched, plain):
            assert tokens == one_at_a_time(model, prompt, 20, eos_id=eos)
            assert eos not in tokens
            cut = full.index(eos) if eos in full else len(full)
            assert tokens == full[:cut]  # the same tokens, up to (not including) end-of-text
            lengths.append(len(tokens))
        assert len(set(lengths)) > 1  # rows really stopped at different steps


def test_batched_equals_sequential_in_float32(tiny_config):
    torch.manual_seed(5)
    model = GPTModel(tiny_config).eval()
    prompts = random_prompts([4, 31, 12, 1, 50], vocab=tiny_config.vocab_size, seed=6)
    batched = generate_batch(model, prompts, 12, eos_id=50256)
    for prompt, tokens in zip(prompts, batched):
        assert tokens == one_at_a_time(model, prompt, 12, eos_id=50256)


def test_batch_stops_when_every_row_is_done():
    model = make_model()
    with torch.no_grad():
        model.out_head.weight.zero_()  # every logit 0: greedy picks token 0 at once for every row
    calls = []
    model.out_head.register_forward_hook(lambda *args: calls.append(1))  # once per decoding step
    out = generate_batch(model, random_prompts([2, 7, 4]), 50, eos_id=0)
    assert out == [[], [], []] and len(calls) == 1


def test_sampling_is_reproducible_with_a_seeded_generator():
    model = make_model(torch.float32)
    prompts = random_prompts([3, 8, 5])
    runs = [
        generate_batch(model, prompts, 8, temperature=1.0, top_k=5, generator=torch.Generator().manual_seed(9))
        for _ in range(2)
    ]
    assert runs[0] == runs[1] and all(len(r) == 8 for r in runs[0])
    assert runs[0] != generate_batch(model, prompts, 8)


def test_edge_cases():
    model = make_model()
    assert generate_batch(model, [], 5) == []
    assert generate_batch(model, [[1, 2], [3]], 0) == [[], []]
    with pytest.raises(ValueError, match="at least one token"):
        generate_batch(model, [[1], []], 5)
