"""gptcore: GPT-2 from scratch in PyTorch, as a library behind a reproducible DVC pipeline.

The public names below are imported on first use (PEP 562), so that `import gptcore.<module>` loads
only that module and what it imports: a stage script's import closure, and with it the code its DVC
stage depends on, stays what the stage uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "GPTConfig": "gptcore.config",
    "GPTModel": "gptcore.model",
    "LLM": "gptcore.llm",
    "generate": "gptcore.inference.decoding",
    "get_tokenizer": "gptcore.tokenizer",
    "load_model": "gptcore.weights",
    "save_model": "gptcore.weights",
}
__all__ = ["GPTConfig", "GPTModel", "LLM", "generate", "get_tokenizer", "load_model", "save_model"]  # = _EXPORTS

if TYPE_CHECKING:  # for type checkers and IDEs only; nothing is imported at run time
    from gptcore.config import GPTConfig
    from gptcore.inference.decoding import generate
    from gptcore.llm import LLM
    from gptcore.model import GPTModel
    from gptcore.tokenizer import get_tokenizer
    from gptcore.weights import load_model, save_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'gptcore' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    """The documented API only (not the helpers this module imports), each name once."""
    return sorted({*__all__, "__version__"})
