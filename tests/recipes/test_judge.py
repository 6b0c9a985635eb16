"""The judge against a real HTTP server on 127.0.0.1 that speaks Ollama's protocol with scripted replies."""

from __future__ import annotations

import json
import re
import socket
import statistics
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from gptcore.errors import DataError, GptcoreError
from gptcore.params.schema import JudgeParams
from gptcore.prompt import format_input
from gptcore.recipes.judge.absolute import REMINDER, SCORE_SCHEMA, judge_prompt, judge_responses, load_responses
from gptcore.recipes.judge.cache import ScoreCache
from gptcore.recipes.judge.scores import ParsedScore, parse_score
from gptcore.recipes.judge.statistics import bootstrap_interval, histogram_rows, score_rows

MODEL = "llama3.1:8b"
DIGEST = "46e0c10c039e019119339687c3c1757cc81b9da49709a3b3924863ba87ca666e"


class FakeOllama:
    """Ollama's /api/version, /api/tags and /api/chat, with replies scripted per model response.

    `script[response]` is a list of actions used in turn for the requests about that response
    (the prompt names it); the last action repeats. An action is a reply text, or a tuple:
    ("status", code[, retry_after]) answers with that HTTP error (and a Retry-After header), ("stall", seconds) waits before answering the
    next action, ("drop",) closes the connection without an answer, ("count", n, text) reports
    prompt_eval_count n.
    """

    def __init__(self, script: dict[str, list], models=(MODEL,), context_length: int = 131072):
        self.script = script
        self.context_length = context_length
        self.models = list(models)
        self.requests: list[tuple[str, str, dict | None]] = []
        self.turns: dict[str, int] = {}
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                fake.requests.append(("GET", self.path, None))
                if self.path == "/api/version":
                    self._send(200, {"version": "0.12.6"})
                elif self.path == "/api/tags":
                    self._send(
                        200,
                        {
                            "models": [
                                {"name": m, "model": m, "digest": DIGEST, "size": 4920753328} for m in fake.models
                            ]
                        },
                    )
                else:
                    self._send(404, {"error": "404 page not found"})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append(("POST", self.path, body))
                if self.path == "/api/show":
                    self._send(
                        200,
                        {"details": {"family": "llama"}, "model_info": {"llama.context_length": fake.context_length}},
                    )
                    return
                response = re.search(
                    r"score the model response `(.*)` on a scale", body["messages"][0]["content"], re.S
                )
                key = response.group(1) if response else ""
                with fake.lock:
                    turn = fake.turns.get(key, 0)
                    fake.turns[key] = turn + 1
                actions = fake.script.get(key, ["50"])
                action = actions[min(turn, len(actions) - 1)]
                count = 40
                if isinstance(action, tuple) and action[0] == "stall":
                    time.sleep(action[1])
                    action = actions[min(turn + 1, len(actions) - 1)]
                if isinstance(action, tuple) and action[0] == "status":
                    self._send(action[1], {"error": f"scripted {action[1]}"}, *action[2:])
                    return
                if isinstance(action, tuple) and action[0] == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(action, tuple) and action[0] == "count":
                    _, count, action = action
                self._send(
                    200,
                    {
                        "model": body["model"],
                        "created_at": "2025-01-01T00:00:00Z",
                        "message": {"role": "assistant", "content": action},
                        "done": True,
                        "done_reason": "stop",
                        "prompt_eval_count": count,
                        "eval_count": 2,
                    },
                )

            def _send(self, status, obj, retry_after=None):
                data = json.dumps(obj).encode()
                try:
                    self.send_response(status)
                    if retry_after is not None:
                        self.send_header("Retry-After", retry_after)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (a stall beyond its timeout)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()

    def chats(self) -> list[dict]:
        return [body for method, path, body in self.requests if path == "/api/chat"]


def entry(response: str, instruction: str = "Name the capital of France.") -> dict:
    return {"instruction": instruction, "input": "", "output": "Paris.", "model_response": response}


def write_responses(path, responses):
    path.write_text(json.dumps([entry(r) if isinstance(r, str) else r for r in responses]))
    return path


def params(url: str, **overrides) -> JudgeParams:
    return JudgeParams(url=url, **{"timeout": 5.0, "retries": 2, "backoff": 0.0, **overrides})


def run(responses_path, scores_path, judge_params, **kwargs):
    warnings: list[str] = []
    outcome = judge_responses(
        responses_path,
        scores_path,
        judge_params,
        show_progress=False,
        warn=warnings.append,
        count_tokens=lambda text: len(text.split()),
        **kwargs,
    )
    return outcome, warnings


@pytest.mark.parametrize(
    "reply, score, form",
    [
        ("85", 85, "bare"),
        (" 85\n", 85, "bare"),
        ("85.", 85, "bare"),
        ("**92**", 92, "bare"),
        ("100", 100, "bare"),
        ("0", 0, "bare"),
        ("85.0", 85, "bare"),
        ("Score: 70. A fair answer.", 70, "labelled"),
        ("score = 64", 64, "labelled"),
        ("Rating: 3", 3, "labelled"),
        ("**Score:** 88\n\nThe response names the capital correctly.", 88, "labelled"),
        ("The answer misses one of 3 facts. Score: 60", 60, "labelled"),  # the stated score, not the explanation's
        ("Score: 85/100", 85, "labelled"),
        ("Score: 75\nFinal score: 75", 75, "labelled"),
        ("I would rate it 85/100.", 85, "fraction"),
        ("85 / 100", 85, "fraction"),
        ("85 out of 100", 85, "out_of"),
        ("It deserves 40 out of 100, as it misses 2 points.", 40, "out_of"),
        ('{"score": 90}', 90, "json"),
        ('{"score": "7"}', 7, "json"),
        ('{"score": 55, "why": "terse"}', 55, "json"),
        ('```json\n{"score": 42}\n```', 42, "json"),
        ('Here is my verdict:\n```json\n{"score": 81}\n```', 81, "json"),
        ('```\n{"score": 12}\n```', 12, "json"),
        ('Verdict: {"score": 33}', 33, "labelled"),
        ("```\n85\n```", 85, "bare"),
        ('```json\n{"score": 70}\n```\nScore: 70', 70, "json"),
    ],
)
def test_parse_score_accepts_the_forms_that_state_a_score(reply, score, form):
    assert parse_score(reply) == ParsedScore(score, form)


@pytest.mark.parametrize(
    "reply, reason",
    [
        # Refusals and explanations that hold one number in 0-100 state no score.
        ("The correct answer is 8.", "no score stated"),
        ("I cannot score this response; it has 3 errors.", "no score stated"),
        ("85\n\nThe response is correct and well phrased.", "no score stated"),
        ("I'd give it a 90", "no score stated"),
        ("On a scale from 0 to 100: 40", "no score stated"),
        ("Score: 8/10", "no score stated"),
        ("Rating: 4 out of 5", "no score stated"),
        ("Score: N/A", "no score stated"),
        ("excellent", "no score stated"),
        ("", "no score stated"),
        ('{"grade": 5}', "no score stated"),
        # Outside 0-100, or not an integer.
        ("150", "out of range"),
        ("-5", "out of range"),
        ("Score: 101", "out of range"),
        ("120/100", "out of range"),
        ('{"score": 101}', "out of range"),
        ('```json\n{"score": -1}\n```', "out of range"),
        ("85.5", "not an integer"),
        ("Score: 72.5", "not an integer"),
        ('{"score": true}', "not a number"),
        # Two different scores: ambiguous, never guessed.
        ("Score: 70\nScore: 80", "several scores stated \\(70, 80\\)"),
        ("70/100 or maybe 80/100", "several scores"),
        ('Score: 60\n```json\n{"score": 65}\n```', "several scores"),
        ('```json\n{"score": 70}\n```\n80', "several scores"),
        ("between 70 and 80", "no score stated"),
    ],
)
def test_parse_score_rejects_what_states_no_score(reply, reason):
    with pytest.raises(ValueError, match=reason):
        parse_score(reply)


def test_prompt_is_the_reference_prompt():
    e = {
        "instruction": "Rewrite the sentence.",
        "input": "The cat sat.",
        "output": "Sat, the cat did.",
        "model_response": "The cat was sitting.",
    }
    assert judge_prompt(e) == (
        f"Given the input `{format_input(e)}` and correct output `Sat, the cat did.`, score the model response "
        "`The cat was sitting.` on a scale from 0 to 100, where 100 is the best score. "
        "Respond with the integer number only."
    )


def test_scripted_replies_average_failures_and_cache(tmp_path):
    script = {
        "plain": ["85"],
        "with text": ["Score: 70. The response is correct but terse."],
        "json": ['{"score": 90}'],
        "words": ["excellent", "still excellent"],
        "out of range": ["150", "60"],
    }
    responses = write_responses(tmp_path / "test.json", list(script) + [""])
    scores = tmp_path / "judge" / "scores.jsonl"
    with FakeOllama(script) as fake:
        outcome, warnings = run(responses, scores, params(fake.url))
        m = outcome.metrics
        assert (m["n_scored"], m["n_failed"], m["n_empty"], m["n_entries"]) == (5, 1, 1, 6)
        assert m["average_score"] == pytest.approx((85 + 70 + 90 + 60 + 0) / 5)
        assert (m["judge_model"], m["judge_version"], m["judge_digest"]) == (MODEL, "0.12.6", DIGEST)
        failed = outcome.records[3]
        assert failed["status"] == "failed" and failed["score"] is None
        assert failed["replies"] == ["excellent", "still excellent"] and "no score stated" in failed["reason"]
        assert [r["form"] for r in outcome.records] == ["bare", "labelled", "json", None, "bare", "empty"]
        assert any("entry 3: no score" in w for w in warnings)
        assert outcome.records[5]["score"] == 0 and outcome.records[5]["replies"] == []  # empty: not asked
        # Preflight once, then one request per entry and a second for the two bad first replies.
        assert [p for _, p, _ in fake.requests[:2]] == ["/api/version", "/api/tags"]
        chats = fake.chats()
        assert len(chats) == 7 and len(fake.requests) == 10  # + POST /api/show once
        assert all(c["options"] == {"seed": 123, "temperature": 0.0, "num_ctx": 2048} for c in chats)
        assert all(c["stream"] is False and c["model"] == MODEL and "format" not in c for c in chats)
        retry = next(c for c in chats if len(c["messages"]) == 3)
        assert retry["messages"][1] == {"role": "assistant", "content": retry["messages"][1]["content"]}
        assert retry["messages"][2] == {"role": "user", "content": REMINDER}

        # Every result is in the scores file, failures included.
        lines = [json.loads(line) for line in scores.read_text().splitlines()]
        assert len(lines) == 6 and sum(r["status"] == "failed" for r in lines) == 1
        assert all(r["judge_digest"] == DIGEST for r in lines if r["replies"])

        # A re-run asks again only the failed entry; now it answers, so a third run asks nothing at all.
        script["words"] = ["55"]
        fake.requests.clear()
        outcome, _ = run(responses, scores, params(fake.url))
        assert len(fake.chats()) == 1 and outcome.metrics["n_failed"] == 0
        assert outcome.metrics["average_score"] == pytest.approx((85 + 70 + 90 + 55 + 60 + 0) / 6)
        fake.requests.clear()
        again, _ = run(responses, scores, params(fake.url))
        assert fake.requests == []
        assert again.metrics == outcome.metrics
        assert len(scores.read_text().splitlines()) == 6  # compacted: one record per entry


def test_no_request_at_all_for_cached_entries_even_without_a_server(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a", "b"])
    scores = tmp_path / "scores.jsonl"
    with FakeOllama({"a": ["10"], "b": ["20"]}) as fake:
        run(responses, scores, params(fake.url))
    outcome, _ = run(responses, scores, params(fake.url))  # the server is gone now
    assert outcome.metrics["average_score"] == 15 and outcome.metrics["judge_version"] == "0.12.6"


def test_changed_settings_ask_again(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    scores = tmp_path / "scores.jsonl"
    with FakeOllama({"a": ["10"]}) as fake:
        run(responses, scores, params(fake.url))
        fake.requests.clear()
        run(responses, scores, params(fake.url, seed=7))
        assert len(fake.chats()) == 1 and fake.chats()[0]["options"]["seed"] == 7


def test_structured_output_asks_for_a_json_schema(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    with FakeOllama({"a": ['{"score": 42}']}) as fake:
        outcome, _ = run(responses, tmp_path / "scores.jsonl", params(fake.url, structured=True))
        assert fake.chats()[0]["format"] == SCORE_SCHEMA
    assert outcome.metrics["average_score"] == 42 and outcome.metrics["structured"] is True


def test_server_error_then_success_is_retried_with_backoff(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    sleeps: list[float] = []
    with FakeOllama({"a": [("status", 500), ("status", 503), "77"]}) as fake:
        outcome, _ = run(
            responses, tmp_path / "scores.jsonl", params(fake.url, retries=3, backoff=0.5), sleep=sleeps.append
        )
        assert len(fake.chats()) == 3
    assert outcome.scores == [77]
    assert sleeps == [0.5, 1.0]  # exponential backoff


def test_busy_and_rate_limited_replies_wait_as_retry_after_asks(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    sleeps: list[float] = []
    # Ollama answers 503 when its queue is full; a proxy in front of it may answer 429.
    with FakeOllama({"a": [("status", 503, "7"), ("status", 429, "0"), ("status", 429), "55"]}) as fake:
        outcome, _ = run(
            responses, tmp_path / "scores.jsonl", params(fake.url, retries=3, backoff=0.5), sleep=sleeps.append
        )
        assert len(fake.chats()) == 4
    assert outcome.scores == [55]
    assert sleeps == [7.0, 1.0, 2.0]  # the asked-for wait where longer than the backoff, else the backoff


def test_a_stall_beyond_the_timeout_and_a_dropped_connection_are_retried(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["slow", "rude"])
    with FakeOllama({"slow": [("stall", 2.0), "66"], "rude": [("drop",), "44"]}) as fake:
        start = time.perf_counter()
        outcome, _ = run(responses, tmp_path / "scores.jsonl", params(fake.url, timeout=0.5))
        assert time.perf_counter() - start < 5
        assert len(fake.chats()) == 4
    assert outcome.scores == [66, 44]


def test_a_run_that_cannot_finish_says_so_and_keeps_what_it_scored(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["ok", "broken", "never"])
    scores = tmp_path / "scores.jsonl"
    with FakeOllama({"ok": ["80"], "broken": [("status", 500)]}) as fake:
        with pytest.raises(GptcoreError, match=r"stopped after 1 of 3 entries \(1 scored\)"):
            run(responses, scores, params(fake.url, retries=2))
        assert len(fake.chats()) == 1 + 3  # one for "ok", three tries for "broken", none for "never"
        kept = [json.loads(line) for line in scores.read_text().splitlines()]
        assert [r["score"] for r in kept] == [80]
        fake.script["broken"] = ["30"]
        fake.requests.clear()
        outcome, _ = run(responses, scores, params(fake.url))
        assert len(fake.chats()) == 2 and outcome.scores == [80, 30, 50]


def test_server_absent_gives_one_clear_message(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(GptcoreError) as err:
        run(responses, tmp_path / "scores.jsonl", params(f"http://127.0.0.1:{port}"))
    message = str(err.value)
    assert "ollama serve" in message and "ollama pull llama3.1:8b" in message and "\n" not in message
    assert not (tmp_path / "scores.jsonl").exists()


def test_missing_judge_model_says_how_to_pull_it(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a"])
    with FakeOllama({}, models=["mistral:7b"]) as fake:
        with pytest.raises(GptcoreError, match=r"llama3.1:8b is not available .*mistral:7b.*`ollama pull llama3.1:8b`"):
            run(responses, tmp_path / "scores.jsonl", params(fake.url))
        assert fake.chats() == []


def test_truncation_is_flagged_per_entry(tmp_path):
    long = entry("fine", instruction="word " * 300)
    responses = write_responses(tmp_path / "test.json", [long, "counted", "short"])
    with FakeOllama({"fine": ["50"], "counted": [("count", 256, "60")], "short": ["70"]}) as fake:
        outcome, warnings = run(responses, tmp_path / "scores.jsonl", params(fake.url, num_ctx=256))
    flags = [r["truncated"] for r in outcome.records]
    assert flags == [True, True, False]  # by the estimate, by the reported prompt_eval_count, not at all
    assert outcome.metrics["n_truncated"] == 2 and outcome.metrics["n_scored"] == 3
    assert sum("may be cut to the judge's context of 256 tokens" in w for w in warnings) == 2


def test_a_model_context_below_num_ctx_is_the_limit(tmp_path):
    responses = write_responses(tmp_path / "test.json", [entry("fine", instruction="word " * 120)])
    with FakeOllama({"fine": ["50"]}, context_length=100) as fake:
        outcome, _ = run(responses, tmp_path / "scores.jsonl", params(fake.url))
    assert outcome.records[0]["truncated"] and outcome.records[0]["context_limit"] == 100


def test_corrupt_trailing_line_is_ignored_with_a_note(tmp_path):
    responses = write_responses(tmp_path / "test.json", ["a", "b"])
    scores = tmp_path / "scores.jsonl"
    with FakeOllama({"a": ["10"], "b": ["20"]}) as fake:
        run(responses, scores, params(fake.url))
        lines = scores.read_text().splitlines()
        scores.write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])  # killed mid-append
        fake.requests.clear()
        outcome, warnings = run(responses, scores, params(fake.url))
        assert len(fake.chats()) == 1  # only the entry whose line was cut
    assert any("ignored 1 unreadable line" in w for w in warnings)
    assert outcome.scores == [10, 20]
    assert [json.loads(line)["score"] for line in scores.read_text().splitlines()] == [10, 20]


def test_warnings_go_to_logging_by_default(tmp_path, caplog):
    responses = write_responses(tmp_path / "test.json", [""])  # an empty response: the judge is not asked
    scores = tmp_path / "scores.jsonl"
    scores.write_text("not a record\n")
    with caplog.at_level("WARNING", logger="gptcore.recipes.judge"):
        outcome = judge_responses(
            responses,
            scores,
            params("http://127.0.0.1:9"),
            show_progress=False,
            count_tokens=lambda text: len(text.split()),
        )
    assert outcome.scores == [0]
    assert [(r.name, r.levelname) for r in caplog.records] == [("gptcore.recipes.judge.absolute", "WARNING")]
    assert caplog.records[0].getMessage().startswith(f"{scores}: ignored 1 unreadable line(s) (1)")


def test_cache_rewrites_a_file_without_trailing_newline_before_appending(tmp_path):
    scores = tmp_path / "scores.jsonl"
    scores.write_text(json.dumps({"key": "k", "status": "scored", "score": 5}))
    cache = ScoreCache(scores, warn=lambda m: None)
    cache.append({"key": "k2", "status": "failed", "score": None})
    assert [json.loads(line)["key"] for line in scores.read_text().splitlines()] == ["k", "k2"]


@pytest.mark.parametrize(
    "content, message",
    [
        ("{}", "expected a JSON list"),
        ("[1]", "entry 0: expected an object"),
        ('[{"instruction": "a", "input": "", "output": "b"}]', "entry 0: missing 'model_response'"),
        (
            '[{"instruction": "a", "input": null, "output": "b", "model_response": "c"}]',
            "entry 0: 'input' must be a string",
        ),
        ("[{", "not valid JSON"),
    ],
)
def test_bad_responses_file_is_one_clear_error(tmp_path, content, message):
    path = tmp_path / "test.json"
    path.write_text(content)
    with pytest.raises(DataError, match=re.escape(message)):
        load_responses(path)


def test_a_reply_that_states_no_score_is_asked_again_then_recorded_failed(tmp_path):
    script = {
        "refuses": ["The correct answer is 8.", "I cannot judge this; the answer should be 8."],
        "explains": ["The response names 1 city, correctly.", "75"],
        "fenced": ['```json\n{"score": 64}\n```'],
        "two": ["Score: 70 or Score: 80", "Score: 80 out of 100? No: 70/100"],
    }
    responses = write_responses(tmp_path / "test.json", list(script))
    with FakeOllama(script) as fake:
        outcome, warnings = run(responses, tmp_path / "scores.jsonl", params(fake.url))
        chats = fake.chats()
    assert len(chats) == 7  # two turns for each entry but the fenced JSON
    assert all(c["messages"][-1]["content"] == REMINDER for c in chats if len(c["messages"]) == 3)
    refused, explained, fenced, two = outcome.records
    assert refused["status"] == "failed" and refused["score"] is None and refused["form"] is None
    assert refused["replies"] == script["refuses"] and "no score stated" in refused["reason"]
    assert (explained["status"], explained["score"], explained["form"]) == ("scored", 75, "bare")
    assert (fenced["score"], fenced["form"], len(fenced["replies"])) == (64, "json", 1)
    assert two["status"] == "failed" and "several scores stated (80, 70)" in two["reason"]
    m = outcome.metrics
    assert (m["n_scored"], m["n_failed"], m["average_score"]) == (2, 2, 69.5)  # failures never count as 0
    assert sum("no score" in w for w in warnings) == 2
    assert [r["form"] for r in score_rows([entry(r) for r in script], outcome.records)] == [
        "failed",
        "bare",
        "json",
        "failed",
    ]


def test_scores_cached_by_the_lax_parser_are_read_again(tmp_path):
    """A record from before the forms were required: a reply that states no score is asked again."""
    responses = write_responses(tmp_path / "test.json", ["kept", "lax"])
    scores = tmp_path / "scores.jsonl"
    with FakeOllama({"kept": ["85"], "lax": ["90"]}) as fake:
        run(responses, scores, params(fake.url))
        old = [json.loads(line) for line in scores.read_text().splitlines()]
        old[1].update(score=8, replies=["The correct answer is 8."])
        scores.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "form"}) + "\n" for r in old))
        fake.requests.clear()
        outcome, _ = run(responses, scores, params(fake.url))
        assert len(fake.chats()) == 1 and "lax" in fake.chats()[0]["messages"][0]["content"]
    assert [(r["score"], r["form"]) for r in outcome.records] == [(85, "bare"), (90, "bare")]
    assert [json.loads(line)["form"] for line in scores.read_text().splitlines()] == ["bare", "bare"]


def test_metrics_carry_the_bootstrap_interval_and_the_spread(tmp_path):
    values = [35, 90, 72, 0, 64, 88, 51, 77, 93, 60]
    responses = write_responses(tmp_path / "test.json", [f"r{i}" for i in range(len(values))])
    with FakeOllama({f"r{i}": [str(v)] for i, v in enumerate(values)}) as fake:
        outcome, _ = run(responses, tmp_path / "scores.jsonl", params(fake.url))
    m = outcome.metrics
    low, high = bootstrap_interval(values, seed=123)
    assert (m["average_score_ci95_low"], m["average_score_ci95_high"]) == (round(low, 2), round(high, 2))
    assert m["average_score_ci95_low"] < m["average_score"] == 63.0 < m["average_score_ci95_high"]
    assert m["score_std"] == pytest.approx(statistics.stdev(values), abs=0.005)
    assert (m["bootstrap_resamples"], m["bootstrap_seed"]) == (10_000, 123)
    # About the normal interval mean +- 1.96 sd / sqrt(n) (the percentile interval is a little narrower
    # for small n, since the bootstrap's variance divides by n, not n - 1).
    half = 1.96 * statistics.pstdev(values) / len(values) ** 0.5
    assert high - low == pytest.approx(2 * half, rel=0.1)


def test_bootstrap_matches_a_hand_computation():
    # Means of resamples of [0, 0, 0, 100]: 25 * K with K ~ Binomial(4, 1/4); P(K <= 2) = 243/256 = 0.949
    # and P(K <= 3) = 255/256 = 0.996, so the 2.5th percentile is 0 and the 97.5th is 75.
    assert bootstrap_interval([0, 0, 0, 100], seed=123) == (0.0, 75.0)
    # A constant list has no spread; one value is its own interval.
    assert bootstrap_interval([70, 70, 70], seed=1) == (70.0, 70.0) and bootstrap_interval([55], seed=1) == (55.0, 55.0)
    # The same computation, spelled out: seeded draws, means, numpy's linear-interpolation percentiles.
    values = [10, 40, 45, 80, 95]
    rng = np.random.default_rng(7)
    draws = rng.integers(0, len(values), size=(10_000, len(values)))
    means = sorted(sum(values[i] for i in row) / len(values) for row in draws.tolist())

    def percentile(q):
        position = q / 100 * (len(means) - 1)
        below = int(position)
        return means[below] + (means[below + 1] - means[below]) * (position - below)

    low, high = bootstrap_interval(values, seed=7)
    assert (low, high) == pytest.approx((percentile(2.5), percentile(97.5)), abs=1e-9)


def test_bootstrap_is_deterministic_and_depends_on_the_seed():
    values = list(range(0, 100, 7))
    assert bootstrap_interval(values, seed=123) == bootstrap_interval(values, seed=123)
    assert bootstrap_interval(values, seed=123) != bootstrap_interval(values, seed=124)
    with pytest.raises(ValueError, match="no scores"):
        bootstrap_interval([], seed=123)


def test_histogram_bins():
    rows = histogram_rows([0, 9, 10, 55, 90, 100, 100])
    assert [r["count"] for r in rows] == [2, 1, 0, 0, 0, 1, 0, 0, 0, 3]
    assert rows[-1]["bin"] == "90-100"


def test_judge_stage_end_to_end(repo_copy):
    responses = repo_copy.root / "data" / "responses" / "test.json"
    responses.parent.mkdir(parents=True)
    write_responses(responses, ["a", "b", ""])
    with FakeOllama({"a": ["80"], "b": ["no idea", "still no idea"]}) as fake:
        repo_copy.set_params({"judge": {"url": fake.url, "retries": 1, "backoff": 0.0}})
        proc = repo_copy.dvc("repro", "--single-item", "judge")
        metrics = repo_copy.read_json("metrics/judge.json")
        assert (metrics["n_scored"], metrics["n_failed"], metrics["average_score"]) == (2, 1, 40.0)
        assert (metrics["average_score_ci95_low"], metrics["average_score_ci95_high"]) == (0.0, 80.0)
        assert metrics["score_std"] == pytest.approx(56.57, abs=0.01) and metrics["bootstrap_seed"] == 123
        assert "judge: average score 40.00 (95% CI 0.00-80.00) over 2 entries, 1 failed" in proc.stdout
        assert (repo_copy.root / "plots/judge/histogram.png").read_bytes()[:4] == b"\x89PNG"
        histogram = (repo_copy.root / "plots/judge/histogram.csv").read_text().splitlines()
        assert histogram[0] == "bin,low,count" and histogram[1] == "0-9,0,1" and histogram[-2] == "80-89,80,1"
        table = (repo_copy.root / "plots/judge/scores.csv").read_text().splitlines()
        assert table == [
            "entry,instruction,score,form",
            "0,Name the capital of France.,80,bare",
            "1,Name the capital of France.,NaN,failed",
            "2,Name the capital of France.,0,empty",
        ]
        shown = json.loads(repo_copy.dvc("plots", "show", "--json", "judge_scores").stdout)["data"]["judge_scores"]
        spec = shown[0]["content"]  # DVC reads the per-entry table as dvc.yaml declares it
        assert spec["title"]["text"] == "Judge score per test entry (failed entries have none)"
        assert {row["entry"]: row["score"] for row in spec["data"]["values"]} == {"0": "80", "1": "NaN", "2": "0"}
        assert len((repo_copy.root / "data" / "judge" / "scores.jsonl").read_text().splitlines()) == 3
        n_before = len(fake.requests)
        repo_copy.dvc("repro", "--single-item", "judge")  # nothing changed: DVC skips the stage
        assert len(fake.requests) == n_before
