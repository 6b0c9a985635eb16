"""The HTTP side: one FastAPI application serving Ollama's routes (`/api/*`, NDJSON streams,
serve/ollama_routes.py), OpenAI's (`/v1/*`, SSE streams, serve/openai_routes.py) and both APIs' embeddings
(serve/embedding_routes.py), behind the Host/Origin guard (serve/security.py).

Handlers parse and validate a request (protocol), render its prompt (chat), queue it on the engine and
forward its events; they never run the model. Errors are one clear message in each API's shape: Ollama's
`{"error": "..."}`, OpenAI's `{"error": {"message", "type", "param", "code"}}`. Requests from web pages
are checked as Ollama checks them: the Host must be the loopback (when bound to it) and an Origin must be
allowed (localhost and loopback origins by default, more through `origins` / OLLAMA_ORIGINS).
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from starlette.exceptions import HTTPException as StarletteHTTPException

from gptcore.serve import protocol as p
from gptcore.serve.embedding_routes import embedding_routes
from gptcore.serve.engine import Engine
from gptcore.serve.http_io import FieldCheck, error_response
from gptcore.serve.info import ServerInfo
from gptcore.serve.models_routes import ollama_manage_routes, ollama_model_routes
from gptcore.serve.ollama_routes import ollama_generation_routes
from gptcore.serve.openai_routes import openai_routes
from gptcore.serve.security import DEFAULT_ORIGINS, Guard, origin_pattern


def create_app(engine: Engine, info: ServerInfo) -> FastAPI:
    """The FastAPI application serving `engine`'s model as `info.name`."""
    app = FastAPI(title="gptcore", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.info = engine, info

    app.add_middleware(FieldCheck, strict=info.strict_options)
    app.add_middleware(Guard, info=info, origins=[origin_pattern(o) for o in DEFAULT_ORIGINS + info.origins])

    @app.exception_handler(p.RequestError)
    async def request_error(request: Request, err: p.RequestError):
        return error_response(err.status, err.message, request.url.path.startswith("/v1"))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        message = "404 page not found" if err.status_code == 404 else str(err.detail).lower()
        return error_response(err.status_code, message, request.url.path.startswith("/v1"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # a bug; still one line, never a traceback
        return error_response(500, " ".join(str(err).split()) or type(err).__name__, request.url.path.startswith("/v1"))

    for routes in (
        ollama_model_routes,
        ollama_manage_routes,
        ollama_generation_routes,
        embedding_routes,
        openai_routes,
    ):
        app.include_router(routes(engine, info))
    return app
