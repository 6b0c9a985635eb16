"""A gptcore weights file as OpenAI's TensorFlow checkpoint, converted back by `gptcore convert`.

    python benchmarks/tf_foundation.py models/pretrained/model.safetensors /tmp/tf-stage1/model.safetensors

The stand-in for an OpenAI checkpoint where OpenAI's cannot be fetched, with trained weights (a checkpoint
of random ones, as benchmarks/convert_memory.py writes, says nothing about finetuning): the weights are
exported to Hugging Face's GPT2LMHeadModel (`gptcore export --format hf`), renamed to OpenAI's variables
(tests/tf_checkpoints.py: [1, nx, nf] conv weights, `model/h{i}/...`), saved by TensorFlow's
tf.compat.v1 Saver with GPT-2's encoder.json and vocab.bpe from the mirror, and converted with
`gptcore convert CKPT OUT`: the path an OpenAI download takes. OpenAI's layout always holds the qkv bias,
so a model trained with `qkv_bias: false` comes back with a zero one; it has no output head of its own
(GPT-2 ties it to the token embedding), so an untied model's `out_head.weight` does not come back: a
classifier replaces the head anyway. Prints one JSON line: the output, how many tensors equal the
source's exactly (every shared one must), the zero tensors added and the source's tensors left out.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("weights", help="a gptcore language-model weights file (.safetensors)")
    parser.add_argument("out", help="the converted weights file to write")
    parser.add_argument("--vocab-dir", default=os.path.join(os.environ.get("GPTCORE_MIRROR", ""), "gpt2"))
    args = parser.parse_args()
    import torch
    from safetensors.torch import load_file
    from transformers import GPT2LMHeadModel

    from tests.tf_checkpoints import openai_arrays, write_checkpoint

    gptcore = [sys.executable, "-m", "gptcore"]
    with tempfile.TemporaryDirectory(prefix="gptcore-tf-foundation-") as work:
        hf_dir, ckpt = Path(work) / "hf", Path(work) / "ckpt"
        subprocess.run([*gptcore, "export", "--format", "hf", args.weights, str(hf_dir)], check=True)
        model = GPT2LMHeadModel.from_pretrained(hf_dir, torch_dtype=torch.float32)
        c = model.config
        hparams = {"n_vocab": c.vocab_size, "n_ctx": c.n_positions, "n_embd": c.n_embd, "n_head": c.n_head}
        hparams["n_layer"] = c.n_layer
        write_checkpoint(ckpt, hparams, openai_arrays(model, c.n_layer), vocab_dir=Path(args.vocab_dir))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        subprocess.run([*gptcore, "convert", str(ckpt), args.out], check=True)
    source, converted = load_file(args.weights), load_file(args.out)
    shared = sorted(set(source) & set(converted))
    differ = [name for name in shared if not torch.equal(converted[name], source[name])]
    added = sorted(set(converted) - set(source))
    nonzero = [name for name in added if converted[name].count_nonzero()]
    if differ or nonzero:
        raise SystemExit(f"error: tensors differ from the source: {differ}; added and not zero: {nonzero}")
    row = {"weights": args.weights, "out": args.out, "tensors_equal": len(shared), "zero_added": len(added)}
    print(json.dumps({**row, "left_out": sorted(set(source) - set(converted))}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
