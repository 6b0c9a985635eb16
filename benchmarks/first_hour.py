"""The first hour of a new user, measured: the README's commands, verbatim, in a fresh clone.

In a temporary folder: a `git clone` of this repository with `../shared` beside it (a link to the one
beside this repository), then, each timed with the machine's load around it (gptcore.bench.machine_load):
  pipeline_install  the install part of the README's first command (a fresh venv, `pip install ...`):
                    seconds, the venv's size, and whether pip built any wheel (compiled anything)
  test_install      the same for the README's test command
  test_suite        the test part of the README's test command, in that venv
  quickstart        the README's quick start block (doctor, the run), in the test venv, then its restore
                    line, and whether `git status` is clean afterwards
Writes one JSON object (--out, default benchmarks/results/first_hour.json) for the README to quote
(tests/test_docs.py checks that this script still finds the README's commands). Only a quiet machine gives figures
worth committing: each entry says whether the run was quiet. pip's cache is used as it is (--no-cache
empties it first, for the cold figures of a first install).

    python benchmarks/first_hour.py                      # everything, about 40 minutes on 2 cores
    python benchmarks/first_hour.py --only quickstart    # one entry, merged into the existing file
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from gptcore.arguments import ArgumentParser
from gptcore.bench.machine_load import LoadWatch

REPO = Path(__file__).resolve().parents[1]

ENTRIES = ("pipeline_install", "test_install", "test_suite", "quickstart")


def readme_blocks() -> dict[str, str]:
    """The README's commands: the pipeline's and the test command (one line each), the quick start block."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)```", text, flags=re.DOTALL)
    test = text.split("<!-- ci:test-command -->", 1)[1]
    quick = text.split("<!-- quickstart -->", 1)[1]
    return {
        "pipeline": blocks[0].strip(),
        "test": re.search(r"```bash\n(.*?)```", test, flags=re.DOTALL).group(1).strip(),
        "quickstart": re.search(r"```bash\n(.*?)```", quick, flags=re.DOTALL).group(1).strip(),
    }


def split_install(command: str) -> tuple[str, str]:
    """A README command `venv && activate && pip install ... && REST` as (the install part, REST)."""
    parts = [p.strip() for p in command.split(" && ")]
    last_pip = max(i for i, p in enumerate(parts) if p.startswith("pip install"))
    return " && ".join(parts[: last_pip + 1]), " && ".join(parts[last_pip + 1 :])


def timed(command: str, cwd: Path, log: Path, env: dict[str, str] | None = None) -> dict:
    """Run command in bash; its seconds, exit code and the machine's load around it."""
    with LoadWatch() as watch, open(log, "w") as out:
        started = time.monotonic()
        proc = subprocess.run(["bash", "-c", command], cwd=cwd, stdout=out, stderr=subprocess.STDOUT, env=env)
        seconds = time.monotonic() - started
    return {"seconds": round(seconds, 1), "exit_code": proc.returncode, **watch.to_dict()}


def size_of(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def fresh_clone(work: Path) -> Path:
    """A clone of this repository's HEAD with ../shared beside it, as the README assumes."""
    (work / "shared").symlink_to(REPO.parent / "shared")
    subprocess.run(["git", "clone", "-q", str(REPO), str(work / "gptcore")], check=True)
    return work / "gptcore"


def measure_install(clone: Path, command: str, name: str, logs: Path) -> dict:
    install, _ = split_install(command)
    shutil.rmtree(clone / ".venv", ignore_errors=True)
    result = timed(install, clone, logs / f"{name}.log")
    pip_log = (logs / f"{name}.log").read_text(errors="replace")
    result["venv_bytes"] = size_of(clone / ".venv")
    result["built_wheels"] = sorted(set(re.findall(r"Building wheel for (\S+)", pip_log)))
    return result


def measure_quickstart(clone: Path, block: str, logs: Path) -> dict:
    """The quick start's lines but the last (doctor, the run), timed; then the last (the restore)."""
    lines = [line for line in block.splitlines() if line.strip()]
    env = {**os.environ, "PATH": f"{clone / '.venv' / 'bin'}{os.pathsep}{os.environ['PATH']}"}
    env.pop("GPTCORE_MIRROR", None)
    result = timed("set -e\n" + "\n".join(lines[:-1]), clone, logs / "quickstart.log", env)
    restore = subprocess.run(["bash", "-c", lines[-1]], cwd=clone, capture_output=True, text=True)
    status = subprocess.run(["git", "status", "--porcelain"], cwd=clone, capture_output=True, text=True).stdout
    result["restore_exit_code"] = restore.returncode
    result["git_status_clean_after_restore"] = status.strip() == ""
    return result


def main() -> None:
    parser = ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", nargs="+", choices=ENTRIES, default=list(ENTRIES), help="the entries to measure")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "first_hour.json"), help="JSON file")
    parser.add_argument("--no-cache", action="store_true", help="empty pip's cache first (a first install's figures)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone and the logs")
    args = parser.parse_args()
    if args.no_cache:
        subprocess.run([sys.executable, "-m", "pip", "cache", "purge"], check=False)
    blocks = readme_blocks()
    work = Path(tempfile.mkdtemp(prefix="gptcore-first-hour-"))
    logs = work / "logs"
    logs.mkdir()
    clone = fresh_clone(work)
    results = json.loads(Path(args.out).read_text()) if Path(args.out).is_file() else {}
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes")
    machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "measured": when}
    if "pipeline_install" in args.only:
        results["pipeline_install"] = {
            **measure_install(clone, blocks["pipeline"], "pipeline_install", logs),
            **machine,
        }
    if {"test_install", "test_suite", "quickstart"} & set(args.only):
        results["test_install"] = {**measure_install(clone, blocks["test"], "test_install", logs), **machine}
    if "test_suite" in args.only:
        _, suite = split_install(blocks["test"])
        results["test_suite"] = {**timed(". .venv/bin/activate && " + suite, clone, logs / "test_suite.log"), **machine}
    if "quickstart" in args.only:
        results["quickstart"] = {**measure_quickstart(clone, blocks["quickstart"], logs), **machine}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    print(f"logs: {logs}" if args.keep else "", file=sys.stderr)
    if not args.keep:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
