"""`gptcore serve`: a gptcore weights file behind Ollama's REST API (`/api/*`) and OpenAI's (`/v1/*`).

FastAPI + uvicorn; one engine thread owns the model and batches concurrent requests (serve/engine.py,
its job and event types in serve/jobs.py); prompt templates and the detokenizer live in serve/chat.py,
request models in serve/protocol.py, the application in serve/app.py and its routes in
serve/ollama_routes.py, serve/openai_routes.py and serve/embedding_routes.py. See docs/serving.md for the
endpoints and what each honours.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from gptcore.errors import GptcoreError

if TYPE_CHECKING:
    from gptcore.serve.engine import Engine
    from gptcore.serve.info import ServerInfo

MAX_BODY = 1 << 20  # bytes of a request body; a prompt is text, 1 MiB is ~250k tokens
MAX_CONNECTIONS = 64  # concurrent connections before uvicorn answers 503
MAX_BATCH = 16  # requests decoded together; more wait in the queue
ORIGINS_ENV = "OLLAMA_ORIGINS"
KEEP_ALIVE_ENV = "OLLAMA_KEEP_ALIVE"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limits:
    """What one server accepts: request body bytes, open connections, requests decoded together (more
    wait in the queue), new tokens per request (None: up to the context, as Ollama's num_ctx), and whether
    request fields gptcore does not use are refused."""

    max_body: int = MAX_BODY
    max_connections: int = MAX_CONNECTIONS
    max_batch: int = MAX_BATCH
    max_predict: int | None = None
    strict_options: bool = False  # refuse request fields gptcore does not use (else: a Warning header)


@dataclass(frozen=True)
class LoadOptions:
    """How the served model is loaded: the precision it decodes in, int8 weights (`quantize`), a LoRA
    adapter file applied to the weights file at load time (merged in memory; nothing is written), and
    how long it stays loaded once idle when a request does not say (`keep_alive`, Ollama's duration:
    "5m", seconds, negative = forever; None: $OLLAMA_KEEP_ALIVE, else 5 minutes, as Ollama)."""

    precision: str = "fp32"
    quantize: str = "none"
    adapter: str | os.PathLike | None = None
    keep_alive: str | float | None = None


class Server:
    """A loaded model, its engine, and a bound uvicorn server (not yet serving); port 0 picks a free one."""

    def __init__(
        self,
        model_path: str | os.PathLike,
        host: str = "127.0.0.1",
        port: int = 11434,
        name: str | None = None,
        device: str = "auto",
        origins: list[str] | None = None,
        limits: Limits = Limits(),
        quiet: bool = False,
        load: LoadOptions = LoadOptions(),
    ):
        # The server's own imports first: a missing one fails before the model loads.
        import uvicorn

        from gptcore.device import resolve_device
        from gptcore.serve.app import create_app

        path = Path(model_path)
        self.device = resolve_device(device)
        self.engine = self._load_engine(path, load, limits.max_batch)
        self.info = self._describe(path, name, host, origins, limits, load.quantize)
        self.socket = _listen(host, port)
        self.host, self.port = self.socket.getsockname()[:2]
        app = create_app(self.engine, self.info)
        self.uvicorn = uvicorn.Server(
            uvicorn.Config(
                # uvicorn counts the connection being checked too: +1 lets max_connections connections in
                app,
                limit_concurrency=limits.max_connections + 1,
                timeout_keep_alive=30,
                log_level="warning" if quiet else "info",
                access_log=not quiet,
                server_header=False,
                timeout_graceful_shutdown=5,
            )
        )
        self._thread: threading.Thread | None = None

    def _load_engine(self, path: Path, load: LoadOptions, max_batch: int) -> Engine:
        """The engine, its model loaded on self.device (a classifier is refused)."""
        from gptcore.inference import kernels
        from gptcore.inference.decoding import cast_for_inference, resolve_decoding_precision
        from gptcore.precision import autocast
        from gptcore.serve.engine import Engine
        from gptcore.tokenizer import get_tokenizer
        from gptcore.weights import load_model

        resolved, reason = resolve_decoding_precision(load.precision, self.device)

        def load_for_serving():
            """The model as served: loaded (the adapter merged in), checked to be a language model, cast for inference."""
            if load.adapter is None:
                model = load_model(path, device=self.device)
            else:
                from gptcore.recipes.merge import load_with_adapter

                model, _ = load_with_adapter(path, load.adapter, self.device)
            if model.config.num_classes is not None:
                raise GptcoreError(
                    f"{path}: is a classifier ({model.config.num_classes} classes); only language models can be served"
                )
            return cast_for_inference(model, resolved, load.quantize)

        engine = Engine(
            load_for_serving,
            get_tokenizer(),
            max_batch=max_batch,
            compute=lambda: autocast(self.device, resolved),
            keep_alive=default_keep_alive(load.keep_alive),
        )
        engine.ensure_loaded()  # a classifier is refused before anything is logged
        logger.info("gptcore serve: precision %s (%s); decoding kernels: %s", resolved, reason, kernels.describe())
        engine.touch(None)
        return engine

    def _describe(
        self, path: Path, name: str | None, host: str, origins: list[str] | None, limits: Limits, quantize: str
    ) -> ServerInfo:
        """What the routes report about the loaded model and the server (ServerInfo)."""
        from gptcore import __version__
        from gptcore.download import sha256_of
        from gptcore.serve.info import ServerInfo, canonical_name, default_name

        model = self.engine.model
        config = model.config
        env_origins = [o.strip() for o in os.environ.get(ORIGINS_ENV, "").split(",") if o.strip()]
        info = ServerInfo(
            name=canonical_name(name or default_name(path)),
            path=path,
            digest=sha256_of(path),
            version=__version__,
            context_length=config.context_length,
            n_params=_count_parameters(config),
            dtype="INT8"
            if quantize == "int8"
            else str(model.tok_emb.weight.dtype).removeprefix("torch.").upper().replace("FLOAT", "F"),
            bound_host=host,
            max_body=limits.max_body,
            max_predict=limits.max_predict,
            origins=env_origins + list(origins or []),
            strict_options=limits.strict_options,
        )
        info.model_info = {
            "general.architecture": "gpt2",
            "general.parameter_count": info.n_params,
            "gpt2.context_length": config.context_length,
            "gpt2.embedding_length": config.emb_dim,
            "gpt2.block_count": config.n_layers,
            "gpt2.attention.head_count": config.n_heads,
            "gpt2.vocab_size": config.vocab_size,
        }
        return info

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}" if ":" not in self.host else f"http://[{self.host}]:{self.port}"

    def serve_forever(self) -> None:
        """Serve until interrupted (uvicorn handles Ctrl-C when run on the main thread)."""
        self.engine.start()
        try:
            self.uvicorn.run(sockets=[self.socket])
        finally:
            self.engine.stop()
            self.socket.close()

    def start(self) -> Server:
        """Serve on a background thread (tests, notebooks); `close()` stops it."""
        self._thread = threading.Thread(target=self.serve_forever, name="gptcore-serve", daemon=True)
        self._thread.start()
        while not self.uvicorn.started and self._thread.is_alive():
            threading.Event().wait(0.02)
        return self

    def close(self) -> None:
        self.uvicorn.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=30)


def default_keep_alive(value: str | float | None) -> float:
    """The server's keep_alive in seconds (inf: forever): value, else $OLLAMA_KEEP_ALIVE, else 5 minutes;
    GptcoreError for a value that is not a duration."""
    from gptcore.serve.options import parse_keep_alive
    from gptcore.serve.protocol import RequestError

    if value is None:
        value = os.environ.get(KEEP_ALIVE_ENV) or "5m"
    try:
        return parse_keep_alive(value)
    except RequestError as err:
        raise GptcoreError(f"keep-alive: {err.message.removeprefix('invalid keep_alive: ')}") from None


def _listen(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and listening, or a GptcoreError saying the port is taken."""
    try:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        # Listening from here on, before uvicorn runs: a client that connects as soon as the URL is
        # printed waits in the kernel's queue instead of being refused (uvicorn's backlog, 2048).
        sock.listen(2048)
    except OSError as err:
        raise GptcoreError(
            f"cannot listen on {host}:{port}: {err.strerror or err} "
            "(is Ollama or another server using it? pick another --port)"
        ) from None
    return sock


def _count_parameters(config) -> int:
    """The model's parameters, as trained (decoding may untie the head or hold int8 buffers instead)."""
    import torch

    from gptcore.model import GPTModel

    with torch.device("meta"):
        return GPTModel(config).num_parameters()


def serve(
    model_path: str | os.PathLike,
    host: str = "127.0.0.1",
    port: int = 11434,
    name: str | None = None,
    device: str = "auto",
    max_predict: int | None = None,
    origins: list[str] | None = None,
    load: LoadOptions = LoadOptions(),
    strict_options: bool = False,
) -> None:
    """Load the model and serve it until interrupted (Ctrl-C)."""
    server = Server(
        model_path,
        host,
        port,
        name=name,
        device=device,
        origins=origins,
        limits=Limits(max_predict=max_predict, strict_options=strict_options),
        load=load,
    )
    if host not in ("127.0.0.1", "localhost", "::1"):
        logger.warning(
            "warning: listening on %s: the API has no authentication; anyone who can reach the port can use it", host
        )
    logger.info(
        "gptcore serve: %s (%s, %.0fM parameters, %s) on %s (Ctrl-C stops)",
        server.info.name,
        server.info.path,
        server.info.n_params / 1e6,
        server.device,
        server.url,
    )
    server.serve_forever()
