"""The judge's Ollama client: the few calls of Ollama's REST API it needs, with retries for transient faults."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import requests

from gptcore.errors import GptcoreError
from gptcore.params.schema import JudgeParams
from gptcore.retry import retry_delay

INSTALL_HINT = (
    "start Ollama with `ollama serve` (install it from https://ollama.com/download), "
    "pull the judge with `ollama pull {model}`, or point judge.url in params.yaml at a running server"
)


def request_options(params: JudgeParams) -> dict[str, Any]:
    return {"seed": params.seed, "temperature": params.temperature, "num_ctx": params.num_ctx}


class OllamaUnavailable(GptcoreError):
    """The server stayed unreachable or failing after every retry."""


@dataclass
class JudgeServer:
    """What the preflight check learned about the server and the judge model."""

    version: str
    model: str
    digest: str | None
    context_length: int | None = None  # the model's own limit (from /api/show), if it reports one


class OllamaClient:
    """The few calls of Ollama's REST API the judge needs, with retries for transient faults."""

    def __init__(
        self,
        url: str,
        timeout: float = 120.0,
        retries: int = 5,
        backoff: float = 1.0,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.sleep = sleep
        self.session = requests.Session()

    def close(self) -> None:
        self.session.close()

    def check(self, model: str) -> JudgeServer:
        """GET /api/version and /api/tags: the server answers and has the judge model (whose context
        length POST /api/show may add)."""
        hint = INSTALL_HINT.format(model=model)
        try:
            about = self._send("GET", "/api/version")
            version = about.get("version")
            if isinstance(version, str) and isinstance(about.get("gptcore_version"), str):  # `gptcore serve`
                version = f"gptcore {about['gptcore_version']} (Ollama API {version})"
            tags = self._send("GET", "/api/tags").get("models")
        except (requests.RequestException, _HTTPFault) as err:
            raise GptcoreError(f"no Ollama server answers at {self.url} ({_describe(err)}); {hint}") from None
        except GptcoreError as err:
            raise GptcoreError(f"{self.url} does not answer like an Ollama server ({err}); {hint}") from None
        if not isinstance(version, str) or not isinstance(tags, list):
            raise GptcoreError(f"{self.url} does not answer like an Ollama server; {hint}")
        for tag in tags:
            names = {tag.get("name"), tag.get("model")} if isinstance(tag, dict) else set()
            if model in names or (":" not in model and f"{model}:latest" in names):
                return JudgeServer(
                    version=version, model=model, digest=tag.get("digest"), context_length=self._context_length(model)
                )
        have = ", ".join(sorted(str(t.get("name")) for t in tags if isinstance(t, dict))) or "no models"
        raise GptcoreError(
            f"the judge model {model} is not available at {self.url} (it has {have}); "
            f"pull it with `ollama pull {model}`"
        )

    def _context_length(self, model: str) -> int | None:
        """The model's context length from POST /api/show (`<arch>.context_length`), or None."""
        try:
            info = self._send("POST", "/api/show", {"model": model}).get("model_info")
        except (requests.RequestException, _HTTPFault, GptcoreError):
            return None
        lengths = [v for k, v in (info or {}).items() if k.endswith(".context_length") and isinstance(v, int)]
        return min(lengths) if lengths else None

    def chat(self, model: str, messages: list[dict], options: dict, format: dict | None = None) -> dict:
        """POST /api/chat (no streaming); returns Ollama's response object."""
        body = {"model": model, "messages": messages, "stream": False, "options": options}
        if format is not None:
            body["format"] = format
        return self.request("POST", "/api/chat", body)

    def request(self, method: str, path: str, body: dict | None = None) -> dict:
        """One API call; connection errors, timeouts, 5xx and 429 are retried with exponential backoff, or
        after the wait a 429/503's Retry-After asks for when that is longer (Ollama's 503 "server busy")."""
        for attempt in range(self.retries + 1):
            try:
                return self._send(method, path, body)
            except (
                requests.ConnectionError,
                requests.Timeout,
                requests.exceptions.ChunkedEncodingError,
                _HTTPFault,
            ) as err:
                if isinstance(err, _HTTPFault) and err.status < 500 and err.status != 429:
                    raise GptcoreError(f"{self.url}{path}: HTTP {err.status}: {err.message}") from None
                if attempt == self.retries:
                    raise OllamaUnavailable(
                        f"{self.url}{path} failed {self.retries + 1} times, last: {_describe(err)}"
                    ) from None
                asked = err.retry_after if isinstance(err, _HTTPFault) else None
                self.sleep(retry_delay(attempt, self.backoff, asked))
        raise AssertionError("unreachable")

    def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        response = self.session.request(method, self.url + path, json=body, timeout=self.timeout)
        try:
            data = response.json()
        except ValueError:
            data = None
        if response.status_code != 200:
            message = data.get("error") if isinstance(data, dict) else None
            raise _HTTPFault(
                response.status_code,
                str(message or response.text[:200] or response.reason),
                response.headers.get("Retry-After"),
            )
        if not isinstance(data, dict):
            raise GptcoreError(f"{self.url}{path}: the reply is not a JSON object: {response.text[:200]!r}")
        return data


class _HTTPFault(Exception):
    def __init__(self, status: int, message: str, retry_after: str | None = None):
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.retry_after = retry_after


def _describe(err: Exception) -> str:
    if isinstance(err, requests.Timeout):
        return "timed out"
    if isinstance(err, requests.ConnectionError):
        return "connection refused or dropped"
    return " ".join(str(err).split())[:200]
