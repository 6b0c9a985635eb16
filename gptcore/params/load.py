"""Reading params.yaml: the whole file, validated as one `Params` model before a stage does any work."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from gptcore.errors import ConfigError
from gptcore.params.schema import Params


def read_params(path: str | os.PathLike = "params.yaml") -> dict[str, Any]:
    """The raw mapping of a params file.

    Raises:
        ConfigError: the file is missing, not YAML, or not a mapping at the top level (one line naming it).
    """
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


def load_params(path: str | os.PathLike = "params.yaml") -> Params:
    """Read and validate the whole params file; every stage calls this first, whatever section it uses.

    Raises:
        ConfigError: `<path>: <key path>: <problem>` for every problem anywhere in the file (an unknown
            key or section, a wrong type, a value out of range, a rule across keys), one line each, so a
            bad value in any section stops every stage at once and all of them are fixed in one go.
    """
    return Params.from_dict(read_params(path), where=str(path))
