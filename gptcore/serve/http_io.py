"""What every route shares on the HTTP side: reading a request's JSON body within the size limit, and an
error answered in each API's shape (Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message", "type",
"param", "code"}}`), and the request fields gptcore does not use, listed in a Warning header (FieldCheck)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse
from starlette.datastructures import MutableHeaders

from gptcore.serve import protocol as p
from gptcore.serve.info import ServerInfo


async def read_json(request: Request, info: ServerInfo, required: bool = True) -> Any:
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


def error_response(status: int, message: str, openai: bool, close: bool = False) -> JSONResponse:
    body = p.openai_error(status, message) if openai else p.ollama_error(message)
    return JSONResponse(body, status_code=status, headers={"Connection": "close"} if close else None)


class FieldCheck:
    """ASGI middleware: each request gets protocol.FIELDS (strict: refuse unknown fields); the fields it
    sent that gptcore does not use come back in a `Warning: 299 gptcore "..."` header (RFC 9110's
    miscellaneous persistent warning; its text is ASCII, at most 500 characters)."""

    def __init__(self, app, strict: bool):
        self.app, self.strict = app, strict

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        fields = {"strict": self.strict, "unknown": []}
        token = p.FIELDS.set(fields)

        async def send_with_warning(message) -> None:
            if message["type"] == "http.response.start" and fields["unknown"]:
                names = ", ".join(dict.fromkeys(fields["unknown"])).encode("ascii", "replace").decode()
                text = f"ignored unknown fields: {names}"[:500].replace('"', "'").replace("\\", "/")
                MutableHeaders(scope=message).append("Warning", f'299 gptcore "{text}"')
            await send(message)

        try:
            await self.app(scope, receive, send_with_warning)
        finally:
            p.FIELDS.reset(token)
