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
    checkpoint_minutes: float = 10.0  # resumable progress is saved this often (and on SIGINT/SIGTERM)
    # The lr over the run (gptcore/schedule.py): constant (the book's main chapters) or cosine decay to zero,
    # after a linear warmup over this leading fraction of the steps (0: none).
    lr_schedule: typing.Literal["constant", "cosine"] = "constant"
    warmup: float = 0.0
    # Speed and memory only (the result is the same up to float rounding; batch_size stays the global batch):
    grad_accum: int = 1  # micro-batches each process cuts its share of a batch into (less activation memory)
    activation_checkpointing: bool = False  # recompute block activations in the backward pass (large models)
    compile: bool = False  # torch.compile the transformer blocks (slow start; pays off on long GPU runs)
    step_in_backward: bool = False  # update each weight as soon as its gradient is ready (less memory; 1 process)

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.eval_every < 1 or self.eval_batches < 1:
            raise ValueError("epochs, batch_size, eval_every and eval_batches must be positive")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be positive, got {self.grad_accum}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.checkpoint_minutes < 0:
            raise ValueError(f"checkpoint_minutes must be >= 0, got {self.checkpoint_minutes}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup}")

    def loop_options(self) -> dict[str, Any]:
        """The lr schedule and the speed and memory knobs as keyword arguments of gptcore.train.train."""
        return {
            "lr_schedule": self.lr_schedule,
            "warmup": self.warmup,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "step_in_backward": self.step_in_backward,
        }


@dataclass
class PretrainParams(TrainConfig):
    """params.yaml `pretrain:` — Stage 1, training GPTModel from scratch on a small text."""

    model: GPTConfig = field(
        default_factory=lambda: GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False)
    )
    train_ratio: float = 0.9  # leading share of the text used for training, the rest validates
    stride: int | None = None  # window stride in tokens; None: the context length (no overlap)
    # Stage 1's random weights: pytorch (the modules' defaults, as the book's chapter 5) or gpt2 (see ScratchParams).
    init: typing.Literal["gpt2", "pytorch"] = "pytorch"
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 < self.train_ratio < 1.0:
            raise ValueError(f"train_ratio must be in (0, 1), got {self.train_ratio}")
        if self.stride is not None and self.stride < 1:
            raise ValueError(f"stride must be positive, got {self.stride}")


@dataclass
class SmsDownloadParams(DownloadParams):
    """params.yaml `download_sms:` — the UCI SMS Spam Collection zip and what its data file must hold."""

    backup_url: str | None = None  # tried when the main address fails (not with GPTCORE_MIRROR)
    expected_rows: int = 5574  # messages in SMSSpamCollection; another count is a DataError

    def __post_init__(self):
        super().__post_init__()
        if self.backup_url is not None and not self.backup_url.startswith(("http://", "https://")):
            raise ValueError(f"backup_url must be an http(s) address, got {self.backup_url!r}")
        if self.expected_rows < 1:
            raise ValueError(f"expected_rows must be positive, got {self.expected_rows}")


@dataclass
class PrepareSmsParams(Section):
    """params.yaml `prepare_sms:` — balancing and splitting, as the book's chapter 6 (defaults are its values)."""

    seed: int = 123  # pandas random_state of the ham subsample and of the shuffle
    train_frac: float = 0.7
    validation_frac: float = 0.1  # the test split is the rest

    def __post_init__(self):
        if not (0 < self.train_frac < 1 and 0 < self.validation_frac < 1 and self.train_frac + self.validation_frac < 1):
            raise ValueError("train_frac and validation_frac must be in (0, 1) and sum to less than 1")


@dataclass
class ClassifierParams(TrainConfig):
    """params.yaml `classifier:` — Stage 3, finetuning the foundation into a spam classifier (book ch. 6)."""

    epochs: int = 5
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 5
    # What trains: last_block (+ final LayerNorm + head, the book's choice), last_two_blocks, all, head.
    trainable: typing.Literal["last_block", "last_two_blocks", "all", "head"] = "last_block"
    # Which position's logits classify: the last one (a pad for short texts, as the book) or the last real token.
    token_position: typing.Literal["last", "last_non_pad"] = "last"
    # Warmup then cosine decay: training ends settled rather than on its last noisy steps.
    lr_schedule: typing.Literal["constant", "cosine"] = "cosine"
    warmup: float = 0.1


@dataclass
class ScratchParams(Section):
    """params.yaml `init_scratch:` — the `scratch` foundation: random weights of the Stage 1 architecture."""

    # gpt2: OpenAI's N(0, 0.02), as nanoGPT, litgpt and Hugging Face (a from-scratch classifier
    # generalises better from it); pytorch: the modules' defaults, as the book.
    init: typing.Literal["gpt2", "pytorch"] = "gpt2"


# The `precision` values (Lightning's names), defined here so that reading params needs no torch;
# gptcore.precision says what each one means for training and inference.
PRECISIONS = ("auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
# Values of earlier versions, whose meaning differed between training and generation.
RENAMED_PRECISIONS = {"bf16": "bf16-mixed or bf16-true", "fp16": "fp16-mixed"}


@dataclass
class RunConfig(Section):
    """Top-level params.yaml keys that every stage shares."""

    seed: int = 123
    device: str = "auto"  # auto, cpu, cuda, cuda:N, mps
    precision: str = "auto"  # one of PRECISIONS; what each means: gptcore/precision.py

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            hint = f" (renamed: use {RENAMED_PRECISIONS[self.precision]})" if self.precision in RENAMED_PRECISIONS else ""
            raise ValueError(f"precision: unknown value {self.precision!r}{hint}; expected one of {', '.join(PRECISIONS)}")


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


@dataclass
class PrepareInstructionsParams(Section):
    """params.yaml `prepare_instructions:` — the book's split of the instruction data (ch. 7)."""

    train_ratio: float = 0.85  # the first int(n * train_ratio) entries train
    test_ratio: float = 0.1  # the next int(n * test_ratio) test; the rest validates
    shuffle_seed: int | None = None  # None: split in file order, as the book; an int: shuffle first

    def __post_init__(self):
        if not (0 < self.train_ratio < 1 and 0 < self.test_ratio < 1 and self.train_ratio + self.test_ratio < 1):
            raise ValueError("train_ratio and test_ratio must be in (0, 1) and sum to less than 1")


@dataclass
class InstructionsParams(TrainConfig):
    """params.yaml `instructions:` — Stage 4, finetuning the foundation to follow instructions (book ch. 7)."""

    epochs: int = 2
    batch_size: int = 8
    lr: float = 5e-5
    weight_decay: float = 0.1
    eval_every: int = 5
    eval_batches: int = 5
    allowed_max_length: int = 1024  # tokens per training sequence; never more than the model's context
    mask_prompt: bool = False  # True: loss on the response tokens only (prompt targets ignored)
    bucket_by_length: bool = False  # True: batch examples of similar length together (less padding)

    def __post_init__(self):
        super().__post_init__()
        if self.allowed_max_length < 2:
            raise ValueError(f"allowed_max_length must be at least 2, got {self.allowed_max_length}")


@dataclass
class GenerateParams(Section):
    """params.yaml `generate:` — responses to the test instructions (greedy by default, as the book)."""

    max_new_tokens: int = 256
    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int | None = None  # sample only among the k most likely tokens (temperature > 0)
    seed: int = 123  # batch n of the schedule samples with seed + n (unused when greedy)
    batch_size: int = 8  # prompts generated together (left-padded); 1: one at a time

    def __post_init__(self):
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be positive")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be positive, got {self.top_k}")


FOUNDATIONS = (*OPENAI_SIZES, "pretrained", "scratch")


@dataclass
class Gpt2DownloadParams(Section):
    """params.yaml `download_gpt2:` — where OpenAI publishes its GPT-2 TensorFlow checkpoints."""

    base_url: str = "https://openaipublic.blob.core.windows.net/gpt-2/models"  # + /<size>/<file>

    def __post_init__(self):
        if not self.base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) address, got {self.base_url!r}")


def check_openai_models(foundation: object, openai_models: object) -> dict[str, str]:
    """Check params.yaml `openai_models` against `foundation`; return it as {name: OpenAI size}.

    DVC templating cannot derive one key from the other, so `openai_models` (the OpenAI checkpoints
    that download_gpt2/convert_gpt2 fetch and convert) must name exactly the OpenAI foundation in use,
    with its size, and be empty for `pretrained` and `scratch`.
    """
    if foundation not in FOUNDATIONS:
        raise ConfigError(f"params.yaml foundation: expected one of {', '.join(FOUNDATIONS)}, got {foundation!r}")
    if not isinstance(openai_models, dict):
        raise ConfigError(f"params.yaml openai_models: expected a mapping {{name: size}}, got {openai_models!r}")
    wanted = {foundation: OPENAI_SIZES[foundation]} if foundation in OPENAI_SIZES else {}
    if openai_models != wanted:
        raise ConfigError(
            f"params.yaml openai_models is {openai_models or '{}'} but foundation {foundation} needs "
            f"{wanted or '{}'}; change both together (README: switching the foundation)"
        )
    return wanted
