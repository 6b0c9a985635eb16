"""Exports of a gptcore weights file for other runtimes: GGUF + Ollama Modelfile (gguf.py), Hugging Face
(hf.py), and the Alpaca prompt as their chat templates (templates.py).

ExportParams (params.yaml `export:`) is part of the one params model in gptcore/params/schema.py.
"""

from __future__ import annotations

import typing

from gptcore.params.schema import ExportFormat, ExportParams

FORMATS = typing.get_args(ExportFormat)
__all__ = ["ExportParams", "FORMATS"]
