"""`gptcore chat`: a conversation with a language model in the terminal, as `ollama run` and `litgpt chat`.

The engine is gptcore.LLM (gptcore/llm.py): each reply streams as it is decoded, whole characters only;
the conversation is rendered by the one chat template (gptcore.prompt.render_chat), exactly as
`gptcore serve` renders it for /api/chat; when it no longer fits the model's context, the oldest turns are
left out of what the model sees (a note says so; `/save` still writes them). A reply also stops at the next
`### Instruction:`, where a model that missed its end of text would write the user's turn (the stop of the
exported Modelfile).

Ctrl-C stops the reply being written (what was shown stays in the conversation) and gives the prompt back;
Ctrl-C at the prompt clears the line, a second one in a row leaves, as does Ctrl-D or /exit.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any, TextIO

if TYPE_CHECKING:
    from gptcore.llm import LLM

PROMPT = ">>> "
STOP = "### Instruction:"  # gptcore.export.templates.INSTRUCTION_MARKER: a model starting the user's turn
COMMANDS = {
    "/reset": "start a new conversation (the system message stays)",
    "/system TEXT": "set the system message (in place of the Alpaca preamble); /system alone: back to the preamble",
    "/save FILE": "write the conversation as JSON: a list of {role, content} messages, the system message first",
    "/help": "this list",
    "/exit": "leave (also Ctrl-D, or Ctrl-C twice at the prompt)",
}


class ChatSession:
    """One terminal conversation: reads lines with `read` (input), writes replies and notes to `out`.

    `options` are LLM.stream's (sampling, max_new_tokens, stop); `system` the first system message.
    """

    def __init__(
        self,
        llm: LLM,
        options: dict[str, Any],
        system: str | None = None,
        out: TextIO = sys.stdout,
        read: Callable[[str], str] = input,
    ):
        self.llm = llm
        self.options = options
        self.system = system or None
        self.messages: list[dict] = []  # the user's and the assistant's, in order
        self.out = out
        self.read = read
        self.left_out = 0  # turns the model no longer sees

    def conversation(self) -> list[dict]:
        """The whole conversation as chat messages, the system message first (if there is one)."""
        system = [{"role": "system", "content": self.system}] if self.system else []
        return system + self.messages

    def run(self) -> int:
        """Read lines until /exit, Ctrl-D or two Ctrl-C in a row; returns the exit code (0)."""
        interrupted = False
        while True:
            try:
                line = self.read(PROMPT)
            except EOFError:
                self.write("\n")
                return 0
            except KeyboardInterrupt:
                if interrupted:
                    self.write("\n")
                    return 0
                interrupted = True
                self.write("\n(Ctrl-C again, Ctrl-D or /exit to leave)\n")
                continue
            interrupted = False
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return 0
                continue
            self.reply(text)

    def command(self, text: str) -> bool:
        """Run a /command; False when it is /exit."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        if name in ("/exit", "/bye", "/quit"):
            return False
        if name == "/help":
            width = max(len(c) for c in COMMANDS)
            self.write("".join(f"  {c:<{width}}  {h}\n" for c, h in COMMANDS.items()))
            self.write("  Ctrl-C stops a reply; Ctrl-D leaves.\n")
        elif name == "/reset":
            self.messages, self.left_out = [], 0
            self.write("(new conversation)\n")
        elif name == "/system":
            self.system = arg or None
            self.write("(system message set)\n" if arg else "(no system message: the Alpaca preamble)\n")
        elif name == "/save":
            self.save(arg)
        else:
            self.write(f"unknown command {name}; /help lists them\n")
        return True

    def save(self, path: str) -> None:
        from gptcore.atomic import write_json

        if not path:
            self.write("usage: /save FILE\n")
            return
        try:
            write_json(path, self.conversation())
        except OSError as err:
            self.write(f"error: cannot write {path}: {err.strerror or err}\n")
            return
        self.write(f"(saved {len(self.conversation())} messages to {path})\n")

    def reply(self, text: str) -> None:
        """The user's message, then the model's reply written as it comes (Ctrl-C stops it)."""
        self.messages.append({"role": "user", "content": text})
        seen, left_out = self.llm.fit_chat(self.conversation(), self.options["max_new_tokens"])
        if left_out > self.left_out:
            context = self.llm.model.config.context_length
            self.write(f"(the oldest {left_out} turn(s) no longer fit the {context}-token context: left out)\n")
        self.left_out = left_out
        shown: list[str] = []
        pieces = self.llm.stream(seen, **self.options)
        try:
            for piece in pieces:
                shown.append(piece)
                self.write(piece)
            ending = "\n\n"
        except KeyboardInterrupt:
            ending = "\n(stopped)\n\n"
        finally:
            pieces.close()  # decoding stops after its current token
        self.messages.append({"role": "assistant", "content": "".join(shown)})
        self.write(ending)

    def write(self, text: str) -> None:
        self.out.write(text)
        self.out.flush()


def chat_in_terminal(args: argparse.Namespace) -> int:
    """`gptcore chat`: options checked, the model loaded (as `gptcore generate` loads it), then the session."""
    from gptcore.llm import LLM
    from gptcore.sampling_flags import sampling_from_flags

    sampling = sampling_from_flags(args)  # one error line before the model loads
    options = {f.name: getattr(sampling, f.name) for f in fields(sampling)}
    options.update(seed=args.seed, max_new_tokens=args.max_new_tokens, stop=[STOP])
    llm = LLM.load(
        args.model, adapter=args.adapter, precision=args.precision, quantize=args.quantize, device=args.device
    )
    if sys.stdin.isatty():
        with contextlib.suppress(ImportError):  # a Python built without it reads plain lines
            import readline  # noqa: F401 - line editing and history for input()
    session = ChatSession(llm, options, args.system)
    session.write(f"gptcore chat: {args.model} ({llm}); /help lists the commands, Ctrl-D leaves\n")
    return session.run()
