"""The pairwise judge against a real HTTP server on 127.0.0.1 that speaks Ollama's protocol, with a judge
whose verdicts are a function of the prompt: position bias, a real preference, and replies with no verdict."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gptcore.errors import DataError
from gptcore.params.schema import JudgeParams
from gptcore.recipes.judge.pairwise import REMINDER, combine, judge_pairwise, pairwise_prompt
from gptcore.recipes.judge.verdicts import VERDICT_SCHEMA, parse_verdict

MODEL = "llama3.1:8b"
N = 12


class FakeJudge:
    """Ollama's /api/version, /api/tags, /api/show and /api/chat; each chat is answered by decide(messages)."""

    def __init__(self, decide):
        self.chats: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                if self.path == "/api/version":
                    self._send({"version": "0.12.6"})
                else:
                    self._send({"models": [{"name": MODEL, "model": MODEL, "digest": "d1g3st"}]})

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/api/show":
                    self._send({"model_info": {"llama.context_length": 131072}})
                    return
                fake.chats.append(body)
                reply = decide(body["messages"])
                self._send({"model": MODEL, "message": {"role": "assistant", "content": reply}, "done": True})

            def _send(self, obj):
                data = json.dumps(obj).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def first_response(messages) -> str:
    return re.search(r"\[Response 1\]\n(.*?)\n\n\[Response 2\]", messages[0]["content"], re.S).group(1)


def prefers_b(messages) -> str:
    """A judge that prefers model B's response wherever it stands."""
    return "[[1]]" if first_response(messages).startswith("beta") else "[[2]]"


def write_pairs(tmp_path, n=N):
    entries = [{"instruction": f"Task {i}.", "input": "", "output": f"gold {i}"} for i in range(n)]
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps([{**e, "model_response": f"alpha {i}"} for i, e in enumerate(entries)]))
    b.write_text(json.dumps([{**e, "model_response": f"beta {i}"} for i, e in enumerate(entries)]))
    return a, b


def judge(tmp_path, fake, **kwargs):
    a, b = write_pairs(tmp_path)
    params = JudgeParams(url=fake.url, retries=0, backoff=0.0, timeout=10.0)
    return judge_pairwise(a, b, tmp_path / "verdicts.jsonl", params, show_progress=False, **kwargs)


@pytest.mark.parametrize(
    "reply, verdict, form",
    [
        ("[[1]]", "1", "bracketed"),
        ("Response 2 answers the question; Response 1 does not. [[2]]", "2", "bracketed"),
        ("[[TIE]]", "tie", "bracketed"),
        ("2", "2", "bare"),
        ("**Response 1.**", "1", "bare"),
        ('{"verdict": "tie"}', "tie", "json"),
        ('{"verdict": 2}', "2", "json"),
    ],
)
def test_parse_verdict_accepts_the_stated_forms(reply, verdict, form):
    parsed = parse_verdict(reply)
    assert (parsed.value, parsed.form) == (verdict, form)


@pytest.mark.parametrize(
    "reply, reason",
    [
        ("Response 1 is better.", "no verdict stated"),
        ("[[1]] no wait, [[2]]", "several verdicts"),
        ('{"verdict": "A"}', "not 1, 2 or tie"),
        ("", "no verdict stated"),
        ("I think 1 is better", "no verdict stated"),
    ],
)
def test_parse_verdict_rejects_what_states_none(reply, reason):
    with pytest.raises(ValueError, match=reason):
        parse_verdict(reply)


def test_combine_counts_only_verdicts_that_survive_the_swap():
    assert combine("b", "b") == ("b", True)
    assert combine("tie", "tie") == ("tie", True)
    assert combine("a", "b") == ("tie", False)  # position bias: each order named its first response
    assert combine("a", None) == ("failed", None)


def test_prompt_shows_both_responses_the_reference_and_the_criterion():
    entry = {"instruction": "Name a colour.", "input": "", "output": "Blue."}
    prompt = pairwise_prompt(entry, "Red.", "Green.", "politeness")
    assert prompt.index("Name a colour.") < prompt.index("Blue.") < prompt.index("Red.") < prompt.index("Green.")
    assert "polite" in prompt and "[[1]]" in prompt and "[[tie]]" in prompt


def test_a_judge_that_always_names_the_first_position_gives_no_wins(tmp_path):
    with FakeJudge(lambda messages: "[[1]]") as fake:
        rows, m = judge(tmp_path, fake)
    assert len(fake.chats) == 2 * N  # both orders of every entry
    assert m["position_consistency"] == 0.0 and m["first_position_rate"] == 1.0
    assert (m["win_rate"], m["loss_rate"], m["tie_rate"]) == (0.0, 0.0, 1.0)
    assert (m["win_rate_ci95_low"], m["win_rate_ci95_high"]) == (0.0, 0.0)
    assert m["n_inconsistent"] == N and m["n_judged"] == N and m["n_failed"] == 0
    assert {(r["ab"], r["ba"], r["outcome"], r["score"]) for r in rows} == {("a", "b", "tie", 0)}


def test_a_judge_that_prefers_b_in_both_orders_gives_b_every_win(tmp_path):
    with FakeJudge(prefers_b) as fake:
        rows, m = judge(tmp_path, fake)
    assert (m["win_rate"], m["win_rate_ci95_low"], m["win_rate_ci95_high"]) == (1.0, 1.0, 1.0)
    assert m["position_consistency"] == 1.0 and m["first_position_rate"] == 0.5 and m["tie_rate"] == 0.0
    assert all(r["outcome"] == "b" and r["score"] == 1 for r in rows)


def test_a_mixed_judge_gets_a_bootstrap_interval_around_its_win_rate(tmp_path):
    def decide(messages):  # B wins entries 0-5 in both orders, A wins 6-11
        i = int(re.search(r"Task (\d+)\.", messages[0]["content"]).group(1))
        wins_b = i < 6
        return "[[1]]" if first_response(messages).startswith("beta") == wins_b else "[[2]]"

    with FakeJudge(decide) as fake:
        _, m = judge(tmp_path, fake)
    assert (m["win_rate"], m["loss_rate"], m["position_consistency"]) == (0.5, 0.5, 1.0)
    assert 0.1 < m["win_rate_ci95_low"] < 0.5 < m["win_rate_ci95_high"] < 0.9


def test_replies_without_a_verdict_are_asked_again_then_counted_as_failed(tmp_path):
    def decide(messages):
        if "Task 3." in messages[0]["content"]:
            return "Both are fine, really."  # no verdict, also after the reminder
        if "Task 4." in messages[0]["content"] and len(messages) == 1:
            return "Hmm."  # no verdict at first, one after the reminder
        return prefers_b(messages)

    with FakeJudge(decide) as fake:
        rows, m = judge(tmp_path, fake)
    assert m["n_failed"] == 1 and m["n_judged"] == N - 1 and m["n_entries"] == N
    assert rows[3]["outcome"] == "failed" and rows[3]["score"] == "NaN" and rows[3]["ab"] == "failed"
    assert rows[4]["outcome"] == "b"
    retried = [c for c in fake.chats if len(c["messages"]) == 3]
    assert {c["messages"][2]["content"] for c in retried} == {REMINDER} and len(
        retried
    ) == 4  # entry 3 and 4, both orders
    records = [json.loads(line) for line in (tmp_path / "verdicts.jsonl").read_text().splitlines()]
    assert sum(r["status"] == "failed" for r in records) == 2 and len(records) == 2 * N  # nothing dropped
    with FakeJudge(prefers_b) as fake:  # a re-run asks only the failed ones
        rows, m = judge(tmp_path, fake)
    assert len(fake.chats) == 2 and m["n_failed"] == 0 and m["win_rate"] == 1.0


def test_the_interval_is_seeded(tmp_path):
    def decide(messages):
        i = int(re.search(r"Task (\d+)\.", messages[0]["content"]).group(1))
        return prefers_b(messages) if i % 3 else "[[tie]]"

    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    with FakeJudge(decide) as fake:
        _, first = judge(tmp_path / "one", fake)
        _, second = judge(tmp_path / "two", fake)
    assert len(fake.chats) == 4 * N  # two separate caches: every verdict asked twice
    assert first == second and first["win_rate_ci95_low"] < first["win_rate"] < first["win_rate_ci95_high"]


def test_structured_output_asks_for_the_verdict_schema(tmp_path):
    with FakeJudge(lambda messages: '{"verdict": "tie"}') as fake:
        a, b = write_pairs(tmp_path, 2)
        params = JudgeParams(url=fake.url, structured=True, retries=0)
        _, m = judge_pairwise(a, b, tmp_path / "v.jsonl", params, show_progress=False)
    assert all(c["format"] == VERDICT_SCHEMA for c in fake.chats) and m["tie_rate"] == 1.0


def test_different_test_sets_are_refused_naming_the_entry(tmp_path):
    a, b = write_pairs(tmp_path)
    other = json.loads(b.read_text())
    other[5]["instruction"] = "Something else."
    b.write_text(json.dumps(other))
    with pytest.raises(DataError, match=r"entry 5: 'instruction' differs"):
        judge_pairwise(a, b, tmp_path / "v.jsonl", JudgeParams(), show_progress=False)


def test_judge_pairwise_stage_end_to_end(repo_copy):
    responses = repo_copy.root / "data" / "responses"
    responses.mkdir(parents=True)
    a, b = write_pairs(responses)
    a.rename(responses / "test.json")
    b.rename(responses / "preferences.json")
    with FakeJudge(prefers_b) as fake:
        repo_copy.set_params({"judge": {"url": fake.url, "retries": 0}, "judge_pairwise": {"criterion": "politeness"}})
        proc = repo_copy.dvc("repro", "--single-item", "judge_pairwise")
    metrics = repo_copy.read_json("metrics/judge_pairwise.json")
    assert (metrics["win_rate"], metrics["criterion"], metrics["n_judged"]) == (1.0, "politeness", N)
    assert "judge_pairwise: B's win rate 1.000 (95% CI 1.000-1.000)" in proc.stdout
    table = (repo_copy.root / "plots/judge_pairwise/verdicts.csv").read_text().splitlines()
    assert table[0] == "entry,instruction,ab,ba,outcome,score" and table[1] == "0,Task 0.,b,b,b,1"
    shown = json.loads(repo_copy.dvc("plots", "show", "--json", "judge_pairwise_verdicts").stdout)["data"]
    values = shown["judge_pairwise_verdicts"][0]["content"]["data"]["values"]
    assert len(values) == N and {row["score"] for row in values} == {"1"}
