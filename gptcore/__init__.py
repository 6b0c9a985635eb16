"""gptcore: GPT-2 from scratch in PyTorch, as a library behind a reproducible DVC pipeline."""

from gptcore.config import GPTConfig
from gptcore.generate import generate
from gptcore.model import GPTModel
from gptcore.tokenizer import get_tokenizer
from gptcore.weights import load_model, save_model

__all__ = ["GPTConfig", "GPTModel", "generate", "get_tokenizer", "load_model", "save_model"]
__version__ = "0.1.0"
