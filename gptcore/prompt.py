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
