"""Ollama's model-management routes as gptcore answers them: /, /api/version, /api/tags, /api/ps, /api/show,
/api/pull, /api/create, /api/copy, /api/delete, /api/push and /api/blobs.

gptcore serves one weights file. /api/create with `from` one of the served names registers a new name
served from the same weights with its own `system`, `template` and `parameters` (a Variant, serve/info.py);
/api/copy adds an alias; /api/delete removes either. What would need other weights (`files`, `adapters`,
`quantize`, /api/push, /api/blobs, /api/pull of a name not served) is refused in Ollama's error shape with
a sentence saying what gptcore does instead. /api/version reports the Ollama version whose API these routes
follow (OLLAMA_API_VERSION), with gptcore's own beside it and in the X-Gptcore-Version header.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from gptcore.serve import protocol as p
from gptcore.serve.chat import TemplateError, render_generate
from gptcore.serve.engine import Engine
from gptcore.serve.http_io import read_json
from gptcore.serve.info import BASE, ServerInfo, Variant, canonical_name, check_model
from gptcore.serve.options import OLLAMA_DEFAULTS

# The Ollama release whose API these routes follow: its /api/chat tools and logprobs (logprobs came in
# 0.12.11), /api/create from an existing model with system/template/parameters, streamed pull statuses.
OLLAMA_API_VERSION = "0.12.11"
VERSION_HEADER = "X-Gptcore-Version"
SERVE_A_FILE = "gptcore serves local weights files: start `gptcore serve --model FILE --name NAME` to serve one"


def ollama_model_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/, /api/version, /api/tags, /api/ps, /api/show, /api/pull."""
    app = APIRouter()

    @app.api_route("/", methods=["GET", "HEAD"])
    async def root():
        return PlainTextResponse("Ollama is running")

    @app.api_route("/api/version", methods=["GET", "HEAD"])
    async def version():
        body = {"version": OLLAMA_API_VERSION, "gptcore_version": info.version}
        return JSONResponse(body, headers={VERSION_HEADER: info.version})

    @app.api_route("/api/tags", methods=["GET", "HEAD"])
    async def tags():
        return {"models": [_tag(info, name, v) for name, v in _names(info)]}

    @app.api_route("/api/ps", methods=["GET", "HEAD"])
    async def ps():
        if engine.model is None:
            return {"models": []}
        extra = {"expires_at": _expiry(engine.expires_at), "size_vram": 0, "context_length": info.context_length}
        return {"models": [{**_tag(info, info.name, BASE), **extra}]}

    @app.post("/api/show")
    async def show(request: Request):
        body = p.parse(p.ShowRequest, await read_json(request, info))
        name = body.model or body.name
        return _show(info, check_model(name, info), canonical_name(name))

    @app.post("/api/pull")
    async def pull(request: Request):
        body = p.parse(p.PullRequest, await read_json(request, info))
        name = body.model or body.name
        if not body.stream:
            check_model(name, info)
            return {"status": "success"}
        return _ndjson(_pull_lines(info, name))

    return app


def ollama_manage_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/create, /api/copy, /api/delete, /api/push, /api/blobs (the module docstring)."""
    app = APIRouter()

    @app.post("/api/create")
    async def create(request: Request):
        body = p.parse(p.CreateRequest, await read_json(request, info))
        name, variant = _created(body, info)
        info.variants[name] = variant
        if body.stream:
            return _ndjson([{"status": "using existing layer " + info.digest}, {"status": "success"}])
        return {"status": "success"}

    @app.post("/api/copy")
    async def copy(request: Request):
        body = p.parse(p.CopyRequest, await read_json(request, info))
        if not body.source or not body.destination:
            raise p.RequestError(400, "source and destination are required")
        variant = check_model(body.source, info)
        target = _new_name(body.destination, info)
        info.variants[target] = Variant(**{**variant.__dict__, "parent": canonical_name(body.source)})
        return Response(status_code=200)

    @app.delete("/api/delete")
    async def delete(request: Request):
        body = p.parse(p.ShowRequest, await read_json(request, info, required=False))
        name = body.model or body.name
        if name and canonical_name(name) in info.variants:
            del info.variants[canonical_name(name)]
            return Response(status_code=200)
        check_model(name, info)
        raise p.RequestError(400, f"gptcore serves {info.name} from {info.path.name} and does not delete it")

    @app.post("/api/push")
    async def push(request: Request):
        await read_json(request, info, required=False)
        raise p.RequestError(
            400, "gptcore does not push models: `gptcore export` writes a GGUF and a Modelfile that Ollama can push"
        )

    @app.api_route("/api/blobs/{digest}", methods=["HEAD", "POST"])
    async def blobs(digest: str):
        raise p.RequestError(
            400, f"gptcore does not store blobs: {SERVE_A_FILE} (/api/create takes `from` a served name)"
        )

    return app


def _pull_lines(info: ServerInfo, name: str | None) -> list[dict]:
    """Ollama's streamed pull statuses: for a served name the success sequence (nothing is downloaded),
    else the error line that says how to serve a local file."""
    try:
        check_model(name, info)
    except p.RequestError as err:
        return [{"status": "pulling manifest"}, {"error": f"pull model manifest: {err.message}: {SERVE_A_FILE}"}]
    digest, size = info.digest, info.path.stat().st_size
    return [
        {"status": "pulling manifest"},
        {
            "status": f"pulling {digest.removeprefix('sha256:')[:12]}",
            "digest": digest,
            "total": size,
            "completed": size,
        },
        {"status": "verifying sha256 digest"},
        {"status": "writing manifest"},
        {"status": "success"},
    ]


def _created(body: p.CreateRequest, info: ServerInfo) -> tuple[str, Variant]:
    """The name and Variant an /api/create request registers, or a 400 / 404 saying what gptcore does instead."""
    for field, instead in (
        ("files", SERVE_A_FILE),
        ("adapters", "gptcore applies a LoRA adapter as it loads the weights: `gptcore serve --adapter FILE`"),
        ("quantize", "gptcore quantizes as it loads the weights: `gptcore serve --quantize int8`"),
        ("messages", "send the messages with each /api/chat request"),
        ("modelfile", "send `from` with `system`, `template` and `parameters` (Ollama's current create request)"),
    ):
        if getattr(body, field):
            raise p.RequestError(400, f"create with {field}: {instead}")
    if not body.from_:
        raise p.RequestError(400, f"create needs `from`, one of the served names ({info.name}): {SERVE_A_FILE}")
    parent = check_model(body.from_, info)
    parameters = dict(parent.parameters)
    if body.parameters:
        given = p.parse_options(body.parameters, "parameters")
        parameters.update(given.model_dump(exclude_none=True))
    template = body.template if body.template is not None else parent.template
    if template:
        try:
            render_generate("prompt", "system", template)
        except TemplateError as err:
            raise p.RequestError(400, f"invalid template: {err}") from None
    name = _new_name(body.model_name(), info)
    system = body.system if body.system is not None else parent.system
    license_ = body.license if body.license is not None else parent.license
    return name, Variant(system, template, parameters, license_, canonical_name(body.from_))


def _new_name(requested: str, info: ServerInfo) -> str:
    name = canonical_name(requested)
    if name == info.name:
        raise p.RequestError(400, f"{name} is the served weights file's name: choose another")
    return name


def _names(info: ServerInfo) -> list[tuple[str, Variant]]:
    return [(info.name, BASE), *info.variants.items()]


def _ndjson(lines: list[dict]) -> StreamingResponse:
    return StreamingResponse(iter([json.dumps(line) + "\n" for line in lines]), media_type="application/x-ndjson")


def _expiry(expires_at: float | None) -> str:
    """Ollama's expires_at: when the idle model is unloaded (a model kept forever: Ollama's year 2318)."""
    if expires_at is None or expires_at == float("inf"):
        return "2318-01-01T00:00:00Z"
    return datetime.fromtimestamp(expires_at, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _details(info: ServerInfo, variant: Variant) -> dict:
    n = info.n_params
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M"
    return {
        "parent_model": variant.parent,
        "format": "safetensors",
        "family": "gpt2",
        "families": ["gpt2"],
        "parameter_size": size,
        "quantization_level": info.dtype,
    }


def _digest(info: ServerInfo, variant: Variant) -> str:
    """The weights' digest for the served name and an alias of it; a created name's own (its defaults too)."""
    if (variant.system, variant.template, variant.parameters) == (None, None, {}):
        return info.digest
    defaults = json.dumps([info.digest, variant.system, variant.template, variant.parameters], sort_keys=True)
    return "sha256:" + hashlib.sha256(defaults.encode()).hexdigest()


def _tag(info: ServerInfo, name: str, variant: Variant) -> dict:
    stat = info.path.stat()
    modified = stat.st_mtime if variant is BASE else variant.modified
    return {
        "name": name,
        "model": name,
        "size": stat.st_size,
        "digest": _digest(info, variant),
        "modified_at": datetime.fromtimestamp(modified, timezone.utc).isoformat(),
        "details": _details(info, variant),
    }


def _show(info: ServerInfo, variant: Variant, name: str) -> dict:
    parameters: dict[str, Any] = {**OLLAMA_DEFAULTS, **variant.parameters}
    lines = [f"{k} {json.dumps(v) if not isinstance(v, (int, float)) else v}" for k, v in parameters.items()]
    modelfile = f"# served by gptcore from {info.path.name}\nFROM {info.path.name}\n"
    if variant.system:
        modelfile += f'SYSTEM """{variant.system}"""\n'
    if variant.template:
        modelfile += f'TEMPLATE """{variant.template}"""\n'
    modelfile += "".join(f"PARAMETER {line}\n" for line in lines)
    shown = {
        "license": variant.license or "",
        "modelfile": modelfile,
        "parameters": "\n".join(lines),
        "template": variant.template or "{{ .Prompt }}",
        "details": _details(info, variant),
        "model_info": info.model_info,
        "capabilities": ["completion", "tools", "embedding"],
        "modified_at": _tag(info, name, variant)["modified_at"],
    }
    if variant.system:
        shown["system"] = variant.system
    return shown
