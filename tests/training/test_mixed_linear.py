"""Linear layers that cast their weights again in backward give autocast's results bit for bit."""

import pytest
import torch
from torch import nn

from gptcore.config import PRESETS, GPTConfig
from gptcore.model import GPTModel
from gptcore.training.evaluation import lm_loss
from gptcore.training.mixed_linear import recast_pays_off, recast_weights_in_backward
from gptcore.training.step import StepRunner, make_optimizer

CONFIG = GPTConfig(
    vocab_size=97, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, tie_embeddings=True
)


def _linear_run(linear, x, dtype):
    linear.zero_grad()
    x = x.detach().clone().requires_grad_()
    with torch.autocast("cpu", dtype=dtype):
        y = linear(x)
    (y.float() * torch.linspace(-1, 1, y.numel()).view(y.shape)).sum().backward()
    return [y.detach(), x.grad, linear.weight.grad] + ([linear.bias.grad] if linear.bias is not None else [])


@pytest.mark.parametrize("shape", [(8, 12, 24), (5, 24), (2, 3, 4, 24)])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_bits_as_autocast(shape, bias, dtype):
    torch.manual_seed(0)
    linear = nn.Linear(24, 40, bias=bias)
    x = torch.randn(*shape)
    reference = _linear_run(linear, x, dtype)
    undo = recast_weights_in_backward(linear)
    ours = _linear_run(linear, x, dtype)
    undo()
    assert "forward" not in vars(linear)
    for a, b in zip(reference, ours):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_keeps_no_low_precision_weight_copy():
    torch.manual_seed(0)
    model = GPTModel(CONFIG).train()
    recast_weights_in_backward(model)
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []
    ids = torch.randint(0, CONFIG.vocab_size, (2, 9))
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lm_loss(model, (ids[:, :-1], ids[:, 1:]))
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    copies = [
        t for t in saved if t.dtype == torch.bfloat16 and tuple(t.shape) in shapes and t.data_ptr() not in weights
    ]
    assert copies == []
    assert any(t.data_ptr() in weights for t in saved)  # the fp32 weights are what backward keeps


def test_frozen_and_fp32_layers_run_plain_linear():
    linear = nn.Linear(4, 3)
    recast_weights_in_backward(linear)
    x = torch.randn(2, 4, requires_grad=True)
    assert linear(x).grad_fn.name() == "AddmmBackward0"  # no autocast
    linear.requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert linear(x).grad_fn.name() != "RecastLinearBackward"


@pytest.mark.parametrize("step_in_backward", [False, "auto"])
def test_step_runner_training_unchanged_bitwise(step_in_backward):
    """bf16-mixed training through StepRunner (recast weights, step in backward on "auto") ends at the same
    weights as plain autocast steps with nn.Linear's own forward."""
    results = []
    for ours in (False, True):
        torch.manual_seed(0)
        model = GPTModel(CONFIG).train()
        optimizer = make_optimizer(model.parameters(), lr=1e-2, weight_decay=0.1)
        data = torch.Generator().manual_seed(1)
        if ours:
            runner = StepRunner(
                model,
                optimizer,
                lm_loss,
                torch.device("cpu"),
                "bf16-mixed",
                step_in_backward=step_in_backward,
                recast_weights=True,
            )
            assert runner.recast_weights and all("forward" in vars(m) for m in model.modules() if type(m) is nn.Linear)
        for _ in range(3):
            ids = torch.randint(0, CONFIG.vocab_size, (4, 13), generator=data)
            if ours:
                runner.step((ids[:, :-1], ids[:, 1:]))
            else:
                optimizer.zero_grad(set_to_none=True)
                with torch.autocast("cpu", dtype=torch.bfloat16):
                    loss = torch.nn.functional.cross_entropy(
                        model(ids[:, :-1]).flatten(0, 1).float(), ids[:, 1:].flatten()
                    )
                loss.backward()
                optimizer.step()
        if ours:
            assert runner.step_in_backward is (step_in_backward == "auto")
            runner.close()
            assert not any("forward" in vars(m) for m in model.modules())
        results.append(model.state_dict())
    for name, tensor in results[0].items():
        assert torch.equal(tensor, results[1][name]), name


def test_recast_by_default_from_1_gib_of_copies():
    with torch.device("meta"):
        small, large = GPTModel(GPTConfig(**PRESETS["gpt2-medium"])), GPTModel(GPTConfig(**PRESETS["gpt2-large"]))
    assert not recast_pays_off(small, torch.bfloat16)  # 355M: 0.7 GB of copies
    assert recast_pays_off(large, torch.bfloat16)  # 774M: 1.5 GB
    large.requires_grad_(False)
    large.trf_blocks[-1].requires_grad_(True)  # the classifier's trainable part
    assert not recast_pays_off(large, torch.bfloat16)
    model = GPTModel(CONFIG)
    for precision in ("fp32", "bf16-mixed"):
        runner = StepRunner(
            model, make_optimizer(model.parameters(), 1e-3, 0.0), lm_loss, torch.device("cpu"), precision
        )
        assert not runner.recast_weights  # the tiny model keeps autocast's copies
        runner.close()
    runner = StepRunner(
        model, make_optimizer(model.parameters(), 1e-3, 0.0), lm_loss, torch.device("cpu"), "fp32", recast_weights=True
    )
    assert not runner.recast_weights  # nothing to recast without autocast
