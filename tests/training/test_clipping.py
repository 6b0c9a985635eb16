"""Gradient clipping (max_grad_norm): the global L2 norm of the trainable gradients, clipped once per
optimizer step, the same with micro-batches, DDP and FSDP as on one process with the whole batch, after
fp16's unscaling; step-in-backward off while it clips; the clipped steps counted and resumed exactly."""

import logging
import math

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.model import GPTModel
from gptcore.params.schema import ClassifierParams, PretrainParams
from gptcore.training.clipping import clip_gradients, trainable_parameters
from gptcore.training.evaluation import lm_loss
from gptcore.training.loop import TrainResult
from gptcore.training.progress import Progress
from gptcore.training.step import StepRunner, make_optimizer
from tests.training.test_sharding import _assert_same_run, _launch, _results
from tests.training.test_train import _run

CPU = torch.device("cpu")
TINY = GPTConfig(vocab_size=97, context_length=16, emb_dim=16, n_heads=2, n_layers=2, drop_rate=0.0)


def _with_grads(*grads):
    params = [torch.nn.Parameter(torch.zeros_like(g)) for g in grads]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    return params


def _norm(params):
    return math.sqrt(sum(float(p.grad.double().square().sum()) for p in params if p.grad is not None))


# --- the clipping itself, on hand-made gradients -----------------------------------------------------------


def test_a_norm_over_the_limit_is_clipped_to_the_limit():
    # Two tensors whose gradients together are the vector (3, 4, 0, 0, 0, 12): norm 13.
    params = _with_grads(torch.tensor([3.0, 4.0]), torch.tensor([[0.0, 0.0], [0.0, 12.0]]))
    before = [p.grad.clone() for p in params]
    assert clip_gradients(params, 1.0) == pytest.approx(13.0, rel=1e-7)
    assert _norm(params) == pytest.approx(1.0, rel=1e-6)
    for p, g in zip(params, before):  # every gradient scaled by the same factor: the direction is kept
        torch.testing.assert_close(p.grad, g / 13.0, rtol=1e-6, atol=0)


def test_a_norm_under_the_limit_changes_nothing():
    params = _with_grads(torch.tensor([0.3, -0.4]), torch.tensor([0.0]))  # norm 0.5
    before = [p.grad.clone() for p in params]
    assert clip_gradients(params, 1.0) == pytest.approx(0.5, rel=1e-7)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))  # bit for bit


def test_the_same_as_torch_clip_grad_norm():
    torch.manual_seed(0)
    grads = [torch.randn(5, 7) * 3, torch.randn(11), torch.randn(2, 3, 4)]
    ours, reference = _with_grads(*grads), _with_grads(*grads)
    ours.append(torch.nn.Parameter(torch.ones(3)))  # no gradient: left out, as torch leaves it
    norm = clip_gradients(ours, 2.5)
    assert norm == pytest.approx(float(torch.nn.utils.clip_grad_norm_(reference, 2.5)), rel=0, abs=0)
    for a, b in zip(ours, reference):
        assert torch.equal(a.grad, b.grad)


def test_the_limit_must_be_positive():
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="max_norm must be a positive number"):
            clip_gradients(_with_grads(torch.ones(2)), bad)


# --- one optimizer step -------------------------------------------------------------------------------------


def _batch(rows=6, seed=1):
    ids = torch.randint(0, TINY.vocab_size, (rows, 13), generator=torch.Generator().manual_seed(seed))
    return ids[:, :-1], ids[:, 1:]


def _step(max_grad_norm, grad_accum=1, precision="fp32", optimizer=None, **runner_options):
    """One StepRunner step of SGD (lr 1: the update is minus the gradient); the model, the norm, the runner."""
    torch.manual_seed(0)
    model = GPTModel(TINY).train()
    optimizer = (optimizer or (lambda m: torch.optim.SGD(m.parameters(), lr=1.0)))(model)
    runner = StepRunner(
        model, optimizer, lm_loss, CPU, precision, grad_accum=grad_accum, max_grad_norm=max_grad_norm, **runner_options
    )
    norm = runner.step(_batch())
    runner.close()
    return model, norm, runner


def _update(model):
    torch.manual_seed(0)
    start = GPTModel(TINY)
    return {name: p.detach() - start.state_dict()[name] for name, p in model.named_parameters()}


def test_null_turns_clipping_off():
    off, norm, _ = _step(None)
    assert norm is None
    unclipped = _update(off)
    assert math.sqrt(sum(float(u.double().square().sum()) for u in unclipped.values())) > 0.2  # 0.2 (below) clips
    assert PretrainParams.from_dict({"max_grad_norm": None}).loop_options()["max_grad_norm"] is None
    assert TrainResult(steps=5).clipping_metrics() == {}  # and no clipping metrics


def test_the_update_is_clipped_to_the_limit():
    clipped, norm, _ = _step(0.2)
    unclipped, _, _ = _step(None)
    assert norm > 0.2
    update = _update(clipped)
    assert math.sqrt(sum(float(u.double().square().sum()) for u in update.values())) == pytest.approx(0.2, rel=1e-5)
    for name, u in _update(unclipped).items():  # the same direction
        torch.testing.assert_close(
            update[name], u * (0.2 / norm), rtol=1e-4, atol=1e-6
        )  # weights - start: fp32 cancellation


@pytest.mark.parametrize("grad_accum", [2, 3])
def test_micro_batches_clip_the_whole_batch_gradient_once(grad_accum):
    whole, whole_norm, _ = _step(0.2)
    pieces, pieces_norm, _ = _step(0.2, grad_accum=grad_accum)
    assert pieces_norm == pytest.approx(whole_norm, rel=1e-5)
    for name, value in _update(whole).items():
        torch.testing.assert_close(_update(pieces)[name], value, rtol=0, atol=1e-6)


def test_only_the_trained_parameters_count():
    """The norm is the optimizer's parameters' (LoRA: the adapters); a gradient it does not update is
    neither counted nor scaled."""
    head_only = lambda m: torch.optim.SGD(m.out_head.parameters(), lr=1.0)  # noqa: E731
    model, norm, runner = _step(1e-3, optimizer=head_only)
    assert trainable_parameters(runner.optimizer) == [model.out_head.weight]
    plain, _, _ = _step(None, optimizer=head_only)
    assert norm == pytest.approx(float(plain.out_head.weight.grad.norm()), rel=1e-6)
    assert float(model.out_head.weight.grad.norm()) == pytest.approx(1e-3, rel=1e-5)
    for a, b in zip(model.trf_blocks.parameters(), plain.trf_blocks.parameters()):
        assert torch.equal(a.grad, b.grad)  # the others' gradients, as they were


def test_fp16_mixed_clips_the_unscaled_gradients():
    """GradScaler.unscale_ comes first: the gradients the optimizer used have the limit's norm, not the
    limit divided by the loss scale (65,536)."""
    model, norm, runner = _step(1e-2, precision="fp16-mixed")
    assert runner.scaler is not None and math.isfinite(norm) and norm > 1e-2
    assert _norm(list(model.parameters())) == pytest.approx(1e-2, rel=1e-4)


def test_step_in_backward_is_off_while_clipping_and_a_line_says_so(caplog):
    with caplog.at_level(logging.INFO, logger="gptcore.training.step"):
        model, norm, runner = _step(
            1.0, step_in_backward="auto", optimizer=lambda m: make_optimizer(m.parameters(), 1e-3, 0.0)
        )
    assert runner.step_in_backward is False and norm is not None
    assert all(p.grad is not None for p in model.parameters())  # the gradients existed together
    assert any("step_in_backward: off, since max_grad_norm 1 clips" in r.getMessage() for r in caplog.records)
    _, norm, runner = _step(
        None, step_in_backward="auto", optimizer=lambda m: make_optimizer(m.parameters(), 1e-3, 0.0)
    )
    assert runner.step_in_backward is True and norm is None  # without clipping: on, as before
    with pytest.raises(ValueError, match="step_in_backward cannot clip gradients"):
        _step(1.0, step_in_backward=True)
    with pytest.raises(ValueError, match="max_grad_norm must be positive"):
        _step(0.0)


def test_params_refuse_step_in_backward_true_with_clipping():
    assert ClassifierParams.from_dict({"step_in_backward": True, "max_grad_norm": None}).step_in_backward is True
    assert ClassifierParams().max_grad_norm == 1.0


# --- the training loop --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def verdict(mirror_dir):
    return (mirror_dir / "the-verdict.txt").read_text()[:6000]


def test_clipped_steps_are_counted_and_resumed_exactly(tokenizer, verdict, tmp_path):
    reference, ref = _run(tokenizer, verdict, max_grad_norm=1.0)
    norms = [row["grad_norm"] for row in ref.history]
    assert all(math.isfinite(n) and n > 0 for n in norms)
    assert 0 < ref.clipped_steps <= ref.steps
    assert ref.clipped_steps >= sum(n > 1.0 for n in norms)  # every sampled step over the limit was counted
    metrics = ref.clipping_metrics()
    assert metrics == {"clipped_steps": ref.clipped_steps, "clipped_fraction": ref.clipped_steps / ref.steps}
    saved = Progress(tmp_path / "ck", fingerprint="same", every_seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, verdict, progress=saved, fail_at=ref.steps // 2 + 3, max_grad_norm=1.0)
    assert torch.load(tmp_path / "ck" / "state.pt", weights_only=True)["clipped_steps"] >= 0
    resumed, result = _run(tokenizer, verdict, progress=Progress(tmp_path / "ck", "same", 0.0), max_grad_norm=1.0)
    assert 0 < result.resumed_at_step < ref.steps
    assert result.history == ref.history and result.clipped_steps == ref.clipped_steps
    for (name, a), b in zip(reference.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    _, unclipped = _run(tokenizer, verdict)
    assert "grad_norm" not in unclipped.history[0] and unclipped.history != ref.history


# --- several processes (torchrun, gloo) ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_ddp_and_fsdp_clip_as_one_process_with_the_whole_batch(tmp_path, lora):
    """A limit under the steps' norms: one process, DDP with two micro-batches per process and FSDP
    (the norm across the shards) make the same clipped updates, up to float rounding; without clipping
    the run differs far more than that."""
    options = {"max_grad_norm": 0.05, "lora": lora}
    _launch(tmp_path, "one", "auto", **options)
    _launch(tmp_path, "ddp", "ddp", nproc=2, grad_accum=2, **options)
    _launch(tmp_path, "fsdp", "fsdp", nproc=2, **options)
    _launch(tmp_path, "unclipped", "auto", lora=lora)
    (one,), (unclipped,) = _results(tmp_path, "one"), _results(tmp_path, "unclipped")
    assert one["clipped"] == sum(row["grad_norm"] > 0.05 for row in one["history"]) > 0  # evaluated every step
    for result in [*_results(tmp_path, "ddp", 2), *_results(tmp_path, "fsdp", 2)]:
        # Measured: weights within 1.3e-6 (the one-process run without clipping: 1e-6; the clipping
        # itself moves them by 3e-2), losses within 5e-7, norms within 1e-7 relative.
        _assert_same_run(one, result, atol=5e-6)
        assert result["clipped"] == one["clipped"]
        norms = [row["grad_norm"] for row in result["history"]]
        assert norms == pytest.approx([row["grad_norm"] for row in one["history"]], rel=1e-5)
    assert unclipped["clipped"] == 0 and "grad_norm" not in unclipped["history"][0]
    assert max(float((unclipped["state"][k] - v).abs().max()) for k, v in one["state"].items()) > 1e-4
