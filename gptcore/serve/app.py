"""The HTTP side: Ollama's routes (`/api/*`, NDJSON streams) and OpenAI's (`/v1/*`, SSE streams) on FastAPI.

Handlers parse and validate a request (protocol), render its prompt (chat), queue it on the engine and
forward its events; they never run the model. Errors are one clear message in each API's shape: Ollama's
`{"error": "..."}`, OpenAI's `{"error": {"message", "type", "param", "code"}}`. Requests from web pages
are checked as Ollama checks them: the Host must be the loopback (when bound to it) and an Origin must be
allowed (localhost and loopback origins by default, more through `origins` / OLLAMA_ORIGINS).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
import re
import socket
import struct
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptcore.serve import protocol as p
from gptcore.serve.chat import ROLES, TemplateError, render_chat, render_generate
from gptcore.serve.engine import Done, Engine, Failed, Job, Piece, Sampling, TokenLogprob, budget, check_options
from gptcore.tokenizer import encode_text

DEFAULT_TEMPERATURE = 0.8  # Ollama's sampling defaults, used when a request leaves them out
DEFAULT_TOP_K = 40
MAX_TOP_LOGPROBS = 20  # Ollama's and OpenAI's chat limit; the legacy completions API allows 5
OPENAI_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's
# Ollama's default allowed origins (envconfig.AllowedOrigins), `*` matching anything.
DEFAULT_ORIGINS = [f"{scheme}://{host}{port}" for host in ("localhost", "127.0.0.1", "0.0.0.0")
                   for scheme in ("http", "https") for port in ("", ":*")] + [
    "app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]


@dataclass
class ServerInfo:
    """What the routes need to know besides the engine."""

    name: str
    path: Path
    digest: str
    version: str
    context_length: int
    n_params: int
    dtype: str
    bound_host: str = "127.0.0.1"
    max_body: int = 1 << 20
    max_predict: int | None = None
    origins: list[str] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))


def create_app(engine: Engine, info: ServerInfo) -> FastAPI:
    """The FastAPI application serving `engine`'s model as `info.name`."""
    app = FastAPI(title="gptcore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.info = engine, info

    app.add_middleware(Guard, info=info, origins=[_glob(o) for o in DEFAULT_ORIGINS + info.origins])

    @app.exception_handler(p.RequestError)
    async def request_error(request: Request, err: p.RequestError):
        return _error(err.status, err.message, request.url.path.startswith("/v1"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = "404 page not found" if err.status_code == 404 else str(err.detail).lower()
        return _error(err.status_code, message, request.url.path.startswith("/v1"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # a bug; still one line, never a traceback
        return _error(500, " ".join(str(err).split()) or type(err).__name__, request.url.path.startswith("/v1"))

    for routes in (_ollama_metadata_routes, _ollama_generation_routes, _embedding_routes, _openai_routes):
        app.include_router(routes(engine, info))
    return app


def _ollama_metadata_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/, /api/version, /api/tags, /api/ps, /api/show, /api/pull, /api/delete."""
    app = APIRouter()

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return PlainTextResponse("Ollama is running")

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version():
        return {"version": info.version}

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags():
        return {"models": [_tag(info)]}

    @app.api_route("/api/ps", methods=["GET", "HEAD"])
    async def ps():
        if engine.model is None:
            return {"models": []}
        return {"models": [{**_tag(info), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                            "context_length": info.context_length}]}

    @app.post("/api/show")
    async def show(request: Request):
        body = p.parse(p.ShowRequest, await _read_json(request, info))
        _check_model(body.model or body.name, info)
        return _show(info)

    @app.post("/api/pull")
    async def pull(request: Request):
        body = p.parse(p.PullRequest, await _read_json(request, info))
        _check_model(body.model or body.name, info)
        if body.stream:
            return StreamingResponse(iter([json.dumps({"status": "success"}) + "\n"]),
                                     media_type="application/x-ndjson")
        return {"status": "success"}

    @app.delete("/api/delete")
    async def delete(request: Request):
        await _read_json(request, info, required=False)
        raise p.RequestError(400, f"gptcore serves {info.name} from {info.path.name} and does not delete it")

    return app


def _ollama_generation_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/generate and /api/chat."""
    app = APIRouter()

    @app.post("/api/generate")
    async def generate(request: Request):
        body = p.parse(p.GenerateRequest, await _read_json(request, info))
        name = body.model_name()
        _check_model(name, info)
        if body.images:
            raise p.RequestError(400, f"{name} does not support images")
        if body.suffix:
            raise p.RequestError(400, f"{name} does not support insert (suffix)")
        _refuse_thinking(body.think, name)
        sampling, num_predict = _ollama_sampling(body.options)
        grammar = await _ollama_grammar(engine, body.format)
        try:
            text = render_generate(body.prompt or "", body.system, body.template, body.raw)
        except TemplateError as err:
            raise p.RequestError(400, str(err)) from None
        context = body.context or []
        vocab = info.model_info.get("gpt2.vocab_size", 50257)
        if any(not 0 <= t < vocab for t in context):
            raise p.RequestError(400, f"invalid context: expected token ids in [0, {vocab})")
        # Ollama: no prompt, system or template loads the model, whatever the context holds
        ids = context + encode_text(engine.tokenizer, text) if text else []
        job = OllamaJob(name, ids, sampling, num_predict, grammar, body.stream, chat=False, raw=body.raw,
                        keep_alive=body.keep_alive, logprobs=_ollama_logprobs_asked(body))
        return await _ollama_reply(request, engine, info, job)

    @app.post("/api/chat")
    async def chat(request: Request):
        body = p.parse(p.ChatRequest, await _read_json(request, info))
        name = body.model_name()
        _check_model(name, info)
        if body.tools:
            raise p.RequestError(400, f"{name} does not support tools")
        _refuse_thinking(body.think, name)
        sampling, num_predict = _ollama_sampling(body.options)
        grammar = await _ollama_grammar(engine, body.format)
        messages = []
        for i, m in enumerate(body.messages or []):
            if m.role not in ROLES:
                raise p.RequestError(400, f"invalid messages[{i}].role: expected one of {', '.join(ROLES)}, got {m.role!r}")
            if m.images:
                raise p.RequestError(400, f"{name} does not support images")
            messages.append({"role": m.role, "content": m.content or ""})
        ids = encode_text(engine.tokenizer, render_chat(messages)) if messages else []
        job = OllamaJob(name, ids, sampling, num_predict, grammar, body.stream, chat=True, raw=True,
                        keep_alive=body.keep_alive, logprobs=_ollama_logprobs_asked(body))
        return await _ollama_reply(request, engine, info, job)

    return app


def _embedding_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/embed, /api/embeddings (Ollama's legacy route) and /v1/embeddings."""
    app = APIRouter()

    @app.post("/api/embed")
    async def embed(request: Request):
        body = p.parse(p.EmbedRequest, await _read_json(request, info))
        _check_model(body.model, info)
        texts = [body.input] if isinstance(body.input, str) else (body.input or [])
        start = time.perf_counter()
        vectors, count, load_ns = await _embed(engine, info, texts, body.truncate, normalize=True,
                                               dimensions=body.dimensions)
        return {"model": body.model, "embeddings": vectors, "total_duration": _ns(time.perf_counter() - start),
                "load_duration": load_ns, "prompt_eval_count": count}

    @app.post("/api/embeddings")
    async def embeddings_legacy(request: Request):
        body = p.parse(p.LegacyEmbeddingsRequest, await _read_json(request, info))
        _check_model(body.model, info)
        if not body.prompt:
            return {"embedding": []}
        vectors, _, _ = await _embed(engine, info, [body.prompt], truncate=True, normalize=False)
        return {"embedding": vectors[0]}

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        body = p.parse(p.EmbeddingsRequest, await _read_json(request, info))
        _check_model(body.model, info)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise p.RequestError(400, "input: at least one string is required")
        vectors, count, _ = await _embed(engine, info, texts, truncate=True, normalize=True, dimensions=body.dimensions)
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
        return {"object": "list", "model": body.model,
                "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
                "usage": {"prompt_tokens": count, "total_tokens": count}}

    return app


def _openai_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/v1/models, /v1/models/{model}, /v1/chat/completions, /v1/completions."""
    app = APIRouter()

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [_openai_model(info)]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        _check_model(model, info)
        return _openai_model(info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = p.parse(p.ChatCompletionRequest, await _read_json(request, info))
        _check_model(body.model, info)
        if body.tools:
            raise p.RequestError(400, f"{body.model} does not support tools")
        messages = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ROLES:
                raise p.RequestError(400, f"invalid messages[{i}].role: expected one of {', '.join(ROLES)}, got {m.role!r}")
            messages.append({"role": role, "content": _openai_text(m.content, i)})
        if not messages:
            raise p.RequestError(400, "messages: at least one message is required")
        if body.top_logprobs is not None and not body.logprobs:
            raise p.RequestError(400, "top_logprobs: logprobs must be true to use top_logprobs")
        logprobs = _top_count(body.top_logprobs or 0, MAX_TOP_LOGPROBS, "top_logprobs") if body.logprobs else None
        ids = encode_text(engine.tokenizer, render_chat(messages))
        return await _openai_reply(request, engine, info, body, ids, chat=True, logprobs=logprobs)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = p.parse(p.CompletionRequest, await _read_json(request, info))
        _check_model(body.model, info)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise p.RequestError(400, "prompt: gptcore completes one prompt per request")
        if not prompts[0]:
            raise p.RequestError(400, "prompt: the prompt is empty")
        if body.suffix:
            raise p.RequestError(400, f"suffix: {body.model} does not support insert (fill-in-the-middle)")
        logprobs = None if body.logprobs is None else _top_count(body.logprobs, 5, "logprobs")
        if body.echo and logprobs is not None:  # OpenAI would score the echoed prompt's tokens too
            raise p.RequestError(400, "echo and logprobs: gptcore does not return the prompt's log-probabilities")
        ids = encode_text(engine.tokenizer, prompts[0])
        return await _openai_reply(request, engine, info, body, ids, chat=False, logprobs=logprobs,
                                   echo=prompts[0] if body.echo else None)

    return app


class Guard:
    """ASGI middleware: the body-size limit (on Content-Length), Ollama's Host and Origin checks, CORS."""

    def __init__(self, app, info: ServerInfo, origins: list[re.Pattern]):
        self.app, self.info, self.origins = app, info, origins

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        openai = scope["path"].startswith("/v1")
        length, origin = headers.get("content-length"), headers.get("origin")
        refusal = None
        if length is not None and (not length.isdigit() or int(length) > self.info.max_body):
            refusal = (_error(413, f"request body too large: {length} bytes (limit {self.info.max_body})", openai, close=True)
                       if length.isdigit() else _error(400, "invalid Content-Length", openai, close=True))
        elif not _host_allowed(headers.get("host", ""), self.info.bound_host):
            refusal = _error(403, "host not allowed", openai)
        elif origin is not None and not any(pattern.fullmatch(origin) for pattern in self.origins):
            refusal = _error(403, f"origin not allowed: {origin}", openai)
        elif scope["method"] == "OPTIONS" and origin is not None:
            refusal = Response(status_code=204, headers={
                "Access-Control-Allow-Origin": origin, "Vary": "Origin",
                "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
                "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "*"),
                "Access-Control-Max-Age": "43200"})
        if refusal is not None:
            return await refusal(scope, receive, send)
        if origin is None:
            return await self.app(scope, receive, send)

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                out = MutableHeaders(scope=message)
                out["Access-Control-Allow-Origin"] = origin
                out["Vary"] = "Origin"
            await send(message)

        await self.app(scope, receive, send_with_cors)


# -- Ollama replies ---------------------------------------------------------------------------------------
@dataclass
class OllamaJob:
    """A parsed /api/generate or /api/chat request: what `_ollama_reply` runs and how it answers."""

    name: str  # the model name the client used, echoed in every reply
    ids: list[int]  # the prompt's token ids (empty: load or unload the model, as Ollama does)
    sampling: Sampling
    num_predict: int | None  # None or < 0: until end of text or a full context
    grammar: str | None  # llguidance grammar of `format`, or None
    stream: bool
    chat: bool  # /api/chat's reply shape ("message") rather than /api/generate's ("response")
    raw: bool  # /api/generate's raw: no `context` in the reply
    keep_alive: Any
    logprobs: int | None = None  # alternatives per token to report, None for no logprobs


async def _ollama_reply(request: Request, engine: Engine, info: ServerInfo, job: OllamaJob) -> Response:
    name, ids, chat, raw, logprobs = job.name, job.ids, job.chat, job.raw, job.logprobs
    unload = _is_zero(job.keep_alive)

    def fields(text: str, done: bool, tokens: list[TokenLogprob] | None = None) -> dict:
        head = {"model": name, "created_at": _now()}
        reply = ({**head, "message": {"role": "assistant", "content": text}, "done": done} if chat
                 else {**head, "response": text, "done": done})
        if tokens:
            reply["logprobs"] = [_ollama_logprob(t, logprobs) for t in tokens]
        return reply

    if not ids:  # Ollama answers an empty prompt by loading (or, with keep_alive 0, unloading) the model
        if unload:
            engine.request_unload()
            return JSONResponse({**fields("", True), "done_reason": "unload"})
        load_ns = await asyncio.to_thread(engine.load)
        return JSONResponse({**fields("", True), "done_reason": "load", "load_duration": load_ns})

    def final(done: Done, text: str, tokens: list[TokenLogprob] | None = None) -> dict:
        reply = {**fields(text, True, tokens), "done_reason": done.reason, "total_duration": done.total_duration,
                 "load_duration": done.load_duration, "prompt_eval_count": len(done.prompt_ids),
                 "prompt_eval_duration": done.prompt_eval_duration, "eval_count": len(done.new_ids),
                 "eval_duration": done.eval_duration}
        if not chat and not raw:
            reply["context"] = done.prompt_ids + done.new_ids
        return reply

    events = _submit(engine, info, ids, job.sampling, job.num_predict, job.grammar, unload_after=unload, logprobs=logprobs)
    if job.stream:
        async def lines() -> AsyncIterator[str]:
            async for event in events:
                if isinstance(event, Piece):
                    yield json.dumps(fields(event.text, False, event.logprobs), ensure_ascii=False) + "\n"
                elif isinstance(event, Done):
                    yield json.dumps(final(event, ""), ensure_ascii=False) + "\n"
                else:
                    yield json.dumps({"error": event.message}) + "\n"

        return StreamingResponse(lines(), media_type="application/x-ndjson")
    done = await _wait(request, events)
    return JSONResponse(final(done, done.text, done.logprobs))


# -- OpenAI replies ---------------------------------------------------------------------------------------
async def _openai_reply(request: Request, engine: Engine, info: ServerInfo, body, ids: list[int], chat: bool,
                        logprobs: int | None = None, echo: str | None = None) -> Response:
    if body.n != 1:
        raise p.RequestError(400, "n: gptcore returns one choice per request (n=1)")
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise p.RequestError(400, f"temperature: expected a number from 0 to 2, got {temperature}")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    sampling = _sampling(temperature, None, body.seed, stop)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None and not chat:
        max_tokens = OPENAI_MAX_TOKENS
    if max_tokens is not None and max_tokens < 0:
        raise p.RequestError(400, f"max_tokens: expected a number >= 0, got {max_tokens}")
    grammar = None
    if body.response_format is not None and body.response_format.type != "text":
        schema = (body.response_format.json_schema or {}).get("schema") if body.response_format.type == "json_schema" else None
        if body.response_format.type == "json_schema" and not isinstance(schema, dict):
            raise p.RequestError(400, "response_format.json_schema.schema: expected a JSON schema object")
        grammar = await _grammar(engine, schema or {"type": "object"})
    kind = "chat.completion" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())

    def choice(text: str, reason: str | None, delta: bool = False, tokens: list[TokenLogprob] | None = None) -> dict:
        shown = None
        if logprobs is not None and tokens is not None:
            shown = _openai_chat_logprobs(tokens) if chat else _openai_completion_logprobs(tokens, logprobs)
        if chat:
            key = "delta" if delta else "message"
            return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": reason, "logprobs": shown}
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": shown}

    def usage(done: Done) -> dict:
        return {"prompt_tokens": len(done.prompt_ids), "completion_tokens": len(done.new_ids),
                "total_tokens": len(done.prompt_ids) + len(done.new_ids)}

    def envelope(**extra) -> dict:
        return {"id": rid, "object": kind + ("" if not extra.pop("chunk", False) else ".chunk"), "created": created,
                "model": body.model, "system_fingerprint": "gptcore", **extra}

    events = _submit(engine, info, ids, sampling, max_tokens, grammar, logprobs=logprobs)
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage

        async def sse() -> AsyncIterator[str]:
            if echo:  # the legacy API's echo: the prompt comes back first
                yield _sse(envelope(choices=[choice(echo, None)]))
            async for event in events:
                if isinstance(event, Piece):
                    if event.text or event.logprobs:
                        yield _sse(envelope(chunk=chat, choices=[choice(event.text, None, True, event.logprobs)]))
                elif isinstance(event, Done):
                    yield _sse(envelope(chunk=chat, choices=[choice("", _finish_reason(event), delta=True)]))
                    if include_usage:
                        yield _sse(envelope(chunk=chat, choices=[], usage=usage(event)))
                else:
                    yield _sse(p.openai_error(500, event.message))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    done = await _wait(request, events)
    text = (echo or "") + done.text
    return JSONResponse(envelope(choices=[choice(text, _finish_reason(done), tokens=done.logprobs)], usage=usage(done)))


def _ollama_logprobs_asked(body) -> int | None:
    """Ollama's logprobs / top_logprobs: how many alternatives to report per token, None for no logprobs."""
    count = _top_count(body.top_logprobs or 0, MAX_TOP_LOGPROBS, "top_logprobs")
    return count if body.logprobs else None


def _top_count(count: int, most: int, name: str) -> int:
    if not 0 <= count <= most:
        raise p.RequestError(400, f"{name} must be between 0 and {most}, got {count}")
    return count


def _ollama_logprob(token: TokenLogprob, top: int) -> dict:
    entry = {"token": token.token, "logprob": token.logprob, "bytes": list(token.raw)}
    if top:
        entry["top_logprobs"] = [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in token.top]
    return entry


def _openai_chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {"content": [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw),
                         "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.raw)} for a in t.top]}
                        for t in tokens], "refusal": None}


def _openai_completion_logprobs(tokens: list[TokenLogprob], top: int) -> dict:
    """The legacy completions shape: parallel lists, and where each token's text starts in the reply."""
    return {"tokens": [t.token for t in tokens], "token_logprobs": [t.logprob for t in tokens],
            "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens] if top else None,
            "text_offset": [t.offset for t in tokens]}


def _finish_reason(done: Done) -> str:
    return "length" if done.reason == "length" else "stop"


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def _openai_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise p.RequestError(400, f"messages[{i}].content: only text parts are supported, got {str(part.get('type'))[:40]!r}")
        parts.append(part["text"])
    return "\n".join(parts)


# -- shared pieces ----------------------------------------------------------------------------------------
def _submit(engine: Engine, info: ServerInfo, ids: list[int], sampling: Sampling, num_predict: int | None,
            grammar: str | None, unload_after: bool = False, logprobs: int | None = None) -> "_Events":
    if info.max_predict is not None and (num_predict is None or num_predict < 0 or num_predict > info.max_predict):
        num_predict = info.max_predict
    keep, max_new = budget(len(ids), num_predict, info.context_length)
    events = _Events(asyncio.get_running_loop())
    events.job = Job(ids[len(ids) - keep:], max_new, sampling, events.put, grammar, unload_after, logprobs)
    engine.submit(events.job)
    return events


class _Events:
    """The engine's events for one job, delivered into the event loop; closing it cancels the job."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job: Job | None = None

    def put(self, event) -> None:  # called on the engine's thread
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, event)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            self.job.cancel()

    async def __aiter__(self):
        try:
            while True:
                event = await self.queue.get()
                yield event
                if isinstance(event, (Done, Failed)):
                    return
        finally:
            self.job.cancel()


async def _wait(request: Request, events: _Events) -> Done:
    """The Done event of a non-streaming request; a client that goes away (checked every half second,
    whether or not tokens keep coming) cancels the job."""
    checked = time.monotonic()
    try:
        while True:
            try:
                event = await asyncio.wait_for(events.queue.get(), timeout=0.5)
            except asyncio.TimeoutError:
                event = None
            if isinstance(event, Done):
                return event
            if isinstance(event, Failed):
                raise p.RequestError(500, event.message)
            if time.monotonic() - checked >= 0.5:
                checked = time.monotonic()
                if await request.is_disconnected():
                    raise p.RequestError(499, "client closed the request")
    finally:
        events.job.cancel()


def _sampling(temperature: float, top_k: int | None, seed: int | None, stop: list[str]) -> Sampling:
    sampling = Sampling(temperature=float(temperature), top_k=top_k, seed=seed, stop=stop)
    if len(stop) > 16 or any(len(s) > 256 for s in stop):
        raise p.RequestError(400, "invalid stop: expected at most 16 strings of at most 256 characters")
    try:
        check_options(sampling)
    except ValueError as err:
        raise p.RequestError(400, f"invalid {err}") from None
    return sampling


def _ollama_sampling(options: p.Options | None) -> tuple[Sampling, int | None]:
    o = options or p.Options()
    temperature = DEFAULT_TEMPERATURE if o.temperature is None else o.temperature
    top_k = DEFAULT_TOP_K if o.top_k is None else o.top_k
    stop = [o.stop] if isinstance(o.stop, str) else (o.stop or [])
    sampling = _sampling(temperature, top_k if top_k > 0 else None, o.seed, stop)
    if o.num_predict is not None and o.num_predict < -2:
        raise p.RequestError(400, f"invalid num_predict: expected -1 (unbounded), -2 or a number >= 0, got {o.num_predict}")
    return sampling, o.num_predict


async def _ollama_grammar(engine: Engine, fmt: Any) -> str | None:
    if fmt in (None, ""):
        return None
    return await _grammar(engine, {"type": "object"} if fmt == "json" else fmt)


async def _grammar(engine: Engine, schema: dict) -> str:
    """An llguidance grammar for a JSON schema (compact JSON: no free whitespace), or 400 if it is not one."""
    from llguidance import LLMatcher

    try:
        grammar = LLMatcher.grammar_from_json_schema(schema, defaults={"whitespace_flexible": False})
    except ValueError as err:
        raise p.RequestError(400, f"invalid format: {err}") from None
    tokenizer = await asyncio.to_thread(engine.grammar_tokenizer)
    error = await asyncio.to_thread(LLMatcher.validate_grammar, grammar, tokenizer)
    if error:
        raise p.RequestError(400, f"invalid format: {error.splitlines()[0][:300]}")
    return grammar


async def _embed(engine: Engine, info: ServerInfo, texts: list[str], truncate: bool, normalize: bool,
                 dimensions: int | None = None):
    if dimensions is not None and dimensions < 0:
        raise p.RequestError(400, f"invalid dimensions: expected a number >= 1 (0: all), got {dimensions}")
    prompts = []
    for i, text in enumerate(texts):
        ids = encode_text(engine.tokenizer, text)
        if not ids:
            raise p.RequestError(400, f"input[{i}]: cannot embed an empty string")
        if len(ids) > info.context_length:
            if not truncate:
                raise p.RequestError(400, f"input[{i}]: {len(ids)} tokens exceed the context length "
                                          f"({info.context_length}); set truncate to true to cut it")
            ids = ids[: info.context_length]
        prompts.append(ids)
    if not prompts:
        return [], 0, 0
    vectors, load_ns = await asyncio.to_thread(engine.embed, prompts, normalize, dimensions or None)
    return vectors, sum(len(ids) for ids in prompts), load_ns


def _refuse_thinking(think: Any, name: str) -> None:
    if think not in (None, False):
        raise p.RequestError(400, f"{name} does not support thinking")


def _check_model(requested: str | None, info: ServerInfo) -> None:
    if not requested:
        raise p.RequestError(400, "model is required")
    if requested != info.name and canonical_name(requested) != info.name:
        raise p.RequestError(404, f"model '{requested}' not found")


async def _read_json(request: Request, info: ServerInfo, required: bool = True) -> Any:
    data = bytearray()
    async for chunk in request.stream():
        data += chunk
        if len(data) > info.max_body:
            raise p.RequestError(413, f"request body too large: over {info.max_body} bytes")
    if not data and not required:
        return {}
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise p.RequestError(400, f"invalid JSON in the request body: {err}") from None


def _error(status: int, message: str, openai: bool, close: bool = False) -> JSONResponse:
    body = p.openai_error(status, message) if openai else p.ollama_error(message)
    return JSONResponse(body, status_code=status, headers={"Connection": "close"} if close else None)


def _host_allowed(host: str, bound: str) -> bool:
    """Ollama's rule: any Host when bound beyond the loopback; else a loopback or local name."""
    if not _is_loopback(bound):
        return True
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    if name in ("", "localhost", socket.gethostname().lower()) or _is_loopback(name):
        return True
    return name.endswith((".localhost", ".local", ".internal"))


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _glob(pattern: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


def _is_zero(keep_alive: Any) -> bool:
    if isinstance(keep_alive, (int, float)):
        return keep_alive == 0
    return isinstance(keep_alive, str) and keep_alive.strip() in ("0", "0s", "0m", "0h")


def canonical_name(name: str) -> str:
    """Ollama's model names carry a tag; `latest` when none is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def default_name(path: Path) -> str:
    """models/gpt2-large-instruct/model.safetensors -> gpt2-large-instruct; other files by their stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def _details(info: ServerInfo) -> dict:
    n = info.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return {"parent_model": "", "format": "safetensors", "family": "gpt2", "families": ["gpt2"],
            "parameter_size": size, "quantization_level": info.dtype}


def _tag(info: ServerInfo) -> dict:
    stat = info.path.stat()
    return {"name": info.name, "model": info.name, "size": stat.st_size, "digest": info.digest,
            "modified_at": datetime.fromtimestamp(stat.st_mtime, timezone.utc).isoformat(), "details": _details(info)}


def _show(info: ServerInfo) -> dict:
    return {
        "license": "",
        "modelfile": f"# served by gptcore from {info.path.name}\nFROM {info.path.name}\n",
        "parameters": f"temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}",
        "template": "{{ .Prompt }}",
        "details": _details(info),
        "model_info": info.model_info,
        "capabilities": ["completion", "embedding"],
        "modified_at": _tag(info)["modified_at"],
    }


def _openai_model(info: ServerInfo) -> dict:
    return {"id": info.name, "object": "model", "created": info.created, "owned_by": "gptcore"}


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
