"""The `lora:` section of the finetuning stages (classifier, instructions): adapters on the frozen foundation."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

LoraTarget = Literal["qkv", "out_proj", "fc", "proj", "out_head"]


class LoraParams(BaseModel):
    """A `lora:` section: low-rank adapters W x + (alpha / rank) B A x on the frozen foundation's Linear
    layers (gptcore/training/lora.py; Hu et al. 2021, the book's appendix E)."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # as every Section's

    rank: int = Field(16, ge=1, description="r, the inner dimension of B A")
    alpha: float = Field(16.0, gt=0, description="the update is scaled by alpha / rank")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the adapters' input (0: none)")
    targets: list[LoraTarget] = Field(
        default_factory=lambda: ["qkv", "out_proj", "fc", "proj"],
        min_length=1,
        description="the Linear layers adapted in every block (qkv, out_proj, fc, proj), and out_head for an "
        "untied language-model head (GPT-2's is tied to the token embedding; a classifier's new head trains whole)",
    )

    @model_validator(mode="after")
    def _once_each(self):
        if len(set(self.targets)) != len(self.targets):
            raise ValueError("targets: list each layer at most once")
        return self
