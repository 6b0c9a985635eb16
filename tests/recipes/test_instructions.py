"""Stage 4 data and pipeline: validation, the split, collate, length buckets, resume, end to end."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
import torch

from gptcore.config import GPTConfig
from gptcore.data.instructions import (
    InstructionDataset,
    LengthBucketBatchSampler,
    build_instruction_loaders,
    collate_instructions,
    read_instructions,
    split_instructions,
)
from gptcore.errors import DataError, WeightsError
from gptcore.model import GPTModel
from gptcore.params.schema import GenerateParams, RunConfig
from gptcore.prompt import RESPONSE_MARKER, format_example, format_input
from gptcore.weights import save_model

EOT = 50256
REPO_STAGES = Path(__file__).resolve().parents[2] / "stages"


def entry(i: int, text_input: str = "") -> dict:
    return {"instruction": f"Repeat the number {i}.", "input": text_input, "output": f"The number is {i}."}


# --- collate -------------------------------------------------------------------------------------


def book_collate(batch, pad_token_id=EOT, ignore_index=-100, allowed_max_length=None):
    """The book's custom_collate_fn (ch. 7), as the reference the collate must match."""
    batch_max_length = max(len(item) + 1 for item in batch)
    inputs_lst, targets_lst = [], []
    for item in batch:
        new_item = item.copy() + [pad_token_id]
        padded = new_item + [pad_token_id] * (batch_max_length - len(new_item))
        inputs, targets = torch.tensor(padded[:-1]), torch.tensor(padded[1:])
        indices = torch.nonzero(targets == pad_token_id).squeeze()
        if indices.numel() > 1:
            targets[indices[1:]] = ignore_index
        if allowed_max_length is not None:
            inputs, targets = inputs[:allowed_max_length], targets[:allowed_max_length]
        inputs_lst.append(inputs)
        targets_lst.append(targets)
    return torch.stack(inputs_lst), torch.stack(targets_lst)


def test_collate_uneven_lengths_pads_and_keeps_first_end_of_text():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    assert inputs.tolist() == [[0, 1, 2, 3, 4], [5, 6, EOT, EOT, EOT], [7, 8, 9, EOT, EOT]]
    assert targets.tolist() == [[1, 2, 3, 4, EOT], [6, EOT, -100, -100, -100], [8, 9, EOT, -100, -100]]
    assert inputs.dtype == targets.dtype == torch.long
    assert inputs.device.type == targets.device.type == "cpu"


def test_collate_sequence_at_longest_length_gets_its_end_of_text_target():
    # Every row as long as the longest: the padded width is length + 1, so the end-of-text is the last target.
    inputs, targets = collate_instructions([[1, 2, 3], [4, 5, 6]])
    assert inputs.tolist() == [[1, 2, 3], [4, 5, 6]]
    assert targets.tolist() == [[2, 3, EOT], [5, 6, EOT]]


def test_collate_truncates_to_allowed_max_length():
    inputs, targets = collate_instructions([[0, 1, 2, 3, 4], [5, 6]], allowed_max_length=3)
    assert inputs.tolist() == [[0, 1, 2], [5, 6, EOT]]
    assert targets.tolist() == [[1, 2, 3], [6, EOT, -100]]


def test_collate_mask_prompt_ignores_prompt_targets_only():
    batch = [([10, 11, 12, 13, 14], 3), ([20, 21, 22], 2)]
    _, targets = collate_instructions(batch, mask_prompt=True)
    # Prompt 10 11 12: the targets 11 and 12 are ignored; 13 (the first response token) is learned.
    assert targets.tolist() == [[-100, -100, 13, 14, EOT], [-100, 22, EOT, -100, -100]]
    _, unmasked = collate_instructions(batch)  # off by default: prompt lengths are ignored
    assert unmasked.tolist() == [[11, 12, 13, 14, EOT], [21, 22, EOT, -100, -100]]


@pytest.mark.parametrize("allowed", [None, 4, 9])
def test_collate_matches_the_book_on_random_batches(allowed):
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        lengths = torch.randint(1, 12, (4,), generator=gen).tolist()
        batch = [torch.randint(0, EOT, (n,), generator=gen).tolist() for n in lengths]
        ours = collate_instructions(batch, allowed_max_length=allowed)
        ref = book_collate(batch, allowed_max_length=allowed)
        assert torch.equal(ours[0], ref[0]) and torch.equal(ours[1], ref[1])


def test_collate_rejects_empty_sequences():
    with pytest.raises(ValueError):
        collate_instructions([[1, 2], []])


# --- validation and split ------------------------------------------------------------------------

MALFORMED = {
    "missing key": (json.dumps([entry(0), {"instruction": "a", "input": ""}]), "entry 1: missing key 'output'"),
    "non-string value": (
        json.dumps([entry(0), entry(1), {**entry(2), "input": 3}]),
        "entry 2: 'input' must be a string, got a number",
    ),
    "null value": (json.dumps([{**entry(0), "output": None}]), "entry 0: 'output' must be a string, got null"),
    "entry not an object": (json.dumps([entry(0), ["a", "b", "c"]]), "entry 1: expected an object, got a list"),
    "not a list": (
        json.dumps({"instruction": "a", "input": "", "output": "b"}),
        "expected a JSON list of entries, got an object",
    ),
    "invalid JSON": ('[{"instruction": "a", "input": ""', "invalid JSON at line 1"),
    "empty list": ("[]", "the list holds no entries"),
    "empty file": ("  \n", "the file is empty"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_read_instructions_rejects_malformed_data(tmp_path, case):
    text, expected = MALFORMED[case]
    path = tmp_path / "data.json"
    path.write_text(text)
    with pytest.raises(DataError, match=expected) as err:
        read_instructions(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_read_instructions_rejects_non_utf8(tmp_path):
    path = tmp_path / "data.json"
    path.write_bytes(b'[{"instruction": "\xff"}]')
    with pytest.raises(DataError, match="not UTF-8"):
        read_instructions(path)


def run_stage(script: str, argv: list[str], capsys) -> tuple[int, str, str]:
    """Run a stage script in this process (as `python stages/<script>`), returning (exit code, out, err)."""
    old = sys.argv
    sys.argv = [script, *argv]
    try:
        with pytest.raises(SystemExit) as exit_info:
            runpy.run_path(str(REPO_STAGES / script), run_name="__main__")
    finally:
        sys.argv = old
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


@pytest.mark.parametrize("case", ["missing key", "non-string value", "not a list", "invalid JSON"])
def test_prepare_stage_fails_in_one_line_and_writes_nothing(tmp_path, capsys, case):
    text, expected = MALFORMED[case]
    data, out = tmp_path / "data.json", tmp_path / "prepared"
    data.write_text(text)
    (tmp_path / "params.yaml").write_text("prepare_instructions: {}\n")
    code, _, err = run_stage(
        "prepare_instructions.py",
        ["--params", str(tmp_path / "params.yaml"), "--data", str(data), "--out-dir", str(out)],
        capsys,
    )
    assert code == 1
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["data.json", "params.yaml"]


def test_prepare_stage_splits_the_real_data_in_file_order(tmp_path, capsys, mirror_dir):
    out = tmp_path / "prepared"
    (tmp_path / "params.yaml").write_text("prepare_instructions: {}\n")
    data = mirror_dir / "instruction-data.json"
    code, stdout, _ = run_stage(
        "prepare_instructions.py",
        ["--params", str(tmp_path / "params.yaml"), "--data", str(data), "--out-dir", str(out)],
        capsys,
    )
    assert code == 0 and "935 train, 55 validation, 110 test" in stdout
    entries = json.loads(data.read_text())
    parts = {name: json.loads((out / f"{name}.json").read_text()) for name in ("train", "validation", "test")}
    assert parts["train"] == entries[:935]
    assert parts["test"] == entries[935:1045]
    assert parts["validation"] == entries[1045:]


def test_split_shuffle_seed_is_optional_and_deterministic():
    entries = [entry(i) for i in range(100)]
    plain = split_instructions(entries)
    assert [len(plain[k]) for k in ("train", "test", "validation")] == [85, 10, 5]
    assert plain["train"] == entries[:85]
    shuffled = split_instructions(entries, shuffle_seed=7)
    assert shuffled == split_instructions(entries, shuffle_seed=7)
    assert shuffled["train"] != plain["train"]
    assert sorted(e["instruction"] for part in shuffled.values() for e in part) == sorted(
        e["instruction"] for e in entries
    )
    with pytest.raises(DataError, match="empty"):
        split_instructions(entries[:5])


# --- dataset, buckets, loaders -------------------------------------------------------------------


def test_dataset_tokenizes_the_alpaca_prompt(tokenizer):
    entries = [entry(1), entry(2, "with an input")]
    dataset = InstructionDataset(entries, tokenizer)
    for (ids, prompt_len), e in zip(dataset, entries):
        assert tokenizer.decode(ids) == format_example(e)
        assert tokenizer.decode(ids[:prompt_len]) == format_input(e) + RESPONSE_MARKER
    assert "### Input:\nwith an input" in tokenizer.decode(dataset[1][0])


def test_length_buckets_cover_every_example_once_and_pad_less():
    gen = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (203,), generator=gen).tolist()
    bucketed = LengthBucketBatchSampler(lengths, 8, shuffle=True, drop_last=True, seed=123)
    for epoch in range(3):
        bucketed.set_epoch(epoch)
        batches = bucketed.batches()
        flat = [i for b in batches for i in b]
        assert len(batches) == len(bucketed) == 25 and all(len(b) == 8 for b in batches)
        assert len(set(flat)) == len(flat) == 200
        assert batches == bucketed.batches()  # a pure function of (seed, epoch): resumable
    bucketed.set_epoch(1)
    epoch1 = bucketed.batches()
    bucketed.set_epoch(2)
    assert bucketed.batches() != epoch1
    bucketed.set_epoch(1, skip=10)
    assert list(bucketed) == epoch1[10:]

    def padded_tokens(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    from gptcore.data.loader import ResumableBatchSampler

    plain = ResumableBatchSampler(len(lengths), 8, shuffle=True, drop_last=True, seed=123)
    plain.set_epoch(1)
    assert padded_tokens(epoch1) < 0.8 * padded_tokens(plain.batches())


def test_instruction_loaders(tokenizer):
    train_entries = [entry(i, "x" * (i % 7)) for i in range(20)]
    val_entries = [entry(100 + i) for i in range(5)]
    train, val = build_instruction_loaders(
        train_entries, val_entries, tokenizer, batch_size=8, seed=123, allowed_max_length=16, bucket_by_length=True
    )
    assert isinstance(train.batch_sampler, LengthBucketBatchSampler)
    batches = list(train)
    assert len(batches) == 2 and all(x.shape[0] == 8 and x.shape[1] <= 16 for x, _ in batches)
    assert [x.shape[0] for x, _ in val] == [5]
    with pytest.raises(DataError, match="fewer than one batch"):
        build_instruction_loaders(
            train_entries[:3], val_entries, tokenizer, batch_size=8, seed=1, allowed_max_length=16
        )
    with pytest.raises(DataError, match="training entry 0: its prompt of 35 tokens leaves no response token"):
        build_instruction_loaders(
            train_entries, val_entries, tokenizer, batch_size=8, seed=1, allowed_max_length=16, mask_prompt=True
        )


# --- the Stage 4 recipes --------------------------------------------------------------------------


def test_classifier_is_rejected_as_foundation(tmp_path):
    from gptcore.recipes.instruct import load_language_model

    path = tmp_path / "clf.safetensors"
    save_model(
        GPTModel(GPTConfig(vocab_size=100, context_length=8, emb_dim=8, n_heads=2, n_layers=1, num_classes=2)), path
    )
    with pytest.raises(WeightsError, match="is a classifier"):
        load_language_model(path)


def test_generation_metrics_count_the_responses_cut_by_the_cap():
    from gptcore.recipes.instruct import _generation_metrics

    records = [{"tokens": [4, 2, 4], "seconds": 1.0}, {"tokens": [0], "seconds": 1.0}]  # an empty reply: eos first
    m = _generation_metrics(records, 4, GenerateParams(max_new_tokens=4), "fp32")
    assert m["responses_at_max_new_tokens"] == 2 and m["mean_response_tokens"] == 2.5
    assert m["tokens_generated"] == 10 and m["tokens_per_second"] == 5.0


def test_generation_resumes_where_it_was_interrupted(tmp_path, tiny_config, monkeypatch):
    import gptcore.recipes.instruct as instruct

    model_path, test_path = tmp_path / "model.safetensors", tmp_path / "test.json"
    save_model(GPTModel(tiny_config), model_path)
    entries = [entry(i, "some input " * (i % 3)) for i in range(7)]
    test_path.write_text(json.dumps(entries))
    params, run = GenerateParams(max_new_tokens=4, batch_size=3), RunConfig(device="cpu", precision="fp32")

    whole = instruct.generate_responses(model_path, test_path, params, run, show_progress=False)
    assert [r["model_response"] for r in whole.responses] and len(whole.responses) == 7
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in whole.responses] == entries
    assert whole.metrics["tokens_generated"] > 0 and whole.metrics["batch_size"] == 3

    log_path = tmp_path / "ckpt" / "partial.jsonl"
    real, calls, kill_at = instruct.generate_batch, [], [2]

    class Killed(Exception):
        pass

    def interrupted(*args, **kwargs):
        calls.append(len(args[1]))
        if len(calls) in kill_at:
            raise Killed  # as a kill in the middle of the second batch
        return real(*args, **kwargs)

    monkeypatch.setattr(instruct, "generate_batch", interrupted)
    with pytest.raises(Killed):
        instruct.generate_responses(model_path, test_path, params, run, log_path, show_progress=False)
    assert len(log_path.read_text().splitlines()) == 2  # the header and one finished batch

    calls.clear()
    kill_at.clear()
    resumed = instruct.generate_responses(model_path, test_path, params, run, log_path, show_progress=False)
    assert calls == [3, 1]  # only the 4 entries that were missing
    assert resumed.responses == whole.responses
    assert resumed.metrics["tokens_generated"] == whole.metrics["tokens_generated"]
    resumed.log.finish(resumed.metrics)
    assert not log_path.exists() and (log_path.parent / "done.json").is_file()

    # Other params: the old progress is not reused.
    calls.clear()
    instruct.generate_responses(
        model_path, test_path, GenerateParams(max_new_tokens=3, batch_size=3), run, log_path, show_progress=False
    )
    assert calls == [3, 3, 1]


def tiny_finetune_inputs(tmp_path, tiny_config):
    foundation = tmp_path / "foundation.safetensors"
    # A context longer than the prompts (about 50 tokens), so that mask_prompt leaves targets to learn.
    save_model(GPTModel(GPTConfig(**{**tiny_config.to_dict(), "context_length": 80, "drop_rate": 0.1})), foundation)
    train_path, val_path = tmp_path / "train.json", tmp_path / "val.json"
    train_path.write_text(json.dumps([entry(i, "in" * (i % 4)) for i in range(12)]))
    val_path.write_text(json.dumps([entry(50 + i) for i in range(4)]))
    return foundation, train_path, val_path


def test_finetune_resumes_exactly_with_options_on(tmp_path, tiny_config, monkeypatch):
    import gptcore.recipes.instruct as instruct
    from gptcore.params.schema import InstructionsParams

    foundation, train_path, val_path = tiny_finetune_inputs(tmp_path, tiny_config)
    params = InstructionsParams(
        epochs=2,
        batch_size=4,
        lr=1e-3,
        eval_every=2,
        eval_batches=1,
        progress_minutes=0,
        allowed_max_length=64,
        mask_prompt=True,
        bucket_by_length=True,
    )
    run = RunConfig(seed=5, device="cpu", precision="fp32")
    whole = instruct.finetune_instructions(foundation, train_path, val_path, params, run, show_progress=False)
    assert whole.metrics["steps"] == 6 and whole.metrics["val_loss"] < whole.metrics["val_loss_before"]
    assert whole.history[0]["step"] == 0 and whole.history[-1]["step"] == 6

    class Killed(Exception):
        pass

    real_loss, calls = instruct.lm_loss, []

    def killing_loss(model, batch):
        calls.append(model.training)
        if sum(calls) == 4:  # the 4th training step
            raise Killed
        return real_loss(model, batch)

    monkeypatch.setattr(instruct, "lm_loss", killing_loss)
    with pytest.raises(Killed):
        instruct.finetune_instructions(
            foundation, train_path, val_path, params, run, tmp_path / "ck", show_progress=False
        )
    monkeypatch.setattr(instruct, "lm_loss", real_loss)
    resumed = instruct.finetune_instructions(
        foundation, train_path, val_path, params, run, tmp_path / "ck", show_progress=False
    )
    assert resumed.result.resumed_at_step == 3
    assert resumed.history == whole.history and resumed.metrics["tokens_seen"] == whole.metrics["tokens_seen"]
    for name, tensor in whole.model.state_dict().items():
        assert torch.equal(tensor, resumed.model.state_dict()[name]), name


@pytest.mark.slow
def test_pipeline_generate_responses_end_to_end(repo_copy):
    repo_copy.set_params(
        {
            "foundation": "scratch",
            "device": "cpu",
            "precision": "fp32",
            "pretrain": {
                "model": {"context_length": 256, "emb_dim": 64, "n_heads": 4, "n_layers": 2, "drop_rate": 0.0}
            },
            "instructions": {"epochs": 1, "lr": 0.001, "allowed_max_length": 40, "eval_every": 40, "eval_batches": 2},
            "generate": {"max_new_tokens": 6, "batch_size": 16},
        }
    )
    repo_copy.dvc("repro", "generate_responses")
    responses = repo_copy.read_json("data/responses/test.json")
    test = repo_copy.read_json("data/prepared/instructions/test.json")
    assert len(responses) == len(test) == 110
    assert all(set(r) == {"instruction", "input", "output", "model_response"} for r in responses)
    assert [{k: r[k] for k in ("instruction", "input", "output")} for r in responses] == test
    assert all(isinstance(r["model_response"], str) for r in responses)

    m = repo_copy.read_json("metrics/instructions.json")
    assert {"train_loss", "val_loss", "val_perplexity", "tokens_seen", "train_seconds", "val_loss_before"} <= set(m)
    assert m["val_loss"] < m["val_loss_before"]
    assert m["steps"] == 935 // 8
    g = repo_copy.read_json("metrics/generation.json")
    assert g["entries"] == 110 and g["batch_size"] == 16 and g["tokens_per_second"] > 0
    assert (repo_copy.root / "models/instruct/model.safetensors").is_file()
    assert (repo_copy.root / "plots/instructions/images/loss.png").stat().st_size > 0
    steps = (repo_copy.root / "plots/instructions/metrics/val_loss.tsv").read_text().splitlines()
    assert steps[:2] == ["step\tval_loss", f"0\t{m['val_loss_before']}"]  # the foundation's loss, logged first
    assert (repo_copy.root / "progress/generate_responses/instruct/done.json").is_file()  # the foreach instance
    assert (repo_copy.root / "progress/finetune_instructions/done.json").is_file()
    status = repo_copy.dvc("status", "generate_responses").stdout
    assert "changed" not in status
