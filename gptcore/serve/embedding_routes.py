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
from gptcore.tokenizer import encode_text


def embedding_routes(engine: Engine, info: ServerInfo) -> APIRouter:
    """/api/embed, /api/embeddings (Ollama's legacy route) and /v1/embeddings."""
    app = APIRouter()

    @app.post("/api/embed")
    async def embed(request: Request):
        body = p.parse(p.EmbedRequest, await read_json(request, info))
        check_model(body.model, info)
        texts = [body.input] if isinstance(body.input, str) else (body.input or [])
        start = time.perf_counter()
        vectors, count, load_ns = await _embed(
            engine, info, texts, body.truncate, normalize=True, dimensions=body.dimensions
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
        if not body.prompt:
            return {"embedding": []}
        vectors, _, _ = await _embed(engine, info, [body.prompt], truncate=True, normalize=False)
        return {"embedding": vectors[0]}

    @app.post("/v1/embeddings")
    async def openai_embeddings(request: Request):
        body = p.parse(p.EmbeddingsRequest, await read_json(request, info))
        check_model(body.model, info)
        texts = [body.input] if isinstance(body.input, str) else body.input
        if not texts:
            raise p.RequestError(400, "input: at least one string is required")
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
    engine: Engine, info: ServerInfo, texts: list[str], truncate: bool, normalize: bool, dimensions: int | None = None
):
    if dimensions is not None and dimensions < 0:
        raise p.RequestError(400, f"invalid dimensions: expected a number >= 1 (0: all), got {dimensions}")
    prompts = []
    for i, text in enumerate(texts):
        ids = encode_text(engine.tokenizer, text)
        if not ids:
            raise p.RequestError(400, f"input[{i}]: cannot embed an empty string")
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
        return [], 0, 0
    vectors, load_ns = await asyncio.to_thread(engine.embed, prompts, normalize, dimensions or None)
    return vectors, sum(len(ids) for ids in prompts), load_ns


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
