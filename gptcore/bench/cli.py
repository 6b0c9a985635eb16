"""`gptcore bench`'s options, and its run over the tasks: each one's row as text (a table, or a JSON
line) for gptcore/cli.py to print as it comes."""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Iterator
from pathlib import Path

from gptcore.bench.spec import TASKS, BenchSpec

logger = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """`gptcore bench`'s options, by concern, in the order --help lists them."""
    _add_workload(parser)
    _add_sizes(parser)
    _add_timing(parser)
    _add_gptcore_settings(parser)
    _add_peers(parser)
    _add_output(parser)


def _add_workload(parser: argparse.ArgumentParser) -> None:
    """What is measured: the model, the tasks, the precision and the device."""
    from gptcore.arguments import device_name
    from gptcore.params.choices import PRECISIONS

    parser.add_argument(
        "--model", default="gpt2-small", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl or a weights file"
    )
    parser.add_argument(
        "--task", nargs="+", default=["train"], choices=TASKS, metavar="TASK", help=f"one or more of {', '.join(TASKS)}"
    )
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="gptcore's (see gptcore/precision.py)")
    parser.add_argument(
        "--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps"
    )


def _add_sizes(parser: argparse.ArgumentParser) -> None:
    """The work's size: rows, and tokens per row or per prompt and reply."""
    from gptcore.arguments import positive_int

    parser.add_argument("--batch", type=positive_int, default=None, help="rows (default 8; 1 for generate)")
    parser.add_argument("--seq-len", type=positive_int, default=120, help="tokens per row (train, classify)")
    parser.add_argument("--prompt-len", type=positive_int, default=50, help="prompt tokens (generate)")
    parser.add_argument("--new-tokens", type=positive_int, default=100, help="new tokens (generate)")


def _add_timing(parser: argparse.ArgumentParser) -> None:
    """How it is timed: the timed and untimed runs, and torch's threads."""
    from gptcore.arguments import non_negative_int, positive_int

    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed runs per system (the figures are their median)"
    )
    parser.add_argument(
        "--warmup", type=non_negative_int, default=1, help="untimed runs first (allocator, kernels, compile)"
    )
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")


def _add_gptcore_settings(parser: argparse.ArgumentParser) -> None:
    """gptcore's own settings: the training step's memory savers, compile, and int8 decoding."""
    from gptcore.arguments import non_negative_int, positive_int
    from gptcore.params.choices import QUANTIZE

    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (train)")
    parser.add_argument(
        "--activation-checkpointing", action="store_true", help="recompute block activations in backward (train)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile gptcore's blocks")
    parser.add_argument(
        "--step-in-backward",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="update each weight inside backward (less memory, the same update); default: as the "
        "training stages, where it applies (1 process, no --grad-accum, no fp16-mixed, --max-grad-norm none)",
    )
    parser.add_argument(
        "--recast-weights",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="mixed precision: cast weights again in backward instead of keeping bf16 copies (less "
        "memory, the same gradients); default: as the training stages, for 1 GiB+ of copies",
    )
    parser.add_argument(
        "--max-grad-norm",
        type=_max_grad_norm,
        default=1.0,
        help="train: clip each step's gradient norm to this, or none (default 1.0, as the training stages; "
        "clipping turns the default step-in-backward off)",
    )
    parser.add_argument(
        "--lora-rank",
        type=non_negative_int,
        default=0,
        help="train: LoRA adapters of this rank (alpha = rank) on every block's Linear layers, the base "
        "frozen as the finetuning stages' `lora:` holds it; 0: full finetuning",
    )
    parser.add_argument(
        "--quantize",
        default="none",
        choices=QUANTIZE,
        help="gptcore's decoding weights (generate): int8 as llama.cpp's q8_0 (gptcore/inference/quantize.py)",
    )


def _add_peers(parser: argparse.ArgumentParser) -> None:
    """What gptcore is set beside: HF's runs, the workers' allocator, llama.cpp and the roofs."""
    parser.add_argument("--no-hf", action="store_true", help="measure gptcore only")
    parser.add_argument(
        "--hf",
        default="both",
        choices=("both", "fp32", "bf16"),
        help="which HF runs: fp32, under bf16 autocast, or both",
    )
    parser.add_argument(
        "--keep-freed-memory",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="start gptcore's worker with glibc's allocator keeping freed memory (gptcore/training/allocator.py) "
        "or not; default: as the task's work is started, with it for train and classify "
        "(dvc.yaml's training stages), without for generation (serve, generate_responses)",
    )
    parser.add_argument(
        "--hf-keep-freed-memory",
        action="store_true",
        help="start HF's workers with the same allocator setting as gptcore's",
    )
    parser.add_argument(
        "--llama-cpp",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run llama.cpp (llama-cpp-python) on the same weights as GGUF f16, bf16 and q8_0 for generate "
        "(batch 1); default: when it is installed",
    )
    parser.add_argument(
        "--no-roof", action="store_true", help="skip measuring the task's roofs (gptcore/bench/roofline.py)"
    )


def _add_output(parser: argparse.ArgumentParser) -> None:
    """Each system's time limit, and how the rows are printed."""
    from gptcore.arguments import number

    parser.add_argument(
        "--timeout", type=number(minimum=0.0), default=None, help="seconds per system before it is given up"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def run_tasks(args: argparse.Namespace) -> Iterator[str]:
    """`gptcore bench`: every task in turn; each one's row as text (a table, or a JSON line), as it is measured."""
    from gptcore.errors import ConfigError

    if not (args.model in _presets() or Path(args.model).is_file()):
        raise ConfigError(f"--model: {args.model} is neither a preset ({', '.join(_presets())}) nor a weights file")
    for name in ("repeats", "seq_len", "prompt_len", "new_tokens", "grad_accum"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.batch is not None and args.batch < 1:
        raise ConfigError("--batch must be positive")
    # torch comes with these: imported after the checks, so --help and a wrong option answer at once
    from gptcore.bench.report import format_row
    from gptcore.bench.runner import bench

    batch1 = None
    for task in args.task:
        batch = args.batch or (1 if task == "generate" else 8)
        spec = BenchSpec(
            task=task,
            model=args.model,
            precision=args.precision,
            device=args.device,
            batch=batch,
            seq_len=args.seq_len,
            prompt_len=args.prompt_len,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
            grad_accum=args.grad_accum,
            activation_checkpointing=args.activation_checkpointing,
            compile=args.compile,
            step_in_backward="auto" if args.step_in_backward is None else args.step_in_backward,
            recast_weights="auto" if args.recast_weights is None else args.recast_weights,
            max_grad_norm=args.max_grad_norm,
            keep_freed_memory=args.keep_freed_memory,
            quantize=args.quantize,
            lora_rank=args.lora_rank,
            hf_keep_freed_memory=args.hf_keep_freed_memory,
        )
        hf_precisions = ("fp32", "bf16") if args.hf == "both" else (args.hf,)
        row = bench(
            spec,
            hf=not args.no_hf,
            timeout=args.timeout,
            hf_precisions=hf_precisions,
            llama_cpp=args.llama_cpp,
            roof=not args.no_roof,
        )
        if not row["quiet"]:
            logger.warning("warning: %s: the machine was not quiet; see the row's notes", task)
        if task == "generate" and batch == 1:
            batch1 = row["gptcore_tokens_per_s"]
        if task == "generate-batch" and batch1 and row["gptcore_tokens_per_s"]:
            row["gptcore_batch_speedup"] = round(row["gptcore_tokens_per_s"] / batch1, 2)
        yield json.dumps(row) if args.json else format_row(row) + "\n"


def _presets() -> tuple[str, ...]:
    from gptcore.config import PRESETS

    return tuple(PRESETS)


def _max_grad_norm(text: str) -> float | None:
    """--max-grad-norm: a positive number, or none (no clipping)."""
    if text.lower() in ("none", "null"):
        return None
    from gptcore.arguments import number

    value = number()(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0 or none, got {text}")
    return value
