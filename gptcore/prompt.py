"""The Alpaca prompt template used for instruction finetuning, generation, serving and judging."""

from __future__ import annotations

import json

PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
RESPONSE_MARKER = "\n\n### Response:\n"
# Written into the metadata of a weights file finetuned on this template (stages/finetune_instructions.py),
# so that `gptcore export` gives such a model the chat template by default, and a base model none.
PROMPT_FORMAT_KEY = "gptcore.prompt_format"
PROMPT_FORMAT = "alpaca"


def format_input(entry: dict) -> str:
    """The prompt of an entry up to (not including) the response marker."""
    text = f"{PREAMBLE}\n\n### Instruction:\n{entry['instruction']}"
    if entry.get("input"):
        text += f"\n\n### Input:\n{entry['input']}"
    return text


def format_example(entry: dict) -> str:
    """Prompt, response marker and the reference output: one training example."""
    return format_input(entry) + RESPONSE_MARKER + entry["output"]


# The chat template: the one source from which `gptcore serve` renders chats (render_chat below) and the
# exported templates are generated (gptcore.export.templates: the Modelfile's Go TEMPLATE, the GGUF's and
# Hugging Face's Jinja chat_template). System messages, joined by SEPARATOR, replace the preamble; every
# other message is its role's marker and its content; consecutive messages of one role (a system message
# in between counts) are merged with SEPARATOR, as Ollama's template collation merges them; a chat that
# does not end with the assistant's message ends with an open response marker.
#
# Tools (llama.cpp's generic tool format, in Alpaca's words): offered tools follow the system text as
# TOOLS_HEADER and one line per tool, the tool as JSON; an assistant's tool call is TOOL_CALL_MARKER and
# {"name": "NAME", "arguments": ARGUMENTS} after its content; what the tool returned is a tool message
# (the instruction's input).
CHAT_MARKERS = {
    "user": "\n\n### Instruction:\n",
    "tool": "\n\n### Input:\n",  # what a tool returned: the instruction's input
    "assistant": RESPONSE_MARKER,
}
CHAT_ROLES = ("system", *CHAT_MARKERS)
SEPARATOR = "\n\n"
TOOL_CALL_MARKER = "<tool_call>"
TOOLS_HEADER = (
    "\n\nYou may call one of these tools. To call one, reply with "
    + TOOL_CALL_MARKER
    + " followed by a JSON object with the tool's name and arguments. Tools:"
)
CALL_NAME = '{"name": "'  # a call's JSON as the templates write it: CALL_NAME, name, CALL_ARGUMENTS, arguments, "}"
CALL_ARGUMENTS = '", "arguments": '


def tool_json(value) -> str:
    """value as Go's json.Marshal writes a map (Ollama's template function `json`): compact, keys sorted,
    <, >, & and the line/paragraph separators escaped."""
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    for char, escaped in (
        ("<", "\\u003c"),
        (">", "\\u003e"),
        ("&", "\\u0026"),
        ("\u2028", "\\u2028"),
        ("\u2029", "\\u2029"),
    ):
        text = text.replace(char, escaped)
    return text


def render_call(name: str, arguments: dict) -> str:
    """One tool call as the assistant writes it (the constrained grammar of gptcore.serve.tools writes this)."""
    return TOOL_CALL_MARKER + CALL_NAME + name + CALL_ARGUMENTS + tool_json(arguments) + "}"


def render_chat(messages: list[dict], tools: list[dict] | None = None) -> str:
    """Messages ({role, content}; an assistant's may have `tool_calls`: [{"function": {"name", "arguments"}}],
    arguments a dict) and the tools offered ({"type": "function", "function": {...}}) -> one Alpaca prompt,
    by the chat template above; a single user message renders exactly as a training prompt
    (format_input + RESPONSE_MARKER)."""
    text = SEPARATOR.join(m["content"] for m in messages if m["role"] == "system") or PREAMBLE
    if tools:
        text += TOOLS_HEADER + "".join("\n" + tool_json(t) for t in tools)
    last = ""
    for m in messages:
        if m["role"] != "system":
            text += (SEPARATOR if m["role"] == last else CHAT_MARKERS[m["role"]]) + m["content"]
            for call in m.get("tool_calls") or []:
                text += render_call(call["function"]["name"], call["function"].get("arguments") or {})
        last = m["role"]
    if not any(m["role"] != "system" for m in messages) or _last_turn(messages) != "assistant":
        text += RESPONSE_MARKER
    return text


def _last_turn(messages: list[dict]) -> str:
    return [m["role"] for m in messages if m["role"] != "system"][-1]
