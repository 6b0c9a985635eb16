"""The Alpaca prompt template used for instruction finetuning, generation, serving and judging."""

from __future__ import annotations

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
CHAT_MARKERS = {
    "user": "\n\n### Instruction:\n",
    "tool": "\n\n### Input:\n",  # what a tool returned: the instruction's input
    "assistant": RESPONSE_MARKER,
}
CHAT_ROLES = ("system", *CHAT_MARKERS)
SEPARATOR = "\n\n"


def render_chat(messages: list[dict]) -> str:
    """Messages ({role, content}) -> one Alpaca prompt, by the chat template above; a single user message
    renders exactly as a training prompt (format_input + RESPONSE_MARKER)."""
    text = SEPARATOR.join(m["content"] for m in messages if m["role"] == "system") or PREAMBLE
    last = ""
    for m in messages:
        if m["role"] != "system":
            text += (SEPARATOR if m["role"] == last else CHAT_MARKERS[m["role"]]) + m["content"]
        last = m["role"]
    if not any(m["role"] != "system" for m in messages) or _last_turn(messages) != "assistant":
        text += RESPONSE_MARKER
    return text


def _last_turn(messages: list[dict]) -> str:
    return [m["role"] for m in messages if m["role"] != "system"][-1]
