"""Request options in the engine's terms, shared by Ollama's and OpenAI's routes: checked sampling
options, how many alternative tokens to report, and the llguidance grammar of a JSON format."""

from __future__ import annotations

import asyncio

from gptcore.serve import protocol as p
from gptcore.serve.engine import Engine
from gptcore.serve.jobs import Sampling, check_options

MAX_TOP_LOGPROBS = 20  # Ollama's and OpenAI's chat limit; the legacy completions API allows 5


def checked_sampling(temperature: float, top_k: int | None, seed: int | None, stop: list[str]) -> Sampling:
    sampling = Sampling(temperature=float(temperature), top_k=top_k, seed=seed, stop=stop)
    if len(stop) > 16 or any(len(s) > 256 for s in stop):
        raise p.RequestError(400, "invalid stop: expected at most 16 strings of at most 256 characters")
    try:
        check_options(sampling)
    except ValueError as err:
        raise p.RequestError(400, f"invalid {err}") from None
    return sampling


def top_count(count: int, most: int, name: str) -> int:
    if not 0 <= count <= most:
        raise p.RequestError(400, f"{name} must be between 0 and {most}, got {count}")
    return count


async def json_schema_grammar(engine: Engine, schema: dict) -> str:
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
