"""The measured work, in a worker process: each system's task (gptcore's here; Hugging Face's and
llama.cpp's in gptcore/bench/peers.py) as a zero-argument callable, the task's roofs (gptcore/bench/roofline.py), and `measure`,
which runs one of them and reports tokens/s, page faults and peak memory."""

from __future__ import annotations

import contextlib
import dataclasses
import resource
import time
from pathlib import Path
from typing import Any

from gptcore.bench.peers import hf_task, llama_cpp_task
from gptcore.bench.spec import ROOF, BenchSpec, model_config


def _gptcore_task(spec: BenchSpec, device, precision: str):
    """A zero-argument callable that runs the task once on gptcore."""
    import torch

    from gptcore.training.step import compile_blocks

    config = model_config(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.task == "classify":
        return _gptcore_classify_task(spec, device, precision, config, generator)
    model = _gptcore_model(spec, device, config)
    if spec.compile:
        compile_blocks(model)
    if spec.task == "train":
        return _gptcore_train_task(spec, device, precision, model, config, generator)
    return _gptcore_decoding_task(spec, device, precision, model, config, generator)


def _gptcore_model(spec: BenchSpec, device, config):
    """gptcore's language model on the device: a preset's random weights, or the weights file."""
    import torch

    from gptcore.config import PRESETS
    from gptcore.device import forked_rng
    from gptcore.model import GPTModel
    from gptcore.weights import load_model

    if spec.model in PRESETS:
        with forked_rng(device, spec.seed), torch.device(device):
            return GPTModel(config)
    return load_model(spec.model, device)


def _step_runner(spec: BenchSpec, model, optimizer, loss_fn, device, precision: str):
    """The training stages' StepRunner for the model, with the spec's step settings."""
    from gptcore.training.step import StepRunner

    return StepRunner(
        model,
        optimizer,
        loss_fn,
        device,
        precision,
        grad_accum=spec.grad_accum,
        step_in_backward=spec.step_in_backward,
        max_grad_norm=spec.max_grad_norm,
        recast_weights=spec.recast_weights,
    )


def _gptcore_classify_task(spec: BenchSpec, device, precision: str, config, generator):
    """One training step of the classifier's last block and head, as finetune_classifier takes it."""
    import torch

    from gptcore.config import PRESETS
    from gptcore.device import forked_rng
    from gptcore.model import GPTModel
    from gptcore.precision import weights_dtype
    from gptcore.recipes.classifier import frozen_linears_cast, frozen_prefix, load_foundation, set_trainable
    from gptcore.recipes.classify import classification_loss
    from gptcore.training.step import make_optimizer

    if spec.model in PRESETS:
        with forked_rng(device, spec.seed), torch.device(device):
            model = GPTModel(dataclasses.replace(config, num_classes=2))
    else:
        model = load_foundation(spec.model, 2, seed=spec.seed, device=device)
    model.to(weights_dtype(precision))
    trainable = set_trainable(model, "last_block")
    optimizer = make_optimizer(trainable, lr=5e-5, weight_decay=0.1)
    frozen = frozen_prefix(model)
    loss_fn = classification_loss("last", frozen_blocks=frozen)
    # Held for this worker's life, as finetune_classifier holds it for the whole training.
    frozen_linears_cast(model, frozen, precision).__enter__()
    inputs = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len), generator=generator)
    labels = torch.randint(0, 2, (spec.batch,), generator=generator)
    runner = _step_runner(spec, model, optimizer, loss_fn, device, precision)
    model.train()
    return lambda: runner.step((inputs, labels))


def _gptcore_train_task(spec: BenchSpec, device, precision: str, model, config, generator):
    """One pretraining step of the whole model on random tokens."""
    import torch

    from gptcore.model import set_activation_checkpointing
    from gptcore.precision import weights_dtype
    from gptcore.training.evaluation import lm_loss
    from gptcore.training.step import make_optimizer

    model.to(weights_dtype(precision))
    set_activation_checkpointing(model, spec.activation_checkpointing)
    trainable = list(model.parameters())
    if spec.lora_rank:
        from gptcore.recipes.adapters import add_lora
        from gptcore.training.lora import LoRAConfig

        lora = LoRAConfig(rank=spec.lora_rank, alpha=float(spec.lora_rank), targets=("qkv", "out_proj", "fc", "proj"))
        trainable = add_lora(model, lora, device, spec.seed, precision)
    optimizer = make_optimizer(trainable, lr=5e-5, weight_decay=0.1)
    ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len + 1), generator=generator)
    runner = _step_runner(spec, model, optimizer, lm_loss, device, precision)
    model.train()
    return lambda: runner.step((ids[:, :-1], ids[:, 1:]))


def _gptcore_decoding_task(spec: BenchSpec, device, precision: str, model, config, generator):
    """Greedy decoding of new_tokens tokens after random prompts: one row, or a batch of them."""
    import torch

    from gptcore.inference.decoding import cast_for_inference, generate, generate_batch
    from gptcore.precision import autocast

    model.eval()
    cast_for_inference(model, precision)
    if spec.quantize == "int8":
        from gptcore.inference.quantize import quantize_int8

        quantize_int8(model)
    prompts = torch.randint(0, config.vocab_size, (spec.batch, spec.prompt_len), generator=generator)
    if spec.batch == 1:
        idx = prompts.to(device)

        def run():
            with autocast(device, precision):
                generate(model, idx, spec.new_tokens)

        return run
    rows = prompts.tolist()

    def run_batch():
        with autocast(device, precision):
            generate_batch(model, rows, spec.new_tokens)

    return run_batch


def _roofs(spec: BenchSpec, device) -> dict[str, Any]:
    """The task's roofs on this machine in gptcore's precision (gptcore/bench/roofline.py)."""
    from collections import Counter

    import torch

    from gptcore.bench import roofline
    from gptcore.inference.decoding import decoding_weight_dtypes

    decoding = spec.task.startswith("generate")
    precision, _ = _gptcore_precision(spec, device)
    compute = {"fp32": torch.float32, "fp16-mixed": torch.float16}.get(precision, torch.bfloat16)
    config = model_config(spec)
    result: dict[str, Any] = {"system": ROOF, "precision": precision}
    if not decoding:
        if spec.task == "classify":
            config = dataclasses.replace(config, num_classes=2)
        tokens = spec.batch * spec.seq_len
        work = roofline.training_matmuls(config, tokens, 1 if spec.task == "classify" else None)
        seconds = roofline.time_matmuls(work, compute, device)
        flops = sum(mm.flops * count for mm, count in work.items())
        return {
            **result,
            "matmul_s_per_step": round(seconds, 4),
            "matmul_gflop_per_s": round(flops / seconds / 1e9, 1),
            "tokens_per_s": tokens / seconds,
        }
    # As cast_for_inference stores them (decoding_weight_dtypes): bf16-true blocks with a bf16 head (fp32
    # where the CPU lacks AVX512-BF16); fp32 column-major on CPU; the mixed precisions keep fp32 weights
    # and compute in 16 bits; int8 (gptcore/inference/quantize.py): every Linear int8, with bf16 activations.
    int8 = spec.quantize == "int8"
    block_dtype, head_dtype = decoding_weight_dtypes(precision, spec.quantize, device)
    layout = "column" if precision == "fp32" and device.type == "cpu" else "row"
    blocks, head = roofline.decoding_matmuls(config, spec.batch, layout)
    if int8:
        blocks, head = (
            Counter({dataclasses.replace(mm, weight_layout="int8"): n for mm, n in work.items()})
            for work in (blocks, head)
        )
    kernel_s = roofline.time_matmuls(blocks, torch.bfloat16 if int8 else compute, device) + roofline.time_matmuls(
        head, torch.float32 if head_dtype == torch.float32 else torch.bfloat16, device
    )
    weight_bytes = roofline.decoding_weight_bytes(config, block_dtype, head_dtype)
    bandwidth = roofline.memory_read_bandwidth(device)
    return {
        **result,
        "read_gb_per_s": round(bandwidth / 1e9, 1),
        "weight_mb_per_step": round(weight_bytes / 1e6, 1),
        "tokens_per_s": spec.batch * bandwidth / weight_bytes,
        "kernel_tokens_per_s": spec.batch / kernel_s,
    }


def measure(spec: BenchSpec) -> dict[str, Any]:
    """Run one system's task in this process: tokens/s of each timed repeat, page faults and peak memory.

    The allocator setting is the process's (`keeps_freed_memory` reports it; `bench` starts each
    worker with it or without). torch's thread count is spec.threads for the call only, and its draws
    (init, dropout) come from a fork of torch's generators.
    """
    from gptcore.device import forked_rng, resolve_device

    with _torch_threads(spec.threads), forked_rng(resolve_device(spec.device)):
        return _measure(spec)


@contextlib.contextmanager
def _torch_threads(threads: int):
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _measure(spec: BenchSpec) -> dict[str, Any]:
    from gptcore.device import resolve_device

    device = resolve_device(spec.device)
    if spec.system == ROOF:
        return _roofs(spec, device)
    with contextlib.ExitStack() as stack:
        if spec.system == "gptcore":
            precision, why = _gptcore_precision(spec, device)
            run = _gptcore_task(spec, device, precision)
            if why:  # decoding: the choice, its reason and the kernels' paths in the row
                return {**_time_task(spec, device, precision, run), **why}
        elif spec.system.startswith("llama.cpp"):
            import tempfile

            precision = spec.system.split("-", 1)[1]  # the GGUF dtype
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="gptcore-bench-"))
            run = llama_cpp_task(spec, Path(folder), precision)
        else:
            precision = "bf16-mixed" if spec.system == "hf-bf16" else "fp32"
            run = hf_task(spec, device, bf16=precision == "bf16-mixed")
        return _time_task(spec, device, precision, run)


def _gptcore_precision(spec: BenchSpec, device) -> tuple[str, dict[str, Any]]:
    """gptcore's precision for the task and, for decoding, why (precision_reason) and the kernels' paths."""
    from gptcore.inference import decoding, kernels
    from gptcore.precision import resolve_precision

    if not spec.task.startswith("generate"):
        return resolve_precision(spec.precision, device, "train"), {}
    precision, reason = decoding.resolve_decoding_precision(spec.precision, device)
    return precision, {"precision_reason": reason, "kernels": kernels.paths()}


def _time_task(spec: BenchSpec, device, precision: str, run) -> dict[str, Any]:
    import torch

    from gptcore.training.allocator import keeps_freed_memory

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(spec.warmup):
        run()
    sync()
    rates = []
    before = resource.getrusage(resource.RUSAGE_SELF)
    for _ in range(spec.repeats):
        started = time.perf_counter()
        run()
        sync()
        rates.append(spec.tokens_per_repeat() / (time.perf_counter() - started))
    after = resource.getrusage(resource.RUSAGE_SELF)
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "system": spec.system,
        "precision": precision,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "tokens_per_s": rates,
        "peak_rss_mib": round(peak_kib / 1024, 1),
        "page_faults_per_repeat": round(
            (after.ru_minflt - before.ru_minflt) / spec.repeats
        ),  # memory faulted in afresh
        # CPU time (all threads) and its kernel share (page faults are zeroed there): steadier than
        # tokens/s on a machine that other work shares.
        "cpu_s_per_repeat": round(
            (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / spec.repeats, 3
        ),
        "system_s_per_repeat": round((after.ru_stime - before.ru_stime) / spec.repeats, 3),
        "keeps_freed_memory": keeps_freed_memory(),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result
