"""The chat template of gptcore.prompt (CHAT_MARKERS, SEPARATOR, PREAMBLE: the one source) as other
runtimes' templates: Ollama's Go template (the Modelfile's TEMPLATE) and a Jinja chat template (GGUF
`tokenizer.chat_template`, read by llama.cpp and llama-cpp-python; transformers' `chat_template`). Both are
generated from that source, so they render every chat (system, user, assistant and tool messages, the
tools offered and an assistant's tool calls) as gptcore.prompt.render_chat, and so `gptcore serve`, renders
it (tests/export/test_templates.py): the Go template exactly (its `json` is Go's json.Marshal, as
gptcore.prompt.tool_json), the Jinja one up to the spacing of each tool's JSON (`tojson` is the runtime's own
serializer). The Go template names `.Tools`, which is how Ollama decides that a model supports tools.
"""

from __future__ import annotations

from gptcore.prompt import (
    CALL_ARGUMENTS,
    CALL_NAME,
    CHAT_MARKERS,
    PREAMBLE,
    RESPONSE_MARKER,
    SEPARATOR,
    TOOL_CALL_MARKER,
    TOOLS_HEADER,
)

INSTRUCTION_MARKER = "### Instruction:"


def modelfile_template() -> str:
    """The TEMPLATE: Ollama's chat rendered exactly as gptcore.prompt.render_chat renders it.

    With `.Messages` (Ollama's template.Execute takes this path whenever the template names it), `.System` is
    every system message joined by a blank line and consecutive messages of one role come merged (Ollama's
    `collate`): the template writes each non-system message as its role's marker and content, and an open
    response marker unless the last message is the assistant's. The `else` branch serves runtimes that fill
    only `.System` / `.Prompt` / `.Response`. Text outside actions is only the markers themselves (no `{{-`
    trims them), so the result is the source's text.
    """
    for text in (PREAMBLE, TOOLS_HEADER, TOOL_CALL_MARKER, CALL_NAME, CALL_ARGUMENTS, *CHAT_MARKERS.values()):
        if "{{" in text or "}}" in text or text.endswith("{") or text.startswith("}"):
            raise ValueError("the chat template's text may not contain template delimiters")
    calls = (
        "{{ range .ToolCalls }}"
        + TOOL_CALL_MARKER
        + CALL_NAME
        + "{{ .Function.Name }}"
        + CALL_ARGUMENTS
        + "{{ json .Function.Arguments }}}{{ end }}"
    )
    roles = "".join(
        f'{{{{ {"if" if i == 0 else "else if"} eq .Role "{role}" }}}}{marker}{{{{ .Content }}}}{calls}{{{{ $last = "{role}" }}}}'
        for i, (role, marker) in enumerate(CHAT_MARKERS.items())
    )
    roles += "{{ end }}"  # system messages: already in .System
    return (
        "{{ if .System }}{{ .System }}{{ else }}" + PREAMBLE + "{{ end }}"
        "{{ if .Tools }}" + TOOLS_HEADER + "{{ range .Tools }}\n{{ json . }}{{ end }}{{ end }}"
        "{{ if .Messages }}"
        '{{ $last := "" }}'
        "{{ range .Messages }}" + roles + "{{ end }}"
        '{{ if ne $last "assistant" }}' + RESPONSE_MARKER + "{{ end }}"
        "{{ else }}" + CHAT_MARKERS["user"] + "{{ .Prompt }}" + RESPONSE_MARKER + "{{ .Response }}{{ end }}"
    )


def _jinja_string(text: str) -> str:
    """text as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


def jinja_chat_template() -> str:
    """The Jinja chat template (Hugging Face's convention: `messages`, `add_generation_prompt`).

    The source's rule in Jinja: system messages, joined, replace the preamble; each other message is its
    role's marker and content, merged into the one before when the role repeats; with add_generation_prompt
    (llama.cpp's chat endpoints set it) a chat that does not end with the assistant's message ends with an
    open response marker. Offered `tools` follow the system text, an assistant's `tool_calls` its content
    (arguments a mapping, or OpenAI's JSON string); `tojson`'s output is printed on its own, never
    concatenated (Jinja's is markup-safe: a string added to it would be HTML-escaped). One line, no
    whitespace outside string literals: the result does not depend on trim_blocks / lstrip_blocks.
    """
    markers = "".join(
        f"{{%- {'if' if i == 0 else 'elif'} m['role'] == '{role}' -%}}{{{{- {_jinja_string(marker)} -}}}}"
        for i, (role, marker) in enumerate(CHAT_MARKERS.items())
    )
    return (
        "{%- set ns = namespace(system='', last='', turn='') -%}"
        "{%- for m in messages -%}{%- if m['role'] == 'system' -%}"
        "{%- set ns.system = ns.system + (" + _jinja_string(SEPARATOR) + " if ns.system else '') + m['content'] -%}"
        "{%- endif -%}{%- endfor -%}"
        "{{- ns.system if ns.system else " + _jinja_string(PREAMBLE) + " -}}"
        "{%- if tools -%}{{- " + _jinja_string(TOOLS_HEADER) + " -}}"
        "{%- for t in tools -%}{{- '\\n' -}}{{- t | tojson -}}{%- endfor -%}{%- endif -%}"
        "{%- for m in messages -%}"
        "{%- if m['role'] != 'system' -%}"
        "{%- if m['role'] == ns.last -%}{{- " + _jinja_string(SEPARATOR) + " -}}"
        "{%- else -%}" + markers + "{%- endif -%}{%- endif -%}{%- endif -%}"
        "{{- (m['content'] or '') if m['role'] != 'system' else '' -}}"
        "{%- if m['role'] != 'system' and m['tool_calls'] -%}{%- for c in m['tool_calls'] -%}"
        "{%- set a = c['function']['arguments'] -%}"
        "{{- "
        + _jinja_string(TOOL_CALL_MARKER + CALL_NAME)
        + " + c['function']['name'] + "
        + _jinja_string(CALL_ARGUMENTS)
        + " -}}{{- a if a is string else (a | tojson) -}}{{- '}' -}}"
        "{%- endfor -%}{%- endif -%}"
        "{%- if m['role'] != 'system' -%}{%- set ns.turn = m['role'] -%}{%- endif -%}"
        "{%- set ns.last = m['role'] -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt and ns.turn != 'assistant' -%}{{- "
        + _jinja_string(RESPONSE_MARKER)
        + " -}}{%- endif -%}"
    )
