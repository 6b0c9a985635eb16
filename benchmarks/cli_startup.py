"""How fast the CLI answers: the wall time of `gptcore --help`, each verb's `--help` and an argument
error, each in a fresh process (what a user waits for), median of --repeats runs, with the machine's
load around them. The target (issue 34) is 0.5 s or less on a quiet machine; tests/test_cli_args.py
checks the cause (no torch, numpy or pydantic imported) without timing anything.

    python benchmarks/cli_startup.py --repeats 5
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

from gptcore.arguments import ArgumentParser, positive_int
from gptcore.bench.machine_load import LoadWatch

COMMANDS = {
    "--help": ["--help"],
    **{f"{verb} --help": [verb, "--help"] for verb in ("convert", "export", "generate", "classify", "serve", "bench")},
    "doctor --help": ["doctor", "--help"],
    "argument error": ["generate", "--model", "m.safetensors", "--prompt", "Hi", "--top-k", "0"],
}


def time_command(args: list[str], repeats: int) -> list[float]:
    """Wall seconds of `python -m gptcore ARGS`, once per repeat."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "gptcore", *args], capture_output=True, check=False)
        seconds.append(time.perf_counter() - started)
    return seconds


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=positive_int, default=5, help="runs of each command (the median counts)")
    args = parser.parse_args()
    rows = {}
    with LoadWatch() as watch:
        for name, command in COMMANDS.items():
            rows[name] = round(statistics.median(time_command(command, args.repeats)), 3)
    print(json.dumps({"median_seconds": rows, "python": sys.version.split()[0], **watch.to_dict()}, indent=2))


if __name__ == "__main__":
    main()
