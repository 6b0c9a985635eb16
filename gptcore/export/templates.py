"""The Alpaca prompt of gptcore.prompt as other runtimes' chat templates: Ollama's Go template (the
Modelfile's TEMPLATE) and a Jinja chat template (GGUF `tokenizer.chat_template`, read by llama.cpp and
llama-cpp-python; transformers' `chat_template`). Both render a chat as gptcore.serve.chat.render_chat does.
"""

from __future__ import annotations

from gptcore.prompt import PREAMBLE, RESPONSE_MARKER

INSTRUCTION_MARKER = "### Instruction:"


def modelfile_template() -> str:
    """The TEMPLATE: Ollama's chat rendered exactly as gptcore.serve.chat.render_chat renders it.

    With `.Messages` (Ollama's template.Execute takes this path whenever the template names it), `.System` is
    every system message joined by a blank line (Ollama's `collate`); it replaces Alpaca's preamble.
    Each user message becomes `### Instruction:`, each assistant message a `### Response:`; the prompt
    ends with an open `### Response:` unless the last message is the assistant's (then it is continued).
    A single user message (with its `### Input:` section, if any, in its text) renders exactly the
    prompt that `gptcore.prompt.format_input` + RESPONSE_MARKER builds for training.
    The `else` branch serves runtimes that fill only `.System` / `.Prompt` / `.Response`.
    """
    return (
        "{{- if .System }}{{ .System }}{{ else }}" + PREAMBLE + "{{ end }}\n"
        "{{- if .Messages }}\n"
        '{{- $last := "" }}\n'
        "{{- range .Messages }}\n"
        '{{- if eq .Role "user" }}\n\n'
        "### Instruction:\n"
        "{{ .Content }}\n"
        '{{- $last = "user" }}\n'
        '{{- else if eq .Role "assistant" }}\n\n'
        "### Response:\n"
        "{{ .Content }}\n"
        '{{- $last = "assistant" }}\n'
        "{{- end }}\n"
        "{{- end }}\n"
        '{{- if ne $last "assistant" }}\n\n'
        "### Response:\n"
        "{{ end }}\n"
        "{{- else }}\n\n"
        "### Instruction:\n"
        "{{ .Prompt }}\n\n"
        "### Response:\n"
        "{{ .Response }}\n"
        "{{- end }}"
    )


def jinja_chat_template() -> str:
    """The Jinja chat template (Hugging Face's convention: `messages`, `add_generation_prompt`).

    System messages, joined by a blank line, replace Alpaca's preamble; each user message becomes
    `### Instruction:`, each assistant message a `### Response:`; with add_generation_prompt (llama.cpp's
    chat endpoints set it) a chat that does not end with the assistant's message ends with an open
    `### Response:`, which makes one user message the exact training prompt. One line, no whitespace
    outside string literals: the result does not depend on trim_blocks / lstrip_blocks.
    """
    if "'" in PREAMBLE or "\\" in PREAMBLE:  # it goes into a single-quoted Jinja string as is
        raise ValueError("the preamble may not contain quotes or backslashes")
    instruction = f"\\n\\n{INSTRUCTION_MARKER}\\n"
    response = RESPONSE_MARKER.replace("\n", "\\n")
    return (
        "{%- set ns = namespace(system='', last='') -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
        "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + m['content'] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{{- ns.system if ns.system else '" + PREAMBLE + "' -}}"
        "{%- for m in messages -%}"
        "{%- if m['role'] == 'user' -%}{{- '" + instruction + "' + m['content'] -}}{%- set ns.last = 'user' -%}"
        "{%- elif m['role'] == 'assistant' -%}{{- '"
        + response
        + "' + m['content'] -}}{%- set ns.last = 'assistant' -%}"
        "{%- endif -%}{%- endfor -%}"
        "{%- if add_generation_prompt and ns.last != 'assistant' -%}{{- '" + response + "' -}}{%- endif -%}"
    )
