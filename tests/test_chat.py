"""`gptcore chat` driven through a pseudo-terminal, as a person types: two turns that keep the conversation,
/reset, /save, Ctrl-C during a reply (it stops, the prompt comes back, the next turn works), Ctrl-C twice
and Ctrl-D at the prompt; and the session's commands on their own."""

from __future__ import annotations

import codecs
import fcntl
import io
import json
import os
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
import torch

from gptcore.chat import PROMPT, STOP, ChatSession
from gptcore.config import GPTConfig
from gptcore.llm import LLM
from gptcore.model import GPTModel
from gptcore.weights import save_model
from tests.conftest import REPO

CONTEXT = 128
SYSTEM = "You answer in one word."
# The child takes the pseudo-terminal as its controlling terminal (it is a new session's leader), so that
# Ctrl-C typed there is SIGINT to it, as in a real terminal; then it runs the CLI.
CHILD = (
    "import fcntl, termios; fcntl.ioctl(0, termios.TIOCSCTTY, 0); "
    "from gptcore.cli import main; raise SystemExit(main())"
)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    torch.manual_seed(123)
    config = GPTConfig(vocab_size=50257, context_length=CONTEXT, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)
    path = tmp_path_factory.mktemp("chat") / "tiny.safetensors"
    save_model(GPTModel(config), path)
    return path


@pytest.fixture(scope="module")
def llm(model_path, mirror_dir):
    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    return LLM.load(model_path, device="cpu")


class Terminal:
    """`gptcore chat ARGS` on a pseudo-terminal; output post-processing is off, so what the terminal shows
    is byte for byte what the program wrote (and what the terminal echoes of the typing)."""

    def __init__(self, *args: str):
        self.master, slave = os.openpty()
        attrs = termios.tcgetattr(slave)
        attrs[1] &= ~termios.OPOST  # no \n -> \r\n
        attrs[3] |= termios.NOFLSH  # Ctrl-C does not discard output the test has not read yet
        termios.tcsetattr(slave, termios.TCSANOW, attrs)
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))  # rows, columns
        env = {**os.environ, "PYTHONPATH": str(REPO), "TERM": "dumb", "PYTHONIOENCODING": "utf-8"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, "chat", *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=REPO,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.shown = ""  # everything the terminal showed
        self.read_to = 0  # what expect() has consumed

    def _read(self, deadline: float, waiting_for: str) -> None:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"waited for {waiting_for}; the terminal showed:\n{self.shown[-3000:]!r}")
        if select.select([self.master], [], [], min(left, 0.5))[0]:
            try:
                data = os.read(self.master, 1 << 16)
            except OSError:  # EIO: the program closed the terminal (it exited)
                data = b""
            if not data:
                raise AssertionError(
                    f"the program ended ({self.proc.wait()}) before {waiting_for}: {self.shown[-3000:]!r}"
                )
            self.shown += self.decoder.decode(data)

    def expect(self, text: str, timeout: float = 120) -> str:
        """What the terminal showed from the last expect up to and including `text`."""
        deadline = time.monotonic() + timeout
        while (at := self.shown.find(text, self.read_to)) < 0:
            self._read(deadline, repr(text))
        seen, self.read_to = self.shown[self.read_to : at + len(text)], at + len(text)
        return seen

    def expect_more(self, chars: int, timeout: float = 60) -> None:
        """Wait until at least `chars` characters more than expect() consumed have been shown."""
        deadline = time.monotonic() + timeout
        while len(self.shown) - self.read_to < chars:
            self._read(deadline, f"{chars} characters of output")

    def type(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def exit_code(self, timeout: float = 30) -> int:
        return self.proc.wait(timeout=timeout)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        os.close(self.master)


@pytest.fixture
def terminal():
    opened = []

    def open_terminal(*args: str) -> Terminal:
        opened.append(Terminal(*args))
        return opened[-1]

    yield open_terminal
    for t in opened:
        t.close()


def test_two_turns_keep_the_conversation_and_reset_starts_anew(terminal, model_path, llm, tmp_path):
    options = {"max_new_tokens": 12, "stop": [STOP]}
    term = terminal("--model", str(model_path), "--device", "cpu", "--max-new-tokens", "12", "--system", SYSTEM)
    assert "/help lists the commands" in term.expect(PROMPT)
    chat = [{"role": "system", "content": SYSTEM}]
    for text in ("Name a primary color.", "And another?"):
        term.type(text + "\r")
        chat.append({"role": "user", "content": text})
        reply = llm.chat(chat, **options)  # the reply to the whole conversation so far
        assert term.expect(PROMPT).endswith(text + "\n" + reply + "\n\n" + PROMPT)
        chat.append({"role": "assistant", "content": reply})
    assert chat[2]["content"] != chat[4]["content"]  # two different replies: the test can tell them apart
    saved = tmp_path / "chat.json"
    term.type(f"/save {saved}\r")
    term.expect(f"(saved 5 messages to {saved})\n{PROMPT}")
    assert json.loads(saved.read_text(encoding="utf-8")) == chat

    term.type("/reset\r")
    term.expect("(new conversation)\n" + PROMPT)
    term.type("And another?\r")
    fresh = llm.chat([chat[0], chat[3]], **options)  # the system message stays, the turns are gone
    assert fresh != chat[4]["content"]
    assert term.expect(PROMPT).endswith("And another?\n" + fresh + "\n\n" + PROMPT)
    term.type("\x04")  # Ctrl-D leaves
    assert term.exit_code() == 0


def test_ctrl_c_stops_a_reply_and_the_next_turn_works(terminal, model_path, llm, tmp_path):
    """A reply of up to 8,000 tokens (end of text banned) is stopped by Ctrl-C once it has begun; what was
    shown stays in the conversation, and the next turn replies to it; Ctrl-C twice at the prompt leaves.
    The reply is longer than the pseudo-terminal's buffer (about 4 KB): once the test stops reading, the
    program blocks in its write, so the Ctrl-C always arrives during the reply, however fast the machine
    decodes (1,000 tokens of this tiny model could all be written before the Ctrl-C on a quiet machine)."""
    flags = ["--max-new-tokens", "8000", "--logit-bias", "50256=-100"]
    term = terminal("--model", str(model_path), "--device", "cpu", *flags)
    term.expect(PROMPT)
    term.type("Tell me a long story.\r")
    term.expect("Tell me a long story.\n")
    term.expect_more(40)
    term.type("\x03")
    stopped = term.expect("\n(stopped)\n\n" + PROMPT).replace("^C", "")  # the terminal echoes ^C
    term.type("Go on.\r")
    second = term.expect(PROMPT)
    saved = tmp_path / "chat.json"
    term.type(f"/save {saved}\r")
    term.expect(PROMPT)
    chat = json.loads(saved.read_text(encoding="utf-8"))
    assert [m["role"] for m in chat] == ["user", "assistant", "user", "assistant"]
    partial = chat[1]["content"]
    assert len(partial) >= 40 and stopped == partial + "\n(stopped)\n\n" + PROMPT
    reply = llm.chat(chat[:3], max_new_tokens=8000, logit_bias={50256: -100.0}, stop=[STOP])
    assert chat[3]["content"] == reply and second.endswith(reply + "\n\n" + PROMPT)
    term.type("\x03")
    term.expect("(Ctrl-C again, Ctrl-D or /exit to leave)\n" + PROMPT)
    term.type("\x03")
    assert term.exit_code() == 0


def _session(llm, lines, **kwargs) -> tuple[ChatSession, str, int]:
    """A session reading `lines` (an exception in them is raised by the read, as Ctrl-C and Ctrl-D are)."""
    pending = iter(lines)

    def read(prompt: str) -> str:
        out.write(prompt)
        item = next(pending)
        if isinstance(item, BaseException):
            raise item
        return item

    out = io.StringIO()
    session = ChatSession(llm, {"max_new_tokens": 5}, out=out, read=read, **kwargs)
    code = session.run()
    return session, out.getvalue(), code


def test_commands(llm, tmp_path):
    (tmp_path / "file").write_text("")
    session, shown, code = _session(
        llm, ["/help", "/system Be brief.", "Hi", "/bogus", "/save", f"/save {tmp_path}/file/x.json", "/exit"]
    )
    assert code == 0
    assert "/reset" in shown and "/save FILE" in shown and "Ctrl-C stops a reply" in shown
    assert "(system message set)" in shown and session.conversation()[0] == {"role": "system", "content": "Be brief."}
    assert "unknown command /bogus; /help lists them" in shown and "usage: /save FILE" in shown
    assert f"error: cannot write {tmp_path}/file/x.json: " in shown  # a file where a folder should be
    assert [m["role"] for m in session.conversation()] == ["system", "user", "assistant"]
    assert session.conversation()[2]["content"] == llm.chat(session.conversation()[:2], max_new_tokens=5)

    session, shown, code = _session(llm, ["Hi", "/system", "/reset", EOFError()], system="First.")
    assert code == 0 and session.conversation() == [] and "(no system message: the Alpaca preamble)" in shown

    session, shown, code = _session(llm, [KeyboardInterrupt(), "", KeyboardInterrupt(), KeyboardInterrupt()])
    assert code == 0 and shown.count("(Ctrl-C again, Ctrl-D or /exit to leave)") == 2  # two in a row leave


def test_chat_help_and_bad_options_before_loading(model_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run = [sys.executable, "-m", "gptcore", "chat"]
    helped = subprocess.run([*run, "--help"], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    text = " ".join(helped.stdout.split())
    assert helped.returncode == 0
    for flag in ("--system", "--adapter", "--top-p", "--min-p", "--repeat-penalty", "--seed", "--quantize"):
        assert flag in text
    assert "(default: 256)" in text
    bad = subprocess.run(
        [*run, "--model", "missing.safetensors", "--top-p", "2"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert bad.returncode == 1 and bad.stderr.strip() == "error: --top-p must be <= 1.0, got 2.0"
    missing = subprocess.run(
        [*run, "--model", "missing.safetensors"], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert missing.returncode == 1 and missing.stderr.strip() == "error: missing.safetensors: weights file not found"
