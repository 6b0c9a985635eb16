"""The text side of serving, apart from HTTP: prompt templates for chat and generate, and the detokenizer
that turns token ids into text pieces with stop strings.

Chat: messages are rendered by the one chat template of gptcore.prompt (render_chat, from which the
exported templates are generated too): system messages, joined, replace Alpaca's preamble; each user
message becomes "### Instruction:", a tool message an "### Input:" (what the tool returned, as the input
of the instruction), each assistant message a "### Response:" to the one before; consecutive messages of
one role are merged; a conversation that ends with a user or tool message ends with an open
"### Response:", one that ends with an assistant message is continued. A single user message renders
exactly like a training prompt.

Generate: the model's own template is `{{ .Prompt }}` (the prompt is continued verbatim, as
`gptcore generate` does). A `system` renders prompt and system through the Alpaca template (the prompt as
the instruction); a `template` may use `{{ .System }}`, `{{ .Prompt }}` and `{{ .Response }}` (empty).
`raw: true` always continues the prompt verbatim.
"""

from __future__ import annotations

import codecs
import re

from gptcore.prompt import render_chat

_TEMPLATE_FIELD = re.compile(r"\{\{-?\s*\.(System|Prompt|Response)\s*-?\}\}")


class TemplateError(ValueError):
    """A template that uses more of Go's template language than gptcore renders."""


def render_generate(prompt: str, system: str | None = None, template: str | None = None, raw: bool = False) -> str:
    """The text /api/generate continues (see the module docstring)."""
    if raw or (not system and not template):
        return prompt
    if template:
        values = {"System": system or "", "Prompt": prompt, "Response": ""}
        rendered = _TEMPLATE_FIELD.sub(lambda m: values[m.group(1)], template)
        if "{{" in rendered:
            raise TemplateError("template: gptcore renders only {{ .System }}, {{ .Prompt }} and {{ .Response }}")
        return rendered
    return render_chat([{"role": "system", "content": system}, {"role": "user", "content": prompt}])


class Detokenizer:
    """Token ids in, text out, piece by piece: never splits a UTF-8 character, holds back text that may
    begin a stop string, and cuts the text at the first stop string."""

    def __init__(self, tokenizer, stops: list[str] = ()):
        self.tokenizer = tokenizer
        self.stops = [s for s in stops if s]
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""
        self.sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text that token_id completes and that can be released now ('' if none)."""
        if self.stopped:
            return ""
        self.text += self.decoder.decode(self.tokenizer.decode_single_token_bytes(token_id))
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is held back, at the end of generation."""
        if not self.stopped:
            self.text += self.decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        hits = [i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            end = len(self.text)
        else:
            hold = (
                0
                if final
                else max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            )
            end = len(self.text) - hold
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece
