"""Run one non-default configuration in a fresh clone and keep its params and metrics as evidence.

    python benchmarks/experiment.py classifier-check-seed1 \\
        --set foundation=scratch --set precision=fp32 --set seed=1 ... -- finetune_classifier baseline_classifier

In a temporary folder: a `git clone` of this repository's HEAD, its `params.yaml` (or `--params-from FILE`) changed by each
`--set KEY.PATH=VALUE` (VALUE read as YAML, as `dvc exp run -S` does), then `dvc repro TARGETS` with
`GPTCORE_MIRROR` as set here. What is kept, in `benchmarks/results/experiments/<NAME>/`:

- `params.yaml`: the whole params file the run used;
- `metrics/*.json`: every metrics file the run wrote (not the committed ones it left alone);
- `plots/<DIR>/*.tsv`: with `--plots DIR`, the curves the run logged under plots/DIR/metrics/;
- `run.json`: the command line of this script, the `--set` values, the git commit, the UTC start and
  end, the wall time, the machine (benchmarks/record.py's fields) and the load average before and after.

A failed `dvc repro` keeps nothing, shows the end of its log and exits with its status. The clone is
removed at the end (`--keep` keeps it).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import REPO, load, run_fields  # noqa: E402


def set_key(params: dict, path: str, value: str) -> None:
    """Set `a.b.c` in the nested params to VALUE parsed as YAML; an unknown section is an error."""
    *sections, key = path.split(".")
    node = params
    for section in sections:
        if not isinstance(node.get(section), dict):
            raise SystemExit(f"error: --set {path}: no section {section!r} in params.yaml")
        node = node[section]
    node[key] = yaml.safe_load(value)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("name", help="the folder's name under benchmarks/results/experiments/")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a params change")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results" / "experiments"))
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    parser.add_argument(
        "--params-from", metavar="FILE", help="start from this params file of the clone (e.g. params-quickstart.yaml)"
    )
    parser.add_argument(
        "--plots", action="append", default=[], metavar="DIR", help="also keep plots/DIR/metrics/*.tsv (curves)"
    )
    argv = sys.argv[1:]
    if "--" not in argv and not {"-h", "--help"} & set(argv):
        parser.error("no dvc targets given (put them after --)")
    if "--" not in argv:
        parser.parse_args(argv)  # prints the help and exits
    if argv.index("--") == len(argv) - 1:
        parser.error("no dvc targets given (put them after --)")
    split = argv.index("--")
    args, targets = parser.parse_args(argv[:split]), argv[split + 1 :]
    work = Path(tempfile.mkdtemp(prefix=f"gptcore-exp-{args.name}-"))
    clone = work / "gptcore"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=clone, capture_output=True, text=True).stdout.strip()
    params = yaml.safe_load((clone / (args.params_from or "params.yaml")).read_text())
    changes = dict(item.split("=", 1) for item in args.set)
    for path, value in changes.items():
        set_key(params, path, value)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc = shutil.which("dvc") or str(Path(sys.executable).with_name("dvc"))
    start, load_before, t0 = datetime.datetime.now(datetime.timezone.utc), load(), time.perf_counter()
    log = work / "repro.log"
    with log.open("w") as out:
        env = {**os.environ, "PYTHONPATH": str(clone)}  # the stages import the clone's gptcore
        done = subprocess.run([dvc, "repro", *targets], cwd=clone, env=env, stdout=out, stderr=subprocess.STDOUT)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        return done.returncode
    dest = Path(args.out_dir) / args.name
    shutil.rmtree(dest, ignore_errors=True)
    (dest / "metrics").mkdir(parents=True)
    shutil.copy(clone / "params.yaml", dest / "params.yaml")
    for metrics in sorted((clone / "metrics").glob("*.json")):
        if metrics.stat().st_mtime >= start.timestamp():  # written by this run, not a committed file
            shutil.copy(metrics, dest / "metrics" / metrics.name)
    for name in args.plots:  # the curves: one TSV per logged series
        curves = sorted((clone / "plots" / name / "metrics").glob("*.tsv"))
        (dest / "plots" / name).mkdir(parents=True, exist_ok=True)
        for tsv in curves:
            shutil.copy(tsv, dest / "plots" / name / tsv.name)
    record = {
        "command": shlex.join(["python", "benchmarks/experiment.py", *argv]),
        "params_from": args.params_from or "params.yaml",
        "set": changes,
        "dvc_targets": targets,
        "commit": commit,  # the clone's: the code that ran (this checkout's own changes never reach it)
        **run_fields(start, wall, load_before),
        "mirror": os.environ.get("GPTCORE_MIRROR"),
    }
    (dest / "run.json").write_text(json.dumps(record, indent=1) + "\n")
    if not args.keep:
        shutil.rmtree(work)
    print(dest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
