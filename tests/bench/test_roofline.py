"""The roofs `gptcore bench` reports (gptcore/bench/roofline.py) and its quietness check (gptcore/bench/machine_load.py)."""

import json
import subprocess
import sys
import time

import pytest
import torch

from gptcore.bench import roofline
from gptcore.bench.machine_load import LoadWatch, busy_cpu_seconds
from gptcore.config import GPTConfig
from gptcore.inference.decoding import cast_for_inference, decoding_weight_dtypes
from gptcore.inference.quantize import Int8Linear
from gptcore.model import GPTModel
from gptcore.weights import save_model

SMALL = GPTConfig.from_name("gpt2-small")


def _linear_weight_numel(model: torch.nn.Module) -> int:
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_linear_shapes_are_the_models_linears():
    with torch.device("meta"):
        model = GPTModel(SMALL)
    assert sum(k * n for k, n in roofline.linear_shapes(SMALL)) == _linear_weight_numel(model)
    assert len(roofline.linear_shapes(SMALL)) == sum(isinstance(m, torch.nn.Linear) for m in model.modules())


def test_training_matmuls_are_six_flops_per_weight_per_token():
    # Forward 2 FLOPs per weight per token, backward 4 (input and weight gradients): Kaplan et al. 2020, 2.1.
    tokens = 8 * 120
    weights = sum(k * n for k, n in roofline.linear_shapes(SMALL))
    work = roofline.training_matmuls(SMALL, tokens)
    assert sum(mm.flops * count for mm, count in work.items()) == 6 * weights * tokens
    # Training the last block and the head: every Linear forward, only those backward.
    c, head = SMALL.emb_dim, SMALL.emb_dim * SMALL.vocab_size
    last = roofline.training_matmuls(SMALL, tokens, trained_blocks=1)
    assert sum(mm.flops * n for mm, n in last.items()) == 2 * weights * tokens + 4 * (12 * c * c + head) * tokens


def test_decoding_bytes_are_what_cast_for_inference_stores():
    config = GPTConfig(vocab_size=300, context_length=32, emb_dim=32, n_heads=4, n_layers=2, tie_embeddings=True)
    for quantize in ("none", "int8"):
        model = cast_for_inference(GPTModel(config), "bf16-true", quantize)
        linears = [m for m in model.modules() if isinstance(m, (torch.nn.Linear, Int8Linear))]
        stored = sum(
            m.weight.numel() * m.weight.element_size() + (2 * m.scales.numel() if quantize == "int8" else 0)
            for m in linears
        )
        dtypes = decoding_weight_dtypes("bf16-true", quantize, torch.device("cpu"))
        assert roofline.decoding_weight_bytes(config, *dtypes) == stored
    blocks, head = roofline.decoding_matmuls(config, 3, "column")
    assert sum(blocks.values()) == 4 * config.n_layers and list(head) == [roofline.Matmul(3, 32, 300, "column")]


def test_time_matmuls_and_bandwidth_are_positive_and_scale_with_counts():
    one = roofline.time_matmuls({roofline.Matmul(64, 64, 64): 1}, torch.float32, torch.device("cpu"))
    assert one > 0
    assert roofline.memory_read_bandwidth(torch.device("cpu"), nbytes=1 << 24, repeats=2) > 1e8  # > 0.1 GB/s


def test_busy_cpu_seconds_reads_proc_stat(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text("cpu  100 20 30 4000 50 6 7 8 0 0\ncpu0 1 2 3 4 5 6 7 8 0 0\n")
    import os

    assert busy_cpu_seconds(stat) == pytest.approx((100 + 20 + 30 + 6 + 7 + 8) / os.sysconf("SC_CLK_TCK"))
    assert busy_cpu_seconds(tmp_path / "missing") is None


BURN = [sys.executable, "-c", "import time\nend = time.process_time() + {s}\nwhile time.process_time() < end: pass"]


@pytest.mark.skipif(sys.platform != "linux", reason="/proc/stat")
def test_load_watch_sees_other_processes_but_not_its_own_child():
    # The watched child's own CPU time is not "other": only the busy neighbour is.
    with LoadWatch() as own:
        subprocess.run([BURN[0], BURN[1], BURN[2].format(s=1.0)], check=True)
    neighbour = subprocess.Popen([BURN[0], BURN[1], BURN[2].format(s=30)])
    try:
        time.sleep(0.3)
        with LoadWatch() as busy:
            subprocess.run([sys.executable, "-c", "import time; time.sleep(1.5)"], check=True)
    finally:
        neighbour.kill()
        neighbour.wait()
    assert busy.other_cores > 0.6 and not busy.quiet
    assert own.other_cores < busy.other_cores - 0.3
    assert set(busy.to_dict()) == {"load_before", "load_after", "other_cores", "quiet"}


def test_bench_reports_roofs_load_and_llama_cpp(tmp_path):
    """A tiny model with GPT-2's vocabulary (so it exports to GGUF): every column the checks read."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPTModel(GPTConfig(context_length=64, emb_dim=32, n_heads=4, n_layers=2, tie_embeddings=True))
    save_model(model, tmp_path / "tiny.safetensors")
    has_llama_cpp = __import__("importlib").util.find_spec("llama_cpp") is not None
    cmd = [
        sys.executable,
        "-m",
        "gptcore",
        "bench",
        "--model",
        str(tmp_path / "tiny.safetensors"),
        "--task",
        "generate",
        "train",
        "--no-hf",
        "--json",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--prompt-len",
        "6",
        "--new-tokens",
        "4",
        "--seq-len",
        "8",
        "--batch",
        "1",
        "--threads",
        "1",
        "--precision",
        "fp32",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    generate, train = [json.loads(line) for line in proc.stdout.splitlines()]
    for row in (generate, train):
        assert set(row["load"]) >= {"before", "gptcore", "roof"} and isinstance(row["quiet"], bool)
        assert ("NOT QUIET" in row.get("notes", "")) == (not row["quiet"])
        assert row["roof_tokens_per_s"] > 0
        assert row["gptcore_fraction_of_roof"] == pytest.approx(
            row["gptcore_tokens_per_s"] / row["roof_tokens_per_s"], rel=2e-2
        )
    assert generate["roof_read_gb_per_s"] > 0 and generate["roof_kernel_tokens_per_s"] > 0
    assert train["roof_matmul_gflop_per_s"] > 0
    if has_llama_cpp:
        assert generate["llama_cpp_f16_tokens_per_s"] > 0 and generate["llama_cpp_q8_0_tokens_per_s"] > 0
        assert generate["ratio_vs_llama_cpp_f16"] == pytest.approx(
            generate["gptcore_tokens_per_s"] / generate["llama_cpp_f16_tokens_per_s"], rel=2e-2
        )
        assert set(generate["load"]) == {"before", "gptcore", "llama.cpp-f16", "llama.cpp-q8_0", "roof"}
    assert "llama_cpp_f16_tokens_per_s" not in train
