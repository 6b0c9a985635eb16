"""Exports of a gptcore weights file for other runtimes: GGUF + Ollama Modelfile (gguf.py), Hugging Face
(hf.py), and the Alpaca prompt as their chat templates (templates.py).

ExportParams lives here rather than in gptcore/config.py so that adding the export stage leaves
config.py, a dependency of every training stage, unchanged (DVC would otherwise rerun them).
"""

from __future__ import annotations

import typing
from dataclasses import dataclass, field

from gptcore.config import Section

FORMATS = ("gguf", "hf")


@dataclass
class ExportParams(Section):
    """params.yaml `export:` — the instruction model written for other runtimes (docs/export.md)."""

    # gguf: GGUF + Ollama Modelfile (llama.cpp, Ollama); hf: a Hugging Face transformers folder
    formats: list[str] = field(default_factory=lambda: list(FORMATS))
    # GGUF weights: f32 (exact), f16 (half the size), q8_0 (a quarter); agreement with gptcore in docs/export.md
    dtype: typing.Literal["f32", "f16", "q8_0"] = "f16"

    def __post_init__(self):
        unknown = [f for f in self.formats if f not in FORMATS]
        if unknown or not self.formats or len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats must list some of {', '.join(FORMATS)} once each, got {self.formats}")
