"""The ASGI middleware in front of every route (Guard): the body-size limit (on Content-Length), and
requests from web pages checked as Ollama checks them: the Host must be the loopback (when bound to it)
and an Origin must be allowed (localhost and loopback origins by default, more through `origins` /
OLLAMA_ORIGINS); an allowed origin gets CORS headers."""

from __future__ import annotations

import ipaddress
import re
import socket

from fastapi.responses import Response
from starlette.datastructures import Headers, MutableHeaders

from gptcore.serve.http_io import error_response
from gptcore.serve.info import ServerInfo

# Ollama's default allowed origins (envconfig.AllowedOrigins), `*` matching anything.
DEFAULT_ORIGINS = [
    f"{scheme}://{host}{port}"
    for host in ("localhost", "127.0.0.1", "0.0.0.0")
    for scheme in ("http", "https")
    for port in ("", ":*")
] + ["app://*", "file://*", "tauri://*", "vscode-webview://*", "vscode-file://*"]


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
            refusal = (
                error_response(
                    413, f"request body too large: {length} bytes (limit {self.info.max_body})", openai, close=True
                )
                if length.isdigit()
                else error_response(400, "invalid Content-Length", openai, close=True)
            )
        elif not host_allowed(headers.get("host", ""), self.info.bound_host):
            refusal = error_response(403, "host not allowed", openai)
        elif origin is not None and not any(pattern.fullmatch(origin) for pattern in self.origins):
            refusal = error_response(403, f"origin not allowed: {origin}", openai)
        elif scope["method"] == "OPTIONS" and origin is not None:
            refusal = Response(
                status_code=204,
                headers={
                    "Access-Control-Allow-Origin": origin,
                    "Vary": "Origin",
                    "Access-Control-Allow-Methods": "GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS",
                    "Access-Control-Allow-Headers": headers.get("access-control-request-headers", "*"),
                    "Access-Control-Max-Age": "43200",
                },
            )
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


def host_allowed(host: str, bound: str) -> bool:
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


def origin_pattern(pattern: str) -> re.Pattern:
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))
