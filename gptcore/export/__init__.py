"""Exports of a gptcore weights file for other runtimes: GGUF + Ollama Modelfile (gguf.py), Hugging Face (hf.py)."""
