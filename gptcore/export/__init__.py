"""Exports of a gptcore weights file for other runtimes: GGUF + Ollama Modelfile (gguf.py), Hugging Face
(hf.py), and the Alpaca prompt as their chat templates (templates.py)."""
