"""Drive the Python clients people point at Ollama or OpenAI against a real `gptcore serve`, as their users
call them, and check what comes back.

    python tests/clients/verify_python_clients.py                       # starts serve_tiny.py itself
    python tests/clients/verify_python_clients.py --url http://127.0.0.1:11434 --model tiny
    python tests/clients/verify_python_clients.py --only langchain,litellm --server-python .venv/bin/python

Clients: `ollama`, `openai`, `langchain` (langchain-ollama: ChatOllama, OllamaLLM, OllamaEmbeddings),
`llamaindex` (llama-index-llms-ollama, llama-index-embeddings-ollama), `litellm` (`ollama/`,
`ollama_chat/`). One line per check (`ok CLIENT CHECK: detail` / `FAIL CLIENT CHECK: why`), the
installed versions first; a client that is not installed is reported as `skip`. Exit status: 1 if a check
failed, 3 if nothing ran because every client asked for is missing, else 0.

Replies of the tiny random model are gibberish; what is checked is the protocol: that each client sends
the options it is given (greedy replies equal the reply to the same request sent by hand over HTTP;
the same seed gives the same text), that a stream joins to the non-streamed text, that stop strings cut,
that embeddings have the model's width and unit length, that structured output parses, and that what
gptcore refuses comes back as the client's own error for a 4xx. Needs only the clients and httpx (no
gptcore, no torch) unless it starts the server; then `--server-python` must have gptcore.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import threading
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
N = 16  # new tokens of a greedy reply
PROMPT = "Every effort moves you"
QUESTION = "Name a primary color."
SCHEMA = {"type": "object", "properties": {"score": {"type": "integer"}}, "required": ["score"]}
# import name(s) that must be importable, distributions whose versions are reported
CLIENTS = {
    "ollama": (["ollama"], ["ollama"]),
    "openai": (["openai"], ["openai"]),
    "langchain": (["langchain_ollama"], ["langchain-ollama", "langchain-core", "ollama"]),
    "llamaindex": (
        ["llama_index.llms.ollama", "llama_index.embeddings.ollama"],
        ["llama-index-llms-ollama", "llama-index-embeddings-ollama", "llama-index-core", "ollama"],
    ),
    "litellm": (["litellm"], ["litellm"]),
}
SKIPPED = 3


class Reference:
    """The same requests sent by hand over HTTP: what a client's reply must equal."""

    def __init__(self, url: str, model: str):
        self.http = httpx.Client(base_url=url, timeout=120)
        self.model = model
        shown = self.post("/api/show", {"model": model})
        self.width = shown["model_info"]["gpt2.embedding_length"]
        self.context = shown["model_info"]["gpt2.context_length"]

    def post(self, path: str, body: dict) -> dict:
        reply = self.http.post(path, json=body)
        reply.raise_for_status()
        return reply.json()

    def chat(self, content: str, **options) -> dict:
        return self.post(
            "/api/chat",
            {
                "model": self.model,
                "stream": False,
                "options": options,
                "messages": [{"role": "user", "content": content}],
            },
        )

    def generate(self, prompt: str, **options) -> dict:
        return self.post("/api/generate", {"model": self.model, "stream": False, "prompt": prompt, "options": options})


class Checks:
    """Runs named checks for one client, one line each."""

    def __init__(self, client: str):
        self.client = client
        self.failed = 0

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        try:
            detail = fn()
            if asyncio.iscoroutine(detail):
                detail = asyncio.run(detail)
        except Exception as err:  # noqa: BLE001 - every failure is reported, the other checks still run
            self.failed += 1
            frame = traceback.extract_tb(err.__traceback__)[-1]
            where = f" ({Path(frame.filename).name}:{frame.lineno})" if frame else ""
            print(
                f"FAIL {self.client} {name}: {type(err).__name__}: {' '.join(str(err).split())[:400]}{where}",
                flush=True,
            )
            return None
        print(f"ok {self.client} {name}" + (f": {_short(detail)}" if detail not in (None, "") else ""), flush=True)
        return detail


def _short(value: Any) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def expect(condition: bool, message: str) -> None:
    if not condition:
        raise AssertionError(message)


def same(got: str, want: str, what: str = "reply") -> str:
    expect(got == want, f"{what} {got!r} != the same request by hand {want!r}")
    return got


def equal(got: Any, want: Any, what: str) -> Any:
    expect(got == want, f"{what}: {got!r}, expected {want!r}")
    return got


def unit(vectors: list[list[float]], width: int) -> str:
    expect(all(len(v) == width for v in vectors), f"lengths {[len(v) for v in vectors]}, expected {width}")
    norms = [math.sqrt(sum(x * x for x in v)) for v in vectors]
    expect(all(abs(n - 1) < 1e-4 for n in norms), f"norms {norms}, expected unit vectors")
    return f"{len(vectors)} x {width}, unit length"


def raises(fn: Callable[[], Any], error: type | tuple, status: int | None = None) -> str:
    """fn() must raise `error` (with HTTP `status`, where the error carries one); its message is returned."""
    try:
        fn()
    except error as err:
        got = getattr(err, "status_code", None)
        expect(status is None or got == status, f"status {got}, expected {status}: {err}")
        return " ".join(str(err).split())[:120]
    raise AssertionError(f"expected {getattr(error, '__name__', error)}, got a reply")


def stop_inside(text: str) -> tuple[str, str]:
    """A stop string that occurs in text after its first characters, and text cut at its first occurrence."""
    expect(len(text) >= 8, f"reply too short to cut: {text!r}")
    stop = text[4:6]
    return stop, text[: text.index(stop)]


def stops(reply: Callable[[list[str]], str], text: str) -> str:
    """reply(stop strings) must be text cut at a stop string taken from it."""
    stop, cut = stop_inside(text)
    return same(reply([stop]), cut) + f" (stop {stop!r})"


# -- the clients ------------------------------------------------------------------------------------------
def check_ollama(url: str, model: str, ref: Reference, check: Checks) -> None:
    import ollama

    client = ollama.Client(host=url, timeout=120)
    greedy = {"temperature": 0, "num_predict": N}
    check("list", lambda: [m.model for m in client.list().models if m.model.startswith(model)][0])
    check("show", lambda: f"context {client.show(model).modelinfo['gpt2.context_length']}")
    check("ps", lambda: [m.model for m in client.ps().models][0])
    want = ref.generate(PROMPT, **greedy)["response"]
    check("generate", lambda: same(client.generate(model=model, prompt=PROMPT, options=greedy).response, want))
    check(
        "generate stream",
        lambda: same(
            "".join(p.response for p in client.generate(model=model, prompt=PROMPT, options=greedy, stream=True)),
            want,
            "stream",
        ),
    )
    seeded = {"temperature": 1.0, "seed": 7, "num_predict": 12}
    check(
        "generate seed",
        lambda: same(
            client.generate(model=model, prompt=PROMPT, options=seeded).response,
            ref.generate(PROMPT, **seeded)["response"],
        ),
    )
    check(
        "generate stop",
        lambda: stops(
            lambda stop: client.generate(model=model, prompt=PROMPT, options={**greedy, "stop": stop}).response, want
        ),
    )
    messages = [{"role": "user", "content": QUESTION}]
    chat = ref.chat(QUESTION, **greedy)["message"]["content"]
    check("chat", lambda: same(client.chat(model=model, messages=messages, options=greedy).message.content, chat))

    async def async_stream():
        async with ollama.AsyncClient(host=url, timeout=120) as aclient:
            parts = [
                p.message.content
                async for p in await aclient.chat(model=model, messages=messages, options=greedy, stream=True)
            ]
        return same("".join(parts), chat, "stream") and f"{len(parts)} chunks"

    check("AsyncClient chat stream", async_stream)

    def logprobs():
        reply = client.generate(model=model, prompt=PROMPT, logprobs=True, top_logprobs=2, options=greedy)
        return tokens_of(
            reply.response, [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in reply.logprobs]
        )

    check("generate logprobs", logprobs)
    check(
        "format json",
        lambda: json.loads(client.chat(model=model, messages=messages, format="json", options=greedy).message.content),
    )
    check(
        "format schema",
        lambda: _score(client.generate(model=model, prompt=PROMPT, format=SCHEMA, options=greedy).response),
    )
    check(
        "embed",
        lambda: unit(client.embed(model=model, input=["first text", "second, longer text"]).embeddings, ref.width),
    )
    check("embed dimensions", lambda: unit(client.embed(model=model, input="first text", dimensions=8).embeddings, 8))
    check(
        "embeddings (legacy)",
        lambda: equal(len(client.embeddings(model=model, prompt="first text").embedding), ref.width, "length"),
    )
    check(
        "unknown model is a 404",
        lambda: raises(lambda: client.generate(model="llama3.1:8b", prompt=PROMPT), ollama.ResponseError, 404),
    )


def check_openai(url: str, model: str, ref: Reference, check: Checks) -> None:
    import openai
    from pydantic import BaseModel

    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0)
    messages = [{"role": "user", "content": QUESTION}]
    greedy = dict(temperature=0, max_tokens=N)
    want = ref.chat(QUESTION, temperature=0, num_predict=N)
    check("models", lambda: [m.id for m in client.models.list().data])

    def chat():
        reply = client.chat.completions.create(model=model, messages=messages, **greedy)
        expect(reply.usage.prompt_tokens == want["prompt_eval_count"], f"usage {reply.usage}")
        return same(reply.choices[0].message.content, want["message"]["content"])

    check("chat.completions", chat)

    def stream():
        chunks = list(
            client.chat.completions.create(
                model=model, messages=messages, stream=True, stream_options={"include_usage": True}, **greedy
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        expect(
            chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == want["eval_count"], "no usage chunk"
        )
        return same(text, want["message"]["content"], "stream") and f"{len(chunks)} chunks"

    check("chat.completions stream", stream)
    check(
        "seed",
        lambda: same(
            client.chat.completions.create(model=model, messages=messages, temperature=1, seed=7, max_tokens=12)
            .choices[0]
            .message.content,
            ref.chat(QUESTION, temperature=1.0, top_k=0, seed=7, num_predict=12)["message"]["content"],
        ),
    )
    check(
        "stop",
        lambda: stops(
            lambda stop: (
                client.chat.completions.create(model=model, messages=messages, stop=stop, **greedy)
                .choices[0]
                .message.content
            ),
            want["message"]["content"],
        ),
    )
    plain = ref.generate(PROMPT, temperature=0, num_predict=N)["response"]
    check(
        "completions",
        lambda: same(client.completions.create(model=model, prompt=PROMPT, **greedy).choices[0].text, plain),
    )
    check(
        "completions echo",
        lambda: same(
            client.completions.create(model=model, prompt=PROMPT, echo=True, **greedy).choices[0].text, PROMPT + plain
        ),
    )

    def logprobs():
        choice = client.chat.completions.create(
            model=model, messages=messages, logprobs=True, top_logprobs=2, **greedy
        ).choices[0]
        return tokens_of(
            choice.message.content,
            [(t.token, t.logprob, [a.token for a in t.top_logprobs]) for t in choice.logprobs.content],
        )

    check("chat.completions logprobs", logprobs)
    check(
        "response_format json_object",
        lambda: json.loads(
            client.chat.completions.create(
                model=model, messages=messages, response_format={"type": "json_object"}, **greedy
            )
            .choices[0]
            .message.content
        ),
    )

    class Score(BaseModel):
        score: int

    check(
        "chat.completions.parse (pydantic)",
        lambda: (
            client.chat.completions.parse(model=model, messages=messages, response_format=Score, **greedy)
            .choices[0]
            .message.parsed
        ),
    )
    check(
        "embeddings (base64, the default)",
        lambda: unit(
            [
                d.embedding
                for d in client.embeddings.create(model=model, input=["first text", "second, longer text"]).data
            ],
            ref.width,
        ),
    )
    check(
        "embeddings float",
        lambda: unit(
            [client.embeddings.create(model=model, input="first text", encoding_format="float").data[0].embedding],
            ref.width,
        ),
    )
    check(
        "embeddings dimensions",
        lambda: unit([client.embeddings.create(model=model, input="first text", dimensions=8).data[0].embedding], 8),
    )

    async def async_stream():
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0) as aclient:
            chunks = [
                c
                async for c in await aclient.chat.completions.create(
                    model=model, messages=messages, stream=True, **greedy
                )
            ]
        return same("".join(c.choices[0].delta.content or "" for c in chunks), want["message"]["content"], "stream")

    check("AsyncOpenAI stream", async_stream)
    check(
        "unknown model is a 404",
        lambda: raises(
            lambda: client.chat.completions.create(model="gpt-4o", messages=messages), openai.NotFoundError, 404
        ),
    )

    def tool_call():
        reply = client.chat.completions.create(
            model=model, messages=messages, tools=[_TOOL], tool_choice="required", max_tokens=40, seed=1
        )
        call = reply.choices[0].message.tool_calls[0]
        assert reply.choices[0].finish_reason == "tool_calls" and call.function.name == "get_weather"
        assert isinstance(json.loads(call.function.arguments)["city"], str)
        return call.function.arguments

    check("tools: tool_choice required gives a call", tool_call)


def check_langchain(url: str, model: str, ref: Reference, check: Checks) -> None:
    from langchain_ollama import ChatOllama, OllamaEmbeddings, OllamaLLM
    from ollama import ResponseError
    from pydantic import BaseModel

    llm = ChatOllama(model=model, base_url=url, temperature=0, num_predict=N, validate_model_on_init=True)
    want = ref.chat(QUESTION, temperature=0, num_predict=N)
    text = want["message"]["content"]

    def invoke():
        reply = llm.invoke(QUESTION)
        usage = reply.usage_metadata
        expect(
            usage["input_tokens"] == want["prompt_eval_count"] and usage["output_tokens"] == want["eval_count"],
            f"usage_metadata {usage}",
        )
        expect(reply.response_metadata["done_reason"] in ("stop", "length"), f"{reply.response_metadata}")
        return same(reply.content, text)

    check("ChatOllama invoke", invoke)
    check("ChatOllama stream", lambda: same("".join(c.content for c in llm.stream(QUESTION)), text, "stream"))
    check("ChatOllama stop", lambda: stops(lambda stop: llm.invoke(QUESTION, stop=stop).content, text))
    seeded = ChatOllama(model=model, base_url=url, temperature=1.0, seed=7, num_predict=12)
    check(
        "ChatOllama seed",
        lambda: same(
            seeded.invoke(QUESTION).content,
            ref.chat(QUESTION, temperature=1.0, seed=7, num_predict=12)["message"]["content"],
        ),
    )

    async def async_calls():
        same((await llm.ainvoke(QUESTION)).content, text)
        return same("".join([c.content async for c in llm.astream(QUESTION)]), text, "astream")

    check("ChatOllama ainvoke, astream", async_calls)

    def logprobs():
        reply = ChatOllama(
            model=model, base_url=url, temperature=0, num_predict=N, logprobs=True, top_logprobs=2
        ).invoke(QUESTION)
        return tokens_of(
            reply.content,
            [
                (t["token"], t["logprob"], [a["token"] for a in t["top_logprobs"]])
                for t in reply.response_metadata["logprobs"]
            ],
        )

    check("ChatOllama logprobs (top_logprobs)", logprobs)
    check(
        "ChatOllama format json",
        lambda: json.loads(
            ChatOllama(model=model, base_url=url, temperature=0, num_predict=N, format="json").invoke(QUESTION).content
        ),
    )

    class Score(BaseModel):
        score: int

    check(
        "with_structured_output json_schema",
        lambda: llm.with_structured_output(Score, method="json_schema").invoke(QUESTION),
    )
    # json_mode asks for any JSON object (the schema is only described in the prompt): the raw reply must parse
    check(
        "with_structured_output json_mode (raw parses)",
        lambda: json.loads(
            llm.with_structured_output(Score, method="json_mode", include_raw=True).invoke(QUESTION)["raw"].content
        ),
    )

    def bound_tools():
        reply = llm.bind_tools([_TOOL]).invoke(QUESTION)  # tool_choice auto: text or a call
        assert reply.content or (reply.tool_calls and reply.tool_calls[0]["name"] == "get_weather")
        return reply.tool_calls or reply.content[:40]

    check("bind_tools answers (text or a call)", bound_tools)
    check(
        "reasoning is refused (400)",
        lambda: raises(
            lambda: ChatOllama(model=model, base_url=url, reasoning=True).invoke(QUESTION), ResponseError, 400
        ),
    )
    check(
        "validate_model_on_init rejects another model",
        lambda: raises(lambda: ChatOllama(model="llama3.1:8b", base_url=url, validate_model_on_init=True), ValueError),
    )

    completion = OllamaLLM(model=model, base_url=url, temperature=0, num_predict=N)
    plain = ref.generate(PROMPT, temperature=0, num_predict=N)["response"]
    check("OllamaLLM invoke", lambda: same(completion.invoke(PROMPT), plain))
    check("OllamaLLM stream", lambda: same("".join(completion.stream(PROMPT)), plain, "stream"))

    embeddings = OllamaEmbeddings(model=model, base_url=url)
    check(
        "OllamaEmbeddings embed_documents",
        lambda: unit(embeddings.embed_documents(["first text", "second text"]), ref.width),
    )
    check("OllamaEmbeddings embed_query", lambda: unit([embeddings.embed_query("first text")], ref.width))
    check(
        "OllamaEmbeddings dimensions",
        lambda: unit([OllamaEmbeddings(model=model, base_url=url, dimensions=8).embed_query("first text")], 8),
    )

    async def async_embed():
        return unit(await embeddings.aembed_documents(["first text"]), ref.width)

    check("OllamaEmbeddings aembed_documents", async_embed)


def check_llamaindex(url: str, model: str, ref: Reference, check: Checks) -> None:
    from llama_index.core.llms import ChatMessage
    from llama_index.core.prompts import PromptTemplate
    from llama_index.embeddings.ollama import OllamaEmbedding
    from llama_index.llms.ollama import Ollama
    from pydantic import BaseModel

    options = {"num_predict": N}
    llm = Ollama(model=model, base_url=url, temperature=0, request_timeout=120, additional_kwargs=options)
    text = ref.chat(QUESTION, temperature=0, num_predict=N)["message"]["content"]
    check(
        "metadata (context window from /api/show)",
        lambda: equal(llm.metadata.context_window, ref.context, "context_window"),
    )
    check("complete", lambda: same(llm.complete(QUESTION).text, text))
    check("stream_complete", lambda: same("".join(r.delta for r in llm.stream_complete(QUESTION)), text, "stream"))
    messages = [ChatMessage(role="user", content=QUESTION)]
    check("chat", lambda: same(llm.chat(messages).message.content, text))
    check("stream_chat", lambda: same("".join(r.delta for r in llm.stream_chat(messages)), text, "stream"))

    async def async_calls():
        same((await llm.achat(messages)).message.content, text)
        return same("".join([r.delta async for r in await llm.astream_chat(messages)]), text, "astream_chat")

    check("achat, astream_chat", async_calls)
    seeded = Ollama(
        model=model,
        base_url=url,
        temperature=1.0,
        request_timeout=120,
        additional_kwargs={"seed": 7, "num_predict": 12},
    )
    check(
        "seed",
        lambda: same(
            seeded.complete(QUESTION).text,
            ref.chat(QUESTION, temperature=1.0, seed=7, num_predict=12)["message"]["content"],
        ),
    )
    check(
        "stop",
        lambda: stops(
            lambda stop: (
                Ollama(
                    model=model,
                    base_url=url,
                    temperature=0,
                    request_timeout=120,
                    additional_kwargs={**options, "stop": stop},
                )
                .complete(QUESTION)
                .text
            ),
            text,
        ),
    )
    check(
        "json_mode",
        lambda: json.loads(
            Ollama(
                model=model, base_url=url, temperature=0, request_timeout=120, json_mode=True, additional_kwargs=options
            )
            .complete(QUESTION)
            .text
        ),
    )

    class Score(BaseModel):
        score: int

    check("structured_predict", lambda: llm.structured_predict(Score, PromptTemplate("Score {thing}."), thing="it"))
    check("as_structured_llm", lambda: llm.as_structured_llm(Score).complete(QUESTION).raw)
    embedding = OllamaEmbedding(model_name=model, base_url=url)
    check(
        "OllamaEmbedding text, batch, query",
        lambda: unit(
            [
                embedding.get_text_embedding("first text"),
                *embedding.get_text_embedding_batch(["a", "b c"]),
                embedding.get_query_embedding("first text"),
            ],
            ref.width,
        ),
    )

    async def async_embed():
        return unit([await embedding.aget_text_embedding("first text")], ref.width)

    check("OllamaEmbedding aget_text_embedding", async_embed)


def check_litellm(url: str, model: str, ref: Reference, check: Checks) -> None:
    import litellm

    messages = [{"role": "user", "content": QUESTION}]
    want_chat = ref.chat(QUESTION, temperature=0, num_predict=N)
    for provider in ("ollama", "ollama_chat"):
        kw = dict(model=f"{provider}/{model}", api_base=url, messages=messages, max_tokens=N, temperature=0)
        first = check(f"{provider}/ completion", lambda: _litellm_reply(litellm.completion(**kw), want_chat, provider))

        def stream():
            chunks = list(litellm.completion(stream=True, **kw))
            return (
                same("".join(c.choices[0].delta.content or "" for c in chunks), first, "stream")
                and f"{len(chunks)} chunks"
            )

        check(f"{provider}/ stream", stream)

        async def async_calls():
            same((await litellm.acompletion(**kw)).choices[0].message.content, first)
            chunks = [c async for c in await litellm.acompletion(stream=True, **kw)]
            return same("".join(c.choices[0].delta.content or "" for c in chunks), first, "astream")

        check(f"{provider}/ acompletion, astream", async_calls)
        seeded = {**kw, "temperature": 1.0, "seed": 7, "max_tokens": 12}
        check(
            f"{provider}/ seed",
            lambda: same(
                litellm.completion(**seeded).choices[0].message.content,
                litellm.completion(**seeded).choices[0].message.content,
            ),
        )
        check(
            f"{provider}/ stop",
            lambda: stops(lambda stop: litellm.completion(stop=stop, **kw).choices[0].message.content, first or ""),
        )
        check(
            f"{provider}/ response_format json_object",
            lambda: json.loads(
                litellm.completion(response_format={"type": "json_object"}, **kw).choices[0].message.content
            ),
        )
        check(
            f"{provider}/ response_format json_schema",
            lambda: _score(
                litellm.completion(
                    response_format={"type": "json_schema", "json_schema": {"name": "score", "schema": SCHEMA}}, **kw
                )
                .choices[0]
                .message.content
            ),
        )
    check(
        "ollama/ embedding",
        lambda: unit(
            [
                d["embedding"]
                for d in litellm.embedding(
                    model=f"ollama/{model}", api_base=url, input=["first text", "second text"]
                ).data
            ],
            ref.width,
        ),
    )
    check(
        "ollama/ embedding dimensions",
        lambda: unit(
            [
                d["embedding"]
                for d in litellm.embedding(
                    model=f"ollama/{model}", api_base=url, input=["first text"], dimensions=8
                ).data
            ],
            8,
        ),
    )
    check(
        "text_completion",
        lambda: same(
            litellm.text_completion(model=f"ollama/{model}", api_base=url, prompt=PROMPT, max_tokens=N, temperature=0)
            .choices[0]
            .text,
            ref.generate(PROMPT, temperature=0, num_predict=N)["response"],
        ),
    )
    check(
        "get_model_info (from /api/show)",
        lambda: equal(litellm.get_model_info(f"ollama/{model}", api_base=url)["max_tokens"], ref.context, "max_tokens"),
    )


def _litellm_reply(reply, want_chat: dict, provider: str) -> str:
    text = reply.choices[0].message.content
    expect(bool(text) and reply.usage.completion_tokens <= N, f"reply {text!r}, usage {reply.usage}")
    if provider == "ollama_chat":  # sent as chat messages: the same request as by hand
        expect(reply.usage.prompt_tokens == want_chat["prompt_eval_count"], f"usage {reply.usage}")
        same(text, want_chat["message"]["content"])
    return text  # `ollama/` renders the messages into a prompt of its own for /api/generate


def tokens_of(text: str, tokens: list[tuple[str, float, list[str]]]) -> str:
    """Greedy replies' logprobs: one per token, joining to the text, each token the best of its alternatives."""
    expect("".join(t for t, _, _ in tokens) == text, f"tokens {[t for t, _, _ in tokens]} do not join to {text!r}")
    expect(all(lp <= 0 and top[0] == t and len(top) == 2 for t, lp, top in tokens), f"logprobs {tokens[:3]}...")
    return f"{len(tokens)} tokens, {tokens[0][1]:.2f} ..."


def _score(text: str) -> dict:
    value = json.loads(text)
    expect(isinstance(value.get("score"), int), f"no integer score in {text}")
    return value


_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
CHECKS = {
    "ollama": check_ollama,
    "openai": check_openai,
    "langchain": check_langchain,
    "llamaindex": check_llamaindex,
    "litellm": check_litellm,
}


# -- running ----------------------------------------------------------------------------------------------
def missing_module(client: str) -> str | None:
    for name in CLIENTS[client][0]:
        try:
            importlib.import_module(name)
        except ImportError as err:
            return f"{name} is not importable ({err})"
    return None


def versions(client: str) -> str:
    found = []
    for dist in CLIENTS[client][1]:
        try:
            found.append(f"{dist} {importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{dist} ?")
    return ", ".join(found)


def start_server(python: str) -> tuple[subprocess.Popen, str]:
    """serve_tiny.py under `python`, importing this checkout's gptcore; its URL from the startup line it logs
    on stderr."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    process = subprocess.Popen(
        [python, str(HERE / "serve_tiny.py"), "--name", "tiny"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    lines = [process.stderr.readline()]
    while lines[-1] and " on http" not in lines[-1]:
        lines.append(process.stderr.readline())
    line = lines[-1]
    if " on http" not in line:
        process.kill()
        raise SystemExit(f"serve_tiny.py did not start (exit {process.wait()}): {''.join(lines).strip()[-2000:]!r}")
    threading.Thread(target=process.stderr.read, daemon=True).start()  # the rest of its log: the pipe never fills
    return process, line.split(" on ", 1)[1].split()[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running gptcore serve (default: start tests/clients/serve_tiny.py)")
    parser.add_argument("--model", default="tiny", help="the served model's name")
    parser.add_argument("--only", default=",".join(CHECKS), help=f"comma-separated, from {', '.join(CHECKS)}")
    parser.add_argument("--server-python", default=sys.executable, help="interpreter with gptcore, to start the server")
    args = parser.parse_args(argv)
    # LiteLLM fetches its price list from GitHub when imported unless told to use its bundled copy
    os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    chosen = [c.strip() for c in args.only.split(",") if c.strip()]
    unknown = [c for c in chosen if c not in CHECKS]
    if unknown:
        parser.error(f"unknown client(s): {', '.join(unknown)}")
    runnable = []
    for client in chosen:
        why = missing_module(client)
        if why:
            print(f"skip {client}: {why}", flush=True)
        else:
            print(f"{client}: {versions(client)}", flush=True)
            runnable.append(client)
    if not runnable:
        return SKIPPED
    server, url = start_server(args.server_python) if args.url is None else (None, args.url.rstrip("/"))
    failed = 0
    try:
        print(f"server: {url}, model {args.model}; python {sys.version.split()[0]}", flush=True)
        ref = Reference(url, args.model)
        for client in runnable:
            check = Checks(client)
            CHECKS[client](url, args.model, ref, check)
            failed += check.failed
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    print(f"{failed} check(s) failed" if failed else "all checks passed", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
