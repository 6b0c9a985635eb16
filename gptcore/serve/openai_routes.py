"""OpenAI's routes (/v1/models, /v1/models/{model}, /v1/chat/completions, /v1/completions) and their
reply envelopes: server-sent events or one JSON reply."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from gptcore.prompt import CHAT_ROLES as ROLES
from gptcore.prompt import render_chat
from gptcore.serve import protocol as p
from gptcore.serve.engine import Engine
from gptcore.serve.events import Budget, submit, wait_done
from gptcore.serve.http_io import read_json
from gptcore.serve.info import ServerInfo, check_model
from gptcore.serve.jobs import Done, Piece, TokenLogprob
from gptcore.serve.options import MAX_TOP_LOGPROBS, json_schema_grammar, openai_sampling, parse_keep_alive, top_count
from gptcore.serve.tools import CallFilter, ToolPlan, history, openai_calls, parse_call, plan_tools
from gptcore.tokenizer import encode_text

OPENAI_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's


def openai_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/v1/models, /v1/models/{model}, /v1/chat/completions, /v1/completions."""
    app = APIRouter()

    @app.api_route("/v1/models", methods=["GET", "HEAD"])
    async def models():
        return {"object": "list", "data": [_openai_model(info)]}

    @app.api_route("/v1/models/{model:path}", methods=["GET", "HEAD"])
    async def model(model: str):
        check_model(model, info)
        return _openai_model(info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = p.parse(p.ChatCompletionRequest, await read_json(request, info))
        variant = check_model(body.model, info)
        json_mode = body.response_format is not None and body.response_format.type != "text"
        plan = await plan_tools(
            engine, body.tools, "none" if json_mode and body.tool_choice in (None, "auto") else body.tool_choice
        )
        if json_mode and plan and plan.grammar:
            raise p.RequestError(400, "response_format and tool_choice: a reply follows one grammar, send one of them")
        messages = []
        for i, m in enumerate(body.messages):
            role = "system" if m.role == "developer" else m.role
            if role not in ROLES:
                raise p.RequestError(
                    400, f"invalid messages[{i}].role: expected one of {', '.join(ROLES)}, got {m.role!r}"
                )
            messages.append({"role": role, "content": _openai_text(m.content, i), "tool_calls": m.tool_calls})
        if not messages:
            raise p.RequestError(400, "messages: at least one message is required")
        if body.top_logprobs is not None and not body.logprobs:
            raise p.RequestError(400, "top_logprobs: logprobs must be true to use top_logprobs")
        logprobs = top_count(body.top_logprobs or 0, MAX_TOP_LOGPROBS, "top_logprobs") if body.logprobs else None
        messages = variant.with_system(history(messages, bool(plan)))
        ids = encode_text(engine.tokenizer, render_chat(messages, plan.tools if plan else None))
        return await _openai_reply(request, engine, info, body, ids, chat=True, logprobs=logprobs, plan=plan)

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = p.parse(p.CompletionRequest, await read_json(request, info))
        check_model(body.model, info)
        text, ids = _completion_prompt(body.prompt, engine, info)
        if body.best_of is not None and body.best_of != 1:
            raise p.RequestError(400, "best_of: gptcore returns one completion per request (best_of=1)")
        if body.suffix:
            raise p.RequestError(400, f"suffix: {body.model} does not support insert (fill-in-the-middle)")
        logprobs = None if body.logprobs is None else top_count(body.logprobs, 5, "logprobs")
        if body.echo and logprobs is not None:  # OpenAI would score the echoed prompt's tokens too
            raise p.RequestError(400, "echo and logprobs: gptcore does not return the prompt's log-probabilities")
        return await _openai_reply(
            request, engine, info, body, ids, chat=False, logprobs=logprobs, echo=text if body.echo else None
        )

    return app


async def _openai_reply(
    request: Request,
    engine: Engine,
    info: ServerInfo,
    body,
    ids: list[int],
    chat: bool,
    logprobs: int | None = None,
    echo: str | None = None,
    plan: ToolPlan | None = None,
) -> Response:
    if body.n != 1:
        raise p.RequestError(400, "n: gptcore returns one choice per request (n=1)")
    sampling = openai_sampling(body, info.model_info.get("gpt2.vocab_size", engine.tokenizer.n_vocab))
    keep_alive = parse_keep_alive(body.keep_alive)
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if max_tokens is None and not chat:
        max_tokens = OPENAI_MAX_TOKENS
    if max_tokens is not None and max_tokens < 0:
        raise p.RequestError(400, f"max_tokens: expected a number >= 0, got {max_tokens}")
    tools = plan if plan is not None and plan.grammar is not None else None  # calls to parse out of the reply
    grammar = tools.grammar if tools else await _response_format_grammar(engine, body.response_format)
    kind = "chat.completion" if chat else "text_completion"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())

    def choice(
        text: str, reason: str | None, delta: bool = False, tokens: list[TokenLogprob] | None = None, call=None
    ) -> dict:
        shown = None
        if logprobs is not None and tokens is not None:
            shown = _openai_chat_logprobs(tokens) if chat else _openai_completion_logprobs(tokens, logprobs)
        if chat:
            message = {"role": "assistant", "content": None if call and not text else text}
            if call:
                message["tool_calls"] = openai_calls(call, stream=delta)
            return {"index": 0, "delta" if delta else "message": message, "finish_reason": reason, "logprobs": shown}
        return {"index": 0, "text": text, "finish_reason": reason, "logprobs": shown}

    def envelope(**extra) -> dict:
        return {
            "id": rid,
            "object": kind + ("" if not extra.pop("chunk", False) else ".chunk"),
            "created": created,
            "model": body.model,
            "system_fingerprint": "gptcore",
            **extra,
        }

    trigger = tools.trigger if tools else None
    events = submit(
        engine, info, ids, sampling, Budget(max_tokens), grammar, keep_alive, logprobs=logprobs, trigger=trigger
    )
    if body.stream:
        include_usage = body.stream_options is not None and body.stream_options.include_usage
        held = CallFilter(tools)

        async def sse() -> AsyncIterator[str]:
            if echo:  # the legacy API's echo: the prompt comes back first
                yield _sse(envelope(choices=[choice(echo, None)]))
            async for event in events:
                if isinstance(event, Piece):
                    text = held.push(event.text)
                    if text or event.logprobs:
                        yield _sse(envelope(chunk=chat, choices=[choice(text, None, True, event.logprobs)]))
                elif isinstance(event, Done):
                    text, call = held.finish(event.text)
                    if text or call:
                        yield _sse(envelope(chunk=chat, choices=[choice(text, None, True, call=call)]))
                    reason = "tool_calls" if call else _finish_reason(event)
                    yield _sse(envelope(chunk=chat, choices=[choice("", reason, delta=True)]))
                    if include_usage:
                        yield _sse(envelope(chunk=chat, choices=[], usage=_usage(event)))
                else:
                    yield _sse(p.openai_error(500, event.message))
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")
    done = await wait_done(request, events)
    call = parse_call(done.text, tools) if tools else None
    if call:
        reply = choice("", "tool_calls", tokens=done.logprobs, call=call)
    else:
        reply = choice((echo or "") + done.text, _finish_reason(done), tokens=done.logprobs)
    return JSONResponse(envelope(choices=[reply], usage=_usage(done)))


async def _response_format_grammar(engine: Engine, response_format) -> str | None:
    """The llguidance grammar of OpenAI's response_format (None for text), or a 400."""
    if response_format is None or response_format.type == "text":
        return None
    schema = (response_format.json_schema or {}).get("schema") if response_format.type == "json_schema" else None
    if response_format.type == "json_schema" and not isinstance(schema, dict):
        raise p.RequestError(400, "response_format.json_schema.schema: expected a JSON schema object")
    return await json_schema_grammar(engine, schema or {"type": "object"})


def _usage(done: Done) -> dict:
    return {
        "prompt_tokens": len(done.prompt_ids),
        "completion_tokens": len(done.new_ids),
        "total_tokens": len(done.prompt_ids) + len(done.new_ids),
    }


def _openai_chat_logprobs(tokens: list[TokenLogprob]) -> dict:
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.raw),
                "top_logprobs": [{"token": a.token, "logprob": a.logprob, "bytes": list(a.raw)} for a in t.top],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def _openai_completion_logprobs(tokens: list[TokenLogprob], top: int) -> dict:
    """The legacy completions shape: parallel lists, and where each token's text starts in the reply."""
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a.token: a.logprob for a in t.top} for t in tokens] if top else None,
        "text_offset": [t.offset for t in tokens],
    }


def _completion_prompt(prompt: Any, engine: Engine, info: ServerInfo) -> tuple[str, list[int]]:
    """/v1/completions' one prompt (text, or token ids as OpenAI accepts them) as (its text, its ids)."""
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(t, int) for t in prompt):
        prompts = [prompt]
    else:
        prompts = prompt
    if len(prompts) != 1:
        raise p.RequestError(400, "prompt: gptcore completes one prompt per request (send one each: they batch)")
    if not prompts[0]:
        raise p.RequestError(400, "prompt: the prompt is empty")
    if isinstance(prompts[0], str):
        return prompts[0], encode_text(engine.tokenizer, prompts[0])
    vocab = info.model_info.get("gpt2.vocab_size", engine.tokenizer.n_vocab)
    ids = list(prompts[0])
    if any(not 0 <= t < vocab for t in ids):
        raise p.RequestError(400, f"prompt: token ids must be from 0 to {vocab - 1}")
    return engine.tokenizer.decode(ids), ids


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
            raise p.RequestError(
                400, f"messages[{i}].content: only text parts are supported, got {str(part.get('type'))[:40]!r}"
            )
        parts.append(part["text"])
    return "\n".join(parts)


def _openai_model(info: ServerInfo) -> dict:
    return {"id": info.name, "object": "model", "created": info.created, "owned_by": "gptcore"}
