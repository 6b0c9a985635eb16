"""Batch-invariant decoding: a request's tokens and log-probabilities are bitwise the same whether the engine
decodes it alone or beside 7 others (joining together or one after another), in fp32, bf16-true and int8
(16-bit and int8 weights where gemv.c has a vector path for them: elsewhere torch's kernels decode them)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference import kernels
from gptcore.inference.decoding import cast_for_inference
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.serve.engine import Engine
from gptcore.serve.jobs import Done, Job, Sampling

CONFIG = GPTConfig(vocab_size=50257, context_length=96, emb_dim=128, n_heads=4, n_layers=2, qkv_bias=True)


def _run(engine: Engine, prompts: list[list[int]], stagger: float, options: SamplingOptions) -> list[tuple]:
    dones: dict[int, Done] = {}
    finished = threading.Event()

    def sink_for(i):
        def sink(event):
            if isinstance(event, Done):
                dones[i] = event
                if len(dones) == len(prompts):
                    finished.set()

        return sink

    for i, ids in enumerate(prompts):
        engine.submit(Job(ids, 16, Sampling(options), sink_for(i), logprobs=2))
        time.sleep(stagger)
    assert finished.wait(600)
    return [
        (dones[i].new_ids, [(t.logprob, [a.logprob for a in t.top]) for t in dones[i].logprobs])
        for i in range(len(prompts))
    ]


@pytest.mark.skipif(kernels.load_kernels() is None, reason="needs the C kernels (a C compiler)")
@pytest.mark.parametrize(
    "precision, quantize", [("fp32", "none"), ("bf16-true", "none"), ("bf16-true", "int8"), ("fp32", "int8")]
)
def test_eight_requests_decode_as_each_alone(precision, quantize):
    if (precision == "bf16-true" and not kernels.fast_bf16()) or (quantize == "int8" and not kernels.fast_int8()):
        pytest.skip("no vector kernel for these weights here: torch's kernels decode them")

    def load():
        torch.manual_seed(0)
        return cast_for_inference(GPTModel(CONFIG).eval(), precision, quantize)

    engine = Engine(load, tokenizer=__import__("gptcore.tokenizer").tokenizer.get_tokenizer(), max_batch=16)
    engine.start()
    try:
        gen = torch.Generator().manual_seed(1)
        lengths = torch.randint(3, 40, (8,), generator=gen).tolist()
        prompts = [torch.randint(0, 50000, (n,), generator=gen).tolist() for n in lengths]
        for options in (SamplingOptions(), SamplingOptions(temperature=0.9, top_p=0.9, repeat_penalty=1.2, seed=5)):
            alone = [_run(engine, [p], 0, options)[0] for p in prompts]
            assert _run(engine, prompts, 0, options) == alone  # tokens and log-probabilities, bit for bit
            assert _run(engine, prompts, 0.003, options) == alone  # joining a running batch at other steps
    finally:
        engine.stop()
