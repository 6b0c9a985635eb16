"""One row of results per task, from the workers' results (gptcore beside its peers, its roofs), and a
few human-readable lines for it."""

from __future__ import annotations

import statistics
from typing import Any

from gptcore.bench.spec import ROOF, BenchSpec


def result_row(spec: BenchSpec, results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """One task's row: its shape, gptcore's figures beside HF's and llama.cpp's, the roofs, GPU memory,
    gptcore's settings where they are not the defaults, and which workers kept freed memory."""
    ours = results["gptcore"] or {}
    gptcore_rate = _median(ours)
    row = _shape_columns(spec, ours)
    row.update(_gptcore_columns(spec, ours))
    row.update(_hf_columns(results, gptcore_rate, ours.get("precision", "")))
    row.update(_llama_cpp_columns(results, gptcore_rate))
    row.update(_roof_columns(results[ROOF], gptcore_rate))
    row.update(_gpu_memory_columns(results))
    row.update(_setting_columns(spec))
    row["keeps_freed_memory"] = {
        system.replace(".", "_").replace("-", "_"): result["keeps_freed_memory"]
        for system, result in results.items()
        if result and "keeps_freed_memory" in result
    }
    return row


def _shape_columns(spec: BenchSpec, ours: dict[str, Any]) -> dict[str, Any]:
    """What was run: the task, model, precision, device, threads and the work's size."""
    row: dict[str, Any] = {
        "task": spec.task,
        "model": spec.model,
        "precision": ours.get("precision", spec.precision),
        "device": ours.get("device"),
        "threads": ours.get("threads"),
        "batch": spec.batch,
    }
    row.update(
        {"seq_len": spec.seq_len}
        if not spec.task.startswith("generate")
        else {"prompt_len": spec.prompt_len, "new_tokens": spec.new_tokens}
    )
    if spec.quantize != "none":
        row["quantize"] = spec.quantize
    if ours.get("precision_reason"):  # decoding: why this precision, and the kernels' path per weight type
        row["precision_reason"], row["kernels"] = ours["precision_reason"], ours.get("kernels")
    return row


def _gptcore_columns(spec: BenchSpec, ours: dict[str, Any]) -> dict[str, Any]:
    """gptcore's tokens/s (median, min, max of the repeats), peak RSS, page faults and CPU time."""
    rates = ours.get("tokens_per_s") or [None]
    return {
        "repeats": spec.repeats,
        "gptcore_tokens_per_s": _round(_median(ours)),
        "gptcore_tokens_per_s_min": _round(min(rates) if rates[0] is not None else None),
        "gptcore_tokens_per_s_max": _round(max(rates) if rates[0] is not None else None),
        "gptcore_peak_rss_mib": ours.get("peak_rss_mib"),
        "gptcore_page_faults_per_repeat": ours.get("page_faults_per_repeat"),
        "gptcore_cpu_s_per_repeat": ours.get("cpu_s_per_repeat"),
        "gptcore_system_s_per_repeat": ours.get("system_s_per_repeat"),
    }


def _hf_columns(
    results: dict[str, dict[str, Any] | None], gptcore_rate: float | None, ours_precision: str
) -> dict[str, Any]:
    """HF's tokens/s and peak RSS in fp32 and bf16, and gptcore's speed over each (and over its own precision)."""
    hf_fp32, hf_bf16 = _median(results["hf-fp32"]), _median(results["hf-bf16"])
    same = hf_bf16 if ours_precision.startswith("bf16") else hf_fp32 if ours_precision == "fp32" else None
    return {
        "hf_fp32_tokens_per_s": _round(hf_fp32),
        "hf_bf16_tokens_per_s": _round(hf_bf16),
        "hf_fp32_peak_rss_mib": (results["hf-fp32"] or {}).get("peak_rss_mib"),
        "hf_bf16_peak_rss_mib": (results["hf-bf16"] or {}).get("peak_rss_mib"),
        "ratio_vs_hf_fp32": _ratio(gptcore_rate, hf_fp32),
        "ratio_vs_hf_bf16": _ratio(gptcore_rate, hf_bf16),
        "ratio_vs_hf_same_precision": _ratio(gptcore_rate, same),
    }


def _llama_cpp_columns(results: dict[str, dict[str, Any] | None], gptcore_rate: float | None) -> dict[str, Any]:
    """llama.cpp's tokens/s in each GGUF dtype it ran, and gptcore's speed over it."""
    columns: dict[str, Any] = {}
    for system in ("llama.cpp-f16", "llama.cpp-bf16", "llama.cpp-q8_0"):
        if results[system]:
            key = system.replace(".", "_").replace("-", "_")
            columns[f"{key}_tokens_per_s"] = _round(_median(results[system]))
            columns[f"ratio_vs_{key}"] = _ratio(gptcore_rate, _median(results[system]))
    return columns


def _gpu_memory_columns(results: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Each system's peak GPU memory, where it ran on CUDA."""
    return {
        f"{system.replace('-', '_')}_peak_gpu_mib": result["peak_gpu_mib"]
        for system, result in results.items()
        if result and "peak_gpu_mib" in result
    }


def _setting_columns(spec: BenchSpec) -> dict[str, Any]:
    """gptcore's training settings, all of them where any is not the default; none otherwise."""
    if not (
        spec.activation_checkpointing
        or spec.grad_accum > 1
        or spec.compile
        or spec.step_in_backward != "auto"
        or spec.recast_weights != "auto"
        or spec.max_grad_norm != 1.0
        or spec.lora_rank
    ):
        return {}
    return {
        "lora_rank": spec.lora_rank,
        "grad_accum": spec.grad_accum,
        "activation_checkpointing": spec.activation_checkpointing,
        "compile": spec.compile,
        "step_in_backward": spec.step_in_backward,
        "recast_weights": spec.recast_weights,
        "max_grad_norm": spec.max_grad_norm,
    }


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


def _median(result: dict[str, Any] | None) -> float | None:
    if not result or "tokens_per_s" not in result:
        return None
    return statistics.median(result["tokens_per_s"])


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def format_row(row: dict[str, Any]) -> str:
    """A few human-readable lines for one result row."""
    shape = (
        f"{row['batch']} x {row['seq_len']} tokens"
        if "seq_len" in row
        else f"batch {row['batch']}, {row['prompt_len']}-token prompt -> {row['new_tokens']} new"
    )
    lines = [
        f"{row['task']} {row['model']} ({shape}; {row['device']}, {row['threads']} threads, "
        f"median/min/max of {row['repeats']} repeats)"
    ]

    def fmt(v, spec=".1f"):
        return "-" if v is None else format(v, spec)

    if row.get("precision_reason"):
        lines.append(f"  gptcore precision {row['precision']}: {row['precision_reason']}; kernels {row.get('kernels')}")
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
    for dtype in ("f16", "bf16", "q8_0"):
        if f"llama_cpp_{dtype}_tokens_per_s" in row:
            lines.append(f"  {'llama.cpp':<10} {dtype:<9} {fmt(row[f'llama_cpp_{dtype}_tokens_per_s']):>9}")
    lines.append(
        f"  gptcore / HF fp32: {fmt(row['ratio_vs_hf_fp32'], '.2f')}x; / HF bf16: {fmt(row['ratio_vs_hf_bf16'], '.2f')}x;"
        f" / HF same precision: {fmt(row['ratio_vs_hf_same_precision'], '.2f')}x"
        + "".join(
            f"; / llama.cpp {d}: {fmt(row[f'ratio_vs_llama_cpp_{d}'], '.2f')}x"
            for d in ("f16", "bf16", "q8_0")
            if f"ratio_vs_llama_cpp_{d}" in row
        )
    )
    lines.extend(_roof_lines(row, fmt))
    kept = [name for name, keeps in row.get("keeps_freed_memory", {}).items() if keeps]
    lines.append(
        f"  allocator keeps freed memory (gptcore/training/allocator.py): {', '.join(kept) or 'none'}; "
        f"gptcore page faults per repeat: {fmt(row.get('gptcore_page_faults_per_repeat'), ',.0f')}"
    )
    if "gptcore_batch_speedup" in row:
        lines.append(f"  gptcore batch {row['batch']} vs batch 1: {row['gptcore_batch_speedup']:.2f}x tokens/s")
    loads = "; ".join(
        f"{name} {v['load_before']} -> {v['load_after']} (others {v['other_cores']} cores)"
        for name, v in row.get("load", {}).items()
    )
    lines.append(f"  load average before -> after each run: {loads}")
    if row.get("notes"):
        lines.append(f"  note: {row['notes']}")
    return "\n".join(lines)


def _roof_lines(row: dict[str, Any], fmt) -> list[str]:
    if "roof_tokens_per_s" not in row:
        return []
    if "roof_matmul_s_per_step" in row:
        return [
            f"  roof: the step's matmuls alone at torch's kernels {row['roof_matmul_s_per_step']:.3f} s "
            f"({fmt(row['roof_matmul_gflop_per_s'])} GFLOP/s) = {fmt(row['roof_tokens_per_s'])} tokens/s; "
            f"gptcore reached {fmt(row['gptcore_fraction_of_roof'], '.0%')} of it"
        ]
    return [
        f"  roof: {fmt(row['roof_weight_mb_per_step'], '.0f')} MB of weights per step at "
        f"{fmt(row['roof_read_gb_per_s'])} GB/s memory read = {fmt(row['roof_tokens_per_s'])} tokens/s; "
        f"the step's matmuls alone at torch's kernels: {fmt(row['roof_kernel_tokens_per_s'])} tokens/s; "
        f"gptcore reached {fmt(row['gptcore_fraction_of_roof'], '.0%')} and "
        f"{fmt(row['gptcore_fraction_of_kernels'], '.0%')}"
    ]
