"""`gptcore bench`: tokens/s and peak memory of gptcore beside Hugging Face's GPT2LMHeadModel, same shapes.

Each system (gptcore; HF in fp32; HF under bf16 autocast) is measured in a fresh subprocess of its own,
one after the other, so that their peak resident memory (ru_maxrss) does not mix and one's allocations
do not slow the next. Every worker builds its model with random weights (or gptcore's from a weights
file), runs `warmup` untimed repetitions of the task, then `repeats` timed ones, and reports tokens/s
of each, and the page faults they took. gptcore's worker is started as the task's work is: train and
classify with glibc's allocator keeping freed memory, as dvc.yaml starts the fixed-shape training
stages (gptcore/memory.py), generation with the defaults, as serve and generate_responses
(--keep-freed-memory / --no-keep-freed-memory to choose); HF's with the defaults, as its users get it
(--hf-keep-freed-memory: as gptcore's). Tasks:
- train: one full optimizer step (AdamW, every parameter) on a batch of batch x seq_len random tokens;
- classify: one classifier step (2-class head; last block + final LayerNorm + head train, the frozen
  prefix runs without autograd) on batch x seq_len tokens;
- generate / generate-batch: greedy decoding of new_tokens tokens after a prompt_len-token prompt, for
  1 prompt / `batch` prompts (8 by default) at once; tokens/s counts new tokens (prefill included).
For generate (batch 1), llama.cpp (llama-cpp-python, when installed) runs the same weights exported to
GGUF in f16 and q8_0, the same prompt and as many greedy tokens, with as many threads. In the same run
a worker measures the task's roofs (gptcore/roofline.py), and each row gives the fraction of its roof
that gptcore reached. Around every worker, gptcore/machine_load.py records the load average and the
CPU other processes used; a row measured on a machine that was not quiet says so and warns.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptcore.machine_load import QUIET_OTHER_CORES, LoadWatch

TASKS = ("train", "classify", "generate", "generate-batch")
FIXED_SHAPE_TASKS = ("train", "classify")  # the same shapes every step, as the stages that train
SYSTEMS = ("gptcore", "hf-fp32", "hf-bf16", "llama.cpp-f16", "llama.cpp-q8_0")
ROOF = "roof"  # the worker that measures the task's roofs (gptcore/roofline.py)


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
    quantize: str = "none"  # gptcore's decoding weights: none, or int8 (gptcore/quantize.py)
    # Start gptcore's worker with glibc's allocator keeping freed memory (gptcore/memory.py); None: as
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


# --- the worker (one system, in its own process) -------------------------------------------------------


def _model_config(spec: BenchSpec):
    from gptcore.config import PRESETS, GPTConfig
    from gptcore.weights import read_config

    if spec.model in PRESETS:
        return GPTConfig.from_name(spec.model)
    return read_config(spec.model)


def _gptcore_task(spec: BenchSpec, device, precision: str):
    """A zero-argument callable that runs the task once on gptcore."""
    import torch

    from gptcore.config import PRESETS
    from gptcore.decoding import cast_for_inference, generate, generate_batch
    from gptcore.device import forked_rng
    from gptcore.model import GPTModel, set_activation_checkpointing
    from gptcore.precision import autocast, make_grad_scaler, weights_dtype
    from gptcore.train import StepRunner, compile_blocks, lm_loss, make_optimizer
    from gptcore.weights import load_model

    config = _model_config(spec)
    generator = torch.Generator().manual_seed(spec.seed)
    if spec.task == "classify":
        from gptcore.classify import (
            classification_loss, frozen_linears_cast, frozen_prefix, load_foundation, set_trainable,
        )

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
        runner = StepRunner(model, optimizer, loss_fn, device, precision, spec.grad_accum, spec.step_in_backward,
                            make_grad_scaler(device, precision), spec.recast_weights)
        model.train()
        return lambda: runner.step((inputs, labels))

    if spec.model in PRESETS:
        with forked_rng(device, spec.seed), torch.device(device):
            model = GPTModel(config)
    else:
        model = load_model(spec.model, device)
    if spec.compile:
        compile_blocks(model)
    if spec.task == "train":
        model.to(weights_dtype(precision))
        set_activation_checkpointing(model, spec.activation_checkpointing)
        optimizer = make_optimizer(model.parameters(), lr=5e-5, weight_decay=0.1)
        ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len + 1), generator=generator)
        runner = StepRunner(model, optimizer, lm_loss, device, precision, spec.grad_accum, spec.step_in_backward,
                            make_grad_scaler(device, precision), spec.recast_weights)
        model.train()
        return lambda: runner.step((ids[:, :-1], ids[:, 1:]))

    model.eval()
    cast_for_inference(model, precision)
    if spec.quantize == "int8":
        from gptcore.quantize import quantize_int8

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


def _hf_task(spec: BenchSpec, device, bf16: bool):
    """A zero-argument callable that runs the task once on transformers' GPT2LMHeadModel."""
    import torch
    import torch.nn.functional as F
    from transformers import GPT2Config, GPT2LMHeadModel

    from gptcore.device import forked_rng

    config = _model_config(spec)
    hf_config = GPT2Config(
        vocab_size=config.vocab_size, n_positions=config.context_length, n_embd=config.emb_dim,
        n_layer=config.n_layers, n_head=config.n_heads, resid_pdrop=config.drop_rate, embd_pdrop=config.drop_rate,
        attn_pdrop=config.drop_rate, layer_norm_epsilon=1e-5, activation_function="gelu_new",
        tie_word_embeddings=config.tie_embeddings, use_cache=spec.task.startswith("generate"),
    )
    with forked_rng(device, spec.seed), torch.device(device):
        model = GPT2LMHeadModel(hf_config)
    generator = torch.Generator().manual_seed(spec.seed)

    def amp():
        return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    if spec.task in ("train", "classify"):
        ids = torch.randint(0, config.vocab_size, (spec.batch, spec.seq_len + 1), generator=generator).to(device)
        inputs = ids[:, :-1]
        if spec.task == "classify":
            with torch.device(device):
                model.lm_head = torch.nn.Linear(config.emb_dim, 2)
            model.requires_grad_(False)
            for module in (model.transformer.h[-1], model.transformer.ln_f, model.lm_head):
                module.requires_grad_(True)
            targets = torch.randint(0, 2, (spec.batch,), generator=generator).to(device)
        else:
            targets = ids[:, 1:]
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.1)
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            with amp():
                logits = model(input_ids=inputs, use_cache=False).logits
                if spec.task == "classify":
                    logits = logits[:, -1]
                loss = F.cross_entropy(logits.flatten(0, -2).float(), targets.flatten())
            loss.backward()
            optimizer.step()

        return step

    model.eval()
    prompts = torch.randint(0, config.vocab_size, (spec.batch, spec.prompt_len), generator=generator).to(device)
    mask = torch.ones_like(prompts)

    def run():
        with torch.inference_mode(), amp():
            model.generate(
                prompts, attention_mask=mask, max_new_tokens=spec.new_tokens, min_new_tokens=spec.new_tokens,
                do_sample=False, pad_token_id=0,
            )

    return run


def _llama_cpp_task(spec: BenchSpec, folder: Path, gguf_dtype: str):
    """The same random weights (or weights file) as gptcore's worker, exported to GGUF and run by
    llama.cpp: greedy decoding of new_tokens tokens after the same prompt."""
    import llama_cpp
    import torch

    from gptcore.config import PRESETS
    from gptcore.device import forked_rng
    from gptcore.export.gguf import export_gguf
    from gptcore.model import GPTModel
    from gptcore.weights import save_model

    config = _model_config(spec)
    source = Path(spec.model)
    if spec.model in PRESETS:
        with forked_rng(torch.device("cpu"), spec.seed):
            model = GPTModel(config)
        source = folder / "model.safetensors"
        save_model(model, source)
        del model
    export_gguf(source, folder / "model.gguf", dtype=gguf_dtype, chat_template=False)
    threads = spec.threads or torch.get_num_threads()
    llm = llama_cpp.Llama(model_path=str(folder / "model.gguf"), n_ctx=spec.prompt_len + spec.new_tokens,
                          n_batch=spec.prompt_len, n_threads=threads, n_threads_batch=threads, verbose=False)
    generator = torch.Generator().manual_seed(spec.seed)
    prompt = torch.randint(0, config.vocab_size, (1, spec.prompt_len), generator=generator)[0].tolist()

    def run():
        made = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            made += 1
            if made == spec.new_tokens:
                break

    return run


def _roofs(spec: BenchSpec, device) -> dict[str, Any]:
    """The task's roofs on this machine in gptcore's precision (gptcore/roofline.py)."""
    from collections import Counter

    import torch

    from gptcore import roofline
    from gptcore.decoding import decoding_weight_dtypes
    from gptcore.precision import resolve_precision

    decoding = spec.task.startswith("generate")
    precision = resolve_precision(spec.precision, device, "inference" if decoding else "train")
    compute = {"fp32": torch.float32, "fp16-mixed": torch.float16}.get(precision, torch.bfloat16)
    config = _model_config(spec)
    result: dict[str, Any] = {"system": ROOF, "precision": precision}
    if not decoding:
        if spec.task == "classify":
            config = dataclasses.replace(config, num_classes=2)
        tokens = spec.batch * spec.seq_len
        work = roofline.training_matmuls(config, tokens, 1 if spec.task == "classify" else None)
        seconds = roofline.time_matmuls(work, compute, device)
        flops = sum(mm.flops * count for mm, count in work.items())
        return {**result, "matmul_s_per_step": round(seconds, 4), "matmul_gflop_per_s": round(flops / seconds / 1e9, 1),
                "tokens_per_s": tokens / seconds}
    # As cast_for_inference stores them (decoding_weight_dtypes): bf16-true blocks with a bf16 head (fp32
    # where the CPU lacks AVX512-BF16); fp32 column-major on CPU; the mixed precisions keep fp32 weights
    # and compute in 16 bits; int8 (gptcore/quantize.py): every Linear int8, with bf16 activations.
    int8 = spec.quantize == "int8"
    block_dtype, head_dtype = decoding_weight_dtypes(precision, spec.quantize, device)
    layout = "column" if precision == "fp32" and device.type == "cpu" else "row"
    blocks, head = roofline.decoding_matmuls(config, spec.batch, layout)
    if int8:
        blocks, head = (Counter({dataclasses.replace(mm, weight_layout="int8"): n for mm, n in work.items()})
                        for work in (blocks, head))
    kernel_s = (roofline.time_matmuls(blocks, torch.bfloat16 if int8 else compute, device)
                + roofline.time_matmuls(head, torch.float32 if head_dtype == torch.float32 else torch.bfloat16, device))
    weight_bytes = roofline.decoding_weight_bytes(config, block_dtype, head_dtype)
    bandwidth = roofline.memory_read_bandwidth(device)
    return {**result, "read_gb_per_s": round(bandwidth / 1e9, 1), "weight_mb_per_step": round(weight_bytes / 1e6, 1),
            "tokens_per_s": spec.batch * bandwidth / weight_bytes, "kernel_tokens_per_s": spec.batch / kernel_s}


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
    from gptcore.precision import resolve_precision

    device = resolve_device(spec.device)
    if spec.system == ROOF:
        return _roofs(spec, device)
    with contextlib.ExitStack() as stack:
        if spec.system == "gptcore":
            precision = resolve_precision(spec.precision, device, "inference" if spec.task.startswith("generate") else "train")
            run = _gptcore_task(spec, device, precision)
        elif spec.system.startswith("llama.cpp"):
            import tempfile

            precision = spec.system.split("-", 1)[1]  # the GGUF dtype
            folder = stack.enter_context(tempfile.TemporaryDirectory(prefix="gptcore-bench-"))
            run = _llama_cpp_task(spec, Path(folder), precision)
        else:
            precision = "bf16-mixed" if spec.system == "hf-bf16" else "fp32"
            run = _hf_task(spec, device, bf16=precision == "bf16-mixed")
        return _time_task(spec, device, precision, run)


def _time_task(spec: BenchSpec, device, precision: str, run) -> dict[str, Any]:
    import torch

    from gptcore.memory import keeps_freed_memory

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
        "page_faults_per_repeat": round((after.ru_minflt - before.ru_minflt) / spec.repeats),  # memory faulted in afresh
        # CPU time (all threads) and its kernel share (page faults are zeroed there): steadier than
        # tokens/s on a machine that other work shares.
        "cpu_s_per_repeat": round((after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) / spec.repeats, 3),
        "system_s_per_repeat": round((after.ru_stime - before.ru_stime) / spec.repeats, 3),
        "keeps_freed_memory": keeps_freed_memory(),
    }
    if device.type == "cuda":
        result["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return result


# --- the parent: one subprocess per system, then the comparison ------------------------------------------


def _run_worker(spec: BenchSpec, timeout: float | None) -> dict[str, Any]:
    from gptcore.memory import allocator_env

    env = allocator_env(spec.keeps_freed_memory())
    if spec.threads:
        env.update(OMP_NUM_THREADS=str(spec.threads), MKL_NUM_THREADS=str(spec.threads))
    cmd = [sys.executable, "-m", "gptcore.bench", "--worker", json.dumps(dataclasses.asdict(spec))]
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
    import torch

    from gptcore.device import resolve_device
    from gptcore.precision import has_native_bf16

    return has_native_bf16(resolve_device(device_name))


def _median(result: dict[str, Any] | None) -> float | None:
    if not result or "tokens_per_s" not in result:
        return None
    return statistics.median(result["tokens_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _llama_cpp_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("llama_cpp") is not None


def _systems(spec: BenchSpec, hf: bool, hf_precisions: tuple[str, ...], llama_cpp: bool | None) -> tuple[list[str], list[str]]:
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
            systems += ["llama.cpp-f16", "llama.cpp-q8_0"]
        elif llama_cpp:
            notes.append("llama.cpp: llama-cpp-python is not installed")
    return systems, notes


def bench(
    spec: BenchSpec, hf: bool = True, timeout: float | None = None, hf_precisions: tuple[str, ...] = ("fp32", "bf16"),
    llama_cpp: bool | None = None, roof: bool = True,
) -> dict[str, Any]:
    """Measure gptcore, the peers that apply (HF fp32/bf16; llama.cpp f16/q8_0 for batch-1 generation,
    when installed, or when `llama_cpp` is True) and the task's roofs; one flat row of results.

    Each runs in a worker process of its own, one after the other; `load` gives, per worker, the load
    average before and after and the CPU cores other processes used meanwhile (gptcore/machine_load.py),
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
    row = _row(spec, results)
    # Judged on the CPU other processes used, before and during each worker: the load average (kept
    # for reference) lags by a minute and still counts a worker that has just ended.
    loads = {"before": idle.to_dict(), **{name: result["load"] for name, result in results.items() if result}}
    row["load"] = loads
    row["quiet"] = all(load["quiet"] for load in loads.values())
    if not row["quiet"]:
        noisy = ", ".join(f"{name} (other processes {v['other_cores']} cores; load average {v['load_before']} -> "
                          f"{v['load_after']})" for name, v in loads.items() if not v["quiet"])
        notes.append(f"NOT QUIET, the figures are not comparable: {noisy}; quiet means other processes used at "
                     f"most {QUIET_OTHER_CORES} cores in the second before the first run and during each run")
    if notes:
        row["notes"] = "; ".join(notes)
    return row


def _row(spec: BenchSpec, results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    ours = results["gptcore"] or {}
    rates = ours.get("tokens_per_s") or [None]
    gptcore_rate = _median(ours)
    hf_fp32, hf_bf16 = _median(results["hf-fp32"]), _median(results["hf-bf16"])
    ours_precision = ours.get("precision", "")
    same = hf_bf16 if ours_precision.startswith("bf16") else hf_fp32 if ours_precision == "fp32" else None
    row: dict[str, Any] = {"task": spec.task, "model": spec.model, "precision": ours.get("precision", spec.precision),
                           "device": ours.get("device"), "threads": ours.get("threads"), "batch": spec.batch}
    row.update(
        {"seq_len": spec.seq_len} if not spec.task.startswith("generate")
        else {"prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens}
    )
    if spec.quantize != "none":
        row["quantize"] = spec.quantize
    row.update(
        repeats=spec.repeats,
        gptcore_tokens_per_s=_round(gptcore_rate),
        gptcore_tokens_per_s_min=_round(min(rates) if rates[0] is not None else None),
        gptcore_tokens_per_s_max=_round(max(rates) if rates[0] is not None else None),
        gptcore_peak_rss_mib=ours.get("peak_rss_mib"),
        gptcore_page_faults_per_repeat=ours.get("page_faults_per_repeat"),
        gptcore_cpu_s_per_repeat=ours.get("cpu_s_per_repeat"),
        gptcore_system_s_per_repeat=ours.get("system_s_per_repeat"),
        hf_fp32_tokens_per_s=_round(hf_fp32),
        hf_bf16_tokens_per_s=_round(hf_bf16),
        hf_fp32_peak_rss_mib=(results["hf-fp32"] or {}).get("peak_rss_mib"),
        hf_bf16_peak_rss_mib=(results["hf-bf16"] or {}).get("peak_rss_mib"),
        ratio_vs_hf_fp32=_ratio(gptcore_rate, hf_fp32),
        ratio_vs_hf_bf16=_ratio(gptcore_rate, hf_bf16),
        ratio_vs_hf_same_precision=_ratio(gptcore_rate, same),
    )
    for system in ("llama.cpp-f16", "llama.cpp-q8_0"):
        if results[system]:
            key = system.replace(".", "_").replace("-", "_")
            row[f"{key}_tokens_per_s"] = _round(_median(results[system]))
            row[f"ratio_vs_{key}"] = _ratio(gptcore_rate, _median(results[system]))
    row.update(_roof_columns(results[ROOF], gptcore_rate))
    for system, result in results.items():
        if result and "peak_gpu_mib" in result:
            row[f"{system.replace('-', '_')}_peak_gpu_mib"] = result["peak_gpu_mib"]
    if (spec.activation_checkpointing or spec.grad_accum > 1 or spec.compile or spec.step_in_backward != "auto"
            or spec.recast_weights != "auto"):
        row.update(
            grad_accum=spec.grad_accum, activation_checkpointing=spec.activation_checkpointing,
            compile=spec.compile, step_in_backward=spec.step_in_backward, recast_weights=spec.recast_weights,
        )
    row["keeps_freed_memory"] = {
        system.replace(".", "_").replace("-", "_"): result["keeps_freed_memory"] for system, result in results.items()
        if result and "keeps_freed_memory" in result
    }
    return row


def _roof_columns(roof: dict[str, Any] | None, gptcore_rate: float | None) -> dict[str, Any]:
    """The roof worker's figures, and the fraction of each that gptcore reached."""
    if not roof:
        return {}
    columns = {f"roof_{key}": value for key, value in roof.items() if key not in ("system", "precision", "load")}
    columns["roof_tokens_per_s"] = _round(roof["tokens_per_s"])
    columns["gptcore_fraction_of_roof"] = _ratio(gptcore_rate, roof["tokens_per_s"])
    if "kernel_tokens_per_s" in roof:
        columns["roof_kernel_tokens_per_s"] = _round(roof["kernel_tokens_per_s"])
        columns["gptcore_fraction_of_kernels"] = _ratio(gptcore_rate, roof["kernel_tokens_per_s"])
    return columns


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_row(row: dict[str, Any]) -> str:
    """A few human-readable lines for one result row."""
    shape = (
        f"{row['batch']} x {row['seq_len']} tokens" if "seq_len" in row
        else f"batch {row['batch']}, {row['prompt_len']}-token prompt -> {row['new_tokens']} new"
    )
    lines = [f"{row['task']} {row['model']} ({shape}; {row['device']}, {row['threads']} threads, "
             f"median/min/max of {row['repeats']} repeats)"]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    lines.append(f"  {'system':<10} {'precision':<9} {'tokens/s':>9} {'min':>9} {'max':>9} {'peak RSS MiB':>13}")
    lines.append(
        f"  {'gptcore':<10} {row['precision']:<9} {fmt(row['gptcore_tokens_per_s']):>9} "
        f"{fmt(row['gptcore_tokens_per_s_min']):>9} {fmt(row['gptcore_tokens_per_s_max']):>9} "
        f"{fmt(row['gptcore_peak_rss_mib'], '.0f'):>13}"
    )
    for name, key in (("HF", "hf_fp32"), ("HF", "hf_bf16")):
        precision = "fp32" if key == "hf_fp32" else "bf16 amp"
        lines.append(
            f"  {name:<10} {precision:<9} {fmt(row[key + '_tokens_per_s']):>9} {'':>9} {'':>9} "
            f"{fmt(row[key + '_peak_rss_mib'], '.0f'):>13}"
        )
    for dtype in ("f16", "q8_0"):
        if f"llama_cpp_{dtype}_tokens_per_s" in row:
            lines.append(f"  {'llama.cpp':<10} {dtype:<9} {fmt(row[f'llama_cpp_{dtype}_tokens_per_s']):>9}")
    lines.append(
        f"  gptcore / HF fp32: {fmt(row['ratio_vs_hf_fp32'], '.2f')}x; / HF bf16: {fmt(row['ratio_vs_hf_bf16'], '.2f')}x;"
        f" / HF same precision: {fmt(row['ratio_vs_hf_same_precision'], '.2f')}x"
        + "".join(f"; / llama.cpp {d}: {fmt(row[f'ratio_vs_llama_cpp_{d}'], '.2f')}x"
                  for d in ("f16", "q8_0") if f"ratio_vs_llama_cpp_{d}" in row)
    )
    lines.extend(_roof_lines(row, fmt))
    kept = [name for name, keeps in row.get("keeps_freed_memory", {}).items() if keeps]
    lines.append(f"  allocator keeps freed memory (gptcore/memory.py): {', '.join(kept) or 'none'}; "
                 f"gptcore page faults per repeat: {fmt(row.get('gptcore_page_faults_per_repeat'), ',.0f')}")
    if "gptcore_batch_speedup" in row:
        lines.append(f"  gptcore batch {row['batch']} vs batch 1: {row['gptcore_batch_speedup']:.2f}x tokens/s")
    loads = "; ".join(f"{name} {v['load_before']} -> {v['load_after']} (others {v['other_cores']} cores)"
                      for name, v in row.get("load", {}).items())
    lines.append(f"  load average before -> after each run: {loads}")
    if row.get("notes"):
        lines.append(f"  note: {row['notes']}")
    return "\n".join(lines)


def _roof_lines(row: dict[str, Any], fmt) -> list[str]:
    if "roof_tokens_per_s" not in row:
        return []
    if "roof_matmul_s_per_step" in row:
        return [f"  roof: the step's matmuls alone at torch's kernels {row['roof_matmul_s_per_step']:.3f} s "
                f"({fmt(row['roof_matmul_gflop_per_s'])} GFLOP/s) = {fmt(row['roof_tokens_per_s'])} tokens/s; "
                f"gptcore reached {fmt(row['gptcore_fraction_of_roof'], '.0%')} of it"]
    return [f"  roof: {fmt(row['roof_weight_mb_per_step'], '.0f')} MB of weights per step at "
            f"{fmt(row['roof_read_gb_per_s'])} GB/s memory read = {fmt(row['roof_tokens_per_s'])} tokens/s; "
            f"the step's matmuls alone at torch's kernels: {fmt(row['roof_kernel_tokens_per_s'])} tokens/s; "
            f"gptcore reached {fmt(row['gptcore_fraction_of_roof'], '.0%')} and "
            f"{fmt(row['gptcore_fraction_of_kernels'], '.0%')}"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from gptcore.arguments import device_name, non_negative_int, number, positive_int

    parser.add_argument("--model", default="gpt2-small", help="gpt2-small|gpt2-medium|gpt2-large|gpt2-xl or a weights file")
    parser.add_argument("--task", nargs="+", default=["train"], choices=TASKS, metavar="TASK",
                        help=f"one or more of {', '.join(TASKS)}")
    from gptcore.config import PRECISIONS, QUANTIZE

    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="gptcore's (see gptcore/precision.py)")
    parser.add_argument("--device", type=device_name, default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
    parser.add_argument("--batch", type=positive_int, default=None, help="rows (default 8; 1 for generate)")
    parser.add_argument("--seq-len", type=positive_int, default=120, help="tokens per row (train, classify)")
    parser.add_argument("--prompt-len", type=positive_int, default=50, help="prompt tokens (generate)")
    parser.add_argument("--new-tokens", type=positive_int, default=100, help="new tokens (generate)")
    parser.add_argument("--repeats", type=positive_int, default=3, help="timed runs per system (the figures are their median)")
    parser.add_argument("--warmup", type=non_negative_int, default=1, help="untimed runs first (allocator, kernels, compile)")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (train)")
    parser.add_argument("--activation-checkpointing", action="store_true", help="recompute block activations in backward (train)")
    parser.add_argument("--compile", action="store_true", help="torch.compile gptcore's blocks")
    parser.add_argument("--step-in-backward", action=argparse.BooleanOptionalAction, default=None,
                        help="update each weight inside backward (less memory, the same update); default: as the "
                        "training stages, where it applies (1 process, no --grad-accum, no fp16-mixed)")
    parser.add_argument("--recast-weights", action=argparse.BooleanOptionalAction, default=None,
                        help="mixed precision: cast weights again in backward instead of keeping bf16 copies (less "
                        "memory, the same gradients); default: as the training stages, for 1 GiB+ of copies")
    parser.add_argument("--quantize", default="none", choices=QUANTIZE,
                        help="gptcore's decoding weights (generate): int8 as llama.cpp's q8_0 (gptcore/quantize.py)")
    parser.add_argument("--no-hf", action="store_true", help="measure gptcore only")
    parser.add_argument("--hf", default="both", choices=("both", "fp32", "bf16"),
                        help="which HF runs: fp32, under bf16 autocast, or both")
    parser.add_argument("--keep-freed-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="start gptcore's worker with glibc's allocator keeping freed memory (gptcore/memory.py) "
                             "or not; default: as the task's work is started, with it for train and classify "
                             "(dvc.yaml's training stages), without for generation (serve, generate_responses)")
    parser.add_argument("--hf-keep-freed-memory", action="store_true",
                        help="start HF's workers with the same allocator setting as gptcore's")
    parser.add_argument("--llama-cpp", action=argparse.BooleanOptionalAction, default=None,
                        help="run llama.cpp (llama-cpp-python) on the same weights as GGUF f16 and q8_0 for generate "
                             "(batch 1); default: when it is installed")
    parser.add_argument("--no-roof", action="store_true", help="skip measuring the task's roofs (gptcore/roofline.py)")
    parser.add_argument("--timeout", type=number(minimum=0.0), default=None, help="seconds per system before it is given up")
    parser.add_argument("--json", action="store_true", help="one JSON object per line instead of a table")


def run_cli(args: argparse.Namespace) -> int:
    """`gptcore bench`: every task in turn; a table, or JSON lines."""
    from gptcore.errors import ConfigError

    if not (args.model in _presets() or Path(args.model).is_file()):
        raise ConfigError(f"--model: {args.model} is neither a preset ({', '.join(_presets())}) nor a weights file")
    for name in ("repeats", "seq_len", "prompt_len", "new_tokens", "grad_accum"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive")
    if args.batch is not None and args.batch < 1:
        raise ConfigError("--batch must be positive")
    batch1 = None
    for task in args.task:
        batch = args.batch or (1 if task == "generate" else 8)
        spec = BenchSpec(
            task=task, model=args.model, precision=args.precision, device=args.device, batch=batch,
            seq_len=args.seq_len, prompt_len=args.prompt_len, new_tokens=args.new_tokens, repeats=args.repeats,
            warmup=args.warmup, threads=args.threads, grad_accum=args.grad_accum,
            activation_checkpointing=args.activation_checkpointing, compile=args.compile,
            step_in_backward="auto" if args.step_in_backward is None else args.step_in_backward,
            recast_weights="auto" if args.recast_weights is None else args.recast_weights,
            keep_freed_memory=args.keep_freed_memory, quantize=args.quantize,
            hf_keep_freed_memory=args.hf_keep_freed_memory,
        )
        hf_precisions = ("fp32", "bf16") if args.hf == "both" else (args.hf,)
        row = bench(spec, hf=not args.no_hf, timeout=args.timeout, hf_precisions=hf_precisions,
                    llama_cpp=args.llama_cpp, roof=not args.no_roof)
        if not row["quiet"]:
            print(f"warning: {task}: the machine was not quiet; see the row's notes", file=sys.stderr, flush=True)
        if task == "generate" and batch == 1:
            batch1 = row["gptcore_tokens_per_s"]
        if task == "generate-batch" and batch1 and row["gptcore_tokens_per_s"]:
            row["gptcore_batch_speedup"] = round(row["gptcore_tokens_per_s"] / batch1, 2)
        print(json.dumps(row) if args.json else format_row(row) + "\n", flush=True)
    return 0


def _presets() -> tuple[str, ...]:
    from gptcore.config import PRESETS

    return tuple(PRESETS)


def _worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m gptcore.bench")
    parser.add_argument("--worker", required=True, help="a BenchSpec as JSON")
    spec = BenchSpec(**json.loads(parser.parse_args(argv).worker))
    print(json.dumps(measure(spec)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(_worker_main(sys.argv[1:]))
