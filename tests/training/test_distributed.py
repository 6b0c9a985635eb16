"""Several processes (torchrun + DistributedDataParallel on gloo) and micro-batches give the one-process result."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from gptcore.params.schema import TrainConfig
from gptcore.training.cross_entropy import IGNORE_INDEX
from gptcore.training.step import StepRunner

# A tiny finetune on padded sequences (targets -100 after each row's end, as instruction data), with a
# last batch of one row so that one process of two gets none. Run as a script by one process or by
# torchrun; it writes its rank's final losses and weights.
SCRIPT = textwrap.dedent(
    """
    import json, sys
    import torch
    from gptcore.config import GPTConfig
    from gptcore.data.loader import make_loader
    from gptcore.device import is_main_process, rank
    from gptcore.model import GPTModel
    from gptcore.training.evaluation import lm_loss, loss_evaluator
    from gptcore.training.cross_entropy import IGNORE_INDEX
    from gptcore.training.loop import LoopOptions, train
    from gptcore.training.step import make_optimizer

    out, grad_accum = sys.argv[1], int(sys.argv[2])
    torch.manual_seed(7)
    rows = []
    for i in range(13):
        length = 4 + (5 * i) % 9  # 4..12 real tokens of 12
        x = torch.randint(0, 100, (12,))
        y = torch.randint(0, 100, (12,))
        y[length:] = IGNORE_INDEX
        rows.append((x, y))
    collate = lambda b: (torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b]))
    train_loader = make_loader(rows[:9], 4, shuffle=True, drop_last=False, seed=3, collate_fn=collate)
    val_loader = make_loader(rows[9:], 4, shuffle=False, drop_last=False, collate_fn=collate)
    config = GPTConfig(vocab_size=100, context_length=12, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)
    model = GPTModel(config)
    optimizer = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
    cpu = torch.device("cpu")
    evaluate = loss_evaluator(train_loader, val_loader, lm_loss, cpu, "fp32", 3)
    options = LoopOptions(epochs=3, eval_every=2, show_progress=False, grad_accum=grad_accum)
    result = train(model, optimizer, train_loader, lm_loss, evaluate, cpu, options)
    torch.save({"history": result.history, "main": is_main_process(), "state": model.state_dict()},
               f"{out}.{rank()}.pt")
    """
)


def _run(tmp_path, name, grad_accum, nproc=None):
    script = tmp_path / "finetune.py"
    script.write_text(SCRIPT)
    out = tmp_path / name
    cmd = [sys.executable, str(script), str(out), str(grad_accum)]
    if nproc:
        cmd[1:2] = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [torch.load(f"{out}.{r}.pt", weights_only=True) for r in range(nproc or 1)]


@pytest.mark.slow
def test_two_gloo_processes_match_one_process(tmp_path):
    (single,) = _run(tmp_path, "single", grad_accum=1)
    ranks = _run(tmp_path, "ddp", grad_accum=2, nproc=2)
    assert [r["main"] for r in ranks] == [True, False]
    final = single["history"][-1]
    assert final["step"] == 9
    for r in ranks:
        assert [row["step"] for row in r["history"]] == [row["step"] for row in single["history"]]
        assert r["history"][-1]["train_loss"] == pytest.approx(final["train_loss"], abs=1e-5)
        assert r["history"][-1]["val_loss"] == pytest.approx(final["val_loss"], abs=1e-5)
        for name, value in single["state"].items():
            torch.testing.assert_close(r["state"][name], value, rtol=0, atol=1e-5, msg=name)
    assert final["train_loss"] < single["history"][0]["train_loss"] - 0.5  # it learned something
    for name, value in ranks[0]["state"].items():  # the processes hold the very same model
        assert torch.equal(ranks[1]["state"][name], value), name


MISMATCH_SCRIPT = textwrap.dedent(
    """
    import sys
    import torch
    from gptcore.config import GPTConfig
    from gptcore.data.loader import make_loader
    from gptcore.device import rank
    from gptcore.errors import WeightsError
    from gptcore.model import GPTModel
    from gptcore.training.evaluation import lm_loss
    from gptcore.training.loop import LoopOptions, train
    from gptcore.training.progress import Progress
    from gptcore.training.step import make_optimizer

    base, mode = sys.argv[1], sys.argv[2]
    torch.manual_seed(7)
    rows = [(torch.randint(0, 100, (12,)), torch.randint(0, 100, (12,))) for _ in range(8)]
    collate = lambda b: (torch.stack([r[0] for r in b]), torch.stack([r[1] for r in b]))
    loader = make_loader(rows, 4, shuffle=True, drop_last=False, seed=3, collate_fn=collate)

    def run(folder, epochs):
        torch.manual_seed(7)
        model = GPTModel(GPTConfig(vocab_size=100, context_length=12, emb_dim=16, n_heads=2, n_layers=2))
        optimizer = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
        train(model, optimizer, loader, lm_loss, lambda m: {}, torch.device("cpu"),
              LoopOptions(epochs=epochs, eval_every=100, show_progress=False), progress=Progress(f"{base}/{folder}", "same", 0.0))

    if mode == "prepare":  # one process: progress at step 2 in r0, at step 4 in r1
        run("r0", 1)
        run("r1", 2)
    else:  # torchrun: each process finds its own folder's progress
        try:
            run(f"r{rank()}", 3)
        except WeightsError as err:
            open(f"{base}/error{rank()}.txt", "w").write(str(err))
    """
)


@pytest.mark.slow
def test_processes_that_find_different_progress_stop_with_one_line(tmp_path):
    script = tmp_path / "mismatch.py"
    script.write_text(MISMATCH_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for launcher, mode in (
        ([], "prepare"),
        (["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], "run"),
    ):
        # Without the check the two processes' collectives pair up wrongly and hang: the timeout fails it.
        proc = subprocess.run(
            [sys.executable, *launcher, str(script), str(tmp_path), mode],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0, 1):
        message = (tmp_path / f"error{r}.txt").read_text()
        assert "\n" not in message and "resumed from different steps [2, 4]" in message, message


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.w = torch.nn.Linear(3, 5)

    def forward(self, x):
        return self.w(x)


def _token_loss(model, batch):
    x, y = batch
    return torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("grad_accum", [2, 3, 7])
def test_micro_batches_give_the_whole_batch_gradient(grad_accum):
    torch.manual_seed(0)
    x = torch.randn(5, 4, 3)
    y = torch.randint(0, 5, (5, 4))
    y[1, 2:] = IGNORE_INDEX  # rows with fewer targets weigh less
    y[3, :] = IGNORE_INDEX  # a row with none
    grads = []
    for accum in (1, grad_accum):
        torch.manual_seed(1)
        model = _Linear()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        StepRunner(model, optimizer, _token_loss, torch.device("cpu"), grad_accum=accum).step((x, y))
        grads.append([p.grad.clone() for p in model.parameters()])
    for whole, pieces in zip(*grads):
        torch.testing.assert_close(pieces, whole, rtol=0, atol=1e-6)


def test_grad_accum_must_be_positive():
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)
    assert TrainConfig(grad_accum=4, activation_checkpointing=True).loop_options() == {
        "grad_accum": 4,
        "activation_checkpointing": True,
        "compile": False,
        "step_in_backward": "auto",
        "recast_weights": "auto",
        "max_grad_norm": 1.0,
        "lr_schedule": "constant",
        "warmup": 0.0,
    }


@pytest.mark.slow
def test_pretrain_stage_runs_unchanged_under_torchrun(tmp_path, mirror_dir):
    import yaml

    from tests.conftest import REPO, _merge

    params = yaml.safe_load((REPO / "params.yaml").read_text())
    _merge(
        params,
        {
            "precision": "fp32",
            "device": "cpu",
            "pretrain": {
                "model": {"context_length": 32, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0},
                "epochs": 1,
                "batch_size": 4,
                "eval_every": 10,
                "eval_batches": 2,
                "sample_tokens": 4,
            },
        },
    )
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = {}
    for name, launcher, accum in (
        ("one", [], 1),
        ("two", ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"], 2),
    ):
        out = tmp_path / name
        with open(tmp_path / "params.yaml") as f:
            p = yaml.safe_load(f)
        p["pretrain"]["grad_accum"] = accum
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(p))
        cmd = [
            sys.executable,
            *launcher,
            str(REPO / "stages/pretrain.py"),
            "--params",
            str(tmp_path / f"{name}.yaml"),
            "--corpus",
            str(mirror_dir / "the-verdict.txt"),
            "--out",
            str(out / "model.safetensors"),
            "--metrics",
            str(out / "metrics.json"),
            "--plots",
            str(out / "plots"),
            "--sample",
            str(out / "sample.txt"),
            "--progress-dir",
            str(out / "progress"),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("pretrain: train loss") == 1  # one summary: only rank 0 writes
        assert (out / "progress" / "done.json").is_file() and not (out / "progress" / "state.pt").exists()
        metrics[name] = json.loads((out / "metrics.json").read_text())
    assert metrics["two"]["steps"] == metrics["one"]["steps"] > 10
    assert metrics["two"]["tokens_seen"] == metrics["one"]["tokens_seen"]
    for key in ("train_loss", "val_loss"):
        assert metrics["two"][key] == pytest.approx(metrics["one"][key], abs=1e-5)


LORA = {"rank": 4, "alpha": 8.0}


@pytest.mark.slow
@pytest.mark.parametrize(
    "stage, method",
    [
        ("finetune_classifier", {}),
        ("finetune_instructions", {}),
        ("finetune_classifier", {"trainable": "lora", "lora": LORA}),
        ("finetune_instructions", {"method": "lora", "lora": LORA}),
    ],
    ids=["classifier", "instructions", "lora_classifier", "lora_instructions"],
)
def test_finetune_stages_run_unchanged_under_torchrun(tmp_path, stage, method, stage_inputs):
    """The same stage script, one process vs two gloo processes with the same global batch (and LoRA)."""
    from tests.recipes.test_resume_stages import _classifier_run, _instructions_run

    make = {"finetune_classifier": _classifier_run, "finetune_instructions": _instructions_run}[stage]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    metrics = {}
    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    # Two processes share each batch, and each cuts its half into two micro-batches.
    for name, launcher, grad_accum in (("one", [], 1), ("two", torchrun, 2)):
        (tmp_path / name).mkdir()
        run = make(
            tmp_path / name,
            stage_inputs,
            "lm-no-dropout.safetensors",
            epochs=1,
            grad_accum=grad_accum,
            progress_minutes=10.0,
            **method,
        )
        cmd = [run.cmd[0], *launcher, *run.cmd[1:]]
        proc = subprocess.run(cmd, cwd=run.workdir, capture_output=True, text=True, timeout=900, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(f"{stage}: ") == 1  # one summary line: only rank 0 writes
        assert (run.workdir / "ck" / "done.json").is_file() and not (run.workdir / "ck" / "state.pt").exists()
        metrics[name] = json.loads((run.workdir / "metrics.json").read_text())
    one, two = metrics["one"], metrics["two"]
    assert two["steps"] == one["steps"] > 5
    for key, value in one.items():
        if key.endswith(("loss", "accuracy", "precision", "recall", "f1")):
            assert two[key] == pytest.approx(value, abs=1e-5), key
        elif key.endswith("perplexity"):  # exp(loss): the same agreement, relative
            assert two[key] == pytest.approx(value, rel=1e-5), key
