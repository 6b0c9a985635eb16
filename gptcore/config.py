"""The model's architecture (GPTConfig) and its presets: GPT-2's four sizes as OpenAI published them.

Imports neither torch nor pydantic: a GPTConfig is a plain dataclass, validated strictly from a mapping
(params.yaml, a weights file) by `GPTConfig.from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass
from typing import Any

from gptcore.errors import ConfigError

# Strict types, as params.yaml's other keys (pydantic's strict mode): no text for a number, no 1 for true,
# no 2.0 for an integer; an integer is a number.
_EXPECTED = {int: "an integer", float: "a number", bool: "true or false"}


def _type_problem(value: Any, hint: Any) -> str | None:
    """What `value` should have been for the annotation `hint` (int, float, bool, or X | None), or None."""
    kinds = [k for k in typing.get_args(hint) if k is not type(None)] or [hint]
    if value is None:
        return None if type(None) in typing.get_args(hint) else _EXPECTED[kinds[0]]
    kind = kinds[0]
    if kind is float and type(value) in (int, float):
        return None if math.isfinite(value) else "a finite number"
    return None if type(value) is kind else _EXPECTED[kind]


@dataclass
class GPTConfig:
    """Architecture of a GPT-2 style model; saved inside every weights file.

    A plain dataclass, so the library builds and copies it (`dataclasses.replace`) as any other;
    params.yaml (`pretrain.model`) and weights files validate it strictly with `from_dict`.
    """

    vocab_size: int = 50257  # token ids
    context_length: int = 1024  # tokens the model attends over
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0  # dropout probability in [0, 1)
    qkv_bias: bool = False
    # GPT-2 ties the output head to the token embedding; the book's pretraining keeps them separate.
    tie_embeddings: bool = False
    # None: a language model head over the vocabulary; an int: a classifier head with that many classes.
    num_classes: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise ValueError(f"emb_dim ({self.emb_dim}) must be divisible by n_heads ({self.n_heads})")
        if not 0.0 <= self.drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {self.drop_rate}")
        if self.num_classes is not None and self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str = "GPTConfig") -> GPTConfig:
        """Build from a mapping, strictly typed.

        Raises:
            ConfigError: one line `where: key: problem` for an unknown key, a wrong type or a bad value.
        """
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        for key, value in data.items():
            if key not in hints:
                close = difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)
                hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(hints)}"
                raise ConfigError(f"{where}: {key}: unknown key; {hint}")
            expected = _type_problem(value, hints[key])
            if expected:
                raise ConfigError(f"{where}: {key}: expected {expected}, got {value!r}")
        try:
            return cls(**data)
        except ValueError as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> GPTConfig:
        """A preset by name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl), with optional overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}
# OpenAI publishes the checkpoints under folder names that count parameters.
OPENAI_SIZES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
