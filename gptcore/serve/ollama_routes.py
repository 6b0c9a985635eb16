"""Ollama's generation routes (/api/generate, /api/chat: an NDJSON stream or one JSON reply); the model
routes are in serve/models_routes.py, tool calling in serve/tools.py."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptcore.prompt import CHAT_ROLES as ROLES
from gptcore.prompt import render_chat
from gptcore.serve import protocol as p
from gptcore.serve.chat import TemplateError, render_generate
from gptcore.serve.engine import Engine
from gptcore.serve.events import Budget, submit, wait_done
from gptcore.serve.http_io import read_json
from gptcore.serve.info import ServerInfo, check_model
from gptcore.serve.jobs import Done, Piece, Sampling, TokenLogprob
from gptcore.serve.options import (
    MAX_TOP_LOGPROBS,
    json_schema_grammar,
    ollama_sampling,
    parse_keep_alive,
    top_count,
)
from gptcore.serve.tools import CallFilter, ToolPlan, history, ollama_calls, parse_call, plan_tools
from gptcore.tokenizer import encode_text


def ollama_generation_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/generate and /api/chat."""
    app = APIRouter()

    @app.post("/api/generate")
    async def generate(request: Request):
        body = p.parse(p.GenerateRequest, await read_json(request, info))
        return await _ollama_reply(request, engine, info, await _generate_job(engine, info, body))

    @app.post("/api/chat")
    async def chat(request: Request):
        body = p.parse(p.ChatRequest, await read_json(request, info))
        return await _ollama_reply(request, engine, info, await _chat_job(engine, info, body))

    return app


async def _generate_job(engine: Engine, info: ServerInfo, body: p.GenerateRequest) -> OllamaJob:
    """An /api/generate request as the job to run, or a RequestError saying what it asks that gptcore cannot do."""
    name = body.model_name()
    variant = check_model(name, info)
    if body.images:
        raise p.RequestError(400, f"{name} does not support images")
    if body.suffix:
        raise p.RequestError(400, f"{name} does not support insert (suffix)")
    _refuse_thinking(body.think, name)
    options = variant.options(body.options)
    sampling = ollama_sampling(options)
    keep_alive = parse_keep_alive(body.keep_alive)
    grammar = await _ollama_grammar(engine, body.format)
    try:
        system, template = body.system or variant.system, body.template or variant.template
        text = render_generate(body.prompt or "", system, template, body.raw)
    except TemplateError as err:
        raise p.RequestError(400, str(err)) from None
    context = body.context or []
    vocab = info.model_info.get("gpt2.vocab_size", 50257)
    if any(not 0 <= t < vocab for t in context):
        raise p.RequestError(400, f"invalid context: expected token ids in [0, {vocab})")
    # Ollama: no prompt, system or template loads the model, whatever the context holds
    ids = context + encode_text(engine.tokenizer, text) if text else []
    return OllamaJob(
        name,
        ids,
        sampling,
        options,
        grammar,
        body.stream,
        chat=False,
        raw=body.raw,
        keep_alive=keep_alive,
        logprobs=_ollama_logprobs_asked(body),
    )


async def _chat_job(engine: Engine, info: ServerInfo, body: p.ChatRequest) -> OllamaJob:
    """An /api/chat request as the job to run, or a RequestError saying what it asks that gptcore cannot do."""
    name = body.model_name()
    variant = check_model(name, info)
    _refuse_thinking(body.think, name)
    options = variant.options(body.options)
    sampling = ollama_sampling(options)
    keep_alive = parse_keep_alive(body.keep_alive)
    grammar = await _ollama_grammar(engine, body.format)
    plan = await plan_tools(
        engine, body.tools, "none" if grammar and body.tool_choice in (None, "auto") else body.tool_choice
    )
    if grammar and plan and plan.grammar:
        raise p.RequestError(400, "format and tool_choice: a reply follows one grammar, send one of them")
    messages = []
    for i, m in enumerate(body.messages or []):
        if m.role not in ROLES:
            raise p.RequestError(400, f"invalid messages[{i}].role: expected one of {', '.join(ROLES)}, got {m.role!r}")
        if m.images:
            raise p.RequestError(400, f"{name} does not support images")
        messages.append({"role": m.role, "content": m.content or "", "tool_calls": m.tool_calls})
    messages = variant.with_system(history(messages, bool(plan)))
    rendered = render_chat(messages, plan.tools if plan else None)
    ids = encode_text(engine.tokenizer, rendered) if body.messages else []
    return OllamaJob(
        name,
        ids,
        sampling,
        options,
        grammar or (plan.grammar if plan else None),
        body.stream,
        chat=True,
        raw=True,
        keep_alive=keep_alive,
        logprobs=_ollama_logprobs_asked(body),
        tools=plan,
    )


@dataclass
class OllamaJob:
    """A parsed /api/generate or /api/chat request: what `_ollama_reply` runs and how it answers."""

    name: str  # the model name the client used, echoed in every reply
    ids: list[int]  # the prompt's token ids (empty: load or unload the model, as Ollama does)
    sampling: Sampling
    options: p.Options  # num_predict (None or < 0: until end of text or a full context), num_ctx, num_keep
    grammar: str | None  # llguidance grammar of `format`, or None
    stream: bool
    chat: bool  # /api/chat's reply shape ("message") rather than /api/generate's ("response")
    raw: bool  # /api/generate's raw: no `context` in the reply
    keep_alive: float | None  # seconds (inf: forever), None: the server's default
    logprobs: int | None = None  # alternatives per token to report, None for no logprobs
    tools: ToolPlan | None = None  # /api/chat's tools (serve/tools.py)


async def _ollama_reply(request: Request, engine: Engine, info: ServerInfo, job: OllamaJob) -> Response:
    name, ids, chat, raw, logprobs = job.name, job.ids, job.chat, job.raw, job.logprobs
    unload = job.keep_alive == 0

    def fields(text: str, done: bool, tokens: list[TokenLogprob] | None = None, call: dict | None = None) -> dict:
        head = {"model": name, "created_at": _now()}
        reply = (
            {**head, "message": {"role": "assistant", "content": text}, "done": done}
            if chat
            else {**head, "response": text, "done": done}
        )
        if call:
            reply["message"]["tool_calls"] = ollama_calls(call)
        if tokens:
            reply["logprobs"] = [_ollama_logprob(t, logprobs) for t in tokens]
        return reply

    if not ids:  # Ollama answers an empty prompt by loading (or, with keep_alive 0, unloading) the model
        if unload:
            engine.request_unload()
            return JSONResponse({**fields("", True), "done_reason": "unload"})
        load_ns = await asyncio.to_thread(engine.load, job.keep_alive)
        return JSONResponse({**fields("", True), "done_reason": "load", "load_duration": load_ns})

    def final(done: Done, text: str, tokens: list[TokenLogprob] | None = None, call: dict | None = None) -> dict:
        reply = {
            **fields(text, True, tokens, call),
            "done_reason": done.reason,
            "total_duration": done.total_duration,
            "load_duration": done.load_duration,
            "prompt_eval_count": len(done.prompt_ids),
            "prompt_eval_duration": done.prompt_eval_duration,
            "eval_count": len(done.new_ids),
            "eval_duration": done.eval_duration,
        }
        if not chat and not raw:
            reply["context"] = done.prompt_ids + done.new_ids
        return reply

    o = job.options
    budget = Budget(o.num_predict, o.num_ctx, o.num_keep or 0)
    plan = job.tools if job.tools is not None and job.tools.grammar is not None else None
    trigger = plan.trigger if plan else None
    events = submit(
        engine, info, ids, job.sampling, budget, job.grammar, job.keep_alive, logprobs=logprobs, trigger=trigger
    )
    if job.stream:
        return StreamingResponse(_lines(events, fields, final, plan), media_type="application/x-ndjson")
    done = await wait_done(request, events)
    call = parse_call(done.text, plan) if plan else None
    return JSONResponse(final(done, "" if call else done.text, done.logprobs, call))


async def _lines(events, fields, final, plan: ToolPlan | None) -> AsyncIterator[str]:
    """An Ollama NDJSON stream of a job's events (fields / final: the reply objects); a tool call is held
    back by CallFilter and sent as one message with tool_calls before the final object."""
    held = CallFilter(plan)
    async for event in events:
        if isinstance(event, Piece):
            text = held.push(event.text)
            if text or event.logprobs or not plan:
                yield json.dumps(fields(text, False, event.logprobs), ensure_ascii=False) + "\n"
        elif isinstance(event, Done):
            text, call = held.finish(event.text)
            if text or call:
                yield json.dumps(fields(text, False, call=call), ensure_ascii=False) + "\n"
            yield json.dumps(final(event, ""), ensure_ascii=False) + "\n"
        else:
            yield json.dumps({"error": event.message}) + "\n"


async def _ollama_grammar(engine: Engine, fmt: Any) -> str | None:
    if fmt in (None, ""):
        return None
    return await json_schema_grammar(engine, {"type": "object"} if fmt == "json" else fmt)


def _ollama_logprobs_asked(body) -> int | None:
    """Ollama's logprobs / top_logprobs: how many alternatives to report per token, None for no logprobs."""
    count = top_count(body.top_logprobs or 0, MAX_TOP_LOGPROBS, "top_logprobs")
    return count if body.logprobs else None


def _ollama_logprob(token: TokenLogprob, top: int) -> dict:
    entry = {"token": token.token, "logprob": token.logprob, "bytes": list(token.raw)}
    if top:
        entry["top_logprobs"] = [{"token": t.token, "logprob": t.logprob, "bytes": list(t.raw)} for t in token.top]
    return entry


def _refuse_thinking(think: Any, name: str) -> None:
    if think not in (None, False):
        raise p.RequestError(400, f"{name} does not support thinking")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
