"""Converters into gptcore's weights file: OpenAI's TensorFlow checkpoints and Hugging Face GPT-2 folders."""
