"""Typed configuration: the model architecture (GPTConfig) and one validated model of all of params.yaml.

`Params` is the root: every top-level key and one field per params.yaml section, each section a
pydantic model (`extra="forbid"`, strict types: no string for a number, no 1 for true) whose fields
carry their default, their constraints and a one-line doc. Every stage validates the whole file with
it before doing any work, so a typo anywhere stops every stage with one line naming the key path
(`params.yaml: classifier.lr: expected a number, got 'fast'`). pydantic is pure Python here: this
module imports no torch and stays cheap in every stage's import closure.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from gptcore.errors import ConfigError

# ---- errors: pydantic's report -> one line naming the key path ----

# What a value of each kind must be, in words, by pydantic error type.
_EXPECTED = {
    "float_type": "a number", "float_parsing": "a number", "int_type": "an integer", "int_parsing": "an integer",
    "int_from_float": "an integer", "bool_type": "true or false", "bool_parsing": "true or false",
    "string_type": "text", "dict_type": "a mapping", "model_type": "a mapping", "dataclass_type": "a mapping",
    "model_attributes_type": "a mapping", "finite_number": "a finite number", "none_required": "null",
}
_BOUNDS = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}


def _dotted(loc: tuple) -> str:
    return ".".join(str(part) for part in loc)


def _allowed_keys(model: Any, loc: tuple) -> list[str]:
    """The field names of the (nested) model or dataclass at loc, for did-you-mean hints."""
    for part in loc:
        fields = _fields_of(model)
        if part not in fields:
            return []
        model = _unwrap(fields[part])
    return list(_fields_of(model))


def _fields_of(model: Any) -> dict[str, Any]:
    if isinstance(model, type) and issubclass(model, BaseModel):
        return {name: f.annotation for name, f in model.model_fields.items()}
    if isinstance(model, type) and dataclasses.is_dataclass(model):
        hints = typing.get_type_hints(model, include_extras=False)
        return {f.name: hints[f.name] for f in dataclasses.fields(model) if f.init}
    return {}


def _unwrap(hint: Any) -> Any:
    """The model/dataclass/Literal inside an annotation (through Optional and Annotated)."""
    while typing.get_origin(hint) is Annotated:
        hint = typing.get_args(hint)[0]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) not in (None, Literal, dict, list) and len(args) == 1:
        return _unwrap(args[0])
    return hint


def _choices(model: Any, loc: tuple) -> tuple | None:
    hint = model
    for part in loc:
        hint = _unwrap(_fields_of(hint).get(part))
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else None


def describe_error(error: dict[str, Any], model: Any) -> str:
    """One pydantic error as `key.path: problem` in words a params.yaml editor acts on."""
    loc = tuple(p for p in error["loc"] if isinstance(p, (str, int)))
    kind, value, ctx = error["type"], error.get("input"), error.get("ctx") or {}
    where = _dotted(loc) or "(top level)"
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        allowed = _allowed_keys(model, loc[:-1])
        what = "section" if not loc[:-1] and isinstance(value, dict) else "key"
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else f"expected one of {', '.join(allowed)}"
        return f"{where}: unknown {what}; {hint}"
    if kind == "literal_error":
        choices = _choices(model, loc)
        listed = ", ".join(map(str, choices)) if choices else ctx.get("expected", "")
        return f"{where}: expected one of {listed}, got {value!r}"
    if kind in _BOUNDS:
        bound = next(iter(ctx.values()))
        return f"{where}: must be {_BOUNDS[kind]} {bound:g}, got {value!r}"
    if kind in ("value_error", "assertion_error"):
        message = str(ctx.get("error", error["msg"]))
        return f"{where}: {message}" if loc else message  # a whole-file rule names its keys itself
    if kind in _EXPECTED:
        hint = ""
        if kind.startswith("float") and isinstance(value, str) and _is_number(value):
            hint = " (YAML reads 5e-5 as text: write 5.0e-5)"
        return f"{where}: expected {_EXPECTED[kind]}, got {value!r}{hint}"
    return f"{where}: {error['msg'][:1].lower()}{error['msg'][1:]}, got {value!r}"


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def one_line_error(err: ValidationError, model: Any, where: str) -> ConfigError:
    """A ConfigError for the first problem pydantic found (and how many more there are)."""
    errors = err.errors(include_url=False)
    line = f"{where}: {describe_error(errors[0], model)}"
    if len(errors) > 1:
        line += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return ConfigError(" ".join(line.split()))


# ---- the model architecture ----


@dataclass
class GPTConfig:
    """Architecture of a GPT-2 style model; saved inside every weights file.

    A plain dataclass, so the library builds and copies it (`dataclasses.replace`) as any other;
    params.yaml (`pretrain.model`) and weights files validate it strictly with `from_dict`.
    """

    # pydantic's settings when a GPTConfig is validated from a mapping (params.yaml, a weights file).
    __pydantic_config__ = ConfigDict(extra="forbid", allow_inf_nan=False)

    vocab_size: StrictInt = 50257  # token ids
    context_length: StrictInt = 1024  # tokens the model attends over
    emb_dim: StrictInt = 768
    n_heads: StrictInt = 12
    n_layers: StrictInt = 12
    drop_rate: StrictFloat = 0.0  # dropout probability in [0, 1)
    qkv_bias: StrictBool = False
    # GPT-2 ties the output head to the token embedding; the book's pretraining keeps them separate.
    tie_embeddings: StrictBool = False
    # None: a language model head over the vocabulary; an int: a classifier head with that many classes.
    num_classes: StrictInt | None = None

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
    def from_dict(cls, data: dict[str, Any] | None, where: str = "GPTConfig") -> "GPTConfig":
        """Build from a mapping, strictly typed.

        Raises:
            ConfigError: one line `where: key: problem` for an unknown key, a wrong type or a bad value.
        """
        try:
            return _GPT_CONFIG.validate_python(dict(data or {}))
        except ValidationError as err:
            raise one_line_error(err, cls, where) from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "GPTConfig":
        """A preset by name (gpt2-small, gpt2-medium, gpt2-large, gpt2-xl), with optional overrides."""
        if name not in PRESETS:
            raise ConfigError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


_GPT_CONFIG = TypeAdapter(GPTConfig)

_GPT2 = dict(vocab_size=50257, context_length=1024, drop_rate=0.0, qkv_bias=True, tie_embeddings=True)
PRESETS: dict[str, dict[str, Any]] = {
    "gpt2-small": dict(_GPT2, emb_dim=768, n_layers=12, n_heads=12),  # 124M
    "gpt2-medium": dict(_GPT2, emb_dim=1024, n_layers=24, n_heads=16),  # 355M
    "gpt2-large": dict(_GPT2, emb_dim=1280, n_layers=36, n_heads=20),  # 774M
    "gpt2-xl": dict(_GPT2, emb_dim=1600, n_layers=48, n_heads=25),  # 1558M
}
# OpenAI publishes the checkpoints under folder names that count parameters.
OPENAI_SIZES = {"gpt2-small": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


# ---- params.yaml: one model per section, and the root ----


def _http_address(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) address, got {value!r}")
    return value


def is_device_name(value: str) -> bool:
    """Whether value names a device gptcore accepts: auto, cpu, cuda, cuda:N or mps (usable or not)."""
    name, _, index = value.partition(":")
    return value in ("auto", "cpu", "cuda", "mps") or (name == "cuda" and index.isdigit())


def _device_name(value: str) -> str:
    if not is_device_name(value):
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


Url = Annotated[str, AfterValidator(_http_address)]
Fraction = Annotated[float, Field(gt=0, lt=1)]  # strictly between 0 and 1

# The knobs every training stage shares; each stage's section sets its own defaults.
Epochs = Annotated[int, Field(ge=1, description="passes over the training split")]
BatchSize = Annotated[int, Field(ge=1, description="examples per optimizer step (the global batch under torchrun)")]
LearningRate = Annotated[float, Field(gt=0, description="AdamW's learning rate (the peak, with a schedule)")]
WeightDecay = Annotated[float, Field(ge=0, description="AdamW's decoupled weight decay")]
EvalEvery = Annotated[int, Field(ge=1, description="optimizer steps between evaluations")]
EvalBatches = Annotated[int, Field(ge=1, description="batches per evaluation (train and validation)")]
LrSchedule = Annotated[Literal["constant", "cosine"], Field(
    description="the lr over the run (gptcore/schedule.py): constant, or cosine decay to zero")]
Warmup = Annotated[float, Field(ge=0, lt=1, description="leading fraction of the steps with a linear lr warmup (0: none)")]
Init = Annotated[Literal["gpt2", "pytorch"], Field(
    description="random weights: gpt2 (OpenAI's N(0, 0.02), as nanoGPT/litgpt/HF) or pytorch (the modules' defaults, as the book)")]


class Section(BaseModel):
    """A params.yaml section: unknown keys and loosely typed values (text for a number, 1 for true) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None):
        """Validate a mapping into this section.

        Raises:
            ConfigError: one line `where: key.path: problem` (the first problem found).
        """
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as err:
            raise one_line_error(err, cls, where or cls.__name__) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the nested GPTConfig as a mapping): what progress fingerprints and metrics record."""
        return self.model_dump()


class DownloadParams(Section):
    """A download stage's section: where the file lives, and optionally its expected digest."""

    url: Url = Field(description="http(s) address of the file (served from GPTCORE_MIRROR by its name when set)")
    sha256: str | None = Field(None, description="expected hex digest, checked after the download; a mismatch deletes the file")


class CorpusDownloadParams(DownloadParams):
    """params.yaml `download_corpus:` — the pretraining text (the book's short story)."""

    url: Url = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
    sha256: str | None = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


class InstructionsDownloadParams(DownloadParams):
    """params.yaml `download_instructions:` — the book's 1,100 instruction entries."""

    url: Url = "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    sha256: str | None = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


class SmsDownloadParams(DownloadParams):
    """params.yaml `download_sms:` — the UCI SMS Spam Collection zip and what its data file must hold."""

    url: Url = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    sha256: str | None = None
    backup_url: Url | None = Field(
        "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
        description="tried when the main address fails (not with GPTCORE_MIRROR)")
    expected_rows: int = Field(5574, ge=1, description="messages in SMSSpamCollection; another count is a DataError")


class Gpt2DownloadParams(Section):
    """params.yaml `download_gpt2:` — where OpenAI publishes its GPT-2 TensorFlow checkpoints."""

    base_url: Url = Field("https://openaipublic.blob.core.windows.net/gpt-2/models", description="+ /<size>/<file>")


class TrainConfig(Section):
    """Optimisation knobs shared by every training stage."""

    epochs: Epochs = 10
    batch_size: BatchSize = 2
    lr: LearningRate = 4e-4
    weight_decay: WeightDecay = 0.1
    eval_every: EvalEvery = 5
    eval_batches: EvalBatches = 5
    progress_minutes: float = Field(10.0, ge=0, description="resumable progress is saved this often (and on SIGINT/SIGTERM)")
    lr_schedule: LrSchedule = "constant"
    warmup: Warmup = 0.0
    # Speed and memory only (the result is the same up to float rounding; batch_size stays the global batch):
    grad_accum: int = Field(1, ge=1, description="micro-batches each process cuts its share of a batch into (less activation memory)")
    activation_checkpointing: bool = Field(False, description="recompute block activations in the backward pass (large models)")
    compile: bool = Field(False, description="torch.compile the transformer blocks (slow start; pays off on long GPU runs)")
    step_in_backward: bool | Literal["auto"] = Field(
        "auto", description="update each weight as soon as its gradient is ready (less memory, the same update); "
        "auto: where it applies (1 process, grad_accum 1, no fp16-mixed)")
    recast_weights: bool | Literal["auto"] = Field(
        "auto", description="mixed precision: cast each weight again in backward instead of keeping its bf16/fp16 "
        "copy (2 bytes/parameter less, the same gradients, one more cast per step); auto: when the copies take >= 1 GiB")

    @model_validator(mode="before")
    @classmethod
    def _renamed_progress_minutes(cls, data: Any) -> Any:
        # "checkpoint" now names OpenAI's TensorFlow files only; resumable training state is "progress".
        if isinstance(data, dict) and "checkpoint_minutes" in data:
            raise ValueError("checkpoint_minutes: renamed to progress_minutes")
        return data

    def loop_options(self) -> dict[str, Any]:
        """The lr schedule and the speed and memory knobs as keyword arguments of gptcore.train.train."""
        return {
            "lr_schedule": self.lr_schedule,
            "warmup": self.warmup,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "step_in_backward": self.step_in_backward,
            "recast_weights": self.recast_weights,
        }


class PretrainParams(TrainConfig):
    """params.yaml `pretrain:` — Stage 1, training GPTModel from scratch on a small text."""

    model: GPTConfig = Field(
        default_factory=lambda: GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False),
        description="the Stage 1 architecture (also the `scratch` foundation's); keys left out take GPTConfig's defaults")
    train_ratio: Fraction = Field(0.9, description="leading share of the text used for training, the rest validates")
    stride: int | None = Field(None, ge=1, description="window stride in tokens; null: the context length (no overlap)")
    init: Init = "pytorch"
    sample_prompt: str = Field("Every effort moves you", description="the prompt of the sample continuation written after training")
    sample_tokens: int = Field(50, ge=0, description="tokens of that sample")


class ScratchParams(Section):
    """params.yaml `init_scratch:` — the `scratch` foundation: random weights of the Stage 1 architecture."""

    init: Init = "gpt2"  # a from-scratch classifier generalises better from gpt2's init


class PrepareSmsParams(Section):
    """params.yaml `prepare_sms:` — balancing and splitting, as the book's chapter 6 (defaults are its values)."""

    seed: int = Field(123, description="pandas random_state of the ham subsample and of the shuffle")
    train_frac: Fraction = 0.7
    validation_frac: Fraction = Field(0.1, description="the test split is the rest")

    @model_validator(mode="after")
    def _leave_a_test_split(self):
        if self.train_frac + self.validation_frac >= 1:
            raise ValueError("train_frac + validation_frac must be less than 1 (the test split is the rest)")
        return self


class ClassifierParams(TrainConfig):
    """params.yaml `classifier:` — Stage 3, finetuning the foundation into a spam classifier (book ch. 6)."""

    epochs: Epochs = 5
    batch_size: BatchSize = 8
    lr: LearningRate = 5e-5
    eval_every: EvalEvery = 50
    trainable: Literal["last_block", "last_two_blocks", "all", "head"] = Field(
        "last_block", description="what trains: last_block (+ final LayerNorm + head, the book's choice), last_two_blocks, all, head")
    token_position: Literal["last", "last_non_pad"] = Field(
        "last", description="whose logits classify: the last position (a pad for short texts, as the book) or the last real token")
    # Warmup then cosine decay: training ends settled rather than on its last noisy steps.
    lr_schedule: LrSchedule = "cosine"
    warmup: Warmup = 0.1


# The `precision` values (Lightning's names), declared here so that reading params needs no torch;
# gptcore.precision says what each one means for training and inference.
Precision = Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"]
PRECISIONS: tuple[str, ...] = typing.get_args(Precision)

Quantize = Literal["none", "int8"]  # decoding weights: as they are, or int8 as llama.cpp's q8_0 (gptcore/quantize.py)
QUANTIZE: tuple[str, ...] = typing.get_args(Quantize)
# Values of earlier versions, whose meaning differed between training and generation.
RENAMED_PRECISIONS = {"bf16": "bf16-mixed or bf16-true", "fp16": "fp16-mixed"}


def _renamed_precision(value: Any) -> Any:
    if isinstance(value, str) and value in RENAMED_PRECISIONS:
        raise ValueError(f"unknown value {value!r} (renamed: use {RENAMED_PRECISIONS[value]}); "
                         f"expected one of {', '.join(PRECISIONS)}")
    return value


class RunConfig(Section):
    """Top-level params.yaml keys that every stage shares."""

    seed: int = Field(123, description="seeds torch (and each rank's generator as seed + rank)")
    device: Annotated[str, AfterValidator(_device_name)] = Field(
        "auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps")
    precision: Annotated[Precision, BeforeValidator(_renamed_precision)] = Field(
        "auto", description="what each value means for training and inference: gptcore/precision.py")


class JudgeParams(Section):
    """params.yaml `judge:` — Stage 4b, scoring the instruction model's responses with an Ollama model."""

    url: Url = Field("http://localhost:11434", description="the Ollama server")
    model: str = Field("llama3.1:8b", min_length=1, description="the judge model, as `ollama pull` names it")
    seed: int = Field(123, description="sent with every request, as in the reference evaluation")
    temperature: float = Field(0.0, ge=0, description="the judge's sampling temperature (0: greedy)")
    num_ctx: int = Field(2048, ge=1, description="the judge's context in tokens; longer prompts would be cut silently by Ollama")
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one reply before retrying")
    retries: int = Field(5, ge=0, description="retries of a request after a transient fault (connection, 5xx, timeout)")
    backoff: float = Field(1.0, ge=0, description="seconds before the first retry, doubled after each")
    structured: bool = Field(False, description="ask for {\"score\": n} through Ollama's `format` JSON schema")


class PrepareInstructionsParams(Section):
    """params.yaml `prepare_instructions:` — the book's split of the instruction data (ch. 7)."""

    train_ratio: Fraction = Field(0.85, description="the first int(n * train_ratio) entries train")
    test_ratio: Fraction = Field(0.1, description="the next int(n * test_ratio) test; the rest validates")
    shuffle_seed: int | None = Field(None, description="null: split in file order, as the book; an int: shuffle with it first")

    @model_validator(mode="after")
    def _leave_a_validation_split(self):
        if self.train_ratio + self.test_ratio >= 1:
            raise ValueError("train_ratio + test_ratio must be less than 1 (the validation split is the rest)")
        return self


class InstructionsParams(TrainConfig):
    """params.yaml `instructions:` — Stage 4, finetuning the foundation to follow instructions (book ch. 7)."""

    epochs: Epochs = 2
    batch_size: BatchSize = 8
    lr: LearningRate = 5e-5
    allowed_max_length: int = Field(1024, ge=2, description="tokens per training sequence; never more than the model's context")
    mask_prompt: bool = Field(False, description="true: loss on the response tokens only (prompt targets ignored)")
    bucket_by_length: bool = Field(False, description="true: batch examples of similar length together (less padding)")


class GenerateParams(Section):
    """params.yaml `generate:` — responses to the test instructions (greedy by default, as the book)."""

    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per response")
    temperature: float = Field(0.0, ge=0, description="0: greedy (argmax)")
    top_k: int | None = Field(None, ge=1, description="sample only among the k most likely tokens (temperature > 0)")
    seed: int = Field(123, description="batch n of the schedule samples with seed + n (unused when greedy)")
    batch_size: int = Field(8, ge=1, description="prompts generated together (left-padded); 1: one at a time")
    quantize: Quantize = Field("none", description="int8: int8 weights, activations rounded per 32 as llama.cpp's q8_0 (CPU; gptcore/quantize.py)")


Foundation = Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "pretrained", "scratch"]
FOUNDATIONS: tuple[str, ...] = typing.get_args(Foundation)


ExportFormat = Literal["gguf", "hf"]


class ExportParams(Section):
    """params.yaml `export:` — the instruction model written for other runtimes (docs/export.md)."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["gguf", "hf"], min_length=1,
        description="gguf: GGUF + Ollama Modelfile (llama.cpp, Ollama); hf: a Hugging Face transformers folder")
    dtype: Literal["f32", "f16", "q8_0"] = Field(
        "f16", description="GGUF weights: f32 (exact), f16 (half the size), q8_0 (a quarter); agreement in docs/export.md")

    @model_validator(mode="after")
    def _once_each(self):
        if len(set(self.formats)) != len(self.formats):
            raise ValueError("formats: list each of gguf, hf at most once")
        return self


class Params(RunConfig):
    """The whole of params.yaml: the top-level keys and one field per section.

    Extension point: a new params.yaml section is one more field here, typed by a Section subclass
    defined in this module (so that validating params stays torch-free and in every stage's closure).
    """

    foundation: Foundation = Field(
        "gpt2-large", description="the weights the finetuning stages start from: an OpenAI GPT-2, pretrained (Stage 1) or scratch")
    download_gpt2: Gpt2DownloadParams = Field(default_factory=Gpt2DownloadParams)
    download_corpus: CorpusDownloadParams = Field(default_factory=CorpusDownloadParams)
    pretrain: PretrainParams = Field(default_factory=PretrainParams)
    init_scratch: ScratchParams = Field(default_factory=ScratchParams)
    download_sms: SmsDownloadParams = Field(default_factory=SmsDownloadParams)
    prepare_sms: PrepareSmsParams = Field(default_factory=PrepareSmsParams)
    classifier: ClassifierParams = Field(default_factory=ClassifierParams)
    download_instructions: InstructionsDownloadParams = Field(default_factory=InstructionsDownloadParams)
    prepare_instructions: PrepareInstructionsParams = Field(default_factory=PrepareInstructionsParams)
    instructions: InstructionsParams = Field(default_factory=InstructionsParams)
    generate: GenerateParams = Field(default_factory=GenerateParams)
    judge: JudgeParams = Field(default_factory=JudgeParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @model_validator(mode="before")
    @classmethod
    def _no_openai_models(cls, data: Any) -> Any:
        # Before the `foundation` stage, params.yaml listed the OpenAI checkpoint to fetch beside `foundation`.
        if isinstance(data, dict) and "openai_models" in data:
            raise ValueError("openai_models: no longer used: the foundation stage follows `foundation` alone; "
                             "delete this key")
        return data

    @property
    def run(self) -> RunConfig:
        """The top-level keys every stage shares (seed, device, precision)."""
        return RunConfig(seed=self.seed, device=self.device, precision=self.precision)
