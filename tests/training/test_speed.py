"""Speed and memory options give the reference results; `gptcore bench` reports what it promises."""

import json
import subprocess
import sys

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.inference.decoding import cast_for_inference, generate
from gptcore.model import GPTModel, set_activation_checkpointing
from gptcore.training.evaluation import lm_loss
from gptcore.training.step import StepRunner, make_optimizer
from gptcore.weights import save_model

CONFIG = GPTConfig(
    vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.1, tie_embeddings=True
)


def _train(steps=3, precision="fp32", fused=True, **runner_options):
    torch.manual_seed(0)
    model = GPTModel(CONFIG).train()
    if fused:
        optimizer = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    runner = StepRunner(model, optimizer, lm_loss, torch.device("cpu"), precision, **runner_options)
    data = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, CONFIG.vocab_size, (4, 17), generator=data)
        runner.step((ids[:, :-1], ids[:, 1:]))
    runner.close()
    return model, optimizer


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_step_in_backward_is_the_same_update(precision):
    reference, ref_opt = _train(precision=precision)
    model, opt = _train(precision=precision, step_in_backward=True)
    for (name, a), b in zip(reference.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), name  # the tied embedding/head weight included
    assert all(p.grad is None for p in model.parameters())  # freed as soon as used
    assert opt.state_dict()["state"][0]["step"] == ref_opt.state_dict()["state"][0]["step"] == 3


def test_step_in_backward_refuses_micro_batches():
    model = GPTModel(CONFIG)
    with pytest.raises(ValueError, match="grad_accum 1"):
        StepRunner(
            model,
            make_optimizer(model.parameters(), 1e-3, 0.0),
            lm_loss,
            torch.device("cpu"),
            grad_accum=2,
            step_in_backward=True,
        )


def test_closed_runner_leaves_no_hooks():
    model, _ = _train(steps=1, step_in_backward=True)
    before = [p.clone() for p in model.parameters()]
    lm_loss(model, (torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))).backward()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("precision", ["fp32", "bf16-mixed"])
def test_activation_checkpointing_gives_the_same_gradients(precision):
    grads = []
    for recompute in (False, True):
        torch.manual_seed(0)
        model = GPTModel(CONFIG).train()  # dropout on: the recomputation must replay the same masks
        set_activation_checkpointing(model, recompute)
        ids = torch.randint(0, CONFIG.vocab_size, (3, 17), generator=torch.Generator().manual_seed(2))
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed", cache_enabled=not recompute):
            loss = lm_loss(model, (ids[:, :-1], ids[:, 1:]))
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(b, a, rtol=0, atol=1e-6)


def test_fused_adamw_matches_the_default():
    reference, _ = _train(fused=False)
    model, opt = _train(fused=True)
    assert opt.defaults["fused"]
    for a, b in zip(reference.parameters(), model.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)


def test_cast_for_inference():
    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    idx = torch.tensor([[1, 2, 3]])
    reference_state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        reference_logits = model(idx)
    reference = generate(model, idx, 5)
    assert cast_for_inference(model, "fp32").tok_emb.weight.dtype == torch.float32
    # fp32 on CPU: the same weights and outputs; with gptcore's kernels each Linear decodes through gemv.c's
    # fp32 kernel over its row-major weight (batch-invariant), else the weight is stored transposed (x @ W).
    from gptcore.inference import kernels

    qkv = model.trf_blocks[0].att.qkv.weight
    assert qkv.shape == reference_state["trf_blocks.0.att.qkv.weight"].shape
    assert qkv.is_contiguous() if kernels.load_kernels() is not None else qkv.t().is_contiguous()
    for name, value in model.state_dict().items():
        assert torch.equal(value, reference_state[name]), name
    with torch.no_grad():
        torch.testing.assert_close(model(idx), reference_logits, rtol=1e-5, atol=1e-5)
    fp32 = generate(model, idx, 5)
    assert torch.equal(fp32, reference)
    model = GPTModel(CONFIG).eval()  # a model is prepared once, for one precision: a fresh one for bf16
    model.load_state_dict(reference_state)
    cast_for_inference(model, "bf16-true")
    head = {p for p in [*model.final_norm.parameters(), *model.out_head.parameters()]}
    assert {p.dtype for p in model.parameters() if p not in head} == {torch.bfloat16}
    assert {p.dtype for p in model.final_norm.parameters()} == {torch.float32}
    with torch.no_grad():
        assert model(idx).dtype == torch.float32  # logits in fp32 (a bf16 head sums in fp32)
    out = generate(model, idx, 5)
    assert out.shape == fp32.shape and out[0, :3].tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="precision"):
        cast_for_inference(model, "auto")


def _bench(*args, check=True):
    proc = subprocess.run(
        [sys.executable, "-m", "gptcore", "bench", *args], capture_output=True, text=True, timeout=900
    )
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bench") / "tiny.safetensors"
    save_model(
        GPTModel(
            GPTConfig(
                vocab_size=300, context_length=48, emb_dim=32, n_heads=4, n_layers=2, qkv_bias=True, tie_embeddings=True
            )
        ),
        path,
    )
    return path


def test_bench_gptcore_only(tiny_weights):
    out = _bench(
        "--model",
        str(tiny_weights),
        "--task",
        "train",
        "classify",
        "generate",
        "generate-batch",
        "--no-hf",
        "--json",
        "--repeats",
        "2",
        "--warmup",
        "0",
        "--seq-len",
        "12",
        "--prompt-len",
        "6",
        "--new-tokens",
        "5",
        "--threads",
        "1",
        "--precision",
        "fp32",
        "--no-llama-cpp",
        "--no-roof",
    )
    rows = [json.loads(line) for line in out.stdout.splitlines()]
    assert [r["task"] for r in rows] == ["train", "classify", "generate", "generate-batch"]
    for row in rows:
        assert row["precision"] == "fp32" and row["threads"] == 1
        assert row["gptcore_tokens_per_s_min"] <= row["gptcore_tokens_per_s"] <= row["gptcore_tokens_per_s_max"]
        assert row["gptcore_peak_rss_mib"] > 50
        assert row["hf_fp32_tokens_per_s"] is None and row["ratio_vs_hf_fp32"] is None
    assert rows[2]["batch"] == 1 and rows[3]["batch"] == 8 and rows[3]["gptcore_batch_speedup"] > 0
    # The worker starts as the task's work does: training with glibc's allocator keeping freed memory
    # (dvc.yaml's training stages), generation with its defaults (serve, generate_responses).
    if sys.platform == "linux":
        assert [r["keeps_freed_memory"]["gptcore"] for r in rows] == [True, True, False, False]
    assert all(r["gptcore_page_faults_per_repeat"] >= 0 for r in rows)
    (swapped,) = [
        json.loads(line)
        for line in _bench(
            "--model",
            str(tiny_weights),
            "--task",
            "train",
            "--no-keep-freed-memory",
            "--no-hf",
            "--json",
            "--repeats",
            "1",
            "--warmup",
            "0",
            "--seq-len",
            "12",
            "--threads",
            "1",
        ).stdout.splitlines()
    ]
    assert swapped["keeps_freed_memory"] == {"gptcore": False}


@pytest.mark.slow
def test_bench_beside_transformers(tiny_weights):
    pytest.importorskip("transformers")
    out = _bench(
        "--model",
        str(tiny_weights),
        "--task",
        "train",
        "--json",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--seq-len",
        "12",
        "--threads",
        "1",
        "--precision",
        "bf16-mixed",
    )
    (row,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert row["hf_fp32_tokens_per_s"] > 0 and row["hf_fp32_peak_rss_mib"] > 50
    assert row["ratio_vs_hf_fp32"] == pytest.approx(row["gptcore_tokens_per_s"] / row["hf_fp32_tokens_per_s"], rel=1e-2)
    if row["hf_bf16_tokens_per_s"] is not None:  # only where the CPU computes bf16 natively
        assert row["ratio_vs_hf_same_precision"] == row["ratio_vs_hf_bf16"]
    table = _bench(
        "--model",
        str(tiny_weights),
        "--task",
        "generate",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--prompt-len",
        "4",
        "--new-tokens",
        "3",
        "--threads",
        "1",
        "--precision",
        "fp32",
    ).stdout
    assert "gptcore / HF fp32" in table and "peak RSS MiB" in table


def test_bench_rejects_an_unknown_model(tmp_path):
    proc = _bench("--model", str(tmp_path / "nothing.safetensors"), check=False)
    assert proc.returncode == 1 and "nothing.safetensors" in proc.stderr and "Traceback" not in proc.stderr


def test_short_bf16_attention_takes_the_explicit_path_and_agrees(monkeypatch):
    import gptcore.model as model_module

    q = torch.zeros(1, 2, 8, 4, dtype=torch.bfloat16)
    assert model_module.explicit_is_faster(q, q)
    assert not model_module.explicit_is_faster(q.float(), q.float())  # fp32 keeps the fused kernel
    long_keys = torch.zeros(1, 2, model_module.EXPLICIT_MAX_KEYS + 1, 4, dtype=torch.bfloat16)
    assert not model_module.explicit_is_faster(long_keys, long_keys)
    with torch.no_grad():  # decoding and evaluation: the fused kernel
        assert not model_module.explicit_is_faster(q, q) and not model_module.explicit_is_faster(q[:, :, :1], q)

    torch.manual_seed(0)
    model = GPTModel(CONFIG).eval()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 12))
    reference = model(idx)
    with torch.autocast("cpu", torch.bfloat16):
        explicit = model(idx).float()
        monkeypatch.setattr(model_module, "EXPLICIT_MAX_KEYS", 0)
        fused = model(idx).float()
    # bf16 keeps 8 bits of mantissa (logits near 4 round in steps of 1/32), and both paths round in bf16.
    gap = (explicit - fused).abs().max().item()
    assert gap < 0.1 and gap <= 2 * (fused - reference).abs().max().item()
