"""gptcore.LLM, the one-object API: the tokens gptcore.generate gives, chats rendered as the server renders
them, streams that join to the generated text without splitting a character, and one clear error for a bad
option."""

from __future__ import annotations

import dataclasses
import logging
import threading
import time

import pytest
import torch

import gptcore
from gptcore.cli import main as cli_main
from gptcore.config import GPTConfig
from gptcore.download import sha256_of
from gptcore.errors import ConfigError, GptcoreError
from gptcore.inference.decoding import generate
from gptcore.inference.sampling import SamplingOptions
from gptcore.llm import LLM
from gptcore.model import GPTModel
from gptcore.prompt import render_chat
from gptcore.tokenizer import EOT_ID, encode_text
from gptcore.training.adapter_file import save_adapter
from gptcore.training.lora import LoRAConfig, LoRALinear, adapter_state_dict, apply_lora
from gptcore.weights import save_model

PROMPT = "Every effort moves you"
CONTEXT = 64
CHAT = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Name a primary color."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "And another?"},
]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(123)
    config = GPTConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("llm") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


@pytest.fixture(scope="module")
def llm(model_path, mirror_dir):
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    return LLM.load(model_path, device="cpu")


def test_the_package_exports_it_lazily(llm):
    assert gptcore.LLM is LLM and "LLM" in gptcore.__all__
    assert llm.precision == "fp32" and not llm.model.training and "context 64" in repr(llm)


@pytest.mark.parametrize(
    "options",
    [
        {},  # greedy, 50 new tokens
        {"temperature": 0.9, "top_k": 40, "top_p": 0.9, "min_p": 0.01, "seed": 7, "max_new_tokens": 30},
        {"temperature": 1.2, "typical_p": 0.8, "repeat_penalty": 1.3, "presence_penalty": 0.5, "seed": 3},
        {"frequency_penalty": 0.7, "repeat_last_n": -1, "logit_bias": {11: 5.0, 13: -100.0}, "max_new_tokens": 90},
    ],
    ids=["greedy", "nucleus", "typical-penalties", "bias-sliding-window"],
)
def test_tokens_equal_gptcore_generate(llm, tokenizer, options, capsys, model_path):
    """Bitwise the tokens gptcore.generate appends for the same options (90 new tokens slide the window
    past the 64-token context), and the text of those tokens is generate()'s."""
    ids = llm.encode(PROMPT)
    assert ids == encode_text(tokenizer, PROMPT)
    new = llm.generate_ids(ids, **options)
    sampling = SamplingOptions(**{k: v for k, v in options.items() if k != "max_new_tokens"})
    out = generate(llm.model, torch.tensor([ids]), options.get("max_new_tokens", 50), eos_id=EOT_ID, sampling=sampling)
    assert new == out[0, len(ids) :].tolist() and len(new) > 0
    assert llm.generate(PROMPT, **options) == tokenizer.decode(new)
    assert llm.generate_ids(ids, **options) == new  # a seed makes a call repeatable
    if "logit_bias" not in options:  # the CLI: same loading, same tokens
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
        capsys.readouterr()
        assert cli_main(["generate", "--model", str(model_path), "--prompt", PROMPT, "--device", "cpu", *flags]) == 0
        assert capsys.readouterr().out == PROMPT + llm.generate(PROMPT, **options) + "\n"


def test_stream_joins_to_generate_and_prints_whole_characters_only(llm, tokenizer):
    """Forced to draw the two tokens of 你 (b'\\xe4\\xbd', b'\\xa0') at random, the stream never shows half of
    it: joined, the pieces are generate()'s text, in which 你 appears whole."""
    first, second = tokenizer.encode("你")
    options = {"temperature": 1.0, "top_k": 2, "logit_bias": {first: 100.0, second: 100.0}, "seed": 5}
    pieces = list(llm.stream(PROMPT, **options, max_new_tokens=40))
    text = llm.generate(PROMPT, **options, max_new_tokens=40)
    assert "".join(pieces) == text and "你" in text
    assert len(pieces) < 40  # tokens that end in the middle of a character release nothing
    greedy = llm.generate(PROMPT, max_new_tokens=30)
    assert len(greedy) > 20
    stop = greedy[10:14]
    assert llm.generate(PROMPT, max_new_tokens=30, stop=stop) == greedy[: greedy.index(stop)]
    assert "".join(llm.stream(PROMPT, max_new_tokens=30, stop=[stop, "\x00never"])) == greedy[: greedy.index(stop)]


def test_chat_renders_as_the_server_and_answers_as_it(llm, tokenizer, model_path):
    """The prompt is the chat template's (gptcore.prompt.render_chat, the server's), and a real server
    given the same messages replies with the same greedy text."""
    import ollama

    from gptcore.serve import Server

    assert llm.encode(CHAT) == encode_text(tokenizer, render_chat(CHAT))
    developer = [{"role": "developer", "content": [{"type": "text", "text": "You answer in one word."}]}, *CHAT[1:]]
    assert llm.encode(developer) == llm.encode(CHAT)  # OpenAI's developer role and text parts, as /v1 reads them
    server = Server(model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True).start()
    try:
        with ollama.Client(host=server.url, timeout=60) as client:
            reply = client.chat(model="tiny", messages=CHAT, options={"temperature": 0, "num_predict": 12})
    finally:
        server.close()
    assert reply.prompt_eval_count == len(llm.encode(CHAT))
    assert llm.chat(CHAT, max_new_tokens=12) == reply.message.content
    assert "".join(llm.stream(CHAT, max_new_tokens=12)) == reply.message.content


def test_the_oldest_turns_are_left_out_when_the_chat_does_not_fit(llm, caplog, monkeypatch):
    monkeypatch.setattr(logging.getLogger("gptcore"), "propagate", True)  # an entry point may have turned it off
    turns = []
    for i in range(6):
        turns += [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Answer {i}."}]
    chat = [{"role": "system", "content": "Be brief."}, *turns, {"role": "user", "content": "Last one?"}]
    kept, dropped = llm.fit_chat(chat, max_new_tokens=20)
    assert dropped > 0 and kept[0] == chat[0] and kept[1:] == chat[1 + 2 * dropped :]
    assert len(llm.encode(kept)) <= CONTEXT - 20 < len(llm.encode([chat[0], *chat[2 * dropped - 1 :]]))
    assert llm.fit_chat(chat[:2], max_new_tokens=20) == (chat[:2], 0)
    with caplog.at_level("WARNING", logger="gptcore.llm"):
        assert llm.chat(chat, max_new_tokens=20) == llm.chat(kept, max_new_tokens=20)
    assert f"left out the oldest {dropped} turn(s)" in caplog.text


def test_closing_a_stream_stops_decoding(llm):
    stream = llm.stream(PROMPT, max_new_tokens=10**6, logit_bias={EOT_ID: -100.0})
    assert next(stream) and next(stream)
    stream.close()  # or dropped: decoding stops after its current token
    deadline = time.monotonic() + 10
    while any(t.name == "gptcore-llm" for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.name == "gptcore-llm" for t in threading.enumerate())


@pytest.mark.parametrize(
    "options, message",
    [
        ({"temprature": 0.7}, "unknown option 'temprature'; the options are: temperature, top_k"),
        ({"num_predict": 5}, "unknown option 'num_predict'"),
        ({"top_p": 1.5}, "top_p must be <= 1.0, got 1.5"),
        ({"temperature": -1}, "temperature must be a finite number >= 0, got -1"),
        ({"top_k": 0}, "top_k must be positive, got 0"),
        ({"repeat_penalty": 0}, "repeat_penalty must be > 0.0, got 0"),
        ({"seed": "7"}, "seed must be an integer, got '7'"),
        ({"max_new_tokens": -1}, "max_new_tokens must be an integer >= 0, got -1"),
        ({"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 0, got 2.5"),
        ({"stop": 5}, "stop must be a string or a list of at most 16 strings"),
        ({"logit_bias": {50257: 1.0}}, "logit_bias: token ids are integers from 0 to 50256, got 50257"),
        ({"logit_bias": {"11": 1.0}}, "logit_bias: token ids are integers >= 0, got '11'"),
        ({"logit_bias": [11]}, "logit_bias must be a dict of token id -> bias, got list"),
        ({"stop": 0}, "stop must be a string or a list of at most 16 strings, got 0"),
    ],
)
def test_a_bad_option_is_one_clear_error(llm, options, message):
    for call in (
        lambda: llm.generate(PROMPT, **options),
        lambda: llm.chat(CHAT, **options),
        lambda: llm.stream(PROMPT, **options),  # at the call, before anything is read
    ):
        with pytest.raises(ValueError) as err:
            call()
        assert message in str(err.value) and "\n" not in str(err.value)


def test_bad_prompts_messages_and_loads_are_one_clear_error(llm, model_path, tmp_path):
    cases = [
        (lambda: llm.generate(""), ValueError, "the prompt is empty"),
        (lambda: llm.generate(CHAT), ValueError, "generate: expected a text, got list (chat() takes messages)"),
        (lambda: llm.chat([]), ValueError, "messages: expected a non-empty list"),
        (lambda: llm.chat("hi"), ValueError, "messages: expected a non-empty list"),
        (
            lambda: llm.chat([{"role": "wizard", "content": "x"}]),
            ValueError,
            "messages[0].role: expected one of system",
        ),
        (lambda: llm.chat([{"role": "user", "content": 3}]), ValueError, "messages[0].content: expected a string"),
        (lambda: llm.generate_ids([1, 2], stop="x"), ValueError, "unknown option 'stop'"),
        (lambda: LLM.load(model_path, precision="fp64"), ConfigError, "fp64"),
        (lambda: LLM.load(model_path, quantize="int4"), ValueError, "quantize: expected one of none, int8"),
        (lambda: LLM.load(tmp_path / "missing.safetensors"), GptcoreError, "missing.safetensors"),
    ]
    classifier = tmp_path / "classifier.safetensors"
    save_model(
        GPTModel(GPTConfig(vocab_size=50257, context_length=8, emb_dim=8, n_heads=2, n_layers=1, num_classes=2)),
        classifier,
    )
    cases.append((lambda: LLM.load(classifier), GptcoreError, "is a classifier; use `gptcore classify`"))
    for call, kind, message in cases:
        with pytest.raises(kind) as err:
            call()
        assert message in str(err.value), str(err.value)


def test_an_adapter_is_applied_as_generate_applies_it(model_path, tmp_path, capsys):
    model = gptcore.load_model(model_path)
    apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(generator=torch.Generator().manual_seed(1))
    adapter = tmp_path / "adapter.safetensors"
    save_adapter(adapter, adapter_state_dict(model), LoRAConfig(rank=2, alpha=4.0), sha256_of(model_path))
    tuned = LLM.load(model_path, adapter=adapter, device="cpu").generate(PROMPT, max_new_tokens=20)
    capsys.readouterr()
    flags = ["--adapter", str(adapter), "--prompt", PROMPT, "--max-new-tokens", "20", "--device", "cpu"]
    assert cli_main(["generate", "--model", str(model_path), *flags]) == 0
    assert capsys.readouterr().out == PROMPT + tuned + "\n"
    assert tuned != LLM.load(model_path, device="cpu").generate(PROMPT, max_new_tokens=20)


def test_the_readme_example_runs(model_path, capsys):
    """The README's first code block, on the tiny model: each of its three calls prints."""
    from tests.conftest import REPO

    code = (REPO / "README.md").read_text(encoding="utf-8").split("```python\n", 1)[1].split("```", 1)[0]
    assert "gptcore.LLM.load(" in code
    exec(code.replace("models/instruct/model.safetensors", str(model_path)), {})
    printed = capsys.readouterr().out
    assert printed.count("\n") >= 2 and len(printed) > 20


def test_an_llm_of_a_model_in_memory(tiny_config, tokenizer):
    model = GPTModel(dataclasses.replace(tiny_config, context_length=32))
    llm = LLM(model, tokenizer)
    ids = llm.encode("Hello")
    assert (
        llm.generate_ids(ids, max_new_tokens=5)
        == generate(model, torch.tensor([ids]), 5, eos_id=EOT_ID)[0, len(ids) :].tolist()
    )
