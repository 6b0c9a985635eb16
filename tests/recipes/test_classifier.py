"""The spam classifier: head replacement, what trains, the frozen-prefix path, saving, the CLI, the stages."""

from __future__ import annotations

import contextlib
import json
import re
import sys

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.data.sms import SmsDataset, encode_texts
from gptcore.errors import WeightsError
from gptcore.model import GPTModel
from gptcore.recipes.classifier import (
    ClassifierInfo,
    build_classifier,
    class_logits,
    classify_texts,
    frozen_linears_cast,
    frozen_prefix,
    load_classifier,
    save_classifier,
    set_trainable,
    token_index,
)
from gptcore.recipes.classify import classification_loss
from gptcore.recipes.metrics import binary_scores, confusion_rows
from gptcore.weights import load_model, save_model

METRIC_KEYS = {
    "train_accuracy",
    "val_accuracy",
    "test_accuracy",
    "test_loss",
    "test_precision",
    "test_recall",
    "test_f1",
}


@pytest.fixture
def foundation(tiny_config) -> GPTModel:
    config = GPTConfig(**{**tiny_config.to_dict(), "n_layers": 3, "tie_embeddings": True})
    torch.manual_seed(0)
    return GPTModel(config).eval()


@pytest.fixture
def classifier(foundation) -> GPTModel:
    return build_classifier(foundation.config, foundation.state_dict(), 2, seed=123)


def test_head_is_replaced_and_the_body_copied(foundation, classifier):
    assert classifier.config.num_classes == 2
    assert classifier.out_head.weight.shape == (2, foundation.config.emb_dim)
    assert classifier.out_head.bias is not None
    body = {k: v for k, v in foundation.state_dict().items() if not k.startswith("out_head.")}
    mine = classifier.state_dict()
    assert all(torch.equal(v, mine[k]) for k, v in body.items())
    torch.manual_seed(123)  # the book: torch.manual_seed(123); nn.Linear(emb_dim, 2)
    book_head = torch.nn.Linear(foundation.config.emb_dim, 2)
    assert torch.equal(classifier.out_head.weight, book_head.weight)
    assert torch.equal(classifier.out_head.bias, book_head.bias)
    assert classifier(torch.randint(0, 50000, (2, 7))).shape == (2, 7, 2)


def _trainable_names(model: GPTModel) -> set[str]:
    return {
        name.split(".")[0] + ("." + name.split(".")[1] if name.startswith("trf_blocks") else "")
        for name, p in model.named_parameters()
        if p.requires_grad
    }


@pytest.mark.parametrize(
    "mode, expected, prefix",
    [
        ("last_block", {"trf_blocks.2", "final_norm", "out_head"}, 2),
        ("last_two_blocks", {"trf_blocks.1", "trf_blocks.2", "final_norm", "out_head"}, 1),
        ("head", {"out_head"}, 3),
        ("all", {"tok_emb", "pos_emb", "trf_blocks.0", "trf_blocks.1", "trf_blocks.2", "final_norm", "out_head"}, None),
    ],
)
def test_trainable_selection(classifier, mode, expected, prefix):
    params = set_trainable(classifier, mode)
    assert _trainable_names(classifier) == expected
    assert sum(p.numel() for p in params) == sum(p.numel() for p in classifier.parameters() if p.requires_grad)
    assert frozen_prefix(classifier) == prefix


def test_unknown_trainable_is_an_error(classifier):
    with pytest.raises(ValueError, match="trainable"):
        set_trainable(classifier, "first_block")


def _batch():
    idx = torch.randint(0, 50000, (3, 9))
    idx[0, 4:] = 50256  # right padding: 4 real tokens
    idx[1, 8:] = 50256
    return idx


def test_token_positions():
    idx = _batch()
    assert token_index(idx, "last").tolist() == [8, 8, 8]
    assert token_index(idx, "last_non_pad").tolist() == [3, 7, 8]


@pytest.mark.parametrize("position", ["last", "last_non_pad"])
@pytest.mark.parametrize("frozen", [None, 0, 2, 3])
def test_frozen_prefix_path_equals_the_full_forward(classifier, position, frozen):
    idx = _batch()
    full = classifier(idx)  # [B, T, 2]
    expected = full[torch.arange(3), token_index(idx, position)]
    assert torch.allclose(class_logits(classifier, idx, position, frozen_blocks=frozen), expected, atol=1e-5)


def test_no_grad_prefix_gives_the_same_gradients(classifier):
    set_trainable(classifier, "last_block")
    classifier.train()
    batch = (_batch(), torch.tensor([0, 1, 1]))
    grads = []
    for frozen in (None, frozen_prefix(classifier)):
        classifier.zero_grad()
        classification_loss("last", frozen_blocks=frozen)(classifier, batch).backward()
        grads.append({n: p.grad.clone() for n, p in classifier.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert all(p.grad is None for p in classifier.parameters() if not p.requires_grad)


def test_frozen_linears_cast_changes_nothing_under_bf16_autocast(classifier):
    set_trainable(classifier, "last_block")
    classifier.train()
    frozen = frozen_prefix(classifier)
    batch = (_batch(), torch.tensor([0, 1, 1]))
    before = {n: p.detach().clone() for n, p in classifier.named_parameters()}
    runs = []
    for cast in (False, True):
        classifier.zero_grad()
        context = frozen_linears_cast(classifier, frozen, "bf16-mixed") if cast else contextlib.nullcontext()
        with context, torch.autocast("cpu", dtype=torch.bfloat16):
            if cast:
                assert classifier.trf_blocks[0].ff.fc.weight.dtype == torch.bfloat16
                assert classifier.trf_blocks[-1].ff.fc.weight.dtype == torch.float32  # trains: stays fp32
                assert classifier.trf_blocks[0].norm1.weight.dtype == torch.float32
            loss = classification_loss("last", frozen_blocks=frozen)(classifier, batch)
            loss.backward()
        runs.append((loss.detach(), {n: p.grad.clone() for n, p in classifier.named_parameters() if p.requires_grad}))
    assert torch.equal(runs[0][0], runs[1][0])  # exactly the values autocast casts to at every step
    assert all(torch.equal(runs[0][1][n], runs[1][1][n]) for n in runs[0][1])
    after = dict(classifier.named_parameters())
    assert all(after[n].dtype == torch.float32 and torch.equal(after[n], before[n]) for n in before)  # fp32 back


def test_save_load_and_classify_pad_as_in_training(classifier, tokenizer, tmp_path):
    path = tmp_path / "clf.safetensors"
    info = ClassifierInfo(max_length=12, token_position="last")
    save_classifier(classifier, info, path)
    model, loaded = load_classifier(path)
    assert loaded == info and model.config.num_classes == 2
    texts = ["Free entry to win a prize, text WIN now", "ok see you at 5", "x " * 40]
    results = classify_texts(model, loaded, tokenizer, texts)
    dataset = SmsDataset(encode_texts(tokenizer, texts), [0, 0, 0], max_length=12)
    with torch.no_grad():
        probs = torch.softmax(classifier(dataset.inputs)[:, -1], dim=-1)  # the training-time input of each text
    for (label, p), row in zip(results, probs):
        assert label == ("ham", "spam")[int(row.argmax())]
        assert p == pytest.approx(float(row.max()), abs=1e-5)


def test_classifier_without_metadata_and_language_models(classifier, foundation, tokenizer, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_model(classifier, bare)
    model, info = load_classifier(bare)
    assert info.max_length is None and info.labels == ("ham", "spam")
    assert len(classify_texts(model, info, tokenizer, ["a", "b c d"])) == 2
    lm = tmp_path / "lm.safetensors"
    save_model(foundation, lm)
    with pytest.raises(WeightsError, match="language model"):
        load_classifier(lm)


def test_binary_scores_by_hand():
    scores = binary_scores([1, 1, 1, 0, 0], [1, 0, 1, 1, 0])
    assert scores == pytest.approx({"accuracy": 0.6, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3})
    assert binary_scores([0, 0], [0, 0])["f1"] == 0.0
    assert confusion_rows([1, 0], [0, 0], ("ham", "spam")) == [
        {"actual": "spam", "predicted": "ham"},
        {"actual": "ham", "predicted": "ham"},
    ]


@pytest.mark.slow
def test_stages_end_to_end_and_classify(repo_copy):
    repo_copy.set_params(
        {
            "foundation": "scratch",
            "pretrain": {
                "model": {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 128, "drop_rate": 0.0}
            },
            "classifier": {"epochs": 1, "eval_every": 50, "eval_batches": 2},
        }
    )
    repo_copy.dvc("repro", "finetune_classifier", "baseline_classifier")
    root = repo_copy.root
    ours, baseline = (
        repo_copy.read_json("metrics/classifier.json"),
        repo_copy.read_json("metrics/classifier_baseline.json"),
    )
    assert METRIC_KEYS <= set(ours) and METRIC_KEYS <= set(baseline)
    assert all(0.0 <= ours[k] <= 1.0 for k in METRIC_KEYS - {"test_loss"})
    assert ours["steps"] == 130 and ours["max_length"] == 120
    # Even one epoch of the last block of a tiny scratch model learns, from GPT-2's initialisation (83% when
    # measured; the book's N(0, 1) embeddings stay at chance, 50%, in this budget).
    assert ours["test_accuracy"] > 0.75
    assert baseline["test_accuracy"] > 0.9
    plots = root / "plots/classifier"
    for name in ("loss.png", "accuracy.png"):
        assert (plots / "images" / name).read_bytes().startswith(b"\x89PNG")
    tables = {path.stem: path.read_text().splitlines() for path in (plots / "metrics").glob("*.tsv")}
    assert set(tables) == {"epoch", "examples_seen", "train_loss", "val_loss", "train_accuracy", "val_accuracy"}
    assert [row.split("\t")[0] for row in tables["val_loss"]] == ["step", "1", "51", "101", "130"]
    assert tables["examples_seen"][1:] == ["1\t8", "51\t408", "101\t808", "130\t1040"]
    assert tables["val_accuracy"][0] == "step\tval_accuracy"
    confusion = json.loads((plots / "sklearn/confusion_matrix.json").read_text())
    assert len(confusion) == 300 and {row["actual"] for row in confusion} == {"ham", "spam"}
    assert ours["step"] == 130  # DVCLive's step, beside our own keys
    assert (root / "progress/finetune_classifier/done.json").is_file()
    assert "up to date" in repo_copy.dvc("status", "finetune_classifier", "baseline_classifier").stdout

    texts = ["WINNER!! You have won a free prize, call now", "See you at lunch"]
    proc = repo_copy.run(
        sys.executable, "-m", "gptcore", "classify", "--model", "models/classifier/model.safetensors", *texts
    )
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and all(re.fullmatch(r"(spam|ham) (0\.(5\d\d|[6-9]\d\d)|1\.000)", line) for line in lines)
    bad = repo_copy.run(
        sys.executable, "-m", "gptcore", "classify", "--model", "models/scratch/model.safetensors", "hi", check=False
    )
    assert bad.returncode == 1 and bad.stderr.startswith("error: ") and "language model" in bad.stderr


@pytest.mark.slow
def test_stage_runs_from_the_pretrained_foundation(repo_copy):
    repo_copy.set_params(
        {
            "foundation": "pretrained",
            "pretrain": {"model": {"n_layers": 2, "emb_dim": 64, "n_heads": 4, "context_length": 128}, "epochs": 1},
            "classifier": {"epochs": 1, "eval_every": 50, "eval_batches": 2},  # default trainable: last_block
        }
    )
    repo_copy.dvc("repro", "finetune_classifier")
    root = repo_copy.root
    # download_gpt2 is not upstream of a Stage 1 foundation: no OpenAI folder, not even an empty one.
    assert not [
        name for name in ("gpt2-small", "gpt2-medium", "gpt2-large", "gpt2-xl") if (root / "models" / name).exists()
    ]
    ours = repo_copy.read_json("metrics/classifier.json")
    assert METRIC_KEYS <= set(ours) and ours["steps"] == 130
    assert ours["trainable_parameters"] == 2 * 64 + 64 * 2 + 2 + sum(  # final LayerNorm, head, last block
        p.numel()
        for p in GPTModel(GPTConfig(n_layers=1, emb_dim=64, n_heads=4, context_length=128, qkv_bias=False))
        .trf_blocks[0]
        .parameters()
    )
    foundation, classifier = (
        load_model(root / f"models/{name}/model.safetensors") for name in ("pretrained", "classifier")
    )
    frozen, trained = classifier.trf_blocks[0].ff.fc.weight, classifier.trf_blocks[1].ff.fc.weight
    assert torch.equal(frozen, foundation.trf_blocks[0].ff.fc.weight)  # the body is the Stage 1 model's
    assert torch.equal(classifier.tok_emb.weight, foundation.tok_emb.weight)
    assert not torch.equal(trained, foundation.trf_blocks[1].ff.fc.weight)  # the last block trained
