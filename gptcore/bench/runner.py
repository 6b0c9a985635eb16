"""`gptcore bench`: tokens/s and peak memory of gptcore beside Hugging Face's GPT2LMHeadModel, same shapes.

Each system (gptcore; HF in fp32; HF under bf16 autocast) is measured in a fresh subprocess of its own,
one after the other, so that their peak resident memory (ru_maxrss) does not mix and one's allocations
do not slow the next. Every worker builds its model with random weights (or gptcore's from a weights
file), runs `warmup` untimed repetitions of the task, then `repeats` timed ones, and reports tokens/s
of each, and the page faults they took. gptcore's worker is started as the task's work is: train and
classify with glibc's allocator keeping freed memory, as dvc.yaml starts the fixed-shape training
stages (gptcore/training/allocator.py), generation with the defaults, as serve and generate_responses
(--keep-freed-memory / --no-keep-freed-memory to choose); HF's with the defaults, as its users get it
(--hf-keep-freed-memory: as gptcore's). Tasks:
- train: one full optimizer step (AdamW, every parameter) on a batch of batch x seq_len random tokens;
- classify: one classifier step (2-class head; last block + final LayerNorm + head train, the frozen
  prefix runs without autograd) on batch x seq_len tokens;
- generate / generate-batch: greedy decoding of new_tokens tokens after a prompt_len-token prompt, for
  1 prompt / `batch` prompts (8 by default) at once; tokens/s counts new tokens (prefill included).
For generate (batch 1), llama.cpp (llama-cpp-python, when installed) runs the same weights exported to
GGUF in f16, bf16 and q8_0, the same prompt and as many greedy tokens, with as many threads. In the same run
a worker measures the task's roofs (gptcore/bench/roofline.py), and each row gives the fraction of its roof
that gptcore reached. Around every worker, gptcore/bench/machine_load.py records the load average and the
CPU other processes used; a row measured on a machine that was not quiet says so and warns.

This module is the parent: one worker process per system (gptcore/bench/worker.py, which measures with
gptcore/bench/tasks.py), then the comparison row (gptcore/bench/report.py). The options and the run over
the tasks are gptcore/bench/cli.py's; the tasks, systems and BenchSpec gptcore/bench/spec.py's.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from typing import Any

from gptcore.bench.machine_load import QUIET_OTHER_CORES, LoadWatch
from gptcore.bench.report import result_row
from gptcore.bench.spec import ROOF, SYSTEMS, BenchSpec


def _run_worker(spec: BenchSpec, timeout: float | None) -> dict[str, Any]:
    from gptcore.training.allocator import allocator_env

    env = allocator_env(spec.keeps_freed_memory())
    if spec.threads:
        env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    cmd = [sys.executable, "-m", "gptcore.bench.worker", "--worker", json.dumps(dataclasses.asdict(spec))]
    try:
        with LoadWatch() as watch:
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f}s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": f"exit status {proc.returncode}: {tail}"}
    return {**json.loads(lines[-1]), "load": watch.to_dict()}


def _hf_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("transformers") is not None


def _bf16_available(device_name: str) -> bool:
    from gptcore.device import resolve_device
    from gptcore.precision import has_native_bf16

    return has_native_bf16(resolve_device(device_name))


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _systems(
    spec: BenchSpec, hf: bool, hf_precisions: tuple[str, ...], llama_cpp: bool | None
) -> tuple[list[str], list[str]]:
    """The systems to run for spec (gptcore first), and notes on those left out."""
    systems, notes = ["gptcore"], []
    if hf and _hf_available():
        if "fp32" in hf_precisions:
            systems.append("hf-fp32")
        if "bf16" in hf_precisions and _bf16_available(spec.device):
            systems.append("hf-bf16")
        elif "bf16" in hf_precisions:
            notes.append("hf-bf16: no native bf16 on this device")
    elif hf:
        notes.append("transformers is not installed")
    # llama.cpp runs on the CPU: beside a CUDA gptcore it would compare two machines.
    if llama_cpp is not False and spec.task == "generate" and spec.batch == 1 and spec.device in ("auto", "cpu"):
        if _llama_cpp_available():
            systems += ["llama.cpp-f16", "llama.cpp-bf16", "llama.cpp-q8_0"]
        elif llama_cpp:
            notes.append("llama.cpp: llama-cpp-python is not installed")
    return systems, notes


def bench(
    spec: BenchSpec,
    hf: bool = True,
    timeout: float | None = None,
    hf_precisions: tuple[str, ...] = ("fp32", "bf16"),
    llama_cpp: bool | None = None,
    roof: bool = True,
) -> dict[str, Any]:
    """Measure gptcore, the peers that apply (HF fp32/bf16; llama.cpp f16/q8_0 for batch-1 generation,
    when installed, or when `llama_cpp` is True) and the task's roofs; one flat row of results.

    Each runs in a worker process of its own, one after the other; `load` gives, per worker, the load
    average before and after and the CPU cores other processes used meanwhile (gptcore/bench/machine_load.py),
    and `quiet` is False (with a note) when any of them was not quiet.
    """
    systems, notes = _systems(spec, hf, hf_precisions, llama_cpp)
    with LoadWatch() as idle:  # a second of nothing: what other processes use before the first worker
        time.sleep(1.0)
    results: dict[str, dict[str, Any] | None] = {name: None for name in (*SYSTEMS, ROOF)}
    for system in systems + ([ROOF] if roof else []):
        result = _run_worker(dataclasses.replace(spec, system=system), timeout)
        if "error" in result:
            notes.append(f"{system}: {result['error']}")
        else:
            results[system] = result
    row = result_row(spec, results)
    # Judged on the CPU other processes used, before and during each worker: the load average (kept
    # for reference) lags by a minute and still counts a worker that has just ended.
    loads = {"before": idle.to_dict(), **{name: result["load"] for name, result in results.items() if result}}
    row["load"] = loads
    row["quiet"] = all(load["quiet"] for load in loads.values())
    if not row["quiet"]:
        noisy = ", ".join(
            f"{name} (other processes {v['other_cores']} cores; load average {v['load_before']} -> {v['load_after']})"
            for name, v in loads.items()
            if not v["quiet"]
        )
        notes.append(
            f"NOT QUIET, the figures are not comparable: {noisy}; quiet means other processes used at "
            f"most {QUIET_OTHER_CORES} cores in the second before the first run and during each run"
        )
    if notes:
        row["notes"] = "; ".join(notes)
    return row
