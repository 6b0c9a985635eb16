"""Tool calling for any model, as llama.cpp's generic tool handler gives it: the tools offered are rendered
into the prompt by the one chat template (gptcore.prompt.render_chat), and a call is decoded under an
llguidance grammar built from the functions' JSON schemas, so its arguments always validate.

`tool_choice`:
- `auto` (the default when tools are given): the model writes freely; only if its reply begins with the
  template's call marker (TOOL_CALL_MARKER) is the rest constrained to a call of one of the functions
  (a lazy grammar with a trigger, serve/constraints.py `triggered`). A plain answer stays free text.
- `required` (OpenAI's; Ollama clients may say `any`), or a named function
  (`{"type": "function", "function": {"name": ...}}`): the reply is constrained from its first token to a
  call of (that) function.
- `none`: the tools are neither rendered nor called.

A call's text is TOOL_CALL_MARKER + {"name": NAME, "arguments": {...}} (gptcore.prompt.render_call); the
routes return it as Ollama's `message.tool_calls` / OpenAI's `tool_calls`, and an assistant's tool calls
in a client's history render back the same way. Bad input is a 400 naming it: a tool without a name, a
schema llguidance cannot compile, an unknown function in tool_choice, a tool message with no call before it.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

from gptcore.prompt import CALL_ARGUMENTS, CALL_NAME, TOOL_CALL_MARKER
from gptcore.serve import protocol as p

_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")  # OpenAI's function names (with `.` and `:`, as MCP's)
_EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass
class ToolPlan:
    """How a request's tools are used: rendered into the prompt (`tools`, None for tool_choice none), the
    grammar of a call and the trigger after which it applies (None: from the first token)."""

    tools: list[dict] | None
    grammar: str | None = None
    trigger: str | None = None
    names: list[str] = field(default_factory=list)


def checked_tools(tools: list[Any] | None) -> list[dict]:
    """The tools of a request ({"type": "function", "function": {"name", "description", "parameters"}}),
    checked; a 400 naming the first bad one."""
    checked = []
    for i, tool in enumerate(tools or []):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or tool.get("type", "function") != "function":
            raise p.RequestError(400, f'invalid tools[{i}]: expected {{"type": "function", "function": {{...}}}}')
        name = function.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise p.RequestError(
                400, f"invalid tools[{i}].function.name: expected letters, digits, _ . : -, got {name!r:.40}"
            )
        parameters = function.get("parameters") or _EMPTY_PARAMETERS
        if not isinstance(parameters, dict):
            raise p.RequestError(400, f"invalid tools[{i}].function.parameters ({name}): expected a JSON schema object")
        checked.append({"type": "function", "function": {**function, "parameters": parameters}})
    return checked


def _chosen(tools: list[dict], tool_choice: Any) -> tuple[str, list[dict]]:
    """(mode: auto, required or none; the functions a call may name) for a tool_choice."""
    if tool_choice in (None, "auto"):
        return "auto", tools
    if tool_choice == "none":
        return "none", []
    if tool_choice in ("required", "any"):
        if not tools:
            raise p.RequestError(400, f"tool_choice {tool_choice!r}: no tools were given")
        return "required", tools
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise p.RequestError(
            400,
            'invalid tool_choice: expected "auto", "none", "required" or '
            f'{{"type": "function", "function": {{"name": ...}}}}, got {tool_choice!r:.60}',
        )
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise p.RequestError(400, f"invalid tool_choice: no tool named {name!r} was given")
    return "required", named


def _call_rules(tools: list[dict]) -> list[str]:
    """Lark rules: `call` is CALL_NAME name CALL_ARGUMENTS arguments "}" for one of the tools."""
    rules = ["call: " + " | ".join(f"f{i}" for i in range(len(tools)))]
    for i, tool in enumerate(tools):
        function = tool["function"]
        schema = {**function["parameters"], "x-guidance": {"whitespace_flexible": False}}
        head = json.dumps(CALL_NAME + function["name"] + CALL_ARGUMENTS)
        rules.append(f'f{i}: {head} a{i} "}}"')
        rules.append(f"a{i}: %json {json.dumps(schema)}")
    return rules


async def plan_tools(engine, tools: list[Any] | None, tool_choice: Any) -> ToolPlan | None:
    """A request's ToolPlan (None when it offers no tools), every function's schema compiled by llguidance
    (a 400 naming the function whose schema it cannot compile)."""
    from llguidance import LLMatcher

    checked = checked_tools(tools)
    mode, functions = _chosen(checked, tool_choice)
    if not checked:
        return None
    if mode == "none":
        return ToolPlan(None)
    tokenizer = await asyncio.to_thread(engine.grammar_tokenizer)
    for tool in functions:
        grammar = LLMatcher.grammar_from_lark("\n".join(["start: call", *_call_rules([tool])]))
        error = await asyncio.to_thread(LLMatcher.validate_grammar, grammar, tokenizer)
        if error:
            first = next((line for line in error.splitlines() if "schema" in line), error.splitlines()[0])
            raise p.RequestError(
                400, f"invalid tools: the parameters of {tool['function']['name']!r}: {first.strip()[:300]}"
            )
    start = "start: call" if mode == "auto" else f"start: {json.dumps(TOOL_CALL_MARKER)} call"
    grammar = LLMatcher.grammar_from_lark("\n".join([start, *_call_rules(functions)]))
    names = [t["function"]["name"] for t in functions]
    return ToolPlan(checked, grammar, TOOL_CALL_MARKER if mode == "auto" else None, names)


def history(messages: list[dict], offered: bool) -> list[dict]:
    """Chat messages ({role, content, tool_calls?}) for render_chat: tool calls as
    [{"function": {"name", "arguments": dict}}] whether they came in Ollama's shape or OpenAI's
    (arguments a JSON string). Where tools are offered, a tool message must answer a call: one with no
    assistant tool call before it is a 400."""
    out, called = [], False
    for i, m in enumerate(messages):
        calls = []
        for j, call in enumerate(m.get("tool_calls") or []):
            function = call.get("function") if isinstance(call, dict) else None
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if isinstance(arguments, str):
                try:
                    arguments = json.loads(arguments) if arguments.strip() else {}
                except json.JSONDecodeError:
                    arguments = None
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise p.RequestError(400, f"invalid messages[{i}].tool_calls[{j}]: expected a function with a name")
            if arguments is not None and not isinstance(arguments, dict):
                raise p.RequestError(
                    400, f"invalid messages[{i}].tool_calls[{j}].function.arguments: expected an object"
                )
            calls.append({"function": {"name": function["name"], "arguments": arguments or {}}})
        if m["role"] == "assistant" and calls:
            called = True
        elif m["role"] == "tool" and offered and not called:
            raise p.RequestError(400, f"invalid messages[{i}]: a tool message with no tool call before it")
        out.append({"role": m["role"], "content": m.get("content") or "", **({"tool_calls": calls} if calls else {})})
    return out


def parse_call(text: str, plan: ToolPlan) -> dict | None:
    """The call a reply makes ({"name", "arguments"}), or None when it is no complete call of a tool offered."""
    head = text.lstrip()
    if not head.startswith(TOOL_CALL_MARKER):
        return None
    try:
        value, _ = json.JSONDecoder().raw_decode(head[len(TOOL_CALL_MARKER) :])
    except json.JSONDecodeError:
        return None
    if (
        not isinstance(value, dict)
        or value.get("name") not in plan.names
        or not isinstance(value.get("arguments"), dict)
    ):
        return None
    return {"name": value["name"], "arguments": value["arguments"]}


class CallFilter:
    """A streamed reply's text pieces with the tool call held back: text is released as it comes unless
    the reply may still begin with the call marker; a reply that does is held to the end, where it is a
    call (`finish`) or, if it is none after all, released as text."""

    def __init__(self, plan: ToolPlan | None):
        self.plan = plan
        self.held = ""
        self.free = plan is None or plan.grammar is None

    def push(self, text: str) -> str:
        """The part of text that can be sent now."""
        if self.free:
            return text
        self.held += text
        head = self.held.lstrip()
        if TOOL_CALL_MARKER.startswith(head) or head.startswith(TOOL_CALL_MARKER):
            return ""
        self.free, released, self.held = True, self.held, ""
        return released

    def finish(self, text: str) -> tuple[str, dict | None]:
        """(text still to send, the call) at the end; `text` is the whole reply."""
        call = parse_call(text, self.plan) if not self.free else None
        released, self.held = ("" if call else self.held), ""
        return released, call


def ollama_calls(call: dict) -> list[dict]:
    return [{"function": {"name": call["name"], "arguments": call["arguments"]}}]


def openai_calls(call: dict, stream: bool = False) -> list[dict]:
    entry = {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": call["name"], "arguments": json.dumps(call["arguments"], ensure_ascii=False)},
    }
    return [{"index": 0, **entry} if stream else entry]
