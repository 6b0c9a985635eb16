"""`gptcore serve`: a gptcore weights file behind the parts of Ollama's REST API that clients use.

Endpoints: GET / and /api/version, /api/tags, /api/ps; POST /api/show, /api/generate, /api/chat
(NDJSON streaming by default, one JSON object with `"stream": false`). Replies carry Ollama's fields
and errors are Ollama's `{"error": "..."}` with its status codes, so the official clients (and
gptcore's own judge) work against it. Standard library HTTP only; one model per server.

Prompts:
- /api/generate continues `prompt` verbatim, as `gptcore generate` does (Ollama's `raw: true`):
  a gptcore weights file carries no chat template. `context` (token ids from an earlier reply) is
  prepended.
- /api/chat renders the messages with the Alpaca template the instruction stage trains on
  (gptcore.prompt): system messages, joined, replace Alpaca's preamble; each user message becomes
  "### Instruction:", each assistant message a "### Response:" to the one before; a conversation that
  ends with a user message ends with an open "### Response:", one that ends with an assistant message
  is continued. A single user message renders exactly like a training prompt.
- A prompt longer than the model's context keeps its last tokens (`prompt_eval_count` says how many
  were read); generation beyond the context slides the window, as `gptcore.generate` does.
"""

from __future__ import annotations

import codecs
import json
import math
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable

from gptcore.errors import GptcoreError
from gptcore.prompt import PREAMBLE, RESPONSE_MARKER

MAX_BODY = 1 << 20  # bytes of a request body; a prompt is text, 1 MiB is ~250k tokens
MAX_PREDICT = 512  # new tokens per request at most (and by default, as Ollama's unlimited -1)
MAX_PENDING = 32  # requests waiting for the model before the server answers 503 busy
# Ollama's sampling defaults, used when a request leaves them out.
DEFAULT_TEMPERATURE = 0.8
DEFAULT_TOP_K = 40
INSTRUCTION = "\n\n### Instruction:\n"
GET_ROUTES = ("/", "/api/version", "/api/tags", "/api/ps")
POST_ROUTES = ("/api/show", "/api/generate", "/api/chat")


class RequestError(Exception):
    """A request the server refuses: HTTP status and Ollama-style message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class Sampling:
    """The `options` a request may set; the others (num_ctx, top_p, ...) are accepted and ignored."""

    temperature: float = DEFAULT_TEMPERATURE
    top_k: int | None = DEFAULT_TOP_K
    seed: int | None = None
    num_predict: int = MAX_PREDICT
    stop: list[str] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    ids: list[int]  # prompt (as read) + generated token ids: Ollama's `context`
    prompt_eval_count: int
    eval_count: int
    done_reason: str  # "stop" (end of text or a stop string) or "length" (num_predict reached)
    total_duration: int  # nanoseconds, as Ollama reports them
    prompt_eval_duration: int
    eval_duration: int


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
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True
            end = len(self.text)
        else:
            hold = 0 if final else max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
            end = len(self.text) - hold
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece


class ModelService:
    """One loaded model, its metadata, and generation serialised by a lock (requests queue for it)."""

    def __init__(self, model_path: str | os.PathLike, name: str | None = None, device: str = "auto",
                 max_predict: int = MAX_PREDICT, max_body: int = MAX_BODY, max_pending: int = MAX_PENDING,
                 precision: str = "fp32"):
        from gptcore import __version__
        from gptcore.device import resolve_device
        from gptcore.precision import resolve_precision
        from gptcore.download import sha256_of
        from gptcore.decoding import cast_for_inference
        from gptcore.tokenizer import get_tokenizer
        from gptcore.weights import load_model

        self.path = Path(model_path)
        self.device = resolve_device(device)
        self.model = load_model(self.path, device=self.device)
        if self.model.config.num_classes is not None:
            raise GptcoreError(f"{self.path}: is a classifier ({self.model.config.num_classes} classes); "
                               "only language models can be served")
        cast_for_inference(self.model, resolve_precision(precision, self.device, "inference"))
        self.tokenizer = get_tokenizer()
        self.name = canonical_name(name or default_name(self.path))
        self.digest = sha256_of(self.path)
        self.size = self.path.stat().st_size
        self.modified_at = _timestamp(self.path.stat().st_mtime)
        self.version = __version__
        self.max_predict = max_predict
        self.max_body = max_body
        self.max_pending = max_pending
        self.n_params = sum(p.numel() for p in self.model.parameters())
        self.lock = threading.Lock()
        self._pending = 0
        self._pending_lock = threading.Lock()

    # -- metadata -----------------------------------------------------------------------------
    def matches(self, requested: str) -> bool:
        return requested == self.name or canonical_name(requested) == self.name

    def details(self) -> dict[str, Any]:
        size = f"{self.n_params / 1e9:.1f}B" if self.n_params >= 1e9 else f"{self.n_params / 1e6:.0f}M"
        dtype = str(self.model.tok_emb.weight.dtype).removeprefix("torch.").upper().replace("FLOAT", "F")
        return {"parent_model": "", "format": "safetensors", "family": "gpt2", "families": ["gpt2"],
                "parameter_size": size, "quantization_level": dtype}

    def tag(self) -> dict[str, Any]:
        return {"name": self.name, "model": self.name, "modified_at": self.modified_at, "size": self.size,
                "digest": self.digest, "details": self.details()}

    def show(self) -> dict[str, Any]:
        c = self.model.config
        return {
            "license": "",
            "modelfile": f"# served by gptcore from {self.path.name}\nFROM {self.path.name}\n",
            "parameters": f"temperature {DEFAULT_TEMPERATURE}\ntop_k {DEFAULT_TOP_K}\nnum_predict {self.max_predict}",
            "template": "{{ .Prompt }}",
            "details": self.details(),
            "model_info": {
                "general.architecture": "gpt2", "general.parameter_count": self.n_params,
                "gpt2.context_length": c.context_length, "gpt2.embedding_length": c.emb_dim,
                "gpt2.block_count": c.n_layers, "gpt2.attention.head_count": c.n_heads,
                "gpt2.vocab_size": c.vocab_size,
            },
            "capabilities": ["completion"],
            "modified_at": self.modified_at,
        }

    # -- generation ---------------------------------------------------------------------------
    def reserve(self) -> None:
        with self._pending_lock:
            if self._pending >= self.max_pending:
                raise RequestError(503, "server busy, please try again. maximum pending requests exceeded")
            self._pending += 1

    def release(self) -> None:
        with self._pending_lock:
            self._pending -= 1

    def complete(self, ids: list[int], sampling: Sampling, emit: Callable[[str], bool] = lambda _: True) -> Completion:
        """Generate after `ids`; `emit(piece)` sees the text as it comes and returns False to cancel."""
        import torch

        from gptcore.decoding import generate, make_generator
        from gptcore.tokenizer import EOT_ID

        start = time.perf_counter()
        prompt = ids[-self.model.config.context_length :]
        detok = Detokenizer(self.tokenizer, sampling.stop)
        new_ids: list[int] = []
        first: list[float] = []
        cancelled = False

        def on_token(next_id: torch.Tensor) -> bool:
            nonlocal cancelled
            if not first:
                first.append(time.perf_counter())
            new_ids.append(int(next_id[0, 0]))
            piece = detok.push(new_ids[-1])
            if piece and not emit(piece):
                cancelled = True
            return cancelled or detok.stopped

        generator = None
        if sampling.temperature > 0:
            seed = sampling.seed if sampling.seed is not None else int.from_bytes(os.urandom(8), "little") >> 1
            generator = make_generator(seed % 2**63, self.device)
        with self.lock:
            started = time.perf_counter()
            idx = torch.tensor([prompt], dtype=torch.long, device=self.device)
            generate(self.model, idx, sampling.num_predict, temperature=sampling.temperature, top_k=sampling.top_k,
                     eos_id=EOT_ID, generator=generator, on_token=on_token)
            end = time.perf_counter()
        tail = detok.finish()
        if tail and not cancelled:
            emit(tail)
        first_at = first[0] if first else end
        reason = "stop" if detok.stopped or len(new_ids) < sampling.num_predict else "length"
        return Completion(
            text=detok.text, ids=prompt + new_ids, prompt_eval_count=len(prompt), eval_count=len(new_ids),
            done_reason=reason, total_duration=_ns(end - start), prompt_eval_duration=_ns(first_at - started),
            eval_duration=_ns(end - first_at),
        )


def default_name(path: Path) -> str:
    """models/gpt2-large-instruct/model.safetensors -> gpt2-large-instruct; other files by their stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def canonical_name(name: str) -> str:
    """Ollama's model names carry a tag; `latest` when none is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def render_chat(messages: list[dict]) -> str:
    """Messages -> one Alpaca prompt (see the module docstring for the rule)."""
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    text = system or PREAMBLE
    turns = [m for m in messages if m["role"] != "system"]
    for m in turns:
        text += (INSTRUCTION if m["role"] == "user" else RESPONSE_MARKER) + m["content"]
    if not turns or turns[-1]["role"] == "user":
        text += RESPONSE_MARKER
    return text


# -- request validation -------------------------------------------------------------------------
def _field(body: dict, key: str, kind: type | tuple, default: Any = None, what: str = "") -> Any:
    """body[key] if it has the expected JSON type (true/false is not a number here); null means absent."""
    value = body.get(key)
    if value is None:
        return default
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        raise RequestError(400, f"invalid {key}: expected {what or _kind_name(kind)}, got {json.dumps(value)[:80]}")
    return value


def _kind_name(kind: type | tuple) -> str:
    names = {str: "a string", bool: "true or false", int: "an integer", float: "a number", list: "a list",
             dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def parse_sampling(body: dict, max_predict: int) -> Sampling:
    """The honoured `options`, type-checked (400 on a wrong type or an out-of-range value)."""
    options = _field(body, "options", dict, {})
    temperature = _field(options, "temperature", (int, float), DEFAULT_TEMPERATURE, "a number")
    if not math.isfinite(temperature) or temperature < 0:
        raise RequestError(400, f"invalid temperature: must be a number >= 0, got {temperature}")
    top_k = _field(options, "top_k", int, DEFAULT_TOP_K)
    seed = _field(options, "seed", int, None)
    num_predict = _field(options, "num_predict", int, -1)
    if num_predict in (-1, -2):  # Ollama: unlimited / fill the context; here: the server's limit
        num_predict = max_predict
    if not 0 <= num_predict <= max_predict:
        raise RequestError(400, f"invalid num_predict {num_predict}: this server generates at most "
                                f"{max_predict} tokens per request (gptcore serve --max-predict)")
    stop = _field(options, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 16 or not all(isinstance(s, str) and len(s) <= 256 for s in stop):
        raise RequestError(400, "invalid stop: expected at most 16 strings of at most 256 characters")
    return Sampling(temperature=float(temperature), top_k=top_k if top_k > 0 else None, seed=seed,
                    num_predict=num_predict, stop=stop)


def _refuse_unsupported(body: dict, model: str) -> None:
    for key in ("images", "tools"):
        if _field(body, key, list, []):
            raise RequestError(400, f"{model} does not support {key}")
    if body.get("format") not in (None, ""):
        raise RequestError(400, f"{model} does not support structured outputs (format)")
    if body.get("think") not in (None, False):
        raise RequestError(400, f"{model} does not support thinking")


def parse_messages(body: dict) -> list[dict]:
    messages = _field(body, "messages", list, [])
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise RequestError(400, f"invalid messages[{i}]: expected an object")
        role = m.get("role")
        if role not in ("system", "user", "assistant"):
            raise RequestError(400, f"invalid messages[{i}].role: expected system, user or assistant, got {json.dumps(role)[:40]}")
        content = m.get("content") or ""
        if not isinstance(content, str):
            raise RequestError(400, f"invalid messages[{i}].content: expected a string")
        if m.get("images"):
            raise RequestError(400, "this model does not support images")
        parsed.append({"role": role, "content": content})
    return parsed


# -- HTTP -----------------------------------------------------------------------------------------
class Handler(BaseHTTPRequestHandler):
    """Ollama's routes over http.server; one thread per connection (ThreadingHTTPServer)."""

    protocol_version = "HTTP/1.1"  # keep-alive, and chunked transfer for streams
    server_version = "gptcore"
    timeout = 120  # seconds a socket may stall (reading a body, or a client not reading a stream)
    service: ModelService  # set by make_server
    quiet = False

    # routes
    def do_HEAD(self) -> None:
        if self.path == "/":
            self._reply(200, b"", "text/plain; charset=utf-8", head=True)
        else:
            self._error(404, "404 page not found")

    def do_GET(self) -> None:
        self._guard(self._get)

    def do_POST(self) -> None:
        self._guard(self._post)

    def do_PUT(self) -> None:
        self._error(405, "method not allowed")

    do_DELETE = do_PATCH = do_PUT

    def _get(self) -> None:
        path = self.path.split("?", 1)[0]
        s = self.service
        if path == "/":
            self._reply(200, b"Ollama is running", "text/plain; charset=utf-8")
        elif path == "/api/version":
            self._json(200, {"version": s.version})
        elif path == "/api/tags":
            self._json(200, {"models": [s.tag()]})
        elif path == "/api/ps":
            self._json(200, {"models": [{**s.tag(), "expires_at": "2318-01-01T00:00:00Z", "size_vram": 0,
                                         "context_length": s.model.config.context_length}]})
        elif path in POST_ROUTES:
            self._error(405, "method not allowed")
        else:
            self._error(404, "404 page not found")

    def _post(self) -> None:
        path = self.path.split("?", 1)[0]
        if path not in POST_ROUTES:
            self._drain_or_close()
            if path in GET_ROUTES:
                raise RequestError(405, "method not allowed")
            raise RequestError(404, "404 page not found")
        body = self._read_json()
        name = body.get("model") or body.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(400, "model is required")
        if not self.service.matches(name):
            raise RequestError(404, f"model '{name}' not found")
        if path == "/api/show":
            self._json(200, self.service.show())
            return
        chat = path == "/api/chat"
        _refuse_unsupported(body, name)
        sampling = parse_sampling(body, self.service.max_predict)
        stream = _field(body, "stream", bool, True)
        if chat:
            messages = parse_messages(body)
            text = render_chat(messages) if messages else ""
            ids = self._encode(text)
        else:
            prompt = _field(body, "prompt", str, "")
            for key in ("system", "template", "suffix"):
                if _field(body, key, str, ""):
                    raise RequestError(400, f"{key} is not supported: /api/generate continues the prompt verbatim "
                                            "(use /api/chat for the instruction template)")
            context = _field(body, "context", list, [])
            vocab = self.service.model.config.vocab_size
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in context):
                raise RequestError(400, f"invalid context: expected token ids in [0, {vocab})")
            ids = context + self._encode(prompt)
        self._generate(name, ids, sampling, stream, chat)

    def _encode(self, text: str) -> list[int]:
        from gptcore.tokenizer import encode

        return encode(self.service.tokenizer, text) if text else []

    def _generate(self, name: str, ids: list[int], sampling: Sampling, stream: bool, chat: bool) -> None:
        def fields(text: str, done: bool) -> dict:
            head = {"model": name, "created_at": _now()}
            if chat:
                return {**head, "message": {"role": "assistant", "content": text}, "done": done}
            return {**head, "response": text, "done": done}

        if not ids:  # Ollama answers an empty prompt by loading the model
            self._json(200, {**fields("", True), "done_reason": "load"})
            return
        self.service.reserve()
        try:
            if stream:
                self._start_stream()
                completion = self.service.complete(ids, sampling, lambda piece: self._chunk(fields(piece, False)))
            else:
                completion = self.service.complete(ids, sampling)
        except Exception as err:  # noqa: BLE001 - reported to the client, the server keeps serving
            if not stream:
                raise
            self._chunk({"error": " ".join(str(err).split()) or type(err).__name__})
            self._end_stream()
            return
        finally:
            self.service.release()
        final = {
            **fields("" if stream else completion.text, True),
            "done_reason": completion.done_reason,
            "total_duration": completion.total_duration, "load_duration": 0,
            "prompt_eval_count": completion.prompt_eval_count,
            "prompt_eval_duration": completion.prompt_eval_duration,
            "eval_count": completion.eval_count, "eval_duration": completion.eval_duration,
        }
        if not chat:
            final["context"] = completion.ids
        if stream:
            if self._chunk(final):
                self._end_stream()
        else:
            self._json(200, final)

    # plumbing
    def _guard(self, route: Callable[[], None]) -> None:
        try:
            route()
        except RequestError as err:
            self._error(err.status, err.message)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True
        except Exception as err:  # noqa: BLE001 - one bad request must not stop the server
            self._error(500, " ".join(str(err).split()) or type(err).__name__)

    def _read_json(self) -> dict:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(411, "a Content-Length is required")
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            self.close_connection = True
            raise RequestError(400, "invalid Content-Length") from None
        if length < 0:
            self.close_connection = True
            raise RequestError(400, "invalid Content-Length")
        if length > self.service.max_body:
            self._drain_or_close(length)
            raise RequestError(413, f"request body too large: {length} bytes (limit {self.service.max_body})")
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RequestError(400, f"invalid JSON in the request body: {err}") from None
        if not isinstance(body, dict):
            raise RequestError(400, "the request body must be a JSON object")
        return body

    def _drain_or_close(self, length: int | None = None) -> None:
        """Read and drop a body we will not use (so the client sees our answer), unless it is absurd."""
        if length is None:
            try:
                length = int(self.headers.get("Content-Length", "0"))
            except ValueError:
                length = -1
        if 0 <= length <= 16 * self.service.max_body:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        else:
            self.close_connection = True

    def _json(self, status: int, obj: dict) -> None:
        self._reply(status, json.dumps(obj, ensure_ascii=False).encode("utf-8"), "application/json; charset=utf-8")

    def _error(self, status: int, message: str) -> None:
        self._json(status, {"error": message})

    def _reply(self, status: int, data: bytes, content_type: str, head: bool = False) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not head:
            self.wfile.write(data)

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/x-ndjson")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()

    def _chunk(self, obj: dict) -> bool:
        """One NDJSON line as one HTTP chunk; False once the client has gone away."""
        line = (json.dumps(obj, ensure_ascii=False) + "\n").encode("utf-8")
        try:
            self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
            self.wfile.flush()
            return True
        except OSError:
            self.close_connection = True
            return False

    def _end_stream(self) -> None:
        try:
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except OSError:
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:
        if not self.quiet:
            sys.stderr.write(f"{self.address_string()} [{_now()}] {format % args}\n")


def make_server(service: ModelService, host: str = "127.0.0.1", port: int = 11434, quiet: bool = False) -> ThreadingHTTPServer:
    """A bound (not yet serving) HTTP server for `service`; port 0 picks a free port."""
    handler = type("BoundHandler", (Handler,), {"service": service, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as err:
        raise GptcoreError(f"cannot listen on {host}:{port}: {err.strerror or err} "
                           "(is Ollama or another server using it? pick another --port)") from None
    server.daemon_threads = True
    return server


def serve(model_path: str | os.PathLike, host: str = "127.0.0.1", port: int = 11434, name: str | None = None,
          device: str = "auto", max_predict: int = MAX_PREDICT, precision: str = "fp32") -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    service = ModelService(model_path, name=name, device=device, max_predict=max_predict, precision=precision)
    server = make_server(service, host, port)
    bound_host, bound_port = server.server_address[:2]
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {host}: the API has no authentication; anyone who can reach the port can use it",
              file=sys.stderr)
    print(f"gptcore serve: {service.name} ({service.path}, {service.details()['parameter_size']} parameters, "
          f"{service.device}) on http://{bound_host}:{bound_port} (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _timestamp(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def _ns(seconds: float) -> int:
    return max(0, int(seconds * 1e9))
