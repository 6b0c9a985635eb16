"""Tool calling on /api/chat and /v1/chat/completions, through the official ollama and openai clients:
tool_choice auto (free text or a call), required and named (a call whose arguments validate against the
function's schema, checked with jsonschema), none; a two-round conversation (call, tool result, answer)
streamed and not on both routes; the lazy grammar on the engine; and the 400s that name bad input."""

from __future__ import annotations

import json
import threading

import jsonschema
import ollama
import openai
import pytest
import requests
import torch

from gptcore.config import GPTConfig
from gptcore.inference.sampling import SamplingOptions
from gptcore.model import GPTModel
from gptcore.prompt import TOOL_CALL_MARKER, render_call, render_chat
from gptcore.serve import Server
from gptcore.serve.constraints import triggered
from gptcore.serve.engine import Engine
from gptcore.serve.jobs import Done, Job, Sampling
from gptcore.serve.tools import CallFilter, ToolPlan, parse_call
from gptcore.weights import load_model, save_model

SCHEMAS = {
    "no_parameters": {"type": "object", "properties": {}},
    "integer_with_default": {
        "type": "object",
        "properties": {"days": {"type": "integer", "default": 1, "minimum": 0, "maximum": 30}},
    },
    "nested_object": {
        "type": "object",
        "properties": {
            "place": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 12}, "country": {"enum": ["FR", "IT"]}},
                "required": ["city", "country"],
                "additionalProperties": False,
            },
            "units": {"enum": ["celsius", "fahrenheit"]},
        },
        "required": ["place", "units"],
        "additionalProperties": False,
    },
}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
BUDGET = 48


def tool(name: str) -> dict:
    return {
        "type": "function",
        "function": {"name": name, "description": f"the {name} tool", "parameters": SCHEMAS[name]},
    }


TOOLS = [tool(name) for name in SCHEMAS]


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(11)
    config = GPTConfig(vocab_size=50257, context_length=512, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=True)
    path = tmp_path_factory.mktemp("tools") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


@pytest.fixture(scope="module")
def url(model_path, mirror_dir):
    import os

    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    server = Server(model_path, "127.0.0.1", 0, name="tiny", device="cpu", quiet=True).start()
    yield server.url
    server.close()


@pytest.fixture
def client(url):
    with ollama.Client(host=url, timeout=120) as c:
        yield c


@pytest.fixture
def oai(url):
    with openai.OpenAI(base_url=url + "/v1", api_key="unused", timeout=120, max_retries=0) as c:
        yield c


def ollama_chat(client, stream: bool, **kwargs) -> tuple[str, list]:
    """(content, tool calls as (name, arguments)) of an /api/chat reply, streamed or not: through the
    official client, or raw HTTP for tool_choice (Ollama's own API has no such field; gptcore takes
    OpenAI's there too)."""
    kwargs.setdefault("options", {"num_predict": BUDGET, "seed": 1})
    if "tool_choice" in kwargs:
        url = str(client._client.base_url).rstrip("/")
        reply = requests.post(url + "/api/chat", json={"model": "tiny", "stream": stream, **kwargs}, timeout=120)
        assert reply.status_code == 200, reply.text
        chunks = [ollama.ChatResponse(**json.loads(line)) for line in reply.text.splitlines()]
    elif not stream:
        chunks = [client.chat(model="tiny", **kwargs)]
    else:
        chunks = list(client.chat(model="tiny", stream=True, **kwargs))
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    calls = [(c.function.name, dict(c.function.arguments)) for ch in chunks for c in ch.message.tool_calls or []]
    return "".join(ch.message.content or "" for ch in chunks), calls


def openai_chat(oai, stream: bool, **kwargs) -> tuple[str, list, str]:
    """(content, tool calls as (name, arguments), finish_reason) of a /v1/chat/completions reply."""
    kwargs.setdefault("max_tokens", BUDGET)
    kwargs.setdefault("seed", 1)
    if not stream:
        choice = oai.chat.completions.create(model="tiny", **kwargs).choices[0]
        calls = [(c.function.name, json.loads(c.function.arguments)) for c in choice.message.tool_calls or []]
        return choice.message.content or "", calls, choice.finish_reason
    chunks = [c for c in oai.chat.completions.create(model="tiny", stream=True, **kwargs) if c.choices]
    deltas = [c.choices[0].delta for c in chunks]
    calls = [(c.function.name, json.loads(c.function.arguments)) for d in deltas for c in d.tool_calls or []]
    return "".join(d.content or "" for d in deltas), calls, chunks[-1].choices[0].finish_reason


def check_call(calls: list, names=tuple(SCHEMAS)) -> tuple[str, dict]:
    assert len(calls) == 1, calls
    name, arguments = calls[0]
    assert name in names
    jsonschema.validate(arguments, SCHEMAS[name])
    return name, arguments


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_auto_gives_text_or_a_valid_call(client, oai, stream):
    for content, calls in (
        ollama_chat(client, stream, messages=QUESTION, tools=TOOLS),
        openai_chat(oai, stream, messages=QUESTION, tools=TOOLS, tool_choice="auto")[:2],
    ):
        if calls:
            check_call(calls)
        else:
            assert content and not content.lstrip().startswith(TOOL_CALL_MARKER)


@pytest.mark.parametrize("name", list(SCHEMAS))
@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_required_and_named_calls_validate(client, oai, url, name, stream):
    content, calls = ollama_chat(client, stream, messages=QUESTION, tools=[tool(name)], tool_choice="required")
    assert content == "" and check_call(calls)[0] == name
    content, calls, reason = openai_chat(oai, stream, messages=QUESTION, tools=TOOLS, tool_choice="required")
    assert content == "" and reason == "tool_calls"
    check_call(calls)
    named = {"type": "function", "function": {"name": name}}
    content, calls, reason = openai_chat(oai, stream, messages=QUESTION, tools=TOOLS, tool_choice=named)
    assert reason == "tool_calls" and check_call(calls, [name])[0] == name


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_two_rounds_call_result_answer(client, oai, stream):
    """Round 1 calls a tool; round 2 sends the call and the tool's result back and gets an answer, which
    the model continues from the rendered history (the same template renders both)."""
    _, calls = ollama_chat(client, stream, messages=QUESTION, tools=TOOLS, tool_choice="required")
    name, arguments = check_call(calls)
    history = [
        *QUESTION,
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_name": name},
    ]
    content, more = ollama_chat(client, stream, messages=history, tools=TOOLS)
    assert content or more
    rendered = render_chat(history, TOOLS)
    assert render_call(name, arguments) + "\n\n### Input:\n" + '{"temperature": 21}' in rendered
    # the same conversation in OpenAI's shape: arguments as a JSON string, the result by tool_call_id
    _, calls, _ = openai_chat(oai, stream, messages=QUESTION, tools=TOOLS, tool_choice="required")
    name, arguments = check_call(calls)
    call = {"id": "call_1", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    history = [
        *QUESTION,
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": '{"temperature": 21}', "tool_call_id": "call_1"},
    ]
    content, more, reason = openai_chat(oai, stream, messages=history, tools=TOOLS)
    assert (content and reason in ("stop", "length")) or (more and reason == "tool_calls")


def test_the_history_renders_as_the_model_writes_calls(url):
    """The prompt of round 2 is round 1's prompt, the call as the model wrote it, and the tool's result:
    its token count adds up (prompt_eval_count) and none is 'None' or missing."""
    first = requests.post(
        url + "/api/chat",
        json={
            "model": "tiny",
            "messages": QUESTION,
            "tools": TOOLS,
            "tool_choice": "required",
            "stream": False,
            "options": {"num_predict": BUDGET, "seed": 3},
        },
        timeout=120,
    ).json()
    (call,) = first["message"]["tool_calls"]
    history = [*QUESTION, {"role": "assistant", "content": "", "tool_calls": [call]}, {"role": "tool", "content": "21"}]
    # raw HTTP: the ollama client keeps only the schema keywords of Ollama's own Tool type
    body = {"model": "tiny", "messages": history, "tools": TOOLS, "stream": False, "options": {"num_predict": 1}}
    second = requests.post(url + "/api/chat", json=body, timeout=120).json()
    from gptcore.tokenizer import encode_text, get_tokenizer

    assert second["prompt_eval_count"] == len(encode_text(get_tokenizer(), render_chat(history, TOOLS)))


def test_tool_choice_none_renders_no_tools(client, oai):
    plain = client.chat(model="tiny", messages=QUESTION, options={"num_predict": 1})
    offered = client.chat(model="tiny", messages=QUESTION, tools=TOOLS, options={"num_predict": 1})
    assert offered.prompt_eval_count > plain.prompt_eval_count  # the tools are in the prompt
    none = oai.chat.completions.create(model="tiny", messages=QUESTION, tools=TOOLS, tool_choice="none", max_tokens=1)
    assert none.usage.prompt_tokens == plain.prompt_eval_count and none.choices[0].finish_reason != "tool_calls"


def test_show_lists_tools(client):
    assert "tools" in client.show("tiny").capabilities


BAD_SCHEMA = {"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}}


@pytest.mark.parametrize(
    "extra, message",
    [
        ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": BAD_SCHEMA}}]}, "'bad'"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "'nope'"),
        ({"tool_choice": "required"}, "no tools were given"),
        ({"tools": [{"type": "function", "function": {"description": "no name"}}]}, "tools[0].function.name"),
        ({"tools": TOOLS, "messages": [*QUESTION, {"role": "tool", "content": "21"}]}, "messages[1]"),
    ],
)
def test_bad_tool_input_is_a_400_naming_it(url, extra, message):
    for path, error in (("/api/chat", lambda r: r["error"]), ("/v1/chat/completions", lambda r: r["error"]["message"])):
        body = {"model": "tiny", "messages": QUESTION, "stream": False, **extra}
        reply = requests.post(url + path, json=body, timeout=60)
        assert reply.status_code == 400 and message in error(reply.json()), (path, reply.text)


def test_a_lazy_grammar_starts_at_its_trigger(model_path, tokenizer):
    """The engine decodes freely until the reply begins with the trigger, then only what the grammar
    allows: with the first tokens the model writes freely as the trigger, the reply is those tokens and a
    call that validates."""
    from llguidance import LLMatcher

    from gptcore.serve.tools import _call_rules

    engine = Engine(lambda: load_model(model_path, device="cpu"), tokenizer)
    engine.start()
    try:

        def run(grammar=None, trigger=None) -> Done:
            finished = threading.Event()
            box = []
            prompt = tokenizer.encode_ordinary(render_chat(QUESTION))
            sink = lambda event: (box.append(event), isinstance(event, Done) and finished.set())  # noqa: E731
            engine.submit(Job(prompt, 40, Sampling(SamplingOptions(temperature=0.0)), sink, grammar, trigger=trigger))
            assert finished.wait(120)
            return box[-1]

        free = run()
        trigger = tokenizer.decode(free.new_ids[:2]).lstrip()
        grammar = LLMatcher.grammar_from_lark("\n".join(["start: call", *_call_rules([tool("integer_with_default")])]))
        done = run(grammar, trigger)
        reply = done.text.lstrip()
        assert done.new_ids[:2] == free.new_ids[:2] and reply.startswith(trigger) and reply != free.text.lstrip()
        call = json.loads(reply[len(trigger) :])
        assert call["name"] == "integer_with_default"
        jsonschema.validate(call["arguments"], SCHEMAS["integer_with_default"])
    finally:
        engine.stop()


def test_triggered_and_the_call_filter():
    assert triggered("", "<tool_call>") is None and triggered(" <tool", "<tool_call>") is None
    assert triggered("Hello", "<tool_call>") is False and triggered("<tool_call>{", "<tool_call>") == "{"
    assert triggered("\n<tool_call>", "<tool_call>") == ""  # the next token is the grammar's
    plan = ToolPlan(TOOLS, grammar="g", trigger=TOOL_CALL_MARKER, names=["no_parameters"])
    text = render_call("no_parameters", {})
    held = CallFilter(plan)
    assert [held.push(p) for p in (text[:3], text[3:])] == ["", ""]
    assert held.finish(text) == ("", {"name": "no_parameters", "arguments": {}})
    free = CallFilter(plan)
    assert free.push("<ta") == "<ta" and free.push("ble") == "ble" and free.finish("<table") == ("", None)
    assert parse_call(render_call("unknown", {}), plan) is None and parse_call(TOOL_CALL_MARKER + "{", plan) is None
