"""What `gptcore bench` measures: its tasks and systems, and one measurement (BenchSpec), which the
parent (gptcore/bench/runner.py) hands to each worker process as JSON."""

from __future__ import annotations

from dataclasses import dataclass

TASKS = ("train", "classify", "generate", "generate-batch")
FIXED_SHAPE_TASKS = ("train", "classify")  # the same shapes every step, as the stages that train
SYSTEMS = ("gptcore", "hf-fp32", "hf-bf16", "llama.cpp-f16", "llama.cpp-bf16", "llama.cpp-q8_0")
ROOF = "roof"  # the worker that measures the task's roofs (gptcore/bench/roofline.py)


@dataclass
class BenchSpec:
    """One measurement: a system running a task on a model at a precision, with the shapes to use."""

    task: str = "train"
    model: str = "gpt2-small"  # a preset name, or a gptcore weights file
    system: str = "gptcore"
    precision: str = "auto"  # gptcore's; HF runs in fp32 or under bf16 autocast as `system` says
    device: str = "auto"
    batch: int = 8
    seq_len: int = 120
    prompt_len: int = 50
    new_tokens: int = 100
    repeats: int = 3
    warmup: int = 1
    threads: int = 0  # 0: torch's default
    seed: int = 123
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    step_in_backward: bool | str = "auto"  # as the training stages: on where it applies (StepRunner)
    recast_weights: bool | str = "auto"  # as the training stages: for 1 GiB+ of weight copies (StepRunner)
    max_grad_norm: float | None = 1.0  # as the training stages: clipping on (step_in_backward auto off); None: off
    # train: LoRA adapters of this rank (alpha = rank) on every block's Linear layers, the rest frozen, as
    # the finetuning stages' `lora:` (gptcore/recipes/adapters.py); 0: every weight trains
    lora_rank: int = 0
    quantize: str = "none"  # gptcore's decoding weights: none, or int8 (gptcore/inference/quantize.py)
    # Start gptcore's worker with glibc's allocator keeping freed memory (gptcore/training/allocator.py); None: as
    # the entry points of the task's work start, with it for train/classify (dvc.yaml's fixed-shape
    # training stages), without for generation (serve, generate_responses).
    keep_freed_memory: bool | None = None
    hf_keep_freed_memory: bool = False  # HF's worker as gptcore's (by default HF runs as its users get it)

    def keeps_freed_memory(self) -> bool:
        """Whether this system's worker starts with the allocator setting."""
        ours = self.task in FIXED_SHAPE_TASKS if self.keep_freed_memory is None else self.keep_freed_memory
        return ours if self.system == "gptcore" else ours and self.hf_keep_freed_memory

    def tokens_per_repeat(self) -> int:
        if self.task.startswith("generate"):
            return self.batch * self.new_tokens
        return self.batch * self.seq_len


def model_config(spec: BenchSpec):
    """The GPTConfig of the spec's model: a preset's, or the one stored in the weights file."""
    from gptcore.config import PRESETS, GPTConfig
    from gptcore.weights import read_config

    if spec.model in PRESETS:
        return GPTConfig.from_name(spec.model)
    return read_config(spec.model)
