"""Reading params.yaml: the whole file, or one section as its typed dataclass."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml

from gptcore.config import RunConfig, Section
from gptcore.errors import ConfigError

S = TypeVar("S", bound=Section)


def read_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: params file not found")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return params


def section(params: dict[str, Any], name: str, cls: type[S]) -> S:
    """The `name:` section of params as `cls`, strictly typed (unknown keys are errors)."""
    data = params.get(name)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(f"params.yaml {name}: expected a mapping, got {data!r}")
    return cls.from_dict(data or {}, where=f"params.yaml {name}")


def run_config(params: dict[str, Any]) -> RunConfig:
    """The top-level keys shared by every stage (seed, device, precision)."""
    fields = {k: params[k] for k in ("seed", "device", "precision") if k in params}
    return RunConfig.from_dict(fields, where="params.yaml")
