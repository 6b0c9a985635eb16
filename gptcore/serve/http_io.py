"""What every route shares on the HTTP side: reading a request's JSON body within the size limit, and an
error answered in each API's shape (Ollama's `{"error": "..."}`, OpenAI's `{"error": {"message", "type",
"param", "code"}}`)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse

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
