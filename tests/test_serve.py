"""`gptcore serve` exercised with the official ollama Python client, raw HTTP, and gptcore's own judge."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
import sys
import threading

import ollama
import pytest
import requests
import torch

from gptcore import __version__
from gptcore.cli import main as cli_main
from gptcore.config import GPTConfig, JudgeParams
from gptcore.download import sha256_of
from gptcore.errors import GptcoreError
from gptcore.judge import judge_prompt, judge_responses, parse_score
from gptcore.model import GPTModel
from gptcore.prompt import RESPONSE_MARKER, format_input
from gptcore.serve import Detokenizer, ModelService, make_server, render_chat
from gptcore.weights import save_model

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(123)
    config = GPTConfig(vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("serve") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


@pytest.fixture(scope="module")
def service(model_path, mirror_dir):
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    return ModelService(model_path, name="tiny", device="cpu", max_predict=64)


@pytest.fixture(scope="module")
def url(service):
    server = make_server(service, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def client(url):
    with ollama.Client(host=url, timeout=60) as c:
        yield c


def cli_generate(capsys, model_path, prompt, *extra) -> str:
    capsys.readouterr()
    assert cli_main(["generate", "--model", str(model_path), "--prompt", prompt, "--device", "cpu", *extra]) == 0
    return capsys.readouterr().out


def test_metadata_endpoints(client, url, service, model_path):
    assert requests.get(url + "/").text == "Ollama is running"
    assert requests.head(url + "/").status_code == 200
    assert requests.get(url + "/api/version").json() == {"version": __version__}
    (listed,) = client.list().models
    assert listed.model == "tiny:latest" and listed.digest == sha256_of(model_path)
    assert listed.size == model_path.stat().st_size and listed.details.family == "gpt2"
    shown = client.show("tiny")
    assert shown.modelinfo["gpt2.context_length"] == 32 and shown.modelinfo["gpt2.block_count"] == 2
    assert shown.details.format == "safetensors" and shown.capabilities == ["completion"]
    assert client.show("tiny:latest").modelinfo == shown.modelinfo
    assert requests.get(url + "/api/ps").json()["models"][0]["name"] == "tiny:latest"


def test_greedy_generate_equals_gptcore_generate(client, capsys, model_path):
    expected = cli_generate(capsys, model_path, PROMPT, "--max-new-tokens", "20")
    reply = client.generate(model="tiny", prompt=PROMPT, stream=False, options={"temperature": 0, "num_predict": 20})
    assert PROMPT + reply.response + "\n" == expected
    assert reply.done and reply.done_reason in ("stop", "length") and reply.model == "tiny"
    assert reply.prompt_eval_count == 4 and 1 <= reply.eval_count <= 20
    assert reply.total_duration > 0 and len(reply.context) == 4 + reply.eval_count

    chunks = list(client.generate(model="tiny", prompt=PROMPT, stream=True, options={"temperature": 0, "num_predict": 20}))
    assert "".join(c.response for c in chunks) == reply.response
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert len(chunks) >= 3  # streamed piece by piece, not in one go
    assert chunks[-1].eval_count == reply.eval_count and chunks[-1].context == reply.context


def test_seeded_sampling_equals_gptcore_generate(client, capsys, model_path):
    expected = cli_generate(capsys, model_path, PROMPT, "--max-new-tokens", "12", "--temperature", "1.0",
                            "--top-k", "40", "--seed", "7")
    options = {"temperature": 1.0, "top_k": 40, "seed": 7, "num_predict": 12}
    reply = client.generate(model="tiny", prompt=PROMPT, options=options)
    assert PROMPT + reply.response + "\n" == expected
    assert client.generate(model="tiny", prompt=PROMPT, options=options).response == reply.response


def test_chat_uses_the_alpaca_template(client):
    options = {"temperature": 0, "num_predict": 10}
    messages = [{"role": "user", "content": "Name a color."}]
    reply = client.chat(model="tiny", messages=messages, options=options)
    assert reply.message.role == "assistant" and reply.done
    raw = client.generate(model="tiny", prompt=format_input({"instruction": "Name a color.", "input": ""}) + RESPONSE_MARKER,
                          options=options)
    assert reply.message.content == raw.response
    streamed = list(client.chat(model="tiny", messages=messages, options=options, stream=True))
    assert "".join(c.message.content for c in streamed) == reply.message.content and streamed[-1].done


def test_render_chat_rule():
    assert render_chat([{"role": "user", "content": "Hi"}]) == format_input({"instruction": "Hi", "input": ""}) + RESPONSE_MARKER
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A"},
                    {"role": "assistant", "content": "B"}, {"role": "user", "content": "C"}]
    assert render_chat(conversation) == (
        "Be brief.\n\n### Instruction:\nA\n\n### Response:\nB\n\n### Instruction:\nC\n\n### Response:\n")
    assert render_chat(conversation[:3]).endswith("### Response:\nB")  # continue the assistant's reply


def test_stop_strings_cut_the_reply(client):
    options = {"temperature": 0, "num_predict": 20}
    full = client.generate(model="tiny", prompt=PROMPT, options=options).response
    stop = full[6:9]
    assert stop and full.find(stop) >= 1
    cut = client.generate(model="tiny", prompt=PROMPT, options={**options, "stop": [stop, "never there"]})
    assert cut.response == full[: full.find(stop)] and cut.done_reason == "stop"
    chunks = list(client.generate(model="tiny", prompt=PROMPT, stream=True, options={**options, "stop": [stop]}))
    assert "".join(c.response for c in chunks) == cut.response


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


def test_num_predict_zero_and_empty_prompt(client):
    assert client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 0}).response == ""
    loaded = client.generate(model="tiny", prompt="")
    assert loaded.done and loaded.done_reason == "load"


BAD_BODIES = [
    (b"{not json", 400, "invalid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "invalid prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "stream": "yes"}).encode(), 400, "invalid stream"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"temperature": "hot"}}).encode(), 400, "invalid temperature"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"top_k": True}}).encode(), 400, "invalid top_k"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": {"num_predict": 10**9}}).encode(), 400, "num_predict"),
    (json.dumps({"model": "tiny", "prompt": "x", "options": "fast"}).encode(), 400, "invalid options"),
    (json.dumps({"model": "tiny", "prompt": "x", "context": [-1]}).encode(), 400, "invalid context"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model is required"),
    (json.dumps({"model": "nope", "prompt": "x"}).encode(), 404, "model 'nope' not found"),
    (json.dumps({"model": "tiny", "prompt": "x", "format": "json"}).encode(), 400, "structured outputs"),
]


@pytest.mark.parametrize("body, status, message", BAD_BODIES)
def test_bad_requests_get_ollama_errors_and_the_server_keeps_serving(url, body, status, message):
    reply = requests.post(url + "/api/generate", data=body, timeout=30)
    assert reply.status_code == status
    assert message in reply.json()["error"]
    assert requests.get(url + "/api/tags", timeout=30).status_code == 200


def test_bad_chat_requests(url, client):
    for body, status, message in [
        ({"model": "tiny", "messages": "hi"}, 400, "invalid messages"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, 400, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 3}]}, 400, "content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, 400, "tools"),
    ]:
        reply = requests.post(url + "/api/chat", json=body, timeout=30)
        assert reply.status_code == status and message in reply.json()["error"], body
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="llama3.1:8b", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as err:
        client.generate(model="tiny", prompt="x", options={"num_predict": 100_000})
    assert err.value.status_code == 400 and "at most 64" in err.value.error


def test_routes_and_sizes(url, service):
    assert requests.get(url + "/api/nothing").status_code == 404
    assert requests.get(url + "/api/chat").status_code == 405
    huge = b'{"model": "tiny", "prompt": "' + b"x" * (service.max_body + 10) + b'"}'
    reply = requests.post(url + "/api/generate", data=huge, timeout=30)
    assert reply.status_code == 413 and "too large" in reply.json()["error"]
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)  # a length nobody will send
    conn.putrequest("POST", "/api/generate")
    conn.putheader("Content-Length", str(10**12))
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert requests.get(url + "/api/tags", timeout=30).status_code == 200


def test_busy_server_answers_503(url, service):
    service.max_pending, saved = 0, service.max_pending
    try:
        reply = requests.post(url + "/api/generate", json={"model": "tiny", "prompt": "x"}, timeout=30)
    finally:
        service.max_pending = saved
    assert reply.status_code == 503 and "busy" in reply.json()["error"]


def test_client_that_disconnects_mid_stream(url, client):
    with requests.post(url + "/api/generate", json={"model": "tiny", "prompt": PROMPT, "options": {"num_predict": 64}},
                       stream=True, timeout=30) as reply:
        first = json.loads(next(reply.iter_lines()))
        assert first["done"] is False
    assert client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 3}).eval_count == 3


def test_concurrent_clients_get_the_same_greedy_answers(url):
    options = {"temperature": 0, "num_predict": 16}
    with ollama.Client(host=url) as c:
        expected = c.generate(model="tiny", prompt=PROMPT, options=options).response
    results: list[str] = []
    errors: list[BaseException] = []

    def work(i: int) -> None:
        try:
            with ollama.Client(host=url, timeout=120) as c:
                if i % 2:
                    results.append("".join(p.response for p in c.generate(model="tiny", prompt=PROMPT, options=options, stream=True)))
                else:
                    results.append(c.generate(model="tiny", prompt=PROMPT, options=options).response)
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == [] and results == [expected] * 6


def test_our_judge_against_our_server(url, client, service, tmp_path):
    """End to end over real HTTP: the tiny model's replies are not scores, so most land as failures,
    recorded honestly; whatever it does say is parsed exactly as the judge's rules say."""
    entries = [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris."},
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5", "model_response": "6"},
        {"instruction": "Say nothing.", "input": "", "output": "", "model_response": ""},
    ]
    responses = tmp_path / "test.json"
    responses.write_text(json.dumps(entries))
    params = JudgeParams(url=url, model="tiny", timeout=60, retries=1, backoff=0.0)
    outcome = judge_responses(responses, tmp_path / "scores.jsonl", params, progress=False, warn=lambda m: None)
    m = outcome.metrics
    assert m["n_entries"] == 3 and m["n_scored"] + m["n_failed"] == 3 and m["n_empty"] == 1
    assert m["judge_version"] == __version__ and m["judge_digest"] == service.digest
    for entry, record in zip(entries[:2], outcome.records[:2]):
        first = client.chat(model="tiny", messages=[{"role": "user", "content": judge_prompt(entry)}],
                            options={"seed": 123, "temperature": 0, "num_ctx": 2048})
        assert record["replies"][0] == first.message.content  # exactly what the server says
        assert record["prompt_eval_count"] == 32  # the tiny model reads its last 32 tokens...
        assert record["truncated"] and record["context_limit"] == 32  # ...and the judge says so
        if record["status"] == "failed":
            assert record["score"] is None and len(record["replies"]) == 2
        else:
            assert record["score"] == parse_score(record["replies"][-1])
    assert outcome.records[2]["score"] == 0


def test_port_in_use_is_one_clear_error(service, url):
    port = int(url.rsplit(":", 1)[1])
    with pytest.raises(GptcoreError, match=rf"cannot listen on 127.0.0.1:{port}"):
        make_server(service, "127.0.0.1", port)


def test_cli_serve_verb(model_path, mirror_dir):
    proc = subprocess.Popen(
        [sys.executable, "-m", "gptcore", "serve", "--model", str(model_path), "--port", "0", "--device", "cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = proc.stdout.readline()
        found = re.search(r"tiny:latest .* on (http://127\.0\.0\.1:\d+)", line)
        assert found, line + proc.stderr.read() if proc.poll() is not None else line
        with ollama.Client(host=found.group(1), timeout=60) as c:
            assert c.list().models[0].model == "tiny:latest"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_classifier_is_refused(tmp_path, tiny_config):
    path = tmp_path / "classifier.safetensors"
    tiny_config.num_classes = 2
    save_model(GPTModel(tiny_config), path)
    with pytest.raises(GptcoreError, match="classifier"):
        ModelService(path, device="cpu")
