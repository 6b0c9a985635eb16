"""The building blocks of params.yaml's sections: `Section` (strict, one-line errors), the knobs that
every training stage shares (`TrainConfig`), a download's (`DownloadParams`) and the annotated field
types (a `lora:` section is gptcore/params/lora.py's `LoraParams`). `gptcore.params.schema` assembles the sections into
`Params` and re-exports these names. Pure Python, like the schema: no torch.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, model_validator

from gptcore.params.errors import validation_error


def _http_address(value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"expected an http(s) address, got {value!r}")
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
LrSchedule = Annotated[
    Literal["constant", "cosine"],
    Field(description="the lr over the run (gptcore/training/schedule.py): constant, or cosine decay to zero"),
]
Warmup = Annotated[
    float, Field(ge=0, lt=1, description="leading fraction of the steps with a linear lr warmup (0: none)")
]
Init = Annotated[
    Literal["gpt2", "pytorch"],
    Field(
        description="random weights: gpt2 (OpenAI's N(0, 0.02), as nanoGPT/litgpt/HF) or pytorch (the modules' defaults, as the book)"
    ),
]


class Section(BaseModel):
    """A params.yaml section: unknown keys and loosely typed values (text for a number, 1 for true) are errors."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, where: str | None = None):
        """Validate a mapping into this section.

        Raises:
            ConfigError: `where: key.path: problem`, one line per problem when there are several
                (ConfigProblems), so all of them are fixed in one go.
        """
        try:
            return cls.model_validate(dict(data or {}))
        except ValidationError as err:
            raise validation_error(err, cls, where or cls.__name__) from None

    def to_dict(self) -> dict[str, Any]:
        """Plain values (the nested GPTConfig as a mapping): what progress fingerprints and metrics record."""
        return self.model_dump()


class DownloadParams(Section):
    """A download stage's section: where the file lives, and optionally its expected digest."""

    url: Url = Field(description="http(s) address of the file (served from GPTCORE_MIRROR by its name when set)")
    sha256: str | None = Field(
        None, description="expected hex digest, checked after the download; a mismatch deletes the file"
    )


class TrainConfig(Section):
    """Optimisation knobs shared by every training stage."""

    epochs: Epochs = 10
    batch_size: BatchSize = 2
    lr: LearningRate = 4e-4
    weight_decay: WeightDecay = 0.1
    eval_every: EvalEvery = 5
    eval_batches: EvalBatches = 5
    progress_minutes: float = Field(
        10.0, ge=0, description="resumable progress is saved this often (and on SIGINT/SIGTERM)"
    )
    lr_schedule: LrSchedule = "constant"
    warmup: Warmup = 0.0
    max_grad_norm: float | None = Field(
        1.0,
        gt=0,
        description="clip the global L2 norm of each step's gradients to this (nanoGPT's and the book's 1.0; "
        "gptcore/training/clipping.py); null: no clipping. Turns step_in_backward auto off",
    )
    # Speed and memory only (the result is the same up to float rounding; batch_size stays the global batch):
    grad_accum: int = Field(
        1, ge=1, description="micro-batches each process cuts its share of a batch into (less activation memory)"
    )
    activation_checkpointing: bool = Field(
        False, description="recompute block activations in the backward pass (large models)"
    )
    compile: bool = Field(
        False, description="torch.compile the transformer blocks (slow start; pays off on long GPU runs)"
    )
    step_in_backward: bool | Literal["auto"] = Field(
        "auto",
        description="update each weight as soon as its gradient is ready (less memory, the same update); "
        "auto: where it applies (1 process, grad_accum 1, no fp16-mixed, max_grad_norm null)",
    )
    recast_weights: bool | Literal["auto"] = Field(
        "auto",
        description="mixed precision: cast each weight again in backward instead of keeping its bf16/fp16 "
        "copy (2 bytes/parameter less, the same gradients, one more cast per step); auto: when the copies take >= 1 GiB",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_progress_minutes(cls, data: Any) -> Any:
        # "checkpoint" now names OpenAI's TensorFlow files only; resumable training state is "progress".
        if isinstance(data, dict) and "checkpoint_minutes" in data:
            raise ValueError("checkpoint_minutes: renamed to progress_minutes")
        return data

    @model_validator(mode="after")
    def _clipping_needs_whole_gradients(self):
        if self.step_in_backward is True and self.max_grad_norm is not None:
            raise ValueError(
                "step_in_backward: true cannot clip gradients (the global norm needs every gradient before any "
                "update); set max_grad_norm: null, or step_in_backward: auto (off while clipping)"
            )
        return self

    def loop_options(self) -> dict[str, Any]:
        """The lr schedule and the speed and memory knobs as keyword arguments of gptcore.training.loop.train."""
        return {
            "lr_schedule": self.lr_schedule,
            "warmup": self.warmup,
            "grad_accum": self.grad_accum,
            "activation_checkpointing": self.activation_checkpointing,
            "compile": self.compile,
            "step_in_backward": self.step_in_backward,
            "recast_weights": self.recast_weights,
            "max_grad_norm": self.max_grad_norm,
        }
