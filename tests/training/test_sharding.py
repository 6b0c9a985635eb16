"""strategy fsdp (FSDP2 `fully_shard`, gloo on CPU): the same losses and weights as DDP and one process,
exact resume from sharded progress, and one-line errors where it cannot run."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from gptcore.config import GPTConfig
from gptcore.errors import ConfigError
from gptcore.model import GPTModel
from gptcore.params.schema import Params
from gptcore.training.evaluation import lm_loss
from gptcore.training.sharding import mixed_precision_policy, resolve_strategy, shard_units
from gptcore.training.step import StepRunner

# A tiny language model trained for 20 steps (5 batches of 4 rows x 4 epochs), evaluated after every
# step, by one process or by torchrun. argv: out strategy precision options(json). options: lora,
# checkpointing (activation), grad_accum, max_grad_norm, progress (a folder, saved after every step),
# die_at (the processes exit hard at that step's evaluation, before its save: a kill -9).
SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    from gptcore.config import GPTConfig
    from gptcore.data.loader import make_loader
    from gptcore.device import is_main_process, rank
    from gptcore.model import GPTModel
    from gptcore.training.evaluation import lm_loss, loss_evaluator
    from gptcore.training.loop import LoopOptions, train
    from gptcore.training.lora import LoRAConfig, apply_lora, mark_only_lora_as_trainable
    from gptcore.training.progress import Progress
    from gptcore.training.step import make_optimizer
    from gptcore.weights import save_model

    out, strategy, precision, options = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
    torch.manual_seed(7)
    rows = [(torch.randint(0, 96, (12,)), torch.randint(0, 96, (12,))) for _ in range(24)]
    collate = lambda b: (torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b]))
    train_loader = make_loader(rows[:20], 4, shuffle=True, drop_last=False, seed=3, collate_fn=collate)
    val_loader = make_loader(rows[20:], 4, shuffle=False, drop_last=False, collate_fn=collate)
    config = GPTConfig(vocab_size=96, context_length=12, emb_dim=16, n_heads=2, n_layers=3, drop_rate=0.0,
                       tie_embeddings=options.get("tied", False))
    model = GPTModel(config)
    params = model.parameters()
    if options.get("lora"):
        apply_lora(model, LoRAConfig(rank=2, alpha=4.0))
        torch.nn.init.normal_(model.trf_blocks[0].att.qkv.lora_B, std=0.1)  # an adapter that already acts
        params = mark_only_lora_as_trainable(model)
    optimizer = make_optimizer(params, lr=1e-2, weight_decay=0.1)
    cpu = torch.device("cpu")
    evaluate = loss_evaluator(train_loader, val_loader, lm_loss, cpu, precision, 2)
    progress = Progress(options["progress"], "same", 0.0) if options.get("progress") else None

    def report(history):
        if history and history[-1]["step"] == options.get("die_at"):
            os._exit(3)  # no cleanup, no save: as if killed

    loop = LoopOptions(epochs=4, eval_every=1, show_progress=False, grad_accum=options.get("grad_accum", 1),
                       activation_checkpointing=options.get("checkpointing", False), strategy=strategy,
                       max_grad_norm=options.get("max_grad_norm"))
    result = train(model, optimizer, train_loader, lm_loss, evaluate, cpu, loop, precision, progress, report)
    if is_main_process():
        save_model(model, f"{out}.safetensors")
    torch.save({"history": result.history, "state": model.state_dict(), "resumed_at": result.resumed_at_step,
                "clipped": result.clipped_steps}, f"{out}.{rank()}.pt")
    """
)

TORCHRUN = ["-m", "torch.distributed.run", "--standalone"]


def _launch(tmp_path, name, strategy, nproc=1, precision="fp32", check=True, **options):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    launcher = [*TORCHRUN, f"--nproc_per_node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, str(script), str(out), strategy, precision, json.dumps(options)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _results(tmp_path, name, nproc=1):
    return [torch.load(tmp_path / f"{name}.{r}.pt", weights_only=True) for r in range(nproc)]


def _losses(result):
    return [(row["step"], row["train_loss"], row["val_loss"]) for row in result["history"]]


def _assert_same_run(a, b, atol):
    """The same steps, every evaluation's losses within atol, every final weight within atol."""
    assert [s for s, _, _ in _losses(a)] == [s for s, _, _ in _losses(b)]
    for (step, train_a, val_a), (_, train_b, val_b) in zip(_losses(a), _losses(b)):
        assert train_a == pytest.approx(train_b, abs=atol), step
        assert val_a == pytest.approx(val_b, abs=atol), step
    assert a["state"].keys() == b["state"].keys()
    for key, value in a["state"].items():
        torch.testing.assert_close(b["state"][key], value, rtol=0, atol=atol, msg=key)


@pytest.mark.slow
@pytest.mark.parametrize("tied", [False, True])
def test_fsdp_matches_ddp_and_one_process(tmp_path, tied):
    """fp32, no dropout, 20 steps, evaluated after each: FSDP's losses and final weights equal DDP's bit
    for bit (both average the same two half-batch gradients), and one process's within 1e-6, not
    bitwise (4.8e-7 measured: two halves' mean gradients averaged round otherwise than one batch's)."""
    _launch(tmp_path, "one", "auto", tied=tied)
    _launch(tmp_path, "ddp", "ddp", nproc=2, tied=tied)
    _launch(tmp_path, "fsdp", "fsdp", nproc=2, tied=tied)
    (one,) = _results(tmp_path, "one")
    ddp = _results(tmp_path, "ddp", 2)
    fsdp = _results(tmp_path, "fsdp", 2)
    assert one["history"][-1]["step"] == 20 and len(one["history"]) == 20
    assert one["history"][-1]["train_loss"] < one["history"][0]["train_loss"] - 0.5  # it learned
    for result in fsdp:
        _assert_same_run(one, result, atol=1e-6)
        _assert_same_run(ddp[0], result, atol=0.0)
    # Every process gathered the same full weights; rank 0 wrote them, as one process writes its own.
    for key, value in fsdp[0]["state"].items():
        assert torch.equal(fsdp[1]["state"][key], value), key
    from safetensors.torch import load_file

    written = load_file(tmp_path / "fsdp.safetensors")
    for key, value in written.items():
        assert torch.equal(value, fsdp[0]["state"][key]), key
        torch.testing.assert_close(value, load_file(tmp_path / "one.safetensors")[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_fsdp_with_lora_and_activation_checkpointing_matches_ddp(tmp_path):
    """Frozen base weights beside trainable adapters in the same sharded block, recomputed blocks, and
    micro-batches: the same run as DDP's within 1e-6; the frozen weights come back unchanged."""
    options = {"lora": True, "checkpointing": True, "grad_accum": 2}
    _launch(tmp_path, "ddp", "ddp", nproc=2, **options)
    _launch(tmp_path, "fsdp", "fsdp", nproc=2, **options)
    ddp, fsdp = _results(tmp_path, "ddp", 2), _results(tmp_path, "fsdp", 2)
    _assert_same_run(ddp[0], fsdp[0], atol=1e-6)
    torch.manual_seed(7)
    [torch.randint(0, 96, (12,)) for _ in range(48)]  # the rows drawn before the model
    base = GPTModel(GPTConfig(vocab_size=96, context_length=12, emb_dim=16, n_heads=2, n_layers=3, drop_rate=0.0))
    for key, value in base.state_dict().items():
        assert torch.equal(fsdp[0]["state"][key], value), key  # frozen: bitwise the initial weights


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "fp16-mixed"])
def test_fsdp_mixed_precision_trains_close_to_ddp(tmp_path, precision):
    """bf16-mixed / fp16-mixed through FSDP's MixedPrecisionPolicy (low-precision gathers and matmuls,
    fp32 shards and reduction; fp16 with ShardedGradScaler): close to DDP's autocast run, not equal (the
    LayerNorms and embeddings see low-precision weights)."""
    _launch(tmp_path, "ddp", "ddp", nproc=2, precision=precision)
    _launch(tmp_path, "fsdp", "fsdp", nproc=2, precision=precision)
    ddp, fsdp = _results(tmp_path, "ddp", 2), _results(tmp_path, "fsdp", 2)
    for (step, train_a, val_a), (_, train_b, val_b) in zip(_losses(ddp[0]), _losses(fsdp[0])):
        assert train_b == pytest.approx(train_a, abs=0.05), step
        assert val_b == pytest.approx(val_a, abs=0.05), step
    for value in fsdp[0]["state"].values():
        assert value.dtype == torch.float32  # the weights stay fp32; only compute is bf16


@pytest.mark.slow
def test_fsdp_killed_and_resumed_equals_an_uninterrupted_run(tmp_path):
    """Sharded progress saved after every step (DCP: one file per process); the processes die hard at
    step 13 before saving it; the relaunch resumes at 12 and ends bitwise where an uninterrupted run does.
    A launch with another number of processes refuses the progress in one line."""
    _launch(tmp_path, "whole", "fsdp", nproc=2)
    progress = tmp_path / "progress"
    died = _launch(tmp_path, "killed", "fsdp", nproc=2, check=False, progress=str(progress), die_at=13)
    assert died.returncode != 0
    assert sorted(p.name for p in progress.iterdir()) == ["shards-00000012", "state.pt"]
    assert sorted(p.name for p in (progress / "shards-00000012").iterdir()) == [
        ".metadata",
        "__0_0.distcp",
        "__1_0.distcp",
    ]
    other = _launch(tmp_path, "three", "fsdp", nproc=3, check=False, progress=str(progress))
    assert other.returncode != 0
    assert "progress of 2 process(es) cannot resume in 3; launch 2 or delete it to start afresh" in other.stderr
    _launch(tmp_path, "resumed", "fsdp", nproc=2, progress=str(progress))
    whole, resumed = _results(tmp_path, "whole", 2), _results(tmp_path, "resumed", 2)
    assert resumed[0]["resumed_at"] == 12
    assert resumed[0]["history"] == whole[0]["history"]
    for key, value in whole[0]["state"].items():
        assert torch.equal(resumed[0]["state"][key], value), key
    assert (tmp_path / "resumed.safetensors").read_bytes() == (tmp_path / "whole.safetensors").read_bytes()


@pytest.mark.slow
def test_fsdp_on_one_process_is_a_one_line_error(tmp_path):
    proc = _launch(tmp_path, "one", "fsdp", check=False)
    assert proc.returncode != 0
    assert "ConfigError: strategy: fsdp needs several processes, this run has 1" in proc.stderr


def test_strategy_needs_several_processes():
    assert resolve_strategy("auto", 1) == "single"
    assert resolve_strategy("auto", 2) == "ddp"
    assert resolve_strategy("fsdp", 4) == "fsdp"
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(ConfigError, match=f"strategy: {strategy} needs several processes") as err:
            resolve_strategy(strategy, 1)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="unknown value 'fdsp'"):
        resolve_strategy("fdsp", 2)
    model = GPTModel(GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=1))
    optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(ConfigError, match="needs several processes"):  # before any process group
        StepRunner(model, optimizer, lm_loss, torch.device("cpu"), strategy="fsdp")


def test_a_typo_in_strategy_is_a_params_error():
    assert Params.from_dict({}).strategy == "auto"
    assert Params.from_dict({"strategy": "fsdp"}).run.strategy == "fsdp"
    with pytest.raises(ConfigError) as err:
        Params.from_dict({"strategy": "fsdp2"}, where="params.yaml")
    assert str(err.value).startswith("params.yaml: strategy:") and "'fsdp2'" in str(err.value)
    assert "\n" not in str(err.value)


def test_a_model_without_blocks_cannot_be_sharded():
    with pytest.raises(ConfigError, match="Linear has none; use strategy: ddp"):
        shard_units(nn.Linear(3, 4))
    model = GPTModel(GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=2))
    units = shard_units(model)
    assert units == [*model.trf_blocks, model.tok_emb, model.pos_emb]
    tied = GPTModel(GPTConfig(vocab_size=10, context_length=4, emb_dim=8, n_heads=2, n_layers=2, tie_embeddings=True))
    assert shard_units(tied) == [*tied.trf_blocks, tied.pos_emb]  # the tied embedding stays with the head
    model.trf_blocks[1].ff.to(torch.bfloat16)
    with pytest.raises(ConfigError, match="one dtype for the trainable weights of TransformerBlock"):
        shard_units(model)


def test_mixed_precision_policy_follows_precision():
    mixed = mixed_precision_policy("bf16-mixed")
    assert (mixed.param_dtype, mixed.reduce_dtype, mixed.cast_forward_inputs) == (torch.bfloat16, torch.float32, False)
    assert mixed_precision_policy("fp16-mixed").param_dtype == torch.float16
    for precision in ("fp32", "bf16-true"):
        policy = mixed_precision_policy(precision)
        assert (policy.param_dtype, policy.reduce_dtype) == (None, None)


def _with_strategy(run, strategy):
    import yaml

    path = run.workdir / "params.yaml"
    params = yaml.safe_load(path.read_text())
    path.write_text(yaml.safe_dump({**params, "strategy": strategy}))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["finetune_classifier", "finetune_instructions"])
def test_stages_run_under_fsdp_as_on_one_process(tmp_path, stage, stage_inputs):
    """The same stage script and params but `strategy: fsdp`, on two gloo processes: the metrics of one
    process within 1e-5, sharded progress saved after every step and cleared at the end. The classifier
    trains its last block only: the frozen blocks are sharded too, and run without autograd."""
    from tests.recipes.test_resume_stages import _classifier_run, _instructions_run

    make = {"finetune_classifier": _classifier_run, "finetune_instructions": _instructions_run}[stage]
    extra = {"trainable": "last_block"} if stage == "finetune_classifier" else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = {}
    for name, launcher, strategy in (("one", [], "auto"), ("fsdp", [*TORCHRUN, "--nproc_per_node=2"], "fsdp")):
        (tmp_path / name).mkdir()
        run = make(tmp_path / name, stage_inputs, "lm-no-dropout.safetensors", epochs=1, **extra)
        run = _with_strategy(run, strategy)
        cmd = [run.cmd[0], *launcher, *run.cmd[1:]]
        proc = subprocess.run(cmd, cwd=run.workdir, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(f"{stage}: ") == 1  # one summary line: only rank 0 writes
        assert sorted(p.name for p in (run.workdir / "ck").iterdir()) == ["done.json"]
        metrics[name] = json.loads((run.workdir / "metrics.json").read_text())
    one, fsdp = metrics["one"], metrics["fsdp"]
    assert fsdp["steps"] == one["steps"] > 5
    for key, value in one.items():
        if key.endswith(("loss", "accuracy", "precision", "recall", "f1")):
            assert fsdp[key] == pytest.approx(value, abs=1e-5), key
        elif key.endswith("perplexity"):
            assert fsdp[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.slow
def test_a_stage_with_fsdp_on_one_process_stops_with_one_line(tmp_path, stage_inputs):
    from tests.recipes.test_resume_stages import _instructions_run

    run = _with_strategy(_instructions_run(tmp_path, stage_inputs, "lm-no-dropout.safetensors"), "fsdp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GPTCORE_DEBUG": ""}
    proc = subprocess.run(run.cmd, cwd=run.workdir, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: strategy: fsdp needs several processes, this run has 1: launch the stage with "
        "`torchrun --nproc-per-node N` (N >= 2), or set strategy: auto"
    )
    assert not (tmp_path / "model.safetensors").exists()
