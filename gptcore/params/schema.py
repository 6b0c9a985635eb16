"""One validated model of all of params.yaml.

`Params` is the root: every top-level key and one field per params.yaml section, each section a
pydantic model (`extra="forbid"`, strict types: no string for a number, no 1 for true) whose fields
carry their default, their constraints and a one-line doc. Every stage validates the whole file with
it before doing any work, so a typo anywhere stops every stage with one line naming the key path
(`params.yaml: classifier.lr: expected a number, got 'fast'`). pydantic is pure Python here: this
module imports no torch and stays cheap in every stage's import closure.
"""

from __future__ import annotations

import typing
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.params.choices import PRECISIONS, RENAMED_PRECISIONS, Precision, Quantize, Strategy, is_device_name
from gptcore.params.lora import LoraParams
from gptcore.params.sampler import SamplerFields
from gptcore.params.section import (
    BatchSize,
    DownloadParams,
    Epochs,
    EvalBatches,
    EvalEvery,
    Fraction,
    Init,
    LearningRate,
    LrSchedule,
    Section,
    TrainConfig,
    Url,
    Warmup,
    WeightDecay,
)

__all__ = [  # the building blocks, re-exported: `from gptcore.params.schema import TrainConfig` keeps working
    "BatchSize",
    "DownloadParams",
    "Epochs",
    "EvalBatches",
    "EvalEvery",
    "Fraction",
    "Init",
    "LearningRate",
    "LrSchedule",
    "Section",
    "TrainConfig",
    "Url",
    "Warmup",
    "WeightDecay",
]


def _device_name(value: str) -> str:
    if not is_device_name(value):
        raise ValueError(f"expected auto, cpu, cuda, cuda:N or mps, got {value!r}")
    return value


def _launcher(value: str) -> str:
    words = value.split()
    if not words or words[0] not in ("python", "python3", "torchrun") or "\n" in value:
        raise ValueError(f"expected python or torchrun [options] (one line), got {value!r}")
    return value


def _gpt_config(value: Any) -> Any:
    """A mapping validated by GPTConfig's own strict rules (gptcore/config.py), its problem as a ValueError."""
    if not isinstance(value, dict):
        return value  # a GPTConfig passes; anything else is pydantic's "expected a mapping"
    try:
        return GPTConfig.from_dict(value, where="")
    except ConfigError as err:
        raise ValueError(str(err).removeprefix(": ")) from None


class CorpusDownloadParams(DownloadParams):
    """params.yaml `download_corpus:` — the pretraining text (the book's short story)."""

    url: Url = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch02/01_main-chapter-code/the-verdict.txt"
    )
    sha256: str | None = "b41e41a68f0398a3154ae69e2e4c0e2694e17fe0d66730536837f1b01935b31f"


class InstructionsDownloadParams(DownloadParams):
    """params.yaml `download_instructions:` — the book's 1,100 instruction entries."""

    url: Url = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/01_main-chapter-code/instruction-data.json"
    )
    sha256: str | None = "7e09a9af353722ca15c18bc580f093f9c39d3178335a75177319cb1e1d163944"


class SmsDownloadParams(DownloadParams):
    """params.yaml `download_sms:` — the UCI SMS Spam Collection zip and what its data file must hold."""

    url: Url = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"
    sha256: str | None = None
    backup_url: Url | None = Field(
        "https://f001.backblazeb2.com/file/LLMs-from-scratch/sms%2Bspam%2Bcollection.zip",
        description="tried when the main address fails (not with GPTCORE_MIRROR)",
    )
    expected_rows: int = Field(5574, ge=1, description="messages in SMSSpamCollection; another count is a DataError")


class Gpt2DownloadParams(Section):
    """params.yaml `download_gpt2:` — where OpenAI publishes its GPT-2 TensorFlow checkpoints."""

    base_url: Url = Field("https://openaipublic.blob.core.windows.net/gpt-2/models", description="+ /<size>/<file>")


class PretrainParams(TrainConfig):
    """params.yaml `pretrain:` — Stage 1, training GPTModel from scratch on a small text."""

    model: Annotated[GPTConfig, BeforeValidator(_gpt_config)] = Field(
        default_factory=lambda: GPTConfig(context_length=256, drop_rate=0.1, qkv_bias=False),
        description="the Stage 1 architecture (also the `scratch` foundation's); keys left out take GPTConfig's defaults",
    )
    train_ratio: Fraction = Field(0.9, description="leading share of the text used for training, the rest validates")
    stride: int | None = Field(None, ge=1, description="window stride in tokens; null: the context length (no overlap)")
    init: Init = "pytorch"
    sample_prompt: str = Field(
        "Every effort moves you", description="the prompt of the sample continuation written after training"
    )
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
    trainable: Literal["last_block", "last_two_blocks", "all", "head", "lora"] = Field(
        "last_block",
        description="what trains: last_block (+ final LayerNorm + head, the book's choice), last_two_blocks, all, "
        "head, or lora (adapters from `lora:` + the head)",
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="the adapters of trainable: lora")

    @model_validator(mode="after")
    def _head_trains_whole(self):
        if "out_head" in self.lora.targets:
            raise ValueError("lora.targets: out_head: a classifier's new head trains whole; list block layers only")
        return self

    token_position: Literal["last", "last_non_pad"] = Field(
        "last",
        description="whose logits classify: the last position (a pad for short texts, as the book) or the last real token",
    )
    # Warmup then cosine decay: training ends settled rather than on its last noisy steps.
    lr_schedule: LrSchedule = "cosine"
    warmup: Warmup = 0.1


def _renamed_precision(value: Any) -> Any:
    if isinstance(value, str) and value in RENAMED_PRECISIONS:
        raise ValueError(
            f"unknown value {value!r} (renamed: use {RENAMED_PRECISIONS[value]}); "
            f"expected one of {', '.join(PRECISIONS)}"
        )
    return value


class RunConfig(Section):
    """Top-level params.yaml keys that every stage shares."""

    seed: int = Field(123, description="seeds torch (and each rank's generator as seed + rank)")
    device: Annotated[str, AfterValidator(_device_name)] = Field(
        "auto", description="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps"
    )
    precision: Annotated[Precision, BeforeValidator(_renamed_precision)] = Field(
        "auto", description="what each value means for training and inference: gptcore/precision.py"
    )
    strategy: Strategy = Field(
        "auto",
        description="how torchrun's processes share training: auto (DDP under torchrun), ddp, fsdp (FSDP2 "
        "sharding of weights, gradients and AdamW state; gptcore/training/sharding.py)",
    )


class JudgeParams(Section):
    """params.yaml `judge:` — Stage 4b, scoring the instruction model's responses with an Ollama model."""

    url: Url = Field("http://localhost:11434", description="the Ollama server")
    model: str = Field("llama3.1:8b", min_length=1, description="the judge model, as `ollama pull` names it")
    seed: int = Field(123, description="sent with every request, as in the reference evaluation")
    temperature: float = Field(0.0, ge=0, description="the judge's sampling temperature (0: greedy)")
    num_ctx: int = Field(
        2048, ge=1, description="the judge's context in tokens; longer prompts would be cut silently by Ollama"
    )
    timeout: float = Field(120.0, gt=0, description="seconds to wait for one reply before retrying")
    retries: int = Field(5, ge=0, description="retries of a request after a transient fault (connection, 5xx, timeout)")
    backoff: float = Field(1.0, ge=0, description="seconds before the first retry, doubled after each")
    structured: bool = Field(False, description='ask for {"score": n} through Ollama\'s `format` JSON schema')


class PrepareInstructionsParams(Section):
    """params.yaml `prepare_instructions:` — the book's split of the instruction data (ch. 7)."""

    train_ratio: Fraction = Field(0.85, description="the first int(n * train_ratio) entries train")
    test_ratio: Fraction = Field(0.1, description="the next int(n * test_ratio) test; the rest validates")
    shuffle_seed: int | None = Field(
        None, description="null: split in file order, as the book; an int: shuffle with it first"
    )

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
    allowed_max_length: int = Field(
        1024, ge=2, description="tokens per training sequence; never more than the model's context"
    )
    mask_prompt: bool = Field(False, description="true: loss on the response tokens only (prompt targets ignored)")
    bucket_by_length: bool = Field(False, description="true: batch examples of similar length together (less padding)")
    method: Literal["full", "lora"] = Field(
        "full", description="full: every weight trains; lora: the frozen foundation gains adapters from `lora:`"
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="the adapters of method: lora")


class GenerateParams(Section, SamplerFields):
    """params.yaml `generate:` — responses to the test instructions (greedy by default; sampler: params.sampler)."""

    max_new_tokens: int = Field(256, ge=1, description="tokens generated at most per response")
    temperature: float = Field(0.0, ge=0, description="0: greedy (argmax)")
    top_k: int | None = Field(None, ge=1, description="sample only among the k most likely tokens (temperature > 0)")
    seed: int = Field(123, description="batch n of the schedule samples with seed + n (unused when greedy)")
    batch_size: int = Field(8, ge=1, description="prompts generated together (left-padded); 1: one at a time")
    quantize: Quantize = Field(
        "none",
        description="int8: int8 weights, activations rounded per 32 as llama.cpp's q8_0 (CPU; gptcore/inference/quantize.py)",
    )


class PreferencesDownloadParams(DownloadParams):
    """params.yaml `download_preferences:` — the book's 1,100 entries with `chosen` and `rejected` responses."""

    url: Url = (
        "https://raw.githubusercontent.com/rasbt/LLMs-from-scratch/main/ch07/04_preference-tuning-with-dpo/"
        "instruction-data-with-preference.json"
    )
    sha256: str | None = "305315abf14f65fa42c01a0877572f832606571c2a7d49f152ac1d758b16756e"


class PreferencesParams(TrainConfig):
    """params.yaml `preferences:` — DPO from the Stage 4 model on chosen/rejected pairs (the book's ch. 7 bonus).

    The split is `prepare_instructions`' (935 / 110 / 55); the reference log-probabilities are computed
    once by `prepare_preferences` (with `allowed_max_length` and `batch_size` from here).
    """

    epochs: Epochs = 1
    batch_size: BatchSize = 8
    lr: LearningRate = 5e-6
    weight_decay: WeightDecay = 0.01  # the book's AdamW(weight_decay=0.01) for DPO
    beta: float = Field(0.1, gt=0, description="DPO's beta: how far from the reference the policy may move")
    nll_weight: float = Field(
        0.0, ge=0, description="weight of the chosen responses' NLL added to the loss (TRL's rpo_alpha; 0: plain DPO)"
    )
    logprob: Literal["mean", "sum"] = Field(
        "mean",
        description="a response's log-probability: mean over its tokens (the book) or their sum (the paper, TRL)",
    )
    allowed_max_length: int = Field(
        1024, ge=2, description="tokens per sequence (prompt + response); never more than the model's context"
    )
    method: Literal["full", "lora"] = Field(
        "full", description="full: every weight trains; lora: the frozen Stage 4 model gains adapters from `lora:`"
    )
    lora: LoraParams = Field(default_factory=LoraParams, description="the adapters of method: lora")


class PairwiseJudgeParams(Section):
    """params.yaml `judge_pairwise:` — Stage 4 against the preference-tuned model, judged in both orders.

    The server, judge model and request options are `judge:`'s.
    """

    criterion: Literal["helpfulness", "politeness"] = Field(
        "helpfulness",
        description="what the judge compares: helpfulness, or politeness (what the preference data teaches)",
    )


Foundation = Literal["gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl", "pretrained", "scratch"]
FOUNDATIONS: tuple[str, ...] = typing.get_args(Foundation)


ExportFormat = Literal["gguf", "hf"]


class ExportParams(Section):
    """params.yaml `export:` — the instruction model written for other runtimes (docs/export.md)."""

    formats: list[ExportFormat] = Field(
        default_factory=lambda: ["gguf", "hf"],
        min_length=1,
        description="gguf: GGUF + Ollama Modelfile (llama.cpp, Ollama); hf: a Hugging Face transformers folder",
    )
    dtype: Literal["f32", "f16", "bf16", "q8_0"] = Field(
        "f16",
        description="GGUF weights: f32 (exact), f16 or bf16 (half the size), q8_0 (a quarter); agreement in docs/export.md",
    )

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

    launcher: Annotated[str, AfterValidator(_launcher)] = Field(
        "python",
        description="the command dvc.yaml runs the training stages with: python, or torchrun and its options "
        "(torchrun --standalone --nproc-per-node N); read by DVC, not by the stages",
    )
    foundation: Foundation = Field(
        "gpt2-large",
        description="the weights the finetuning stages start from: an OpenAI GPT-2, pretrained (Stage 1) or scratch",
    )
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
    download_preferences: PreferencesDownloadParams = Field(default_factory=PreferencesDownloadParams)
    preferences: PreferencesParams = Field(default_factory=PreferencesParams)
    judge_pairwise: PairwiseJudgeParams = Field(default_factory=PairwiseJudgeParams)
    export: ExportParams = Field(default_factory=ExportParams)

    @model_validator(mode="before")
    @classmethod
    def _no_openai_models(cls, data: Any) -> Any:
        # Before the `foundation` stage, params.yaml listed the OpenAI checkpoint to fetch beside `foundation`.
        if isinstance(data, dict) and "openai_models" in data:
            raise ValueError(
                "openai_models: no longer used: the foundation stage follows `foundation` alone; delete this key"
            )
        return data

    @property
    def run(self) -> RunConfig:
        """The top-level keys every stage shares (seed, device, precision, strategy)."""
        return RunConfig(seed=self.seed, device=self.device, precision=self.precision, strategy=self.strategy)
