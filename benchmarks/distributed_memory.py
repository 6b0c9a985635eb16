"""Per-process peak memory and step time of a training step under `strategy: ddp` and `fsdp` (torchrun).

For each model and strategy, `--nproc` processes (gloo on CPU, NCCL on GPUs) build the model with random
weights, AdamW, and run `--steps` optimizer steps on random tokens through gptcore's StepRunner, the
step every training stage takes. Each process reports its peak resident memory (getrusage, the whole
process life: the full model it starts from, then its shard and the step; large blocks are mmapped
so that freed tensors leave the RSS), its RSS before the model (the interpreter and torch), CUDA's
peak where the run is on a GPU, and the median step time. One JSON line per process and run is printed; `--out`
writes them all. A benchmark, not a test: on a shared machine the times are only as quiet as it was
(the load average is recorded), the memory figures do not depend on it.

    python benchmarks/distributed_memory.py --model gpt2-medium gpt2-large --strategies ddp fsdp \
        --nproc 2 --steps 3 --out benchmarks/results/distributed_memory.json

The arithmetic it is read against (fp32 weights, gradients and two AdamW moments: 16 bytes per
parameter; activations extra): DDP holds 16 B x parameters on every process, FSDP 16 B x parameters / N
plus the largest gathered unit (a block, or the embedding) for the step. docs/distributed.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from gptcore.arguments import ArgumentParser, positive_int
from gptcore.config import PRESETS

# One process of the torchrun launch: one JSON line on stdout (every rank).
WORKER = r"""
import json, os, resource, statistics, sys, time
import torch
from gptcore.config import GPTConfig
from gptcore.device import rank, resolve_device
from gptcore.model import GPTModel
from gptcore.training.evaluation import lm_loss
from gptcore.training.step import StepRunner, make_optimizer

name, strategy, steps, batch, context, precision = sys.argv[1:7]
steps, batch, context = int(steps), int(batch), int(context)
device = resolve_device("auto")
page = os.sysconf("SC_PAGE_SIZE")
with open("/proc/self/statm") as f:
    before = int(f.read().split()[1]) * page / 2**30  # resident before the model: the interpreter and torch
torch.manual_seed(0)
config = GPTConfig.from_name(name, context_length=context, drop_rate=0.0)
model = GPTModel(config).to(device)
parameters = model.num_parameters()  # before fsdp empties the model for its shards
optimizer = make_optimizer(model.parameters(), lr=1e-4, weight_decay=0.1, device=device)
runner = StepRunner(model, optimizer, lm_loss, device, precision, strategy=strategy)
tokens = torch.randint(0, config.vocab_size, (batch, context + 1))
times = []
for step in range(steps):
    start = time.perf_counter()
    runner.step((tokens[:, :-1], tokens[:, 1:]), step + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    times.append(time.perf_counter() - start)
row = {
    "model": name, "strategy": strategy, "rank": rank(), "world": int(os.environ.get("WORLD_SIZE", "1")),
    "parameters": parameters,
    "batch": batch, "context": context, "precision": precision, "steps": steps,
    "rss_before_model_gib": round(before, 3),
    "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    "median_step_s": round(statistics.median(times[1:] or times), 3), "first_step_s": round(times[0], 3),
}
if device.type == "cuda":
    row["cuda_peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
print("RESULT " + json.dumps(row), flush=True)
"""


def run(name: str, strategy: str, args) -> list[dict]:
    """One torchrun launch; the rows of its processes."""
    load = os.getloadavg()[0]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}"]
    script = Path(args.workdir) / "distributed_memory_worker.py"
    script.write_text(WORKER)
    cmd += [str(script), name, strategy, str(args.steps), str(args.batch), str(args.context), args.precision]
    # A fixed mmap threshold: every large tensor is its own mapping, returned to the system when freed,
    # so that the peak RSS follows the tensors alive at once (glibc's sliding threshold would keep
    # freed blocks, such as the full model FSDP shards and drops, in the heap).
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=1048576"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [json.loads(line[len("RESULT ") :]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or len(rows) != args.nproc:
        tail = proc.stderr.strip().splitlines()[-3:]
        return [{"model": name, "strategy": strategy, "failed": proc.returncode, "stderr_tail": tail, "load": load}]
    return [{**row, "load_before": round(load, 2), "load_after": round(os.getloadavg()[0], 2)} for row in rows]


def main() -> None:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", nargs="+", default=["gpt2-medium", "gpt2-large"], choices=sorted(PRESETS))
    parser.add_argument("--strategies", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    parser.add_argument("--nproc", type=positive_int, default=2, help="processes per launch")
    parser.add_argument("--steps", type=positive_int, default=3, help="optimizer steps (the first is not timed)")
    parser.add_argument("--batch", type=positive_int, default=2, help="rows of the global batch")
    parser.add_argument("--context", type=positive_int, default=128, help="tokens per row")
    parser.add_argument("--precision", default="fp32", help="fp32, bf16-mixed, bf16-true, fp16-mixed")
    parser.add_argument("--threads", type=positive_int, default=1, help="OMP_NUM_THREADS of each process")
    parser.add_argument("--workdir", default="/tmp", help="where the worker script is written")
    parser.add_argument("--out", help="JSON file of every row")
    args = parser.parse_args()
    rows = []
    for name in args.model:
        for strategy in args.strategies:
            for row in run(name, strategy, args):
                print(json.dumps(row), flush=True)
                rows.append(row)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
