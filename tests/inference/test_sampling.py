"""The sampler (gptcore/inference/sampling.py) on hand-written logits: each option, their order and their
combination, the checks made up front; and seeded sampling with every option equal between
gptcore.generate and generate_batch, row by row."""

import math

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference.decoding import generate, generate_batch
from gptcore.inference.sampling import ORDER, RowSampler, SamplingOptions, process
from gptcore.model import GPTModel

INF = float("-inf")


def kept(logits, history=(), **options) -> list[int]:
    """The token ids the chain keeps (finite logits after steps 1-6)."""
    out = process(torch.tensor(logits), SamplingOptions(**options), history)
    return torch.isfinite(out).nonzero()[:, 0].tolist()


def test_the_order_is_llama_cpps():
    assert ORDER == ("logit_bias", "penalties", "top_k", "typical_p", "top_p", "min_p", "temperature", "draw")


def test_logit_bias_adds_to_the_listed_tokens():
    logits = torch.tensor([1.0, 3.0, 2.0])
    assert process(logits, SamplingOptions(logit_bias={1: -100.0, 2: 0.5})).tolist() == [1.0, -97.0, 2.5]
    assert RowSampler(SamplingOptions(logit_bias={1: -100.0})).sample(logits) == 2  # greedy: the ban moves it
    assert RowSampler(SamplingOptions(logit_bias={0: 100.0})).sample(logits) == 0
    with pytest.raises(ValueError, match="outside the vocabulary"):
        process(logits, SamplingOptions(logit_bias={3: 1.0}))


def test_penalties_follow_llama_cpp():
    logits = torch.tensor([2.0, -2.0, 1.0, 0.5])
    history = [0, 1, 0, 3]  # token 0 twice, 1 and 3 once, 2 never
    out = process(logits, SamplingOptions(repeat_penalty=2.0), history).tolist()
    assert out == [1.0, -4.0, 1.0, 0.25]  # positive logits divided, negative ones multiplied
    out = process(logits, SamplingOptions(frequency_penalty=0.5, presence_penalty=0.25), history).tolist()
    assert out == [2.0 - 1.0 - 0.25, -2.0 - 0.5 - 0.25, 1.0, 0.5 - 0.5 - 0.25]
    # only the last repeat_last_n tokens count; 0 turns the penalties off, -1 looks at everything
    assert process(logits, SamplingOptions(repeat_penalty=2.0, repeat_last_n=1), history).tolist() == [
        2.0,
        -2.0,
        1.0,
        0.25,
    ]
    assert process(logits, SamplingOptions(repeat_penalty=2.0, repeat_last_n=0), history).tolist() == logits.tolist()
    assert process(logits, SamplingOptions(repeat_penalty=2.0, repeat_last_n=-1), history)[1] == -4.0


def test_top_k_top_p_min_p_typical_p():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    assert kept(logits, top_k=2) == [0, 1]
    assert kept(logits, top_p=0.8) == [0, 1]  # 0.5 + 0.3 reaches 0.8
    assert kept(logits, top_p=0.81) == [0, 1, 2]
    assert kept(logits, top_p=1e-4) == [0] and kept(logits, top_p=0.0) == [0]
    assert kept(logits, min_p=0.3) == [0, 1, 2]  # at least 0.15 = 0.3 x 0.5
    assert kept(logits, min_p=0.99) == [0]
    # entropy 1.15 nats; surprises 0.69, 1.20, 1.90, 3.00: typicality order 1, 0, 2, 3
    assert kept(logits, typical_p=0.2) == [1]
    assert kept(logits, typical_p=0.5) == [0, 1]
    # probabilities of later steps are over what earlier steps kept: top-k 2 leaves 0.625 / 0.375
    assert kept(logits, top_k=2, top_p=0.6) == [0]
    assert kept(logits, top_k=3, min_p=0.5) == [0, 1]


def test_temperature_is_applied_after_the_filters():
    logits = [math.log(p) for p in (0.5, 0.3, 0.15, 0.05)]
    draws = {
        RowSampler(SamplingOptions(temperature=50.0, top_p=0.8, seed=s)).sample(torch.tensor(logits)) for s in range(60)
    }
    assert draws == {0, 1}  # a hot temperature spreads only over what top-p kept


def test_combination_on_hand_written_logits():
    logits = torch.tensor([3.0, 2.5, 1.0, 0.0, -1.0])
    options = SamplingOptions(temperature=0.0, logit_bias={4: 5.0}, repeat_penalty=2.0, top_k=3)
    # bias: token 4 -> 4.0; penalty on the history's 4 and 0: 2.0 and 1.5; top-3: 2.5, 2.0, 1.5
    assert process(logits, options, [4, 0]).tolist() == [1.5, 2.5, INF, INF, 2.0]
    assert RowSampler(options).sample(logits, [4, 0]) == 1


def test_options_are_checked_up_front_each_error_naming_it():
    for bad, name in (
        ({"temperature": -1}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"min_p": -0.1}, "min_p"),
        ({"typical_p": float("nan")}, "typical_p"),
        ({"repeat_penalty": 0.0}, "repeat_penalty"),
        ({"repeat_last_n": -2}, "repeat_last_n"),
        ({"presence_penalty": float("inf")}, "presence_penalty"),
        ({"frequency_penalty": "a"}, "frequency_penalty"),
        ({"logit_bias": {-1: 1.0}}, "logit_bias"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
        ({"seed": 1.5}, "seed"),
    ):
        with pytest.raises(ValueError, match=name):
            SamplingOptions(**bad)


def test_a_seed_repeats_and_rows_keep_their_own_generators():
    logits = torch.randn(50, generator=torch.Generator().manual_seed(0))
    options = SamplingOptions(temperature=1.0, top_p=0.9, seed=7)
    a, b = RowSampler(options), RowSampler(options)
    assert [a.sample(logits) for _ in range(10)] == [b.sample(logits) for _ in range(10)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(5)
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    return GPTModel(config).eval()


EVERY_OPTION = [
    {"temperature": 0.0},
    {"temperature": 1.0, "top_k": 20},
    {"temperature": 1.0, "top_p": 0.7},
    {"temperature": 1.0, "min_p": 0.2},
    {"temperature": 1.0, "typical_p": 0.6},
    {"temperature": 0.0, "repeat_penalty": 1.8, "repeat_last_n": 8},
    {"temperature": 0.9, "presence_penalty": 1.5, "frequency_penalty": 0.5},
    {"temperature": 0.7, "logit_bias": {7: 3.0, 8: -100.0}},
    {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.05, "repeat_penalty": 1.1, "typical_p": 0.95},
]


@pytest.mark.parametrize("options", EVERY_OPTION)
def test_generate_and_generate_batch_sample_the_same_tokens(model, options):
    prompts = [[1, 2, 3, 4, 5], [9, 8], [20, 21, 22]]
    rows = [SamplingOptions(**options, seed=100 + i) for i in range(len(prompts))]
    alone = [generate(model, torch.tensor([p]), 12, sampling=o)[0, len(p) :].tolist() for p, o in zip(prompts, rows)]
    assert generate_batch(model, prompts, 12, sampling=rows) == alone
    if "logit_bias" in options:
        assert all(8 not in tokens for tokens in alone)


def test_repetition_penalty_stops_greedy_repeats():
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    small = GPTModel(config).eval()
    prompt = torch.tensor([[3, 4, 5]])
    greedy = generate(small, prompt, 24)[0, 3:].tolist()
    assert len(set(greedy)) <= 18  # greedy decoding comes back to tokens it wrote
    penalized = generate(small, prompt, 24, sampling=SamplingOptions(repeat_penalty=3.0, repeat_last_n=-1))[0, 3:]
    assert len(set(penalized.tolist())) == 24  # not one token twice


def test_sampling_beside_temperature_is_an_error(model):
    with pytest.raises(ValueError, match="inside sampling"):
        generate(model, torch.tensor([[1]]), 2, temperature=1.0, sampling=SamplingOptions())
