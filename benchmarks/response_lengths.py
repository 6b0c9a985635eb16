"""How long each model's answers to the test instructions are, under one decoding: prints a JSON row per model.

    python benchmarks/record.py response-lengths-stage1 -- python benchmarks/response_lengths.py \\
        --params CLONE/params.yaml --set generate.temperature=1.0 --test CLONE/data/prepared/instructions/test.json \\
        stage4=CLONE/models/instruct/model.safetensors dpo=CLONE/models/preferences/model.safetensors

The collapse check of DPO (a tuned model whose replies turn empty or endless) on models that never end a
greedy reply: each model answers through `stages/generate_responses.py` itself, with the params file
changed by each `--set KEY.PATH=VALUE` (YAML, as benchmarks/experiment.py), in a temporary folder. A row:
the label, the weights file's SHA-256, the `generate:` params used, the stage's metrics
(`mean_response_tokens`, `responses_at_max_new_tokens`, ...), and the replies that are empty after the
stage's clean-up. A failed generation stops the script with its status.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from experiment import set_key  # noqa: E402
from record import REPO  # noqa: E402

sys.path.insert(0, str(REPO))
from gptcore.download import sha256_of  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", metavar="LABEL=WEIGHTS", help="a label and an instruction model's file")
    parser.add_argument("--params", required=True, help="the params file the models were made with")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params change")
    parser.add_argument("--test", required=True, help="the test split (data/prepared/instructions/test.json)")
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    for item in args.set:
        set_key(params, *item.split("=", 1))
    with tempfile.TemporaryDirectory(prefix="gptcore-lengths-") as work:
        params_file = Path(work) / "params.yaml"
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        for label, weights in (item.split("=", 1) for item in args.models):
            out, metrics = Path(work) / f"{label}.json", Path(work) / f"{label}-metrics.json"
            command = [sys.executable, str(REPO / "stages" / "generate_responses.py"), "--params", str(params_file)]
            command += ["--model", weights, "--test", args.test, "--out", str(out), "--metrics", str(metrics)]
            done = subprocess.run([*command, "--progress-dir", str(Path(work) / f"progress-{label}")], cwd=REPO)
            if done.returncode != 0:
                return done.returncode
            replies = [entry["model_response"] for entry in json.loads(out.read_text())]
            row = {"model": label, "weights_sha256": sha256_of(weights), "generate": params["generate"]}
            row |= json.loads(metrics.read_text()) | {"empty_responses": sum(not r.strip() for r in replies)}
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
