"""The worker process of `gptcore bench`, one per system (gptcore/bench/runner.py starts it):

    python -m gptcore.bench.worker --worker '{"task": "train", "system": "gptcore", ...}'

runs `measure` (gptcore/bench/tasks.py) on the BenchSpec given as JSON, in this process, and writes its
result as one JSON line on stdout."""

from __future__ import annotations

import argparse
import json
import sys

from gptcore.bench.spec import BenchSpec
from gptcore.bench.tasks import measure


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptcore.bench.worker")
    parser.add_argument("--worker", required=True, help="a BenchSpec as JSON")
    spec = BenchSpec(**json.loads(parser.parse_args(argv).worker))
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
