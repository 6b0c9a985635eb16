"""Typed configuration: the model architecture and one dataclass per params.yaml section."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from gptcore.errors import ConfigError


def _check_type(name: str, value: Any, hint: Any) -> Any:
    """Return value if it matches the (simple) type hint, else raise ConfigError naming the key."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            try:
                return _check_type(name, value, option)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return value
        raise ConfigError(f"{name}: expected null, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(hint):
            return value
        choices = ", ".join(repr(a) for a in typing.get_args(hint))
        raise ConfigError(f"{name}: expected one of {choices}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_hint, *_) = typing.get_args(hint) or (Any,)
        return [_check_type(f"{name}[{i}]", v, item_hint) for i, v in enumerate(value)]
    if hint is Any:
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float) and isinstance(value, bool):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return hint.from_dict(value, where=name)
    if isinstance(hint, type) and not isinstance(value, hint):
        raise ConfigError(f"{name}: expected {hint.__name__}, got {value!r}")
    return value


class Section:
    """Mixin for config dataclasses: strict construction from a params.yaml mapping."""

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None):
        """Build from a mapping, rejecting unknown keys and wrong types with a ConfigError."""
        where = where or cls.__name__
        data = dict(data or {})
        hints = typing.get_type_hints(cls)
        fields = {f.name for f in dataclasses.fields(cls) if f.init}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; allowed: {', '.join(sorted(fields))}")
        kwargs = {k: _check_type(f"{where}.{k}", v, hints[k]) for k, v in data.items()}
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class GPTConfig(Section):
    """Architecture of a GPT-2 style model; saved inside every weights file."""

    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
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
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
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


@dataclass
class DownloadParams(Section):
    """A download stage's section: where the file lives, and optionally its expected digest."""

    url: str = ""
    sha256: str | None = None  # checked after the download; a mismatch deletes the file

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) address, got {self.url!r}")


@dataclass
class TrainConfig(Section):
    """Optimisation knobs shared by every training stage."""

    epochs: int = 10
    batch_size: int = 2
    lr: float = 4e-4
    weight_decay: float = 0.1
    eval_every: int = 5  # optimizer steps between evaluations
    eval_batches: int = 5  # batches per evaluation (train and validation)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.eval_batches < 1:
            raise ValueError("epochs, batch_size, eval_every and eval_batches must be positive")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")


@dataclass
class PretrainParams(TrainConfig):
    """params.yaml `pretrain:` — Stage 1, training GPTModel from scratch on a small text."""

    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False)
    )
    train_ratio: float = 0.9  # leading share of the text used for training, the rest validates
    stride: int | None = None  # window stride in tokens; None: the context length (no overlap)
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be positive, got {self.stride}")


@dataclass
class RunConfig(Section):
    """Top-level params.yaml keys that every stage shares."""

    seed: int = 123
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: typing.Literal["auto", "fp32", "bf16", "fp16"] = "auto"


@dataclass
class JudgeParams(Section):
    """params.yaml `judge:` — Stage 4b, scoring the instruction model's responses with an Ollama model."""

    url: str = "http://localhost:11434"  # the Ollama server
    model: str = "llama3.1:8b"  # the judge model, as `ollama pull` names it
    seed: int = 123  # options sent with every request, as in the reference evaluation
    temperature: float = 0.0
    num_ctx: int = 2048  # the judge's context in tokens; longer prompts would be cut silently by Ollama
    timeout: float = 120.0  # seconds to wait for one reply before retrying
    retries: int = 5  # retries of a request after a transient fault (connection, 5xx, timeout)
    backoff: float = 1.0  # seconds before the first retry, doubled after each
    structured: bool = False  # ask for {"score": n} through Ollama's `format` JSON schema

    def __post_init__(self):
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"url must be an http(s) address, got {self.url!r}")
        if not self.model:
            raise ValueError("model must name the judge model")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.num_ctx < 1:
            raise ValueError(f"num_ctx must be positive, got {self.num_ctx}")
        if self.timeout <= 0 or self.backoff < 0 or self.retries < 0:
            raise ValueError("timeout must be positive, backoff and retries non-negative")
