"""The shared training loop: data windows, learning, evaluation rows, and exact resume."""

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.data.loader import ResumableBatchSampler
from gptcore.data.text import TokenWindowDataset, build_text_loaders, split_text
from gptcore.errors import DataError
from gptcore.model import GPTModel
from gptcore.training.evaluation import evaluate_loss, lm_loss, loss_evaluator
from gptcore.training.loop import LoopOptions, train
from gptcore.training.progress import Progress
from gptcore.training.schedule import lr_factor


def test_windows_and_shifted_targets():
    ds = TokenWindowDataset(list(range(10)), max_length=4, stride=2)
    assert len(ds) == 3
    x, y = ds[1]
    assert x.tolist() == [2, 3, 4, 5] and y.tolist() == [3, 4, 5, 6]


def test_split_by_ratio():
    assert split_text("abcdefghij", 0.9) == ("abcdefghi", "j")


def test_sampler_is_a_function_of_seed_and_epoch():
    s = ResumableBatchSampler(10, 3, shuffle=True, drop_last=True, seed=5)
    s.set_epoch(2)
    full = list(s)
    assert len(full) == 3 and all(len(b) == 3 for b in full)
    s.set_epoch(2, skip=1)
    assert list(s) == full[1:]
    s.set_epoch(3)
    assert list(s) != full
    assert len(ResumableBatchSampler(10, 3, shuffle=False, drop_last=False)) == 4


def test_too_short_text_is_a_clear_error(tokenizer):
    with pytest.raises(DataError, match="fewer than one batch"):
        build_text_loaders("short text", tokenizer, max_length=64, stride=64, batch_size=2, train_ratio=0.9, seed=1)


def _setup(tokenizer, text, seed=123):
    torch.manual_seed(seed)
    config = GPTConfig(vocab_size=50257, context_length=16, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.1)
    train_loader, val_loader = build_text_loaders(
        text, tokenizer, max_length=16, stride=16, batch_size=4, train_ratio=0.9, seed=seed
    )
    model = GPTModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    evaluate = loss_evaluator(train_loader, val_loader, lm_loss, torch.device("cpu"), "fp32", 2)
    return model, optimizer, train_loader, evaluate


def _run(tokenizer, text, progress=None, fail_at=None, lrs=None, **schedule):
    model, optimizer, loader, evaluate = _setup(tokenizer, text)
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        if lrs is not None:
            lrs.append(optimizer.param_groups[0]["lr"])
        if fail_at is not None and calls["n"] == fail_at:
            raise KeyboardInterrupt
        return lm_loss(m, batch)

    options = LoopOptions(epochs=3, eval_every=4, show_progress=False, **schedule)
    result = train(model, optimizer, loader, loss_fn, evaluate, torch.device("cpu"), options, progress=progress)
    return model, result


@pytest.fixture(scope="module")
def verdict(mirror_dir):
    return (mirror_dir / "the-verdict.txt").read_text()[:6000]


def test_training_lowers_the_loss_and_logs_rows(tokenizer, verdict):
    model, result = _run(tokenizer, verdict)
    rows = result.history
    assert rows[0]["step"] == 1 and rows[1]["step"] == 5 and rows[-1]["step"] == result.steps
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.5
    assert result.tokens_seen == result.steps * 4 * 16
    assert not model.training


@pytest.mark.parametrize("schedule", [{}, {"lr_schedule": "cosine", "warmup": 0.2}], ids=["constant", "cosine"])
def test_resume_after_interruption_is_bitwise_identical(tokenizer, verdict, tmp_path, schedule):
    reference, ref_result = _run(tokenizer, verdict, **schedule)
    saved = Progress(tmp_path / "ck", fingerprint="same", every_seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, verdict, progress=saved, fail_at=ref_result.steps // 2 + 3, **schedule)
    assert (tmp_path / "ck" / "state.pt").is_file()
    resumed, result = _run(tokenizer, verdict, progress=Progress(tmp_path / "ck", "same", 0.0), **schedule)
    assert 0 < result.resumed_at_step < ref_result.steps
    for (name, a), (_, b) in zip(reference.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name
    assert result.history == ref_result.history


def test_lr_factor_warms_up_then_decays_to_zero():
    assert [lr_factor(s, 10) for s in range(10)] == [1.0] * 10
    assert [lr_factor(s, 10, "constant", 0.3) for s in (0, 1, 2, 3, 9)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1])
    cosine = [lr_factor(s, 100, "cosine", 0.1) for s in range(100)]
    assert cosine[9] == 1.0 and cosine[10] == 1.0 and cosine[55] == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(cosine[10:], cosine[11:])) and cosine[-1] < 1e-3
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_factor(0, 10, "linear")
    with pytest.raises(ValueError, match="warmup"):
        lr_factor(0, 10, "cosine", 1.0)


def test_the_lr_of_every_step_follows_the_schedule(tokenizer, verdict):
    lrs = []
    _, result = _run(tokenizer, verdict, lrs=lrs, lr_schedule="cosine", warmup=0.25)
    assert len(lrs) == result.steps > 8
    expected = [1e-3 * lr_factor(step, result.steps, "cosine", 0.25) for step in range(result.steps)]
    assert lrs == pytest.approx(expected, rel=1e-12)
    peak = lrs.index(max(lrs))
    assert lrs[0] < lrs[1] < lrs[peak] == pytest.approx(1e-3) and lrs[-1] < 1e-4  # up, then decayed
    constant = []
    _run(tokenizer, verdict, lrs=constant)
    assert constant == [1e-3] * result.steps


def test_stale_progress_is_not_mixed_in(tokenizer, verdict, tmp_path):
    saved = Progress(tmp_path / "ck", fingerprint="old", every_seconds=0.0)
    with pytest.raises(KeyboardInterrupt):
        _run(tokenizer, verdict, progress=saved, fail_at=5)
    _, result = _run(tokenizer, verdict, progress=Progress(tmp_path / "ck", "new", 0.0))
    assert result.resumed_at_step == 0


def test_evaluate_loss_restores_train_mode(tokenizer, verdict):
    model, _, loader, _ = _setup(tokenizer, verdict)
    model.train()
    loss = evaluate_loss(model, loader, lm_loss, torch.device("cpu"), num_batches=1)
    assert model.training and 9 < loss < 12


def test_progress_of_other_code_is_not_resumed(tmp_path, monkeypatch):
    """The progress identity includes the library's code: an edit to gptcore starts training afresh."""
    import gptcore.training.progress as train_module
    from gptcore.params.schema import PretrainParams
    from gptcore.training.progress import open_progress

    first = open_progress(tmp_path, PretrainParams(), {"seed": 1}).fingerprint
    assert open_progress(tmp_path, PretrainParams(), {"seed": 1}).fingerprint == first
    monkeypatch.setattr(train_module, "code_digest", lambda: "edited")
    assert open_progress(tmp_path, PretrainParams(), {"seed": 1}).fingerprint != first
