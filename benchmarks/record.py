"""Run one benchmark command and keep what it printed as an evidence file under benchmarks/results/.

    python benchmarks/record.py NAME -- gptcore bench --model gpt2-large --task generate --json
    python benchmarks/record.py NAME --env CC=benchmarks/cc-no-avx512 -- gptcore bench ...

The file `benchmarks/results/<UTC date>-<NAME>.json` holds: the command and the environment variables
given with --env, the git commit (and whether the checkout had uncommitted changes), the UTC start and
end, the machine (CPU model, its flags of interest, cores, memory), the load average before and after
(gptcore.bench.machine_load), the wall time, and `rows`: every line of the command's standard output
that parses as a JSON object (`gptcore bench --json` prints one per row), or `stdout` when none does.
A command that fails leaves no file (its output is shown) and this script exits with its status.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16")


def machine() -> dict:
    """CPU model, the instruction-set flags the kernels dispatch on, cores and memory (Linux /proc)."""
    info: dict = {"cores": os.cpu_count()}
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next(line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags"))
        info["cpu"] = model
        info["flags"] = [f for f in FLAGS if f in flags]
        mem_kib = int(
            next(
                line.split()[1]
                for line in Path("/proc/meminfo").read_text().splitlines()
                if line.startswith("MemTotal")
            )
        )
        info["memory_gib"] = round(mem_kib / 2**20, 1)
    except (OSError, StopIteration, ValueError):
        pass
    return info


def git(*args: str) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def run_fields(start: datetime.datetime, wall: float, load_before: list[float]) -> dict:
    """The fields every evidence record ends with: UTC start and end, wall time (s), machine, load before/after."""
    return {
        "started_utc": start.isoformat(timespec="seconds"),
        "ended_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": round(wall, 1),
        "machine": machine(),
        "load_before": load_before,
        "load_after": load(),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the file's name after the date, e.g. kernels-avx2-bf16")
    parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="set for the command")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    argv = sys.argv[1:]
    if "--" not in argv or argv.index("--") == len(argv) - 1:
        parser.error("no command given (put it after --)")
    split = argv.index("--")
    args, command = parser.parse_args(argv[:split]), argv[split + 1 :]
    env = dict(os.environ)
    extra = dict(item.split("=", 1) for item in args.env)
    env.update(extra)
    start, load_before, t0 = datetime.datetime.now(datetime.timezone.utc), load(), time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    sys.stderr.write(done.stderr[-4000:])
    if done.returncode != 0:
        sys.stdout.write(done.stdout[-4000:])
        return done.returncode
    rows = []
    for line in done.stdout.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    record = {
        "command": " ".join(command),
        "env": extra,
        "commit": git("rev-parse", "HEAD"),
        "uncommitted_changes": bool(git("status", "--porcelain", "--untracked-files=no")),
        **run_fields(start, wall, load_before),
        **({"rows": rows} if rows else {"stdout": done.stdout}),
    }
    out = Path(args.out_dir) / f"{start.date().isoformat()}-{args.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=1) + "\n")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
