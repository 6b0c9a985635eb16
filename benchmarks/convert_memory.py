"""Peak memory of `gptcore convert` on a synthetic OpenAI checkpoint of the 774M shape; prints JSON rows.

    python benchmarks/record.py convert-memory-774M -- python benchmarks/convert_memory.py --runs 3

TensorFlow itself writes the checkpoint (tests/tf_checkpoints.py: OpenAI's variable names and
[1, nx, nf] conv weights, N(0, 0.02) drawn by TensorFlow, GPT-2's encoder.json and vocab.bpe from the
mirror) into a temporary folder. Each run is `/usr/bin/time -v python -m gptcore convert CKPT OUT` in a
fresh process; its "Maximum resident set size" (kB = 1024 bytes) is the peak. One row more measures
a process that only imports torch and TensorFlow, the floor under any conversion. A last row compares
every tensor of the output with the checkpoint's variable under gptcore's name table (after the conv
transpose), exactly. Memory figures do not need a quiet machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
HPARAMS_774M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1280, "n_head": 20, "n_layer": 36}
TF_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def peak_rss_kib(command: list[str]) -> int:
    """The peak resident set size of `command` in KiB, as GNU time reports it; a failed command raises."""
    done = subprocess.run(
        ["/usr/bin/time", "-v", *command], capture_output=True, text=True, env={**os.environ, **TF_ENV}
    )
    if done.returncode != 0:
        raise SystemExit(f"error: {' '.join(command)} failed: {done.stderr.strip().splitlines()[-1:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))


def compare(ckpt: Path, out: Path) -> int:
    """How many output tensors equal their checkpoint variable exactly; raises on the first that does not."""
    import numpy as np
    import tensorflow as tf
    from safetensors.numpy import load_file

    from gptcore.convert.openai import RULES, name_table

    reader = tf.train.load_checkpoint(str(ckpt / "model.ckpt"))
    tensors = load_file(str(out))
    equal = 0
    for source, target, rule in name_table(HPARAMS_774M["n_layer"]):
        expected = RULES[rule].apply(np.asarray(reader.get_tensor(source), dtype=np.float32))
        if not np.array_equal(tensors[target].astype(np.float32), expected):
            raise SystemExit(f"error: {target} differs from {source}")
        equal += 1
    return equal


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--vocab-dir", default=os.path.join(os.environ.get("GPTCORE_MIRROR", ""), "gpt2"))
    args = parser.parse_args()
    from tests.tf_checkpoints import openai_shapes, write_checkpoint

    with tempfile.TemporaryDirectory(prefix="gptcore-convert-774M-") as work:
        ckpt, out = Path(work) / "774M", Path(work) / "model.safetensors"
        write_checkpoint(ckpt, HPARAMS_774M, openai_shapes(HPARAMS_774M), vocab_dir=Path(args.vocab_dir))
        data = sum(p.stat().st_size for p in ckpt.glob("model.ckpt.data-*"))
        parameters = sum(math.prod(s) for s in openai_shapes(HPARAMS_774M).values())
        floor = peak_rss_kib([sys.executable, "-c", "import torch, tensorflow"])
        print(json.dumps({"what": "import torch, tensorflow", "peak_rss_kib": floor}), flush=True)
        for run in range(1, args.runs + 1):
            peak = peak_rss_kib([sys.executable, "-m", "gptcore", "convert", str(ckpt), str(out)])
            row = {
                "what": "gptcore convert",
                "run": run,
                "parameters": parameters,
                "data_file_bytes": data,
                "output_bytes": out.stat().st_size,
                "peak_rss_kib": peak,
                "peak_rss_gb": round(peak * 1024 / 1e9, 3),
                "peak_over_data_file": round(peak * 1024 / data, 3),
            }
            print(json.dumps(row), flush=True)
        print(json.dumps({"what": "tensors equal to the checkpoint's", "tensors": compare(ckpt, out)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
