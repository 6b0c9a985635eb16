"""One chat template source (gptcore.prompt: CHAT_MARKERS, SEPARATOR, PREAMBLE): `gptcore serve`'s rendering,
the exported Modelfile TEMPLATE (Go, rendered by tests/gotemplate.py on what Ollama passes it), the GGUF's
tokenizer.chat_template and the Hugging Face chat_template (Jinja, rendered as transformers renders it)
give the same text for every message sequence below: system, user, assistant and tool messages, with and
without an input; and with tools offered and an assistant's tool calls (the Go template exactly, the Jinja
ones up to the spacing and key order of the JSON their runtime's `tojson` writes)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.export.gguf import export_gguf, modelfile_text
from gptcore.export.hf import export_hf
from gptcore.model import GPTModel
from gptcore.prompt import CALL_ARGUMENTS, PREAMBLE, RESPONSE_MARKER, TOOLS_HEADER, format_input, tool_json
from gptcore.serve.chat import render_chat
from gptcore.weights import save_model
from tests.gotemplate import render

CHATS = [
    [{"role": "user", "content": "Name three primary colours."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"}],
    [
        {"role": "user", "content": "Rewrite in passive voice."},
        {"role": "tool", "content": "The cat chased the mouse."},
    ],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}],
    [
        {"role": "system", "content": "Use the weather tool."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "21 degrees."},
        {"role": "user", "content": "And Rome?"},
        {"role": "tool", "content": '{"temp": 25}'},
    ],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "The answer starts"}],
    [{"role": "system", "content": "Only a system message"}],
    [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}],
    [{"role": "system", "content": "A"}, {"role": "user", "content": "Q"}, {"role": "system", "content": "B"}],
    [{"role": "tool", "content": "output only"}],
    [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "system", "content": "S"}],
]


def ollama_values(messages: list[dict], tools: list[dict] | None = None) -> dict:
    """What Ollama passes a template that names .Messages (server/template.go collate): all system
    messages joined by a blank line as .System, consecutive messages of one role merged the same way; an
    assistant's tool calls as .ToolCalls (.Function.Name, .Function.Arguments), the tools as .Tools."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    collated: list[dict] = []
    for m in messages:
        calls = [
            {"Function": {"Name": c["function"]["name"], "Arguments": c["function"]["arguments"]}}
            for c in m.get("tool_calls", [])
        ]
        if collated and collated[-1]["Role"] == m["role"]:
            collated[-1]["Content"] += "\n\n" + m["content"]
            collated[-1]["ToolCalls"] += calls
        else:
            collated.append({"Role": m["role"], "Content": m["content"], "ToolCalls": calls})
    return {"System": system, "Messages": collated, "Response": "", "Tools": tools or []}


def render_jinja(template: str, messages: list[dict], tools: list[dict] | None = None) -> str:
    """As transformers' apply_chat_template and llama-cpp-python render: a sandboxed Jinja environment
    with trim_blocks and lstrip_blocks, add_generation_prompt set."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, tools=tools, add_generation_prompt=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(Modelfile TEMPLATE, GGUF tokenizer.chat_template, HF tokenizer) of one exported tiny model."""
    import gguf
    from transformers import AutoTokenizer

    tmp = tmp_path_factory.mktemp("templates")
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=4, n_layers=1, qkv_bias=True)
    save_model(GPTModel(config), tmp / "m.safetensors")
    path = export_gguf(tmp / "m.safetensors", tmp / "m.gguf").path
    field = gguf.GGUFReader(path).fields["tokenizer.chat_template"]
    gguf_template = bytes(field.parts[field.data[0]]).decode("utf-8")
    match = re.search(r'^TEMPLATE """(.*?)"""$', modelfile_text("m.gguf", 16), re.DOTALL | re.MULTILINE)
    export_hf(tmp / "m.safetensors", tmp / "hf")
    return match.group(1), gguf_template, AutoTokenizer.from_pretrained(tmp / "hf")


@pytest.mark.parametrize("messages", CHATS, ids=[f"chat{i}" for i in range(len(CHATS))])
def test_the_four_templates_render_alike(exported, messages):
    modelfile, gguf_template, hf_tokenizer = exported
    served = render_chat(messages)
    assert render(modelfile, ollama_values(messages)) == served
    assert render_jinja(gguf_template, messages) == served
    assert hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == served


@pytest.mark.parametrize("with_input", [True, False])
def test_one_user_message_is_the_training_prompt(with_input):
    entry = {"instruction": "Rewrite the sentence.", "input": "The cat sat." if with_input else "", "output": "-"}
    messages = [{"role": "user", "content": entry["instruction"]}]
    if with_input:
        messages.append({"role": "tool", "content": entry["input"]})
    assert render_chat(messages) == format_input(entry) + RESPONSE_MARKER
    assert render_chat([{"role": "system", "content": "S"}, *messages]).startswith("S\n\n### Instruction:")
    assert not render_chat(messages).startswith(PREAMBLE + PREAMBLE)


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city <now> & later.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NO_PARAMETERS = {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}}
TOOL_CHATS = [
    ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    ([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Time?"}], [WEATHER, NO_PARAMETERS]),
    (
        [
            {"role": "user", "content": "Weather in Paris?"},
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}],
            },
            {"role": "tool", "content": '{"temp": 21}'},
        ],
        [WEATHER],
    ),
    (
        [
            {"role": "user", "content": "Time, then weather?"},
            {
                "role": "assistant",
                "content": "Let me see.",
                "tool_calls": [{"function": {"name": "now", "arguments": {}}}],
            },
            {"role": "tool", "content": "12:00"},
            {"role": "assistant", "content": "It is noon."},
        ],
        [WEATHER, NO_PARAMETERS],
    ),
]


def _canonical_json(text: str) -> str:
    """text with each offered tool's line and each call's arguments re-written by tool_json: what differs
    between runtimes' JSON writers (spacing, key order, escapes) taken out, the values kept."""
    decoder = json.JSONDecoder()
    head, found, rest = text.partition(TOOLS_HEADER)
    if found:
        head += TOOLS_HEADER
        while rest.startswith("\n{"):
            value, end = decoder.raw_decode(rest, 1)
            head, rest = head + "\n" + tool_json(value), rest[end:]
        text = head + rest
    first, *calls = text.split(CALL_ARGUMENTS)
    for call in calls:
        value, end = decoder.raw_decode(call)
        first += CALL_ARGUMENTS + tool_json(value) + call[end:]
    return first


@pytest.mark.parametrize("messages, tools", TOOL_CHATS, ids=[f"tools{i}" for i in range(len(TOOL_CHATS))])
def test_tools_and_calls_render_alike(exported, messages, tools):
    modelfile, gguf_template, hf_tokenizer = exported
    served = render_chat(messages, tools)
    assert TOOLS_HEADER in served and "".join("\n" + tool_json(t) for t in tools) in served
    assert ".Tools" in modelfile  # how Ollama decides that a model supports tools
    assert render(modelfile, ollama_values(messages, tools)) == served
    assert _canonical_json(render_jinja(gguf_template, messages, tools)) == served
    hf = hf_tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert _canonical_json(hf) == served
    assert render_chat(messages, None) == render_chat(messages)  # no tools: the chat as before
