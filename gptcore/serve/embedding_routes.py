"""The embedding routes of both APIs: /api/embed, /api/embeddings (Ollama's legacy route) and
/v1/embeddings; a request's texts become token ids here, vectors on the engine's worker (serve/embedding.py)."""

from __future__ import annotations

import asyncio
import base64
import struct
import time

from fastapi import APIRouter, Request

from gptcore.serve import protocol as p
from gptcore.serve.engine import Engine
from gptcore.serve.http_io import read_json
from gptcore.serve.info import ServerInfo, check_model
from gptcore.serve.options import parse_keep_alive
from gptcore.tokenizer import EOT_ID, encode_text


def embedding_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/embed, /api/embeddings (Ollama's legacy route) and /v1/embeddings."""
    app = APIRouter()

    @app.post("/api/embed")
    async def embed(request: Request):
        body = p.parse(p.EmbedRequest, await read_json(request, info))
        check_model(body.model, info)
        # As Ollama: a lone empty string embeds nothing (it loads the model); one in a list is embedded
        texts = ([body.input] if body.input else []) if isinstance(body.input, str) else (body.input or [])
        keep_alive = parse_keep_alive(body.keep_alive)
        start = time.perf_counter()
        vectors, count, load_ns = await _embed(
            engine, info, texts, body.truncate, normalize=True, dimensions=body.dimensions, keep_alive=keep_alive
        )
        return {
            "model": body.model,
            "embeddings": vectors,
            "total_duration": _ns(time.perf_counter() - start),
            "load_duration": load_ns,
            "prompt_eval_count": count,
        }

    @app.post("/api/embeddings")
    async def embeddings_legacy(request: Request):
        body = p.parse(p.LegacyEmbeddingsRequest, await read_json(request, info))
        check_model(body.model, info)
        keep_alive = parse_keep_alive(body.keep_alive)
        if not body.prompt:
            return {"embedding": []}
        vectors, _, _ = await _embed(engine, info, [body.prompt], truncate=True, normalize=False, keep_alive=keep_alive)
        return {"embedding": vectors[0]}

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        body = p.parse(p.EmbeddingsRequest, await read_json(request, info))
        check_model(body.model, info)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise p.RequestError(400, "input: at least one string is required")
        if any(not t for t in texts):  # as OpenAI: an empty string is not embedded
            raise p.RequestError(400, f"input[{[bool(t) for t in texts].index(False)}]: cannot embed an empty string")
        vectors, count, _ = await _embed(engine, info, texts, truncate=True, normalize=True, dimensions=body.dimensions)
        if body.encoding_format == "base64":  # little-endian float32, as OpenAI sends them
            vectors = [base64.b64encode(struct.pack(f"<{len(v)}f", *v)).decode("ascii") for v in vectors]
        return {
            "object": "list",
            "model": body.model,
            "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)],
            "usage": {"prompt_tokens": count, "total_tokens": count},
        }

    return app


async def _embed(
    engine: Engine,
    info: ServerInfo,
    texts: list[str],
    truncate: bool,
    normalize: bool,
    dimensions: int | None = None,
    keep_alive: float | None = None,
):
    """(vectors, prompt tokens, load nanoseconds); an empty text (Ollama's /api/embed answers it) is embedded
    as GPT-2's end-of-text token alone, the separator a document starts after; on /v1/embeddings a 400."""
    if dimensions is not None and dimensions < 0:
        raise p.RequestError(400, f"invalid dimensions: expected a number >= 1 (0: all), got {dimensions}")
    prompts = []
    for i, text in enumerate(texts):
        ids = encode_text(engine.tokenizer, text) or [EOT_ID]
        if len(ids) > info.context_length:
            if not truncate:
                raise p.RequestError(
                    400,
                    f"input[{i}]: {len(ids)} tokens exceed the context length "
                    f"({info.context_length}); set truncate to true to cut it",
                )
            ids = ids[: info.context_length]
        prompts.append(ids)
    if not prompts:
        return [], 0, await asyncio.to_thread(engine.load, keep_alive)
    vectors, load_ns = await asyncio.to_thread(engine.embed, prompts, normalize, dimensions or None, keep_alive)
    return vectors, sum(len(ids) for ids in prompts), load_ns


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
