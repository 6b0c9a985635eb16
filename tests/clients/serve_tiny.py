"""`gptcore serve` on a tiny random-weight GPT-2 (real vocabulary, 128-token context), for the client checks.

    python tests/clients/serve_tiny.py [--port 0] [--name tiny]

Writes the weights to a temporary folder and serves them exactly as `gptcore serve --model FILE` does; the
startup line it logs on stderr names the URL. Replies are gibberish; the protocol is what the checks verify. Needs
gptcore (torch) and the tokenizer files (GPTCORE_MIRROR or the cache).
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
from pathlib import Path

import torch

from gptcore.cli import main as cli_main
from gptcore.config import GPTConfig
from gptcore.model import GPTModel
from gptcore.weights import save_model

CONFIG = GPTConfig(vocab_size=50257, context_length=128, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True)


def write_tiny_model(path: Path) -> Path:
    """Seeded random weights of CONFIG, saved as a gptcore weights file."""
    torch.manual_seed(123)
    save_model(GPTModel(CONFIG), path)
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", default="0")
    parser.add_argument("--name", default="tiny")
    args = parser.parse_args(argv)
    # uvicorn re-raises the SIGTERM it shut down on: exit through Python so that the folder is removed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with tempfile.TemporaryDirectory(prefix="gptcore-clients-") as folder:
        path = write_tiny_model(Path(folder) / "tiny.safetensors")
        return cli_main(["serve", "--model", str(path), "--port", args.port, "--name", args.name, "--device", "cpu"])


if __name__ == "__main__":
    raise SystemExit(main())
