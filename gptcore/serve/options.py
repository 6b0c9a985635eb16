"""Request options in the engine's terms, shared by Ollama's and OpenAI's routes: every sampling option
checked up front (gptcore.inference.sampling.SamplingOptions; an option gptcore cannot honour is a 400
naming it, never ignored), keep_alive durations, how many alternative tokens to report, and the
llguidance grammar of a JSON format."""

from __future__ import annotations

import asyncio
import math
import re
from typing import Any

from gptcore.inference.sampling import SamplingOptions
from gptcore.serve import protocol as p
from gptcore.serve.engine import Engine
from gptcore.serve.jobs import Sampling

MAX_TOP_LOGPROBS = 20  # Ollama's and OpenAI's chat limit; the legacy completions API allows 5
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40}  # the served model's parameters (/api/show); others neutral
# Ollama options that exist to change sampling in ways gptcore does not implement: accepted only at the
# value that leaves sampling as it is.
OLLAMA_NEUTRAL = {"mirostat": 0, "tfs_z": 1.0, "penalize_newline": True}
_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def checked_sampling(stop: list[str], **options: Any) -> Sampling:
    """A request's Sampling, or a 400 naming the option that cannot be sampled with."""
    if len(stop) > 16 or any(len(s) > 256 for s in stop):
        raise p.RequestError(400, "invalid stop: expected at most 16 strings of at most 256 characters")
    try:
        return Sampling(SamplingOptions(**{k: v for k, v in options.items() if v is not None}), stop)
    except ValueError as err:
        raise p.RequestError(400, f"invalid {err}") from None


def ollama_sampling(options: p.Options | None) -> Sampling:
    """Ollama's `options` as a Sampling: unset ones take the served model's defaults (OLLAMA_DEFAULTS)."""
    o = options or p.Options()
    for name, neutral in OLLAMA_NEUTRAL.items():
        value = getattr(o, name)
        if value is not None and value != neutral:
            raise p.RequestError(400, f"invalid options.{name}: gptcore does not implement it (only {neutral!r})")
    if o.num_predict is not None and o.num_predict < -2:
        raise p.RequestError(
            400, f"invalid num_predict: expected -1 (unbounded), -2 or a number >= 0, got {o.num_predict}"
        )
    for name in ("num_ctx", "num_keep"):
        if getattr(o, name) is not None and getattr(o, name) < 0:
            raise p.RequestError(400, f"invalid options.{name}: expected a number >= 0, got {getattr(o, name)}")
    top_k = OLLAMA_DEFAULTS["top_k"] if o.top_k is None else o.top_k
    return checked_sampling(
        [o.stop] if isinstance(o.stop, str) else (o.stop or []),
        temperature=OLLAMA_DEFAULTS["temperature"] if o.temperature is None else float(o.temperature),
        top_k=top_k if top_k > 0 else None,  # Ollama: 0 turns top-k off
        top_p=o.top_p,
        min_p=o.min_p,
        typical_p=o.typical_p,
        repeat_penalty=o.repeat_penalty,
        repeat_last_n=o.repeat_last_n,
        presence_penalty=o.presence_penalty,
        frequency_penalty=o.frequency_penalty,
        seed=o.seed,
    )


def openai_sampling(body: Any, vocab_size: int) -> Sampling:
    """OpenAI's sampling fields (and the llama.cpp / vLLM extras top_k, min_p, typical_p, repeat_penalty,
    repetition_penalty, repeat_last_n) as a Sampling, checked in OpenAI's ranges."""
    temperature = 1.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise p.RequestError(400, f"temperature: expected a number from 0 to 2, got {temperature}")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(body, name)
        if value is not None and not -2 <= value <= 2:
            raise p.RequestError(400, f"{name}: expected a number from -2 to 2, got {value}")
    if body.repeat_penalty is not None and body.repetition_penalty is not None:
        raise p.RequestError(400, "repeat_penalty and repetition_penalty: send one of them")
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    return checked_sampling(
        stop,
        temperature=float(temperature),
        top_k=None if not body.top_k or body.top_k < 0 else body.top_k,  # vLLM: 0 and -1 turn it off
        top_p=body.top_p,
        min_p=body.min_p,
        typical_p=body.typical_p,
        repeat_penalty=body.repeat_penalty if body.repeat_penalty is not None else body.repetition_penalty,
        repeat_last_n=body.repeat_last_n,
        presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty,
        logit_bias=_logit_bias(body.logit_bias, vocab_size),
        seed=body.seed,
    )


def _logit_bias(bias: dict[str, float] | None, vocab_size: int) -> dict[int, float] | None:
    """OpenAI's logit_bias ({"token id": bias from -100 to 100}) with integer keys, or a 400."""
    if not bias:
        return None
    checked = {}
    for key, value in bias.items():
        if not re.fullmatch(r"[0-9]+", key) or int(key) >= vocab_size:
            raise p.RequestError(400, f"logit_bias: keys are token ids from 0 to {vocab_size - 1}, got {key[:20]!r}")
        if not -100 <= value <= 100:
            raise p.RequestError(400, f"logit_bias[{key}]: expected a number from -100 to 100, got {value}")
        checked[int(key)] = float(value)
    return checked


def parse_keep_alive(value: Any) -> float | None:
    """Ollama's keep_alive in seconds (math.inf: forever), None when absent (the server's default).

    A number is seconds, a string a Go duration ("5m", "1h30m", "300ms") or a number of seconds
    ("300", as OLLAMA_KEEP_ALIVE); a negative value keeps the model loaded forever, 0 unloads it at once.
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return math.inf if value < 0 else float(value)
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(a + u for a, u in parts) != body:
                raise p.RequestError(400, f"invalid keep_alive: {value[:40]!r} is not a duration") from None
            seconds = sum(float(a) * _UNIT[u] for a, u in parts)
        if math.isfinite(seconds):
            return math.inf if sign < 0 and seconds > 0 else seconds
    raise p.RequestError(400, f'invalid keep_alive: expected a duration such as "5m" or seconds, got {value!r:.40}')


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
