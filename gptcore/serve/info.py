"""The served model as the routes know it besides the engine (ServerInfo), Ollama's model names, the
names /api/create and /api/copy add (Variant: the same weights with other defaults), and the check that a
request names one of them."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from gptcore.serve import protocol as p


@dataclass
class ServerInfo:
    """What the routes need to know besides the engine."""

    name: str
    path: Path
    digest: str
    version: str
    context_length: int
    n_params: int
    dtype: str
    bound_host: str = "127.0.0.1"
    max_body: int = 1 << 20
    max_predict: int | None = None
    origins: list[str] = field(default_factory=list)
    model_info: dict = field(default_factory=dict)
    created: int = field(default_factory=lambda: int(time.time()))
    strict_options: bool = False  # unknown request fields are refused (400) rather than listed in a header
    variants: dict[str, Variant] = field(default_factory=dict)  # names added by /api/create and /api/copy


@dataclass(frozen=True)
class Variant:
    """A name served from the same weights with its own defaults (/api/create's `system`, `template` and
    `parameters`: Ollama options); the served name itself is the Variant with none."""

    system: str | None = None
    template: str | None = None
    parameters: dict = field(default_factory=dict)
    license: str | None = None
    parent: str = ""
    modified: float = field(default_factory=time.time)

    def options(self, given: p.Options | None) -> p.Options:
        """The request's options over this name's parameters."""
        if not self.parameters:
            return given or p.Options()
        return p.Options.model_validate({**self.parameters, **(given.model_dump(exclude_none=True) if given else {})})

    def with_system(self, messages: list[dict]) -> list[dict]:
        """messages, with this name's system prompt first unless they bring their own (as Ollama)."""
        if not self.system or any(m["role"] == "system" for m in messages):
            return messages
        return [{"role": "system", "content": self.system}, *messages]


BASE = Variant()


def canonical_name(name: str) -> str:
    """Ollama's model names carry a tag; `latest` when none is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def default_name(path: Path) -> str:
    """models/gpt2-large-instruct/model.safetensors -> gpt2-large-instruct; other files by their stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def check_model(requested: str | None, info: ServerInfo) -> Variant:
    """The Variant a request names (BASE for the served model), or a 400 / 404."""
    if not requested:
        raise p.RequestError(400, "model is required")
    name = canonical_name(requested)
    if requested == info.name or name == info.name:
        return BASE
    if name in info.variants:
        return info.variants[name]
    raise p.RequestError(404, f"model '{requested}' not found")
