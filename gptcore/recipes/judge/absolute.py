"""The absolute judge: each response scored from 0 to 100 on its own, with the reference prompt, and
the stage's orchestration (`judge_responses`): ask what the cache lacks, flag truncation, sum up."""

from __future__ import annotations

import json
import logging
import os
import statistics  # the standard library's (stdev); the judge's own is gptcore.recipes.judge.statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from gptcore.errors import DataError, GptcoreError
from gptcore.params.schema import JudgeParams
from gptcore.prompt import format_input
from gptcore.recipes.judge.cache import ScoreCache, cache_key
from gptcore.recipes.judge.client import JudgeServer, OllamaClient, OllamaUnavailable, request_options
from gptcore.recipes.judge.scores import parse_score
from gptcore.recipes.judge.statistics import BOOTSTRAP_RESAMPLES, bootstrap_interval, histogram_rows, score_rows

logger = logging.getLogger(__name__)

PROMPT = (
    "Given the input `{input}` and correct output `{output}`, score the model response `{response}` "
    "on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
)
REMINDER = (
    "That reply holds no valid score. Respond with one integer from 0 to 100, where 100 is the best "
    "score, and nothing else: no words, no punctuation."
)
# Ollama's structured outputs: `format` takes a JSON schema and constrains the reply to it.
SCORE_SCHEMA = {
    "type": "object",
    "properties": {"score": {"type": "integer", "minimum": 0, "maximum": 100}},
    "required": ["score"],
}
# Tokens a chat template adds around one user message (Llama 3's headers and end-of-turn markers).
CHAT_OVERHEAD_TOKENS = 16
RESPONSE_FIELDS = ("instruction", "input", "output", "model_response")


def load_responses(path: str | os.PathLike) -> list[dict]:
    """The responses file: a JSON list of entries with instruction, input, output and model_response."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: responses file not found (it comes from stage generate_responses)")
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: not valid JSON: {err}") from None
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON list of entries, got {type(entries).__name__}")
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise DataError(f"{path}: entry {i}: expected an object, got {type(entry).__name__}")
        for key in RESPONSE_FIELDS:
            if key not in entry:
                raise DataError(f"{path}: entry {i}: missing {key!r}")
            if not isinstance(entry[key], str):
                raise DataError(f"{path}: entry {i}: {key!r} must be a string, got {type(entry[key]).__name__}")
    return entries


def judge_prompt(entry: dict) -> str:
    """The reference scoring prompt for one entry."""
    return PROMPT.format(input=format_input(entry), output=entry["output"], response=entry["model_response"])


@dataclass
class JudgeOutcome:
    records: list[dict]  # one per entry, in file order
    metrics: dict[str, Any]
    histogram: list[dict] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)  # one row per entry: the per-entry plot table

    @property
    def scores(self) -> list[int]:
        return [r["score"] for r in self.records if r["status"] == "scored"]


def judge_responses(
    responses_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    params: JudgeParams,
    *,
    show_progress: bool = True,
    warn: Callable[[str], None] = logger.warning,
    count_tokens: Callable[[str], int] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> JudgeOutcome:
    """Score every entry of the responses file, asking the judge only what the cache does not hold.

    `count_tokens` estimates a prompt's length in the judge's tokens; by default GPT-2's tokenizer
    serves as a proxy (Llama 3's larger vocabulary usually needs fewer tokens, so it errs towards
    flagging). Raises GptcoreError if the server is unusable; the entries judged so far stay cached.
    """
    from tqdm import tqdm

    entries = load_responses(responses_path)
    if count_tokens is None:
        count_tokens = _gpt2_token_counter()
    cache = ScoreCache(scores_path, warn)
    client = OllamaClient(params.url, params.timeout, params.retries, params.backoff, sleep=sleep)
    keys = _cache_keys(entries, cache, params)
    server = _check_server(client, params, entries, keys, cache)
    records: list[dict] = []
    bar = tqdm(entries, desc="judge", unit="entry", disable=not show_progress, file=sys.stderr)
    try:
        for index, entry in enumerate(bar):
            record = cache.get(keys[index])
            if record is None or record["status"] != "scored":
                try:
                    record = _judge_entry(client, server, entry, judge_prompt(entry), keys[index], params, count_tokens)
                except OllamaUnavailable as err:
                    done = sum(1 for r in records if r["status"] == "scored")
                    raise GptcoreError(
                        f"{err}; stopped after {len(records)} of {len(entries)} entries ({done} scored), "
                        f"kept in {cache.path}; re-run to continue"
                    ) from None
                cache.append(record)
                _warn_about(record, index, warn)
            records.append({**record, "index": index})
            scored = [r["score"] for r in records if r["status"] == "scored"]
            if scored:
                bar.set_postfix(avg=f"{sum(scored) / len(scored):.1f}", failed=len(records) - len(scored))
    finally:
        bar.close()
        client.close()
    cache.rewrite()
    return JudgeOutcome(
        records=records,
        metrics=_metrics(records, params, server, warn),
        histogram=histogram_rows([r["score"] for r in records if r["status"] == "scored"]),
        table=score_rows(entries, records),
    )


def _cache_keys(entries: Sequence[dict], cache: ScoreCache, params: JudgeParams) -> list[str]:
    """Each entry's cache key; a cached record from before score forms is read again (`_reread`)."""
    keys = [cache_key(judge_prompt(entry), params) for entry in entries]
    for key in keys:
        record = cache.get(key)
        if record is not None and "form" not in record:
            cache.records[key] = _reread(record)
    return keys


def _check_server(
    client: OllamaClient, params: JudgeParams, entries: Sequence[dict], keys: Sequence[str], cache: ScoreCache
) -> JudgeServer | None:
    """The judge server, checked before the first request; None when no entry needs asking."""
    to_ask = [
        entry["model_response"].strip() and (cache.get(key) or {}).get("status") != "scored"
        for entry, key in zip(entries, keys)
    ]
    if not any(to_ask):
        return None
    try:
        return client.check(params.model)  # before the first request, and before any progress bar
    except BaseException:
        client.close()
        raise


def _warn_about(record: dict, index: int, warn: Callable[[str], None]) -> None:
    """Warn about a newly judged entry whose prompt may have been cut, or that got no score."""
    if record["truncated"]:
        warn(
            f"entry {index}: the judge prompt may be cut to the judge's context of "
            f"{record['context_limit']} tokens "
            f"(~{record['prompt_tokens_estimate']} tokens estimated, "
            f"{record['prompt_eval_count']} evaluated)"
        )
    if record["status"] == "failed":
        warn(f"entry {index}: no score ({record['reason']}); recorded as failed, retried next run")


def _reread(record: dict) -> dict:
    """A record cached before replies had to state their score in one of FORMS: its last reply read
    again by `parse_score`; one whose reply states no score becomes failed, so that it is asked again."""
    if record["status"] != "scored":
        return {**record, "form": None}
    if not record.get("replies"):
        return {**record, "form": "empty"}
    try:
        parsed = parse_score(record["replies"][-1])
    except ValueError as why:
        return {**record, "status": "failed", "score": None, "form": None, "reason": f"re-read: {why}"}
    return {**record, "score": parsed.value, "form": parsed.form}


def _judge_entry(
    client: OllamaClient,
    server: JudgeServer | None,
    entry: dict,
    prompt: str,
    key: str,
    params: JudgeParams,
    count_tokens: Callable[[str], int],
) -> dict:
    """Ask once, and once more with a stricter reminder if the reply holds no valid score."""
    estimate = count_tokens(prompt) + CHAT_OVERHEAD_TOKENS
    record = {
        "key": key,
        "status": "scored",
        "score": None,
        "form": None,
        "reason": None,
        "replies": [],
        "judge_model": params.model,
        "judge_digest": None,
        "judge_version": None,
        "options": request_options(params),
        "structured": params.structured,
        "prompt_tokens_estimate": estimate,
        "prompt_eval_count": None,
        "context_limit": None,
        "truncated": False,
        "prompt": prompt,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    if not entry["model_response"].strip():
        # As the reference evaluation: an empty response is worth 0, and the judge is not asked.
        return {**record, "score": 0, "form": "empty", "reason": "empty model response (not asked)"}
    assert server is not None
    record.update(judge_digest=server.digest, judge_version=server.version)
    messages = [{"role": "user", "content": prompt}]
    fmt = SCORE_SCHEMA if params.structured else None
    counts = []
    for _attempt in range(2):
        reply = client.chat(params.model, messages, request_options(params), fmt)
        message = reply.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        text = text if isinstance(text, str) else ""
        record["replies"].append(text)
        if isinstance(reply.get("prompt_eval_count"), int):
            counts.append(reply["prompt_eval_count"])
        try:
            parsed = parse_score(text)
        except ValueError as why:
            record["reason"] = str(why)
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": REMINDER}]
        else:
            record.update(score=parsed.value, form=parsed.form, reason=None)
            break
    else:
        record["status"] = "failed"
    # Ollama cuts a prompt to num_ctx (or to the model's own context, if smaller) without an error.
    limit = min(params.num_ctx, server.context_length or params.num_ctx)
    record["prompt_eval_count"] = counts[0] if counts else None
    record["context_limit"] = limit
    record["truncated"] = estimate >= limit or any(c >= limit for c in counts)
    return record


def _gpt2_token_counter() -> Callable[[str], int]:
    from gptcore.tokenizer import encode_text, get_tokenizer

    tokenizer = get_tokenizer()
    return lambda text: len(encode_text(tokenizer, text))


def _metrics(
    records: Sequence[dict], params: JudgeParams, server: JudgeServer | None, warn: Callable[[str], None]
) -> dict[str, Any]:
    scored = [r["score"] for r in records if r["status"] == "scored"]
    asked = [r for r in records if r["judge_digest"] is not None or r["judge_version"] is not None]
    digests = sorted({r["judge_digest"] for r in asked})
    if server is not None and any(d != server.digest for d in digests):
        warn(
            f"some cached scores came from another build of {params.model} than the server's "
            f"({server.digest}); delete the scores file to judge everything again"
        )
    versions = sorted({r["judge_version"] for r in asked})
    low, high = bootstrap_interval(scored, params.seed) if scored else (None, None)
    return {
        "average_score": round(sum(scored) / len(scored), 2) if scored else None,
        "average_score_ci95_low": None if low is None else round(low, 2),
        "average_score_ci95_high": None if high is None else round(high, 2),
        "score_std": round(statistics.stdev(scored), 2) if len(scored) > 1 else None,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "bootstrap_seed": params.seed,
        "n_entries": len(records),
        "n_scored": len(scored),
        "n_failed": len(records) - len(scored),
        "n_empty": sum(1 for r in records if r["status"] == "scored" and not r["replies"]),
        "n_truncated": sum(1 for r in records if r["truncated"]),
        "judge_model": params.model,
        "judge_digest": digests[0] if len(digests) == 1 else ("mixed" if digests else None),
        "judge_version": (server.version if server else None) or (versions[-1] if versions else None),
        "num_ctx": params.num_ctx,
        "structured": params.structured,
    }
