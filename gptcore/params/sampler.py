"""The sampler's options beyond temperature and top-k as params fields (gptcore.inference.sampling: their
meaning and order), shared by the sections that sample: params.yaml `generate:`. Neutral defaults: off."""

from __future__ import annotations

from pydantic import BaseModel, Field


class SamplerFields(BaseModel):
    """Fields only: the section that inherits them brings its own model_config (strict, extra="forbid")."""

    top_p: float = Field(1.0, ge=0, le=1, description="nucleus: the most likely tokens up to this mass; 1: off")
    min_p: float = Field(0.0, ge=0, le=1, description="tokens at least this fraction as likely as the best; 0: off")
    typical_p: float = Field(1.0, ge=0, le=1, description="locally typical sampling mass; 1: off")
    repeat_penalty: float = Field(
        1.0, gt=0, description="logits of tokens in the last repeat_last_n divided by it; 1: off"
    )
    repeat_last_n: int = Field(64, ge=-1, description="tokens the penalties look back on (prompt included); -1: all")
    presence_penalty: float = Field(0.0, description="subtracted from the logit of every token seen in that window")
    frequency_penalty: float = Field(0.0, description="times its count, subtracted from every seen token's logit")
