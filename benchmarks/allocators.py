"""Speed, page faults and peak memory of one `gptcore bench` task under each allocator setting.

Each setting runs `gptcore bench`'s measurement in a fresh process, the settings interleaved over
`--rounds` so that a busy spell of a shared machine hits all of them:
  defaults   glibc's malloc as it comes
  tunables   GLIBC_TUNABLES=<gptcore.training.allocator.TUNABLES>, what dvc.yaml gives the fixed-shape training stages
  mallopt    the same values set by mallopt() inside the process, as gptcore/training/allocator.py did before #18
  jemalloc, tcmalloc   LD_PRELOAD of the library (PyTorch's CPU performance guide), where installed
                       (Debian: libjemalloc2, libtcmalloc-minimal4); jemalloc-pt: with the guide's MALLOC_CONF
Prints one JSON line per run, then per setting the median tokens/s, CPU and kernel seconds, page faults
per repeat and the peak RSS, with the load average before and after: tokens/s are only as quiet as the
machine was; CPU seconds depend less on what else runs.

    python benchmarks/allocators.py --model gpt2-small --task train --rounds 2
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from gptcore.arguments import ArgumentParser, positive_int
from gptcore.bench.spec import TASKS, BenchSpec
from gptcore.params.choices import PRECISIONS
from gptcore.training.allocator import allocator_env

# In the child: optionally the old in-process mallopt, then one measurement.
WORKER = r"""
import ctypes, json, sys
spec = json.loads(sys.argv[1])
if sys.argv[2] == "mallopt":
    libc = ctypes.CDLL("libc.so.6")
    assert libc.mallopt(-4, 0) and libc.mallopt(-1, -1)  # M_MMAP_MAX 0, M_TRIM_THRESHOLD -1
from gptcore.bench.spec import BenchSpec
from gptcore.bench.tasks import measure
print(json.dumps(measure(BenchSpec(**spec))), flush=True)
"""
PRELOADS = {
    "jemalloc": ["/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", "/usr/lib/aarch64-linux-gnu/libjemalloc.so.2"],
    "tcmalloc": [
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
        "/usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4",
    ],
}


# jemalloc as PyTorch's CPU performance tuning guide configures it (freed pages are kept, not purged).
JEMALLOC_PYTORCH = (
    "oversize_threshold:1,background_thread:true,metadata_thp:auto,dirty_decay_ms:9000000000,muzzy_decay_ms:9000000000"
)


def settings() -> dict[str, dict[str, str]]:
    """Setting name -> the child's environment."""
    found = {"defaults": allocator_env(False), "tunables": allocator_env(True), "mallopt": allocator_env(False)}
    for name, paths in PRELOADS.items():
        path = next((p for p in paths if Path(p).is_file()), None)
        if path:
            found[name] = {**allocator_env(False), "LD_PRELOAD": path}
            if name == "jemalloc":
                found["jemalloc-pt"] = {**found[name], "MALLOC_CONF": JEMALLOC_PYTORCH}
    return found


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gpt2-small", help="a preset (gpt2-small...) or a gptcore weights file")
    parser.add_argument("--task", default="train", choices=TASKS, help="the `gptcore bench` task measured")
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="gptcore's precision")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed repeats per process (after 1 warm-up)")
    parser.add_argument("--rounds", type=positive_int, default=2, help="processes per setting, interleaved")
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        metavar="SETTING",
        help="settings to run (defaults tunables mallopt jemalloc jemalloc-pt tcmalloc; "
        "default: all whose library is installed)",
    )
    args = parser.parse_args()

    spec = BenchSpec(
        task=args.task,
        model=args.model,
        precision=args.precision,
        device="cpu",
        repeats=args.repeats,
        batch=1 if args.task == "generate" else 8,
    )
    envs = {k: v for k, v in settings().items() if not args.only or k in args.only}
    print(json.dumps({"load_before": os.getloadavg(), "settings": list(envs)}), flush=True)
    results: dict[str, list[dict]] = {name: [] for name in envs}
    for round_ in range(args.rounds):
        for name, env in envs.items():
            proc = subprocess.run(
                [sys.executable, "-c", WORKER, json.dumps(asdict(spec)), name], env=env, capture_output=True, text=True
            )
            if proc.returncode != 0:
                print(json.dumps({"setting": name, "error": proc.stderr.strip().splitlines()[-1:]}), flush=True)
                continue
            result = json.loads(proc.stdout.splitlines()[-1])
            results[name].append(result)
            print(json.dumps({"round": round_, "setting": name, **result}), flush=True)
    print(json.dumps({"load_after": os.getloadavg()}), flush=True)
    print(
        f"{'setting':<10} {'tokens/s':>9} {'best':>7} {'CPU s/step':>11} {'kernel s/step':>14} "
        f"{'page faults/step':>17} {'peak RSS MiB':>13}   (medians over runs; best: highest tokens/s)"
    )
    for name, runs in results.items():
        if runs:
            rates = [r for run in runs for r in run["tokens_per_s"]]

            def median(key, runs=runs):
                return statistics.median(run[key] for run in runs)

            print(
                f"{name:<10} {statistics.median(rates):>9.1f} {max(rates):>7.1f} {median('cpu_s_per_repeat'):>11.2f} "
                f"{median('system_s_per_repeat'):>14.2f} {median('page_faults_per_repeat'):>17,.0f} "
                f"{max(run['peak_rss_mib'] for run in runs):>13.0f}"
            )


if __name__ == "__main__":
    main()
