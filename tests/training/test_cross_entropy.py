"""The chunked cross-entropy gives F.cross_entropy's loss and gradient bit for bit, without its fp32 copies."""

import pytest
import torch
import torch.nn.functional as F

from gptcore.training.cross_entropy import CHUNK_ROWS, IGNORE_INDEX, cross_entropy


def _both(logits, targets, weight=1.0):
    out = []
    for fn in (
        lambda x: F.cross_entropy(x.float(), targets, ignore_index=IGNORE_INDEX),
        lambda x: cross_entropy(x, targets),
    ):
        x = logits.detach().clone().requires_grad_()
        loss = fn(x) * weight
        loss.backward()
        out.append((loss.detach(), x.grad))
    return out


@pytest.mark.parametrize("rows", [1, CHUNK_ROWS - 1, CHUNK_ROWS * 3 + 5, 240])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_same_bits_as_cross_entropy_on_fp32_logits(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    logits = (torch.randn(rows, 50257, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 50257, (rows,), generator=gen)
    targets[1::3] = IGNORE_INDEX  # padding positions, as instruction finetuning has them
    for weight in (1.0, 0.37):  # StepRunner weighs micro-batch losses
        (ref_loss, ref_grad), (loss, grad) = _both(logits, targets, weight)
        assert grad.dtype == dtype
        assert torch.equal(loss, ref_loss)
        assert torch.equal(grad, ref_grad)


def test_all_ignored_is_nan_as_cross_entropy():
    logits = torch.randn(4, 10).bfloat16()
    targets = torch.full((4,), IGNORE_INDEX)
    (ref_loss, _), (loss, _) = _both(logits, targets)
    assert ref_loss.isnan() and loss.isnan()


def test_fp32_logits_take_the_reference():
    logits = torch.randn(6, 11, requires_grad=True)
    targets = torch.tensor([1, 2, IGNORE_INDEX, 4, 5, 0])
    assert cross_entropy(logits, targets).grad_fn.name() == "NllLossBackward0"
    assert torch.equal(cross_entropy(logits, targets), F.cross_entropy(logits, targets))


def test_keeps_only_the_low_precision_logits_for_backward():
    logits = torch.randn(64, 50257).bfloat16().requires_grad_()
    targets = torch.randint(0, 50257, (64,))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        cross_entropy(logits, targets)
    big = [t for t in saved if t.numel() >= logits.numel()]
    assert len(big) == 1 and big[0].dtype == torch.bfloat16  # the logits themselves, no fp32 log-softmax
