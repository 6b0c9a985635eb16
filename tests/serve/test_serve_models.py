"""Ollama's model routes as gptcore answers them (each against Ollama's API documentation): /api/create
from a served model with system/template/parameters, /api/copy, /api/delete, /api/pull's streamed status
lines, /api/version; the refused forms; unknown request fields (a Warning header, or a 400 under
--strict-options); and the chat request recorded from Open WebUI 0.12's page, replayed."""

from __future__ import annotations

import json
from pathlib import Path

import ollama
import pytest
import requests
import torch

from gptcore import __version__
from gptcore.config import GPTConfig
from gptcore.download import sha256_of
from gptcore.model import GPTModel
from gptcore.serve import Limits, Server
from gptcore.serve.models_routes import OLLAMA_API_VERSION
from gptcore.weights import save_model

RECORDED = Path(__file__).parent / "data" / "open_webui_chat.json"
GREEDY = {"temperature": 0, "num_predict": 8}
QUESTION = [{"role": "user", "content": "Name a color."}]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(5)
    config = GPTConfig(vocab_size=50257, context_length=512, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=True)
    path = tmp_path_factory.mktemp("models") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


def start(model_path, mirror_dir, **limits) -> Server:
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    return Server(model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True, limits=Limits(**limits)).start()


@pytest.fixture(scope="module")
def url(model_path, mirror_dir):
    server = start(model_path, mirror_dir, max_predict=32)
    yield server.url
    server.close()


@pytest.fixture
def client(url):
    with ollama.Client(host=url, timeout=120) as c:
        yield c


def test_create_from_a_served_model_uses_its_defaults(client, url):
    created = requests.post(
        url + "/api/create",
        json={"model": "pirate", "from": "tiny", "system": "You are a pirate.", "parameters": GREEDY},
        timeout=60,
    )
    assert created.status_code == 200
    statuses = [json.loads(line)["status"] for line in created.text.splitlines()]
    assert statuses[-1] == "success"  # streamed status objects, as Ollama's create
    assert {m.model for m in client.list().models} == {"tiny:latest", "pirate:latest"}
    shown = client.show("pirate")
    assert shown.details.parent_model == "tiny:latest" and "tools" in shown.capabilities
    assert 'SYSTEM """You are a pirate."""' in shown.modelfile and "temperature 0" in shown.parameters
    # chat on the new name = chat on the served one with its system prompt and parameters
    as_pirate = client.chat(model="pirate", messages=QUESTION)
    by_hand = client.chat(
        model="tiny", messages=[{"role": "system", "content": "You are a pirate."}, *QUESTION], options=GREEDY
    )
    plain = client.chat(model="tiny", messages=QUESTION, options=GREEDY)
    assert as_pirate.message.content == by_hand.message.content
    assert (
        as_pirate.prompt_eval_count == by_hand.prompt_eval_count != plain.prompt_eval_count
    )  # system replaces the preamble
    assert as_pirate.eval_count <= GREEDY["num_predict"]
    # a request's own system message and options win over the name's
    own = client.chat(model="pirate", messages=[{"role": "system", "content": "Be brief."}, *QUESTION])
    assert (
        own.prompt_eval_count
        == client.chat(
            model="tiny", messages=[{"role": "system", "content": "Be brief."}, *QUESTION], options=GREEDY
        ).prompt_eval_count
    )
    # /api/generate uses the name's system prompt too (through the chat template)
    generated = client.generate(model="pirate", prompt="Name a color.")
    assert generated.response == as_pirate.message.content
    # a create from a created name inherits its defaults; delete removes only the added names
    assert client.create(model="pirate2", from_="pirate", stream=False).status == "success"
    assert client.chat(model="pirate2", messages=QUESTION).message.content == as_pirate.message.content
    assert client.delete("pirate2").status == "success" and client.delete("pirate").status == "success"
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="pirate", messages=QUESTION)
    assert err.value.status_code == 404


def test_copy_adds_an_alias(client, url, model_path):
    reply = requests.post(url + "/api/copy", json={"source": "tiny", "destination": "tiny-backup"}, timeout=30)
    assert reply.status_code == 200 and reply.content == b""  # Ollama: 200 OK, no body
    tags = {m.model: m for m in client.list().models}
    assert tags["tiny-backup:latest"].digest == tags["tiny:latest"].digest == sha256_of(model_path)
    assert client.chat(model="tiny-backup", messages=QUESTION, options=GREEDY).message.content == (
        client.chat(model="tiny", messages=QUESTION, options=GREEDY).message.content
    )
    missing = requests.post(url + "/api/copy", json={"source": "llama3", "destination": "x"}, timeout=30)
    assert missing.status_code == 404 and "llama3" in missing.json()["error"]
    assert requests.delete(url + "/api/delete", json={"model": "tiny-backup"}, timeout=30).status_code == 200


def test_pull_streams_ollamas_status_lines(client, url, model_path):
    lines = [
        json.loads(x) for x in requests.post(url + "/api/pull", json={"model": "tiny"}, timeout=30).text.splitlines()
    ]
    assert [x.get("status", "").split(" ")[0] for x in lines] == [
        "pulling",
        "pulling",
        "verifying",
        "writing",
        "success",
    ]
    assert lines[0]["status"] == "pulling manifest" and lines[-1] == {"status": "success"}
    layer = lines[1]
    assert layer["digest"].endswith(sha256_of(model_path)) and layer["total"] == layer["completed"] > 0
    assert [p.status for p in client.pull("tiny", stream=True)][-1] == "success"
    assert client.pull("tiny").status == "success"
    # a name not served: the stream says so in an error line, which the client raises
    reply = requests.post(url + "/api/pull", json={"model": "llama3.1:8b"}, timeout=30)
    assert reply.status_code == 200 and "gptcore serve --model" in json.loads(reply.text.splitlines()[-1])["error"]
    with pytest.raises(ollama.ResponseError, match="gptcore serve --model"):
        list(client.pull("llama3.1:8b", stream=True))


def test_version_is_the_ollama_api_we_follow(url):
    reply = requests.get(url + "/api/version", timeout=30)
    assert reply.json() == {"version": OLLAMA_API_VERSION, "gptcore_version": __version__}
    assert reply.headers["X-Gptcore-Version"] == __version__
    assert tuple(int(x) for x in OLLAMA_API_VERSION.split(".")) >= (0, 12, 11)  # logprobs came in 0.12.11


@pytest.mark.parametrize(
    "method, path, body, says",
    [
        ("post", "/api/create", {"model": "m", "files": {"m.gguf": "sha256:00"}}, "gptcore serve --model"),
        ("post", "/api/create", {"model": "m", "from": "tiny", "adapters": {"a": "sha256:00"}}, "--adapter"),
        ("post", "/api/create", {"model": "m", "from": "tiny", "quantize": "q4_K_M"}, "--quantize"),
        ("post", "/api/create", {"model": "m"}, "create needs `from`"),
        ("post", "/api/create", {"model": "tiny", "from": "tiny"}, "choose another"),
        ("post", "/api/create", {"model": "m", "from": "tiny", "parameters": {"bogus": 1}}, "bogus"),
        ("post", "/api/create", {"model": "m", "from": "tiny", "template": "{{ range .X }}"}, "template"),
        ("post", "/api/push", {"model": "tiny"}, "gptcore export"),
        ("post", "/api/blobs/sha256:00", None, "does not store blobs"),
        ("head", "/api/blobs/sha256:00", None, None),
        ("delete", "/api/delete", {"model": "tiny"}, "does not delete it"),
    ],
)
def test_refused_forms_say_what_gptcore_does_instead(url, method, path, body, says):
    reply = getattr(requests, method)(url + path, json=body, timeout=30)
    assert reply.status_code == 400
    if says is not None:
        assert says in reply.json()["error"]  # Ollama's error shape: {"error": "..."}


def test_unknown_fields_are_named_in_a_warning_or_refused(url, model_path, mirror_dir):
    body = {"model": "tiny", "messages": QUESTION, "stream": False, "reasoning_effort": "low",
            "options": {**GREEDY, "bogus": 1}}  # fmt: skip
    reply = requests.post(url + "/api/chat", json=body, timeout=60)
    assert reply.status_code == 200
    assert reply.headers["Warning"] == '299 gptcore "ignored unknown fields: reasoning_effort, options.bogus"'
    known = requests.post(url + "/api/chat", json={**body, "options": GREEDY, "reasoning_effort": None}, timeout=60)
    assert "reasoning_effort" in known.headers["Warning"] and "bogus" not in known.headers["Warning"]
    clean = {k: v for k, v in body.items() if k != "reasoning_effort"}
    assert "Warning" not in requests.post(url + "/api/chat", json={**clean, "options": GREEDY}, timeout=60).headers
    openai_body = {"model": "tiny", "messages": QUESTION, "max_tokens": 2, "reasoning_effort": "low", "user": "u"}
    reply = requests.post(url + "/v1/chat/completions", json=openai_body, timeout=60)
    assert reply.status_code == 200 and "reasoning_effort, user" in reply.headers["Warning"]
    strict = start(model_path, mirror_dir, strict_options=True)
    try:
        for path, sent in (("/api/chat", body), ("/v1/chat/completions", openai_body)):
            reply = requests.post(strict.url + path, json=sent, timeout=60)
            assert reply.status_code == 400 and "reasoning_effort" in reply.text and "--strict-options" in reply.text
        assert requests.post(strict.url + "/api/chat", json={**clean, "options": GREEDY}, timeout=60).status_code == 200
    finally:
        strict.close()


def test_open_webui_requests_replayed(url):
    """Every request Open WebUI 0.12's page sent for one chat (the chat itself with its built-in tools,
    streamed; title, follow-up and tag tasks) answers 200; the chat streams a reply."""
    recorded = json.loads(RECORDED.read_text())["requests"]
    chats = [r for r in recorded if r["body"].get("tools")]
    assert chats and all(r["path"] == "/api/chat" for r in recorded)
    for request in recorded:
        body = request["body"]
        reply = requests.post(url + request["path"], json=body, timeout=120, stream=body.get("stream", True))
        assert reply.status_code == 200, reply.text
        if body.get("stream", True):
            lines = [json.loads(line) for line in reply.iter_lines() if line]
            assert len(lines) >= 2 and lines[-1]["done"] and not any(x["done"] for x in lines[:-1])
            assert "".join(x["message"]["content"] for x in lines) or lines[-2]["message"].get("tool_calls")
        else:
            assert reply.json()["done"]
