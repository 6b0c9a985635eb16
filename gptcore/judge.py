"""The LLM judge: score instruction responses from 0 to 100 with a model served over Ollama's REST API.

The prompt, options (seed 123, temperature 0) and judge (llama3.1:8b) follow the reference evaluation
(Raschka, "Build a Large Language Model (From Scratch)", chapter 7), with what it leaves out: replies
that state no score in an accepted form are asked once more and then recorded as failed — never
dropped, never counted as 0 — the average comes with a seeded bootstrap interval, transient faults
are retried, prompts that the judge's context would cut are flagged, and every answer is cached per
entry so that a re-run asks nothing twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

import requests

from gptcore.atomic import atomic_path
from gptcore.config import JudgeParams
from gptcore.errors import DataError, GptcoreError
from gptcore.prompt import format_input
from gptcore.retry import retry_delay

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
INSTALL_HINT = (
    "start Ollama with `ollama serve` (install it from https://ollama.com/download), "
    "pull the judge with `ollama pull {model}`, or point judge.url in params.yaml at a running server"
)


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


# The forms in which a reply states a score. Anything else (an explanation or a refusal that happens to
# hold one number, "The correct answer is 8.") states none: it is asked again, then recorded as failed.
FORMS = ("json", "bare", "labelled", "fraction", "out_of")
_NUM = r"[-+]?\d+(?:\.\d+)?"
_BARE = re.compile(rf"({_NUM})\.?")  # the whole reply: "85", "85."
_LABELLED = re.compile(  # "Score: 85", "score = 85", "Rating: 85", '"score": 85'; not "Score: 8/10"
    rf"\b(?:score|rating)\"?\s*[:=]\s*({_NUM})(?!\d|\s*(?:/|out\s+of)\s*(?!100\b)\d)", re.IGNORECASE)
_FRACTION = re.compile(rf"(?<![\w./])({_NUM})\s*/\s*100(?![\w/]|\.\d)")  # "85/100"
_OUT_OF = re.compile(rf"(?<![\w./])({_NUM})\s+out\s+of\s+100(?![\w/]|\.\d)", re.IGNORECASE)  # "85 out of 100"
_FENCED = re.compile(r"```(?:json)?\s*(.*?)```", re.IGNORECASE | re.DOTALL)


@dataclass(frozen=True)
class ParsedScore:
    """A score read from a judge's reply, and the form that stated it (one of FORMS)."""

    value: int
    form: str


def parse_score(reply: str) -> ParsedScore:
    """The integer score 0-100 that a judge's reply states, and its form; ValueError (with the reason)
    if it states none.

    Accepted forms: the whole reply a bare integer, optionally with a full stop ("85", "85.", "**85**");
    a labelled score ("Score: 85", "score = 85", "Rating: 85"); "85/100"; "85 out of 100"; a JSON
    object with "score", the whole reply or in a ``` fenced block. Labelled, fraction and out-of forms
    may stand in text. A reply that states several different scores is rejected, not guessed; so are
    scores that are not integers or lie outside 0-100.
    """
    text = reply.strip()
    obj = _json_object(text)
    if obj is not None:
        return ParsedScore(_json_score(obj), "json")
    found: list[tuple[int, str, str]] = []  # (position, form, number)
    prose = text
    for block in _FENCED.finditer(text):
        obj = _json_object(block.group(1).strip())
        if obj is not None:
            found.append((block.start(), "json", str(_json_score(obj))))
            prose = prose[:block.start()] + " " * len(block.group(0)) + prose[block.end():]
    prose = prose.replace("*", " ").replace("`", " ")  # Markdown emphasis and code marks
    bare = _BARE.fullmatch(prose.strip())
    if bare:  # all the prose is one number (beside a fenced JSON score, perhaps)
        found.append((len(prose) - len(prose.lstrip()), "bare", bare.group(1)))
    else:
        for form, pattern in (("labelled", _LABELLED), ("fraction", _FRACTION), ("out_of", _OUT_OF)):
            found += [(m.start(), form, m.group(1)) for m in pattern.finditer(prose)]
    if not found:
        raise ValueError("no score stated (a bare integer, Score: N, N/100, N out of 100 or JSON)")
    found.sort()
    numbers = {float(number) for _, _, number in found}
    if len(numbers) > 1:
        listed = ", ".join(dict.fromkeys(number for _, _, number in found))
        raise ValueError(f"several scores stated ({listed})")
    _, form, number = found[0]
    return ParsedScore(_check_score(number), form)


def _json_object(text: str) -> dict | None:
    """The JSON object with a "score" key that `text` is, or None."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    return obj if isinstance(obj, dict) and "score" in obj else None


def _json_score(obj: dict) -> int:
    value = obj["score"]
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"score is not a number: {value!r}")
    return _check_score(str(value).strip())


def _check_score(token: str) -> int:
    try:
        value = float(token)
    except ValueError:
        raise ValueError(f"score is not a number: {token!r}") from None
    if not math.isfinite(value) or value != int(value):
        raise ValueError(f"score is not an integer: {token}")
    if not 0 <= value <= 100:
        raise ValueError(f"score out of range 0-100: {token}")
    return int(value)


def cache_key(prompt: str, params: JudgeParams) -> str:
    """The cache key of one judgement: the prompt and every judge setting that changes the answer."""
    settings = {"prompt": prompt, "model": params.model, "options": request_options(params),
                "structured": params.structured}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def request_options(params: JudgeParams) -> dict[str, Any]:
    return {"seed": params.seed, "temperature": params.temperature, "num_ctx": params.num_ctx}


class OllamaUnavailable(GptcoreError):
    """The server stayed unreachable or failing after every retry."""


@dataclass
class JudgeServer:
    """What the preflight check learned about the server and the judge model."""

    version: str
    model: str
    digest: str | None
    context_length: int | None = None  # the model's own limit (from /api/show), if it reports one


class OllamaClient:
    """The few calls of Ollama's REST API the judge needs, with retries for transient faults."""

    def __init__(self, url: str, timeout: float = 120.0, retries: int = 5, backoff: float = 1.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def check(self, model: str) -> JudgeServer:
        """GET /api/version and /api/tags: the server answers and has the judge model (whose context
        length POST /api/show may add)."""
        hint = INSTALL_HINT.format(model=model)
        try:
            version = self._send("GET", "/api/version").get("version")
            tags = self._send("GET", "/api/tags").get("models")
        except (requests.RequestException, _HTTPFault) as err:
            raise GptcoreError(f"no Ollama server answers at {self.url} ({_describe(err)}); {hint}") from None
        except GptcoreError as err:
            raise GptcoreError(f"{self.url} does not answer like an Ollama server ({err}); {hint}") from None
        if not isinstance(version, str) or not isinstance(tags, list):
            raise GptcoreError(f"{self.url} does not answer like an Ollama server; {hint}")
        for tag in tags:
            names = {tag.get("name"), tag.get("model")} if isinstance(tag, dict) else set()
            if model in names or (":" not in model and f"{model}:latest" in names):
                return JudgeServer(version=version, model=model, digest=tag.get("digest"),
                                   context_length=self._context_length(model))
        have = ", ".join(sorted(str(t.get("name")) for t in tags if isinstance(t, dict))) or "no models"
        raise GptcoreError(
            f"the judge model {model} is not available at {self.url} (it has {have}); "
            f"pull it with `ollama pull {model}`"
        )

    def _context_length(self, model: str) -> int | None:
        """The model's context length from POST /api/show (`<arch>.context_length`), or None."""
        try:
            info = self._send("POST", "/api/show", {"model": model}).get("model_info")
        except (requests.RequestException, _HTTPFault, GptcoreError):
            return None
        lengths = [v for k, v in (info or {}).items() if k.endswith(".context_length") and isinstance(v, int)]
        return min(lengths) if lengths else None

    def chat(self, model: str, messages: list[dict], options: dict, format: dict | None = None) -> dict:
        """POST /api/chat (no streaming); returns Ollama's response object."""
        body = {"model": model, "messages": messages, "stream": False, "options": options}
        if format is not None:
            body["format"] = format
        return self.request("POST", "/api/chat", body)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call; connection errors, timeouts, 5xx and 429 are retried with exponential backoff, or
        after the wait a 429/503's Retry-After asks for when that is longer (Ollama's 503 "server busy")."""
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, path, body)
            except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
                    _HTTPFault) as err:
                if isinstance(err, _HTTPFault) and err.status < 500 and err.status != 429:
                    raise GptcoreError(f"{self.url}{path}: HTTP {err.status}: {err.message}") from None
                if attempt == self.retries:
                    raise OllamaUnavailable(
                        f"{self.url}{path} failed {self.retries + 1} times, last: {_describe(err)}"
                    ) from None
                asked = err.retry_after if isinstance(err, _HTTPFault) else None
                self.sleep(retry_delay(attempt, self.backoff, asked))
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code != 200:
            message = data.get("error") if isinstance(data, dict) else None
            raise _HTTPFault(response.status_code, str(message or response.text[:200] or response.reason),
                             response.headers.get("Retry-After"))
        if not isinstance(data, dict):
            raise GptcoreError(f"{self.url}{path}: the reply is not a JSON object: {response.text[:200]!r}")
        return data


class _HTTPFault(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _describe(err: Exception) -> str:
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, requests.ConnectionError):
        return "connection refused or dropped"
    return " ".join(str(err).split())[:200]


class ScoreCache:
    """data/judge/scores.jsonl: one JSON record per judged entry, keyed by `cache_key`.

    Records are appended one line at a time with fsync, so a kill leaves at most a partial last line;
    that line (or any line that is not a record) is ignored with a note and the file is rewritten
    without it, atomically, before anything is appended. A later record for a key replaces an
    earlier one (a failure retried on the next run).
    """

    def __init__(self, path: str | os.PathLike, warn: Callable[[str], None]):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        bad = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if isinstance(record, dict) and isinstance(record.get("key"), str) and record.get("status") in ("scored", "failed"):
                self.records[record["key"]] = record
            else:
                bad.append(number)
        if bad:
            warn(f"{self.path}: ignored {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}); "
                 "those entries are asked again")
        if bad or (raw and not raw.endswith(b"\n")):
            self.rewrite()

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self) -> None:
        """Write the latest record of every key, atomically (old file or new, never half)."""
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for record in self.records.values():
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())


@dataclass
class JudgeOutcome:
    records: list[dict]  # one per entry, in file order
    metrics: dict[str, Any]
    histogram: list[dict] = field(default_factory=list)
    table: list[dict] = field(default_factory=list)  # one row per entry: the per-entry plot table

    @property
    def scores(self) -> list[int]:
        return [r["score"] for r in self.records if r["status"] == "scored"]


def _stderr_warning(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(f"warning: {message}", file=sys.stderr)


def judge_responses(
    responses_path: str | os.PathLike,
    scores_path: str | os.PathLike,
    params: JudgeParams,
    *,
    show_progress: bool = True,
    warn: Callable[[str], None] = _stderr_warning,
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
    server: JudgeServer | None = None
    records: list[dict] = []
    keys = [cache_key(judge_prompt(entry), params) for entry in entries]
    for key in keys:
        record = cache.get(key)
        if record is not None and "form" not in record:
            cache.records[key] = _reread(record)
    to_ask = [
        entry["model_response"].strip() and (cache.get(key) or {}).get("status") != "scored"
        for entry, key in zip(entries, keys)
    ]
    if any(to_ask):
        try:
            server = client.check(params.model)  # before the first request, and before any progress bar
        except BaseException:
            client.close()
            raise
    bar = tqdm(entries, desc="judge", unit="entry", disable=not show_progress, file=sys.stderr)
    try:
        for index, entry in enumerate(bar):
            prompt = judge_prompt(entry)
            key = keys[index]
            record = cache.get(key)
            if record is None or record["status"] != "scored":
                try:
                    record = _judge_entry(client, server, entry, prompt, key, params, count_tokens)
                except OllamaUnavailable as err:
                    done = sum(1 for r in records if r["status"] == "scored")
                    raise GptcoreError(
                        f"{err}; stopped after {len(records)} of {len(entries)} entries ({done} scored), "
                        f"kept in {cache.path}; re-run to continue"
                    ) from None
                cache.append(record)
                if record["truncated"]:
                    warn(f"entry {index}: the judge prompt may be cut to the judge's context of "
                         f"{record['context_limit']} tokens "
                         f"(~{record['prompt_tokens_estimate']} tokens estimated, "
                         f"{record['prompt_eval_count']} evaluated)")
                if record["status"] == "failed":
                    warn(f"entry {index}: no score ({record['reason']}); recorded as failed, retried next run")
            records.append({**record, "index": index})
            scored = [r["score"] for r in records if r["status"] == "scored"]
            if scored:
                bar.set_postfix(avg=f"{sum(scored) / len(scored):.1f}", failed=len(records) - len(scored))
    finally:
        bar.close()
        client.close()
    cache.rewrite()
    return JudgeOutcome(records=records, metrics=_metrics(records, params, server, warn),
                        histogram=histogram_rows([r["score"] for r in records if r["status"] == "scored"]),
                        table=score_rows(entries, records))


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


def _judge_entry(client: OllamaClient, server: JudgeServer | None, entry: dict, prompt: str, key: str,
                 params: JudgeParams, count_tokens: Callable[[str], int]) -> dict:
    """Ask once, and once more with a stricter reminder if the reply holds no valid score."""
    estimate = count_tokens(prompt) + CHAT_OVERHEAD_TOKENS
    record = {
        "key": key, "status": "scored", "score": None, "form": None, "reason": None, "replies": [],
        "judge_model": params.model, "judge_digest": None, "judge_version": None,
        "options": request_options(params), "structured": params.structured,
        "prompt_tokens_estimate": estimate, "prompt_eval_count": None, "context_limit": None,
        "truncated": False, "prompt": prompt,
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
    for attempt in range(2):
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


def _metrics(records: Sequence[dict], params: JudgeParams, server: JudgeServer | None,
             warn: Callable[[str], None]) -> dict[str, Any]:
    scored = [r["score"] for r in records if r["status"] == "scored"]
    asked = [r for r in records if r["judge_digest"] is not None or r["judge_version"] is not None]
    digests = sorted({r["judge_digest"] for r in asked})
    if server is not None and any(d != server.digest for d in digests):
        warn(f"some cached scores came from another build of {params.model} than the server's "
             f"({server.digest}); delete the scores file to judge everything again")
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


# Resamples of the percentile bootstrap. Efron & Tibshirani (1993), "An Introduction to the Bootstrap",
# ch. 19, ask for at least 1,000 for percentile intervals; with 10,000 the Monte Carlo error of an end
# point is about 0.07 points for 110 scores of standard deviation 25 (sqrt(p(1-p)/B) / density).
BOOTSTRAP_RESAMPLES = 10_000


def bootstrap_interval(scores: Sequence[float], seed: int, resamples: int = BOOTSTRAP_RESAMPLES,
                       level: float = 0.95) -> tuple[float, float]:
    """The percentile bootstrap confidence interval of the mean score (Efron & Tibshirani 1993, ch. 13).

    Draws `resamples` samples of len(scores) with replacement from a numpy Generator seeded with
    `seed` (so the same scores always give the same interval), and returns the (1 - level) / 2 and
    (1 + level) / 2 quantiles of their means (numpy's default linear interpolation).
    """
    import numpy as np

    values = np.asarray(scores, dtype=np.float64)
    if values.size == 0:
        raise ValueError("no scores to resample")
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, values.size, size=(resamples, values.size))].mean(axis=1)  # [resamples]
    low, high = np.percentile(means, [50 * (1 - level), 50 * (1 + level)])
    return float(low), float(high)


def score_rows(entries: Sequence[dict], records: Sequence[dict]) -> list[dict]:
    """The per-entry plot table: entry index, the instruction's first words, score and the form that
    stated it ("failed" if none did), so `dvc plots diff` compares runs entry by entry.

    A failed entry's score is NaN, which Vega leaves out of the scatter; a blank would be drawn as 0.
    """
    rows = []
    for entry, record in zip(entries, records):
        words = " ".join(entry["instruction"].split())
        scored = record["status"] == "scored"
        rows.append({"entry": record["index"], "instruction": words[:60] + ("…" if len(words) > 60 else ""),
                     "score": record["score"] if scored else "NaN", "form": record["form"] if scored else "failed"})
    return rows


HISTOGRAM_BINS = [(low, low + 9) for low in range(0, 90, 10)] + [(90, 100)]


def histogram_rows(scores: Sequence[int]) -> list[dict]:
    """Counts of scores in bins of ten (the last bin holds 90-100): the plot table."""
    return [{"bin": f"{low}-{high}", "low": low, "count": sum(low <= s <= high for s in scores)}
            for low, high in HISTOGRAM_BINS]
