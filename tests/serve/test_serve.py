"""`gptcore serve` against a real uvicorn server on 127.0.0.1, driven by the official ollama and openai
clients, raw HTTP, and gptcore's own judge; plus the engine's batching and the text pieces on their own."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading
import time

import httpx
import ollama
import openai
import pytest
import requests
import torch

from gptcore import __version__
from gptcore.cli import main as cli_main
from gptcore.config import GPTConfig
from gptcore.download import sha256_of
from gptcore.errors import GptcoreError
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.params.schema import JudgeParams
from gptcore.prompt import RESPONSE_MARKER, format_input
from gptcore.recipes.judge.absolute import judge_responses
from gptcore.serve import Limits, Server
from gptcore.serve.chat import Detokenizer, render_chat, render_generate
from gptcore.serve.engine import Engine
from gptcore.serve.jobs import Done, Job, Sampling, budget
from gptcore.serve.models_routes import OLLAMA_API_VERSION
from gptcore.weights import save_model

PROMPT = "Every effort moves you"
CONTEXT = 64
GREEDY = {"temperature": 0, "num_predict": 20}


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(123)
    config = GPTConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


@pytest.fixture(scope="module")
def server(model_path, mirror_dir):
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    s = Server(
        model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True, origins=["https://example.org"]
    ).start()
    yield s
    s.close()


@pytest.fixture(scope="module")
def url(server):
    return server.url


@pytest.fixture
def client(url):
    with ollama.Client(host=url, timeout=60) as c:
        yield c


@pytest.fixture
def oai(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


def cli_generate(capsys, model_path, prompt, *extra) -> str:
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model_path), "--prompt", prompt, "--device", "cpu", *extra]) == 0
    return capsys.readouterr().out


# -- Ollama API through the official client ---------------------------------------------------------------
def test_metadata_endpoints(client, url, model_path):
    assert requests.get(url + "/").text == "Ollama is running"
    assert requests.get(url + "/api/version").json()["gptcore_version"] == __version__
    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.digest == sha256_of(model_path)
    assert listed.size == model_path.stat().st_size and listed.details.family == "gpt2"
    shown = client.show("tiny")
    assert shown.modelinfo["gpt2.context_length"] == CONTEXT and shown.modelinfo["gpt2.block_count"] == 2
    assert client.show("tiny:latest").modelinfo == shown.modelinfo
    assert client.ps().models[0].model == "tiny:latest"
    assert client.pull("tiny").status == "success"
    with pytest.raises(ollama.ResponseError) as err:
        client.pull("llama3.1:8b")
    assert err.value.status_code == 404


def test_greedy_generate_equals_gptcore_generate(client, capsys, model_path):
    expected = cli_generate(capsys, model_path, PROMPT, "--max-new-tokens", "20")
    reply = client.generate(model="tiny", prompt=PROMPT, stream=False, options=GREEDY)
    assert PROMPT + reply.response + "\n" == expected
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == "tiny"
    assert reply.prompt_eval_count == 4 and 1 <= reply.eval_count <= 20
    assert reply.total_duration > 0 and len(reply.context) == 4 + reply.eval_count
    chunks = list(client.generate(model="tiny", prompt=PROMPT, stream=True, options=GREEDY))
    assert "".join(c.response for c in chunks) == reply.response
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) >= 3 and chunks[-1].context == reply.context
    # raw replies carry no context, as Ollama's; a continuation with context equals one long prompt
    assert client.generate(model="tiny", prompt=PROMPT, raw=True, options=GREEDY).context is None
    first = client.generate(model="tiny", prompt=PROMPT, options={"temperature": 0, "num_predict": 3})
    then = client.generate(model="tiny", prompt="", context=first.context, options={"temperature": 0, "num_predict": 3})
    assert then.done_reason == "load"  # an empty prompt loads, as Ollama does, even with context
    more = client.generate(
        model="tiny", prompt=" and", context=first.context, options={"temperature": 0, "num_predict": 3}
    )
    assert more.prompt_eval_count == len(first.context) + 1


def test_seeded_sampling_equals_gptcore_generate(client, capsys, model_path):
    expected = cli_generate(
        capsys, model_path, PROMPT, "--max-new-tokens", "12", "--temperature", "1.0", "--top-k", "40", "--seed", "7"
    )
    options = {"temperature": 1.0, "top_k": 40.0, "seed": 7, "num_predict": 12.0}  # integers as floats
    reply = client.generate(model="tiny", prompt=PROMPT, options=options)
    assert PROMPT + reply.response + "\n" == expected
    assert client.generate(model="tiny", prompt=PROMPT, options=options).response == reply.response


def test_chat_template_system_and_tool_messages(client):
    messages = [{"role": "user", "content": "Name a color."}]
    reply = client.chat(model="tiny", messages=messages, options=GREEDY)
    assert reply.message.role == "assistant" and reply.done
    prompt = format_input({"instruction": "Name a color.", "input": ""}) + RESPONSE_MARKER
    assert reply.message.content == client.generate(model="tiny", prompt=prompt, options=GREEDY).response
    streamed = list(client.chat(model="tiny", messages=messages, options=GREEDY, stream=True))
    assert "".join(c.message.content for c in streamed) == reply.message.content and streamed[-1].done
    # /api/generate with `system` goes through the same template; `template` substitutes the fields
    by_system = client.generate(model="tiny", prompt="Name a color.", system="Be brief.", options=GREEDY)
    by_chat = client.chat(
        model="tiny", options=GREEDY, messages=[{"role": "system", "content": "Be brief."}, *messages]
    )
    assert by_system.response == by_chat.message.content
    templated = client.generate(model="tiny", prompt="color", template="Q: {{ .Prompt }}\nA:", options=GREEDY)
    assert templated.response == client.generate(model="tiny", prompt="Q: color\nA:", options=GREEDY).response
    history = messages + [
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]},
        {"role": "tool", "content": "blue"},
    ]
    assert client.chat(model="tiny", messages=history, options=GREEDY).done


def test_render_rules():
    assert (
        render_chat([{"role": "user", "content": "Hi"}])
        == format_input({"instruction": "Hi", "input": ""}) + RESPONSE_MARKER
    )
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "A"},
        {"role": "assistant", "content": "B"},
        {"role": "user", "content": "C"},
        {"role": "tool", "content": "D"},
    ]
    assert render_chat(conversation) == (
        "Be brief.\n\n### Instruction:\nA\n\n### Response:\nB\n\n### Instruction:\nC\n\n### Input:\nD\n\n### Response:\n"
    )
    assert render_chat(conversation[:3]).endswith("### Response:\nB")  # continue the assistant's reply
    assert render_generate("x", system="s", raw=True) == "x"
    with pytest.raises(ValueError, match="renders only"):
        render_generate("x", template="{{ if .System }}{{ end }}")


def test_stop_strings_and_num_predict(client):
    full = client.generate(model="tiny", prompt=PROMPT, options=GREEDY).response
    stop = full[6:9]
    assert stop and full.find(stop) >= 1
    cut = client.generate(model="tiny", prompt=PROMPT, options={**GREEDY, "stop": [stop, "never there"]})
    assert cut.response == full[: full.find(stop)] and cut.done_reason == "stop"
    chunks = list(client.generate(model="tiny", prompt=PROMPT, stream=True, options={**GREEDY, "stop": [stop]}))
    assert "".join(c.response for c in chunks) == cut.response
    assert client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 0}).response == ""
    # unbounded and oversized num_predict: bounded by the context, the prompt cut from the left
    for n in (-1, 10_000):
        reply = client.generate(model="tiny", prompt="word " * 200, options={"num_predict": n, "temperature": 0})
        assert reply.prompt_eval_count + reply.eval_count <= CONTEXT and reply.prompt_eval_count == CONTEXT // 2


def test_budget_rule():
    assert budget(10, 20, 64) == (10, 20)
    assert budget(100, 20, 64) == (44, 20)
    assert budget(100, -1, 64) == (32, 32)
    assert budget(10, None, 64) == (10, 54)
    assert budget(100, 1000, 64) == (32, 32)


def test_empty_prompt_load_and_keep_alive_unload(client, server):
    loaded = client.generate(model="tiny", prompt="")
    assert loaded.done and loaded.done_reason == "load"
    unloaded = client.generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    deadline = time.time() + 10
    while client.ps().models and time.time() < deadline:
        time.sleep(0.05)
    assert client.ps().models == []
    again = client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 2})
    assert again.load_duration > 0 and client.ps().models


def test_detokenizer_never_splits_a_character(tokenizer):
    text = "héllo 世界 🙂🙂 naïve — ok"
    ids = tokenizer.encode(text)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold partial characters
    detok = Detokenizer(tokenizer)
    pieces = [detok.push(i) for i in ids] + [detok.finish()]
    assert all("\ufffd" not in p for p in pieces) and "".join(pieces) == text
    detok = Detokenizer(tokenizer, stops=["界 🙂"])
    pieces = [detok.push(i) for i in ids] + [detok.finish()]
    assert "".join(pieces) == "héllo 世" and detok.stopped


def test_user_text_never_spells_a_control_token(client):
    """`<|endoftext|>` typed by a user is ordinary text: 7 tokens, not the end-of-text id."""
    reply = client.generate(model="tiny", prompt="<|endoftext|>", options={"num_predict": 1})
    assert reply.prompt_eval_count > 1 and 50256 not in reply.context[: reply.prompt_eval_count]


def test_structured_output_parses(client, oai):
    schema = {
        "type": "object",
        "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
        "required": ["score"],
    }
    for fmt in ("json", schema):
        for seed in (1, 2):
            reply = client.generate(
                model="tiny", prompt=PROMPT, format=fmt, options={"seed": seed, "temperature": 1.0, "num_predict": 12}
            )
            value = json.loads(reply.response)
            assert isinstance(value, dict)
            if fmt is schema:
                assert isinstance(value["score"], int) and 0 <= value["score"] <= 100
    chat = client.chat(
        model="tiny",
        messages=[{"role": "user", "content": "Score it."}],
        format=schema,
        options={"temperature": 0, "num_predict": 8},
    )
    assert set(json.loads(chat.message.content)) == {"score"}
    completion = oai.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Score it."}],
        max_tokens=10,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
    )
    assert isinstance(json.loads(completion.choices[0].message.content)["score"], int)
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="x", format={"type": "no-such-type"})
    assert err.value.status_code == 400 and "format" in err.value.error


def test_embeddings(client, oai):
    result = client.embed(model="tiny", input=["first text", "second, longer text"])
    assert len(result.embeddings) == 2 and len(result.embeddings[0]) == 32
    assert all(abs(sum(x * x for x in v) - 1) < 1e-4 for v in result.embeddings)  # unit length
    assert result.prompt_eval_count == 2 + 4
    single = client.embed(model="tiny", input="first text").embeddings[0]
    assert single == pytest.approx(result.embeddings[0], abs=1e-5)
    legacy = client.embeddings(model="tiny", prompt="first text").embedding
    assert len(legacy) == 32
    long = "word " * 500
    assert len(client.embed(model="tiny", input=long).embeddings[0]) == 32
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny", input=long, truncate=False)
    assert err.value.status_code == 400 and "context length" in err.value.error
    vectors = oai.embeddings.create(model="tiny", input=["first text", "x"])
    assert (
        vectors.data[0].embedding == pytest.approx(result.embeddings[0], abs=1e-5) and vectors.usage.prompt_tokens == 3
    )


def test_embedding_dimensions(client, oai):
    """`dimensions` keeps the first components and normalises them again, as Ollama (LangChain's
    OllamaEmbeddings, LiteLLM and the openai client send it); more than the width keeps them all."""
    full = client.embed(model="tiny", input="first text").embeddings[0]
    cut = [x / sum(y * y for y in full[:8]) ** 0.5 for x in full[:8]]
    assert client.embed(model="tiny", input="first text", dimensions=8).embeddings[0] == pytest.approx(cut, abs=1e-5)
    assert oai.embeddings.create(model="tiny", input="first text", dimensions=8).data[0].embedding == pytest.approx(
        cut, abs=1e-5
    )
    assert client.embed(model="tiny", input="first text", dimensions=1000).embeddings[0] == pytest.approx(
        full, abs=1e-6
    )
    assert client.embed(model="tiny", input="first text", dimensions=0).embeddings[0] == pytest.approx(full, abs=1e-6)
    with pytest.raises(ollama.ResponseError) as err:
        client.embed(model="tiny", input="first text", dimensions=-1)
    assert err.value.status_code == 400 and "dimensions" in err.value.error
    with pytest.raises(openai.BadRequestError, match="dimensions"):
        oai.embeddings.create(model="tiny", input="first text", dimensions=-1)


# -- OpenAI API through the official client ---------------------------------------------------------------
def test_openai_chat_completions_and_models(oai, client):
    assert [m.id for m in oai.models.list().data] == ["tiny:latest"]
    assert oai.models.retrieve("tiny").id == "tiny:latest"
    messages = [{"role": "user", "content": "Name a color."}]
    reply = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=20, temperature=0, seed=1, top_p=0.9
    )
    expected = client.chat(model="tiny", messages=messages, options=GREEDY).message.content
    assert reply.choices[0].message.content == expected and reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 20
    stream = oai.chat.completions.create(
        model="tiny",
        messages=messages,
        max_tokens=20,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == expected
    assert chunks[-1].usage.completion_tokens == reply.usage.completion_tokens
    text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=20, temperature=0, stop=["\n\n\n"])
    assert (
        text.choices[0].text
        == client.generate(model="tiny", prompt=PROMPT, options={**GREEDY, "stop": ["\n\n\n"]}).response
    )
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4o", messages=messages)
    with pytest.raises(openai.BadRequestError) as err:
        oai.chat.completions.create(model="tiny", messages=messages, n=2)
    assert "n=1" in err.value.body["message"]


def test_logprobs_are_the_models_own(client, oai, url, model_path):
    """logprobs / top_logprobs (ollama, openai, LangChain's ChatOllama send them) are each generated token's
    log-softmax of the raw logits, whatever the temperature, with the best alternatives; a stop string's
    tokens that were cut off are not reported."""
    from gptcore.weights import load_model

    model = load_model(model_path, device="cpu")
    reply = client.generate(
        model="tiny",
        prompt=PROMPT,
        logprobs=True,
        top_logprobs=3,
        options={"temperature": 0.7, "seed": 3, "num_predict": 8},
    )
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([reply.context]))[0].float(), dim=-1)  # [T, V]
    new = reply.context[reply.prompt_eval_count :]
    assert len(reply.logprobs) == len(new) == reply.eval_count
    for i, (token, entry) in enumerate(zip(new, reply.logprobs)):
        row = want[reply.prompt_eval_count - 1 + i]
        assert entry.logprob == pytest.approx(float(row[token]), abs=1e-4)
        assert [t.logprob for t in entry.top_logprobs] == pytest.approx(row.topk(3).values.tolist(), abs=1e-4)
    raw = httpx.post(
        url + "/api/generate",
        json={"model": "tiny", "prompt": PROMPT, "stream": False, "logprobs": True, "options": GREEDY},
    ).json()
    assert b"".join(bytes(t["bytes"]) for t in raw["logprobs"]) == raw["response"].encode()
    assert "top_logprobs" not in raw["logprobs"][0]  # none asked for, none sent (as Ollama)
    assert client.generate(model="tiny", prompt=PROMPT, options=GREEDY).logprobs is None
    stop = raw["response"][6:9]
    cut = client.generate(model="tiny", prompt=PROMPT, logprobs=True, options={**GREEDY, "stop": [stop]})
    assert "".join(t.token for t in cut.logprobs).startswith(cut.response) and len(cut.logprobs) < len(raw["logprobs"])
    chunks = list(
        client.chat(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], logprobs=True, stream=True, options=GREEDY
        )
    )
    streamed = [t for c in chunks for t in (c.logprobs or [])]
    assert [t.token for t in streamed] == [
        t.token
        for t in client.chat(
            model="tiny", messages=[{"role": "user", "content": "Hi"}], logprobs=True, options=GREEDY
        ).logprobs
    ]
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt=PROMPT, logprobs=True, top_logprobs=21)
    assert err.value.status_code == 400 and "top_logprobs" in err.value.error

    messages = [{"role": "user", "content": "Name a color."}]
    chat = oai.chat.completions.create(
        model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    ).choices[0]
    assert "".join(t.token for t in chat.logprobs.content) == chat.message.content
    assert all(t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 2 for t in chat.logprobs.content)  # greedy
    chunks = list(
        oai.chat.completions.create(
            model="tiny", messages=messages, max_tokens=6, temperature=0, logprobs=True, stream=True
        )
    )
    assert [t.token for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content] == [
        t.token for t in chat.logprobs.content
    ]
    text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0, logprobs=2).choices[0]
    assert "".join(text.logprobs.tokens) == text.text and len(text.logprobs.top_logprobs[0]) == 2
    first = want[reply.prompt_eval_count - 1]  # the same prompt: the same distribution; greedy takes its best
    assert text.logprobs.text_offset[:2] == [0, len(text.logprobs.tokens[0])]
    assert text.logprobs.token_logprobs[0] == pytest.approx(float(first.max()), abs=1e-4)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oai.chat.completions.create(model="tiny", messages=messages, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        oai.completions.create(model="tiny", prompt=PROMPT, logprobs=6)


def test_completions_echo_and_suffix(oai, client):
    """/v1/completions' echo returns the prompt before the completion (it was ignored); a suffix is refused
    as on /api/generate (no fill-in-the-middle), not ignored."""
    plain = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0).choices[0].text
    echoed = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, echo=True)
    assert echoed.choices[0].text == PROMPT + plain
    stream = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=5, temperature=0, echo=True, stream=True)
    assert "".join(c.choices[0].text for c in stream) == PROMPT + plain
    with pytest.raises(openai.BadRequestError, match="suffix"):
        oai.completions.create(model="tiny", prompt=PROMPT, suffix="!")
    with pytest.raises(openai.BadRequestError, match="echo"):
        oai.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=1)


# -- connections, CORS, Host, limits ------------------------------------------------------------------------
def test_head_then_get_and_delete_then_list_on_one_connection(url, client):
    with httpx.Client(base_url=url) as c:
        for path in ("/", "/api/tags", "/api/version", "/v1/models"):
            head = c.head(path)
            assert head.status_code == 200 and head.content == b""
            assert c.get(path).status_code == 200
    with requests.Session() as s:
        assert s.put(url + "/api/tags", data=b"x" * 5000).status_code == 405
        assert s.get(url + "/api/tags").status_code == 200
    with pytest.raises(ollama.ResponseError):
        client.delete("tiny")
    assert client.list().models[0].model == "tiny:latest"


def test_cors_and_host_checks(url):
    preflight = requests.options(
        url + "/api/chat",
        headers={
            "Origin": "http://localhost:3000",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )
    assert preflight.status_code == 204
    assert preflight.headers["access-control-allow-origin"] == "http://localhost:3000"
    assert (
        requests.get(url + "/api/tags", headers={"Origin": "http://127.0.0.1:8080"}).headers[
            "access-control-allow-origin"
        ]
        == "http://127.0.0.1:8080"
    )
    assert requests.get(url + "/api/tags", headers={"Origin": "https://example.org"}).status_code == 200  # --origins
    evil = requests.post(
        url + "/api/generate", json={"model": "tiny", "prompt": "x"}, headers={"Origin": "https://evil.example"}
    )
    assert evil.status_code == 403 and "origin" in evil.json()["error"]
    rebound = requests.get(url + "/api/tags", headers={"Host": "attacker.example"})
    assert rebound.status_code == 403 and "host" in rebound.json()["error"]
    assert requests.get(url + "/api/tags", headers={"Host": "localhost:11434"}).status_code == 200


BAD_BODIES = [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "invalid prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), 400, "invalid stream"),
    (
        json.dumps({"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}).encode(),
        400,
        "invalid options.temperature",
    ),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"temperature": -1}}).encode(), 400, "temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"top_k": True}}).encode(), 400, "invalid options.top_k"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"top_k": 4.5}}).encode(), 400, "invalid options.top_k"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": "fast"}).encode(), 400, "invalid options"),
    (json.dumps({"model": "tiny", "prompt": "x", "context": [-1]}).encode(), 400, "invalid context"),
    (json.dumps({"model": "tiny", "prompt": "x", "template": "{{ range .Messages }}"}).encode(), 400, "template"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model is required"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model 'nope' not found"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES)
def test_bad_requests_get_ollama_errors(url, body, status, message):
    reply = requests.post(url + "/api/generate", data=body, timeout=30)
    assert reply.status_code == status, reply.text
    assert message in reply.json()["error"]


def test_accepted_like_ollama(url):
    """Unknown top-level fields and options are served and named in a Warning header (test_serve_models.py),
    Ollama's hardware options are accepted; a tiny temperature samples without NaN; a sampling method
    gptcore lacks is a 400 naming it."""
    options = {"num_ctx": 4096, "top_p": 0.9, "num_thread": 2, "use_mmap": True, "mirostat": 0, "temperature": 1e-30}
    body = {"model": "tiny", "prompt": PROMPT, "stream": False, "unknown": 1, "options": {**options, "num_predict": 5}}
    reply = requests.post(url + "/api/generate", json=body, timeout=30)
    assert reply.status_code == 200 and reply.json()["eval_count"] >= 1 and "unknown" in reply.headers["Warning"]
    for extra, name in (
        ({"mirostat": 2}, "options.mirostat"),
        ({"tfs_z": 0.5}, "options.tfs_z"),
    ):
        reply = requests.post(url + "/api/generate", json={**body, "options": {**options, **extra}}, timeout=30)
        assert reply.status_code == 400 and name in reply.json()["error"], reply.text


def test_limits_and_routes(url):
    assert requests.get(url + "/api/nothing").status_code == 404
    assert requests.get(url + "/api/chat").status_code == 405
    huge = b'{"model": "tiny", "prompt": "' + b"x" * (1 << 20) + b'"}'
    reply = requests.post(url + "/api/generate", data=huge, timeout=30)
    assert reply.status_code == 413 and "too large" in reply.json()["error"]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # a length nobody will send
    conn.putrequest("POST", "/api/generate")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    # a long prompt without whitespace, within the limit: tokenised and cut to the context, no 500
    reply = requests.post(
        url + "/api/generate",
        json={"model": "tiny", "prompt": " " * 900_000 + "x", "stream": False, "options": {"num_predict": 1}},
        timeout=60,
    )
    assert reply.status_code == 200 and reply.json()["prompt_eval_count"] <= CONTEXT


# -- concurrency ----------------------------------------------------------------------------------------------
def test_a_client_that_stops_reading_does_not_delay_others(url, client):
    body = {"model": "tiny", "prompt": PROMPT, "options": {"num_predict": -1, "temperature": 1.0}}
    stalled = requests.post(url + "/api/generate", json=body, stream=True, timeout=30)
    assert json.loads(next(stalled.iter_lines()))["done"] is False  # then never read again
    start = time.perf_counter()
    assert client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 5}).eval_count == 5
    assert time.perf_counter() - start < 10
    stalled.close()


def test_a_disconnected_stream_frees_its_slot(url, server):
    with requests.post(
        url + "/api/generate",
        json={"model": "tiny", "prompt": PROMPT, "options": {"num_predict": -1}},
        stream=True,
        timeout=30,
    ) as reply:
        next(reply.iter_lines())
    deadline = time.time() + 10
    while server.engine.active and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.active == 0


def test_concurrent_clients_get_their_single_client_tokens(url):
    prompts = [PROMPT, "Hello", "The quick brown fox jumps", "1 2 3"]
    with ollama.Client(host=url) as c:
        expected = [c.generate(model="tiny", prompt=q, options=GREEDY).response for q in prompts]
        seeded = c.generate(
            model="tiny", prompt=PROMPT, options={"seed": 3, "temperature": 1.0, "num_predict": 20}
        ).response
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with ollama.Client(host=url, timeout=120) as c:
                if i == len(prompts):
                    results[i] = c.generate(
                        model="tiny", prompt=PROMPT, options={"seed": 3, "temperature": 1.0, "num_predict": 20}
                    ).response
                elif i % 2:
                    results[i] = "".join(
                        p.response for p in c.generate(model="tiny", prompt=prompts[i], options=GREEDY, stream=True)
                    )
                else:
                    results[i] = c.generate(model="tiny", prompt=prompts[i], options=GREEDY).response
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(prompts) + 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and [results[i] for i in range(len(prompts))] == expected and results[len(prompts)] == seeded


def test_engine_batches_joining_requests(model_path, tokenizer):
    """Requests that join a running batch at different steps get exactly their tokens alone (greedy fp32)."""
    from gptcore.weights import load_model

    engine = Engine(lambda: load_model(model_path), tokenizer)
    engine.start()
    prompts = [tokenizer.encode(t) for t in (PROMPT, "A", "Hello there, how are", "x y z")]

    def run(batch: list[list[int]], stagger: float) -> list[list[int]]:
        dones: dict[int, Done] = {}
        events = threading.Event()

        def sink_for(i):
            def sink(e):
                if isinstance(e, Done):
                    dones[i] = e
                    if len(dones) == len(batch):
                        events.set()

            return sink

        for i, ids in enumerate(batch):
            engine.submit(Job(ids, 15, Sampling(SamplingOptions()), sink_for(i)))
            time.sleep(stagger)
        assert events.wait(60)
        return [dones[i].new_ids for i in range(len(batch))]

    alone = [run([ids], 0)[0] for ids in prompts]
    assert run(prompts, 0.003) == alone
    assert run(prompts, 0) == alone
    engine.stop()


# -- the judge and the CLI ------------------------------------------------------------------------------------
def test_our_judge_against_our_server(url, server, tmp_path):
    """End to end over real HTTP, with structured output: every reply parses as {"score": n}."""
    entries = [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "6"},
    ]
    responses = tmp_path / "test.json"
    responses.write_text(json.dumps(entries))
    params = JudgeParams(url=url, model="tiny", timeout=60, retries=1, backoff=0.0, structured=True)
    outcome = judge_responses(responses, tmp_path / "scores.jsonl", params, show_progress=False, warn=lambda m: None)
    m = outcome.metrics
    version = f"gptcore {__version__} (Ollama API {OLLAMA_API_VERSION})"
    assert m["n_entries"] == 2 and m["judge_version"] == version and m["judge_digest"] == server.info.digest
    for record in outcome.records:
        assert all(isinstance(json.loads(r), dict) for r in record["replies"])
        assert record["truncated"] and record["context_limit"] == CONTEXT


def test_port_in_use_is_one_clear_error(model_path, url):
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(GptcoreError, match=rf"cannot listen on 127.0.0.1:{port}"):
        Server(model_path, "127.0.0.1", port, device="cpu")


def test_cli_serve_verb_and_empty_prompt(model_path, mirror_dir, capsys):
    assert cli_main(["generate", "--model", str(model_path), "--prompt", "", "--device", "cpu"]) == 1
    assert "prompt is empty" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:  # argparse refuses it: usage and one error line, exit 2
        cli_main(["generate", "--model", str(model_path), "--prompt", "x", "--temperature", "nan", "--device", "cpu"])
    assert stop.value.code == 2 and "--temperature: expected a finite number" in capsys.readouterr().err
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcore", "serve", "--model", str(model_path), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lines = [proc.stderr.readline()]  # the startup line is logged on stderr (after any warnings)
        while lines[-1] and " on http" not in lines[-1]:
            lines.append(proc.stderr.readline())
        found = re.search(r"tiny:latest .* on (http://127\.0\.0\.1:\d+)", lines[-1])
        assert found, "".join(lines)
        with ollama.Client(host=found.group(1), timeout=60) as c:
            assert c.list().models[0].model == "tiny:latest"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


ODD_VALUES = [None, -1, 1e308, "", [1, "a"], {"a": None}, True]
OLLAMA_FIELDS = [
    "model",
    "stream",
    "format",
    "options",
    "options.temperature",
    "options.top_k",
    "options.top_p",
    "options.min_p",
    "options.typical_p",
    "options.repeat_penalty",
    "options.repeat_last_n",
    "options.presence_penalty",
    "options.frequency_penalty",
    "options.num_ctx",
    "options.num_keep",
    "options.num_predict",
    "options.stop",
    "options.seed",
    "keep_alive",
    "logprobs",
    "top_logprobs",
]
OPENAI_FIELDS = [
    "model",
    "messages",
    "max_tokens",
    "temperature",
    "top_p",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "keep_alive",
    "stop",
    "response_format",
    "n",
    "seed",
    "stream",
    "logprobs",
]
BASE_BODIES = {
    "/api/generate": (
        {"model": "tiny", "prompt": PROMPT, "stream": False, "options": {"num_predict": 2}},
        OLLAMA_FIELDS + ["prompt", "context", "raw", "system", "template"],
    ),
    "/api/chat": (
        {
            "model": "tiny",
            "messages": [{"role": "user", "content": "x"}],
            "stream": False,
            "options": {"num_predict": 2},
        },
        OLLAMA_FIELDS + ["messages"],
    ),
    "/api/embed": ({"model": "tiny", "input": "x"}, ["model", "input", "truncate", "dimensions"]),
    "/v1/chat/completions": (
        {"model": "tiny", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2},
        OPENAI_FIELDS + ["top_logprobs"],
    ),
    "/v1/completions": (
        {"model": "tiny", "prompt": "x", "max_tokens": 2},
        OPENAI_FIELDS[:1] + OPENAI_FIELDS[2:] + ["prompt", "echo", "suffix"],
    ),
    "/v1/embeddings": ({"model": "tiny", "input": "x"}, ["model", "input", "encoding_format", "dimensions"]),
}


@pytest.mark.parametrize("path", list(BASE_BODIES))
def test_no_odd_input_gets_a_500(url, path):
    """Fields of every endpoint set to values of every JSON type: an answer or a clear 4xx."""
    base, fields = BASE_BODIES[path]
    with requests.Session() as s:
        for name in fields:
            for value in ODD_VALUES:
                body = json.loads(json.dumps(base))
                target, key = (body["options"], name[8:]) if name.startswith("options.") else (body, name)
                target[key] = value
                if key == "stream" and value is True:
                    continue  # a stream: covered elsewhere
                reply = s.post(url + path, json=body, timeout=60)
                assert reply.status_code < 500, (body, reply.text)
                if reply.status_code >= 400:
                    error = reply.json()["error"]
                    assert isinstance(error if path.startswith("/api/") else error["message"], str)


def test_connection_limit_and_ollama_origins(model_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_ORIGINS", "https://*.trusted.dev")
    with_limit = Server(
        model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True, limits=Limits(max_connections=1)
    ).start()
    try:
        with requests.Session() as first, requests.Session() as second:
            assert first.get(with_limit.url + "/api/tags").status_code == 200  # kept alive: holds the one slot
            assert second.get(with_limit.url + "/api/tags").status_code == 503
            trusted = first.get(with_limit.url + "/api/tags", headers={"Origin": "https://app.trusted.dev"})
            assert trusted.headers["access-control-allow-origin"] == "https://app.trusted.dev"
            assert first.get(with_limit.url + "/api/tags", headers={"Origin": "https://other.dev"}).status_code == 403
    finally:
        with_limit.close()


def test_a_client_that_hangs_up_on_a_non_streaming_request_cancels_it(tmp_path):
    """No stream to fail on: the server notices the closed connection (every 0.5 s) and drops the job."""
    torch.manual_seed(0)
    path = tmp_path / "long.safetensors"  # a context of 1024: seconds of generation for -1
    save_model(GPTModel(GPTConfig(vocab_size=50257, context_length=1024, emb_dim=64, n_heads=4, n_layers=2)), path)
    long = Server(path, "127.0.0.1", 0, name="long", device="cpu", quiet=True).start()
    finished = []
    finish = long.engine._finish
    long.engine._finish = lambda row, reason: (finished.append(reason), finish(row, reason))
    try:
        body = {
            "model": "long",
            "prompt": "Hello",
            "stream": False,
            "options": {"num_predict": -1, "temperature": 1.0, "seed": 1},
        }
        with pytest.raises(requests.exceptions.ReadTimeout):
            requests.post(long.url + "/api/generate", json=body, timeout=0.3)
        deadline = time.time() + 5
        while long.engine.active and time.time() < deadline:
            time.sleep(0.02)
        assert long.engine.active == 0 and finished == []  # dropped, not run to its end
    finally:
        long.close()


def test_a_client_connecting_before_serving_waits_instead_of_being_refused(model_path, mirror_dir, monkeypatch):
    """`gptcore serve` prints its URL before uvicorn runs: the socket must already listen then."""
    import socket

    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror_dir))
    server = Server(model_path, "127.0.0.1", 0, device="cpu", quiet=True)
    with socket.create_connection((server.host, server.port), timeout=10) as early:  # refused before the fix
        server.start()
        try:
            early.sendall(b"GET /api/version HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert early.recv(64).startswith(b"HTTP/1.1 200")
        finally:
            server.close()
