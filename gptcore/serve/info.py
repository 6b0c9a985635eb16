"""The served model as the routes know it besides the engine (ServerInfo), Ollama's model names, and the
check that a request names that model."""

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


def canonical_name(name: str) -> str:
    """Ollama's model names carry a tag; `latest` when none is given."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else f"{name}:latest"


def default_name(path: Path) -> str:
    """models/gpt2-large-instruct/model.safetensors -> gpt2-large-instruct; other files by their stem."""
    return path.parent.name if path.stem == "model" and path.parent.name else path.stem


def check_model(requested: str | None, info: ServerInfo) -> None:
    if not requested:
        raise p.RequestError(400, "model is required")
    if requested != info.name and canonical_name(requested) != info.name:
        raise p.RequestError(404, f"model '{requested}' not found")
