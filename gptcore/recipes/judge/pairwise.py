"""The pairwise judge: model A's and model B's responses to each test entry compared by an Ollama model,
asked in both orders (MT-Bench's position swap); a verdict counts only when both orders name the same
model (or both a tie), otherwise the entry is a tie, inconsistent.

Win rate of B over A = entries B wins / entries judged in both orders (ties are not half wins: a judge
that always names the first position gives 0 wins to each side, never 50%), with a seeded percentile
bootstrap 95% interval over the entries (AlpacaEval reports its standard error the same way, over
entries). Replies are read strictly (gptcore.recipes.judge.verdicts): a reply that states no verdict is
asked once more, then recorded as failed; an entry with a failed order is counted as failed, never
dropped. Every judgement is cached per prompt (the score cache), so a re-run asks only what is missing.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

from gptcore.errors import DataError, GptcoreError
from gptcore.params.schema import JudgeParams
from gptcore.prompt import format_input
from gptcore.recipes.judge.absolute import load_responses
from gptcore.recipes.judge.cache import ScoreCache, cache_key
from gptcore.recipes.judge.client import JudgeServer, OllamaClient, OllamaUnavailable, request_options
from gptcore.recipes.judge.statistics import BOOTSTRAP_RESAMPLES, bootstrap_interval
from gptcore.recipes.judge.verdicts import VERDICT_SCHEMA, parse_verdict

logger = logging.getLogger(__name__)

CRITERIA = {
    "helpfulness": "which response follows the instruction better: correct, relevant and complete, as the reference answer",
    "politeness": "which response is more polite and respectful in tone while still answering the instruction",
}
PROMPT = (
    "Act as an impartial judge. Compare two responses to the instruction below and decide {criterion}. "
    "A reference answer is given. Do not let the order of the responses or their length influence you.\n\n"
    "[Instruction]\n{input}\n\n[Reference answer]\n{output}\n\n[Response 1]\n{first}\n\n[Response 2]\n{second}\n\n"
    'State your verdict strictly in this form: "[[1]]" if Response 1 is better, "[[2]]" if Response 2 is better, '
    '"[[tie]]" if they are equally good.'
)
REMINDER = 'That reply states no verdict. Answer with exactly one of "[[1]]", "[[2]]" or "[[tie]]" and nothing else.'
ORDERS = {"ab": ("a", "b"), "ba": ("b", "a")}  # which model stands in position 1 and 2
FIELDS = ("instruction", "input", "output")


def pairwise_prompt(entry: dict, first: str, second: str, criterion: str) -> str:
    """The judge's prompt for one entry with `first` in position 1 and `second` in position 2."""
    return PROMPT.format(
        criterion=CRITERIA[criterion], input=format_input(entry), output=entry["output"], first=first, second=second
    )


def load_pairs(path_a: str | os.PathLike, path_b: str | os.PathLike) -> list[tuple[dict, str, str]]:
    """(entry, A's response, B's response) per test entry; both files must hold the same entries in order."""
    a, b = load_responses(path_a), load_responses(path_b)
    if len(a) != len(b):
        raise DataError(f"{path_a} holds {len(a)} entries, {path_b} holds {len(b)}: not the same test set")
    for i, (x, y) in enumerate(zip(a, b)):
        for key in FIELDS:
            if x[key] != y[key]:
                raise DataError(f"entry {i}: {key!r} differs between {path_a} and {path_b}: not the same test set")
    return [(x, x["model_response"], y["model_response"]) for x, y in zip(a, b)]


def combine(ab: str | None, ba: str | None) -> tuple[str, bool | None]:
    """An entry's outcome ("a", "b", "tie" or "failed") from the models its two orders named ("a", "b",
    "tie"; None: failed), and whether the orders agreed (None when one failed)."""
    if ab is None or ba is None:
        return "failed", None
    return (ab, True) if ab == ba else ("tie", False)


def judge_pairwise(
    path_a: str | os.PathLike,
    path_b: str | os.PathLike,
    verdicts_path: str | os.PathLike,
    params: JudgeParams,
    criterion: str = "helpfulness",
    *,
    show_progress: bool = True,
    warn: Callable[[str], None] = logger.warning,
) -> tuple[list[dict], dict[str, Any]]:
    """Judge every entry in both orders, asking only what the cache lacks.

    Returns (one row per entry: entry, instruction, ab, ba, outcome, score; the metrics). Raises
    GptcoreError if the server is unusable; the judgements made so far stay cached.
    """
    from tqdm import tqdm

    pairs = load_pairs(path_a, path_b)
    cache = ScoreCache(verdicts_path, warn)
    client = OllamaClient(params.url, params.timeout, params.retries, params.backoff)
    prompts = [_prompts(entry, {"a": a, "b": b}, criterion) for entry, a, b in pairs]
    records: list[dict[str, dict]] = []
    server = None
    try:
        for index, asks in enumerate(
            tqdm(prompts, desc="judge_pairwise", unit="entry", disable=not show_progress, file=sys.stderr)
        ):
            row = {}
            for order, prompt in asks.items():
                key = cache_key(prompt, params)
                record = cache.get(key)
                if record is None or record["status"] != "scored":
                    server = server or client.check(params.model)
                    record = _ask(client, server, prompt, key, params, f"entry {index} ({order})", len(records))
                    cache.append(record)
                    if record["status"] == "failed":
                        warn(f"entry {index}, order {order}: no verdict ({record['reason']}); recorded as failed")
                row[order] = record
            records.append(row)
    finally:
        client.close()
    cache.rewrite()
    rows = verdict_rows([entry for entry, _, _ in pairs], records)
    return rows, pairwise_metrics(rows, records, params, criterion)


def _prompts(entry: dict, responses: dict[str, str], criterion: str) -> dict[str, str]:
    """The entry's prompt in each order (ab: A in position 1; ba: B in position 1)."""
    return {order: pairwise_prompt(entry, responses[x], responses[y], criterion) for order, (x, y) in ORDERS.items()}


def _ask(
    client: OllamaClient, server: JudgeServer, prompt: str, key: str, params: JudgeParams, where: str, done: int
) -> dict:
    """One order of one entry: asked once, and once more with a reminder if the reply states no verdict."""
    record = {
        "key": key,
        "status": "failed",
        "verdict": None,
        "form": None,
        "reason": None,
        "replies": [],
        "judge_model": params.model,
        "judge_digest": server.digest,
        "judge_version": server.version,
        "options": request_options(params),
        "structured": params.structured,
        "prompt": prompt,
        "time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    messages = [{"role": "user", "content": prompt}]
    for _attempt in range(2):
        try:
            reply = client.chat(
                params.model, messages, request_options(params), VERDICT_SCHEMA if params.structured else None
            )
        except OllamaUnavailable as err:
            raise GptcoreError(
                f"{err}; stopped at {where} after {done} entries, kept in the verdicts file; re-run to continue"
            ) from None
        message = reply.get("message")
        text = message.get("content") if isinstance(message, dict) else None
        text = text if isinstance(text, str) else ""
        record["replies"].append(text)
        try:
            parsed = parse_verdict(text)
        except ValueError as why:
            record["reason"] = str(why)
            messages = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": REMINDER}]
        else:
            return {**record, "status": "scored", "verdict": parsed.value, "form": parsed.form, "reason": None}
    return record


def _named(record: dict, order: str) -> str | None:
    """The model a record's verdict names ("a", "b", "tie"), or None when it failed."""
    if record["status"] != "scored":
        return None
    return "tie" if record["verdict"] == "tie" else ORDERS[order][int(record["verdict"]) - 1]


def verdict_rows(entries: Sequence[dict], records: Sequence[dict[str, dict]]) -> list[dict]:
    """The per-entry plot table: the model each order named, the outcome, and a score for plotting
    (1: B wins, 0: tie, -1: A wins, NaN: failed, which Vega leaves out)."""
    rows = []
    for index, (entry, row) in enumerate(zip(entries, records)):
        named = {order: _named(row[order], order) for order in ORDERS}
        outcome, _ = combine(named["ab"], named["ba"])
        words = " ".join(entry["instruction"].split())
        rows.append(
            {
                "entry": index,
                "instruction": words[:60] + ("…" if len(words) > 60 else ""),
                "ab": named["ab"] or "failed",
                "ba": named["ba"] or "failed",
                "outcome": outcome,
                "score": {"b": 1, "tie": 0, "a": -1}.get(outcome, "NaN"),
            }
        )
    return rows


def pairwise_metrics(
    rows: Sequence[dict], records: Sequence[dict[str, dict]], params: JudgeParams, criterion: str
) -> dict[str, Any]:
    """Win rate of B over A with its bootstrap interval, loss and tie rates, position consistency, counts."""
    judged = [r for r in rows if r["outcome"] != "failed"]
    n = len(judged)
    wins = [1.0 if r["outcome"] == "b" else 0.0 for r in judged]
    consistent = sum(1 for r in judged if r["ab"] == r["ba"])
    low, high = bootstrap_interval(wins, params.seed) if judged else (None, None)
    parsed = [rec for row in records for rec in row.values() if rec["status"] == "scored"]
    digests = sorted({rec["judge_digest"] for row in records for rec in row.values() if rec.get("judge_digest")})
    rate = lambda k: round(k / n, 4) if n else None  # noqa: E731
    return {
        "win_rate": rate(sum(wins)),
        "win_rate_ci95_low": None if low is None else round(low, 4),
        "win_rate_ci95_high": None if high is None else round(high, 4),
        "loss_rate": rate(sum(1 for r in judged if r["outcome"] == "a")),
        "tie_rate": rate(sum(1 for r in judged if r["outcome"] == "tie")),
        "position_consistency": rate(consistent),
        "first_position_rate": round(sum(1 for rec in parsed if rec["verdict"] == "1") / len(parsed), 4)
        if parsed
        else None,
        "n_entries": len(rows),
        "n_judged": n,
        "n_failed": len(rows) - n,
        "n_b_wins": int(sum(wins)),
        "n_a_wins": sum(1 for r in judged if r["outcome"] == "a"),
        "n_ties": sum(1 for r in judged if r["outcome"] == "tie"),
        "n_inconsistent": n - consistent,
        "criterion": criterion,
        "bootstrap_resamples": BOOTSTRAP_RESAMPLES,
        "bootstrap_seed": params.seed,
        "judge_model": params.model,
        "judge_digest": digests[0] if len(digests) == 1 else ("mixed" if digests else None),
        "structured": params.structured,
    }
