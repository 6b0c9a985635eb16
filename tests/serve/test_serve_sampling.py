"""`gptcore serve` honours every sampling option (through the official ollama and openai clients), keep_alive
as Ollama on every route, token-id prompts on /v1/completions and empty strings in /api/embed."""

from __future__ import annotations

import math
import time
from datetime import datetime, timezone

import ollama
import openai
import pytest
import requests
import torch

from gptcore.config import GPTConfig
from gptcore.inference.decoding import generate
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.serve import LoadOptions, Server
from gptcore.serve.options import parse_keep_alive
from gptcore.serve.protocol import RequestError
from gptcore.tokenizer import encode_text
from gptcore.weights import load_model, save_model

PROMPT = "Every effort moves you"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(7)
    config = GPTConfig(vocab_size=50257, context_length=64, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("sampling") / "tiny.safetensors"
    model = GPTModel(config)
    with torch.no_grad():
        # A model that loops as greedy decoding of real models does: blocks that add little, no positions
        # and a head tied to the embedding make each token predict itself next, with spread-out logits.
        for block in model.trf_blocks:
            block.att.out_proj.weight.mul_(0.1)
            block.ff.proj.weight.mul_(0.1)
        model.pos_emb.weight.zero_()
        model.out_head.weight.copy_(model.tok_emb.weight)
        model.final_norm.weight.mul_(0.5)
    save_model(model, path)
    return path


@pytest.fixture(scope="module")
def server(model_path, mirror_dir):
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    s = Server(
        model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True, load=LoadOptions(keep_alive="1h")
    ).start()
    yield s
    s.close()


@pytest.fixture
def client(server):
    with ollama.Client(host=server.url, timeout=60) as c:
        yield c


@pytest.fixture
def oai(server):
    with openai.OpenAI(base_url=server.url + "/v1", api_key="unused", timeout=60, max_retries=0) as c:
        yield c


def ollama_tokens(client, **options) -> list[int]:
    reply = client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 12, **options})
    return reply.context[len(reply.context) - reply.eval_count :]


def test_each_ollama_option_changes_the_reply_when_it_should(client):
    greedy = ollama_tokens(client, temperature=0)
    hot = {"temperature": 1.5, "top_k": 0, "seed": 3}
    assert ollama_tokens(client, **hot) != greedy
    assert ollama_tokens(client, **hot, top_p=1e-4) == greedy  # one token left: greedy
    assert ollama_tokens(client, **hot, min_p=0.99) == greedy
    assert ollama_tokens(client, **hot, typical_p=0.9) != ollama_tokens(client, **hot)
    # penalties: greedy comes back to its tokens; a strong penalty over the whole sequence never does
    long = ollama_tokens(client, temperature=0, num_predict=40)
    assert len(set(long)) < len(long)
    unique = ollama_tokens(client, temperature=0, num_predict=40, repeat_penalty=1e6, repeat_last_n=-1)
    assert len(set(unique)) == len(unique) == 40
    present = ollama_tokens(client, temperature=0, num_predict=40, presence_penalty=1e4, repeat_last_n=-1)
    assert len(set(present)) == 40
    assert ollama_tokens(client, temperature=0, num_predict=40, frequency_penalty=1e4, repeat_last_n=-1) == present


@pytest.mark.parametrize(
    "options",
    [
        {"temperature": 0.9, "top_p": 0.8},
        {"temperature": 1.2, "min_p": 0.1, "top_k": 0},
        {"temperature": 1.0, "typical_p": 0.7},
        {
            "temperature": 0.8,
            "repeat_penalty": 1.3,
            "repeat_last_n": 16,
            "presence_penalty": 0.5,
            "frequency_penalty": 0.2,
        },
    ],
)
def test_seeded_server_sampling_equals_gptcore_generate(client, model_path, tokenizer, options):
    served = ollama_tokens(client, **options, seed=42)
    sampling = SamplingOptions(
        **{k: v for k, v in options.items() if k != "top_k"}, top_k=options.get("top_k", 40) or None, seed=42
    )
    ids = torch.tensor([encode_text(tokenizer, PROMPT)])
    alone = generate(load_model(model_path), ids, 12, sampling=sampling, eos_id=50256)[0, ids.shape[1] :].tolist()
    assert served == alone


def test_openai_logit_bias_and_penalties(oai, tokenizer):
    def tokens(**extra) -> list[int]:
        reply = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=8, **{"temperature": 0, **extra})
        return encode_text(tokenizer, reply.choices[0].text)

    greedy = tokens()
    banned = tokens(logit_bias={str(greedy[0]): -100})
    assert banned[0] != greedy[0]  # the greedy first token is banned
    forced = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=4, temperature=0, logit_bias={"262": 100})
    assert forced.choices[0].text == " the" * 4
    assert tokens(top_p=1e-4, temperature=1.0, seed=1) == greedy
    assert tokens(extra_body={"min_p": 0.99}, temperature=1.0, seed=1) == greedy
    chat = oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=4, temperature=0, logit_bias={"262": 100}
    )
    assert chat.choices[0].message.content == " the" * 4
    for bad, name in (
        ({"logit_bias": {"x": 1}}, "logit_bias"),
        ({"logit_bias": {"99999": 1}}, "logit_bias"),
        ({"logit_bias": {"1": 101}}, "logit_bias"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"frequency_penalty": -2.5}, "frequency_penalty"),
        ({"top_p": 1.5}, "top_p"),
        ({"extra_body": {"min_p": 2}}, "min_p"),
        ({"extra_body": {"best_of": 2}}, "best_of"),
    ):
        with pytest.raises(openai.BadRequestError, match=name):
            oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=2, **bad)


def test_token_id_prompts_on_completions(oai, tokenizer):
    ids = encode_text(tokenizer, PROMPT)
    text = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, temperature=0)
    by_ids = oai.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    nested = oai.completions.create(model="tiny", prompt=[ids], max_tokens=6, temperature=0, echo=True)
    assert by_ids.choices[0].text == text.choices[0].text and by_ids.usage.prompt_tokens == len(ids)
    assert nested.choices[0].text == PROMPT + text.choices[0].text
    for bad in ([ids, ids], [50257], [[]]):
        with pytest.raises(openai.BadRequestError, match="prompt"):
            oai.completions.create(model="tiny", prompt=bad, max_tokens=2)


def test_empty_strings_in_api_embed_as_ollama(client, oai):
    both = client.embed(model="tiny", input=["a", ""]).embeddings
    assert len(both) == 2 and all(abs(sum(v * v for v in e) - 1) < 1e-4 for e in both)
    assert client.embed(model="tiny", input="").embeddings == []
    with pytest.raises(openai.BadRequestError, match="empty"):
        oai.embeddings.create(model="tiny", input=["a", ""])


def test_keep_alive_durations():
    assert parse_keep_alive("5m") == 300 and parse_keep_alive("1h30m") == 5400 and parse_keep_alive(300) == 300
    assert parse_keep_alive("300") == 300 and parse_keep_alive("1.5s") == 1.5 and parse_keep_alive("250ms") == 0.25
    assert parse_keep_alive(-1) == parse_keep_alive("-1") == parse_keep_alive("-5m") == math.inf
    assert parse_keep_alive(0) == parse_keep_alive("0") == parse_keep_alive("0s") == 0
    for bad in ("soon", "5 minutes", "1d", "", True, [1], "m5"):
        with pytest.raises(RequestError, match="keep_alive"):
            parse_keep_alive(bad)


def _expires(client) -> float:
    (model,) = client.ps().models
    return model.expires_at.astimezone(timezone.utc).timestamp()


def _unloaded(client, seconds: float = 15) -> bool:
    deadline = time.time() + seconds
    while client.ps().models and time.time() < deadline:
        time.sleep(0.05)
    return client.ps().models == []


def test_keep_alive_expiry_and_unload_on_every_route(client, oai, server):
    url = server.url
    client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 1}, keep_alive="5m")
    assert abs(_expires(client) - (time.time() + 300)) < 30
    client.chat(model="tiny", messages=[{"role": "user", "content": "x"}], options={"num_predict": 1}, keep_alive=-1)
    assert datetime.fromtimestamp(_expires(client), timezone.utc).year == 2318
    oai.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=1, extra_body={"keep_alive": "1h30m"}
    )
    assert abs(_expires(client) - (time.time() + 5400)) < 30
    for path, body in (
        ("/api/generate", {"prompt": "x"}),
        ("/api/chat", {"messages": [{"role": "user", "content": "x"}]}),
        ("/api/embed", {"input": "x"}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "max_tokens": 1}),
        ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
    ):
        bad = requests.post(url + path, json={"model": "tiny", **body, "keep_alive": "soon"}, timeout=30)
        assert bad.status_code == 400 and "keep_alive" in bad.text, (path, bad.text)
        assert requests.post(url + path, json={"model": "tiny", **body, "keep_alive": 0}, timeout=30).status_code == 200
        assert _unloaded(client), path  # keep_alive 0: unloaded once the request is done, /v1 too
    client.generate(model="tiny", prompt=PROMPT, options={"num_predict": 1}, keep_alive="1s")
    assert client.ps().models and _unloaded(client)  # expired a second after it was used
    client.generate(model="tiny", prompt="", keep_alive="1h")  # loaded again for the next tests
