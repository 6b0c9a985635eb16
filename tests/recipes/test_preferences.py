"""DPO: the loss on hand-made log-probs, response-only masking, the stored reference log-probs, the
stages on real preference data cut small (one model in memory, resume equal to an uninterrupted run)."""

from __future__ import annotations

import gc
import json
import math
import subprocess

import pytest
import torch
import yaml

from gptcore.config import GPTConfig
from gptcore.data.instructions import collate_instructions
from gptcore.data.preferences import (
    PreferenceDataset,
    collate_preferences,
    counted_targets,
    encode_pair,
    read_preferences,
)
from gptcore.errors import DataError
from gptcore.model import GPTModel
from gptcore.params.schema import PreferencesParams, PrepareInstructionsParams, RunConfig
from gptcore.training.cross_entropy import IGNORE_INDEX
from gptcore.training.dpo import LN2, DpoObjective, dpo_loss, sequence_logprobs
from gptcore.weights import load_model
from tests.recipes.test_resume_stages import RUN, StageRun, _env, _kill_and_resume, _progress_saved, _stage

SMALL = GPTConfig(vocab_size=50257, context_length=96, emb_dim=32, n_heads=2, n_layers=2, drop_rate=0.0, qkv_bias=True)
PREFS = {"batch_size": 4, "lr": 1e-3, "eval_every": 3, "eval_batches": 2, "allowed_max_length": 96}


def test_the_loss_is_ln2_when_policy_equals_reference():
    logps = torch.tensor([[-3.0, -5.0], [-10.0, -1.0], [-0.5, -0.5]])
    loss, chosen, rejected = dpo_loss(logps, logps.clone(), beta=0.1)
    assert torch.allclose(loss, torch.full((3,), LN2)) and LN2 == pytest.approx(0.693147, abs=1e-6)
    assert chosen.abs().max() == 0 and rejected.abs().max() == 0


def test_the_loss_and_rewards_by_hand():
    policy, reference = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -1.5]])
    loss, chosen, rejected = dpo_loss(policy, reference, beta=0.1)
    assert chosen.item() == pytest.approx(0.05) and rejected.item() == pytest.approx(-0.05)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-0.1)))  # -log sigmoid(0.1 * (0.5 + 0.5))


def test_the_gradient_pushes_chosen_up_and_rejected_down():
    policy = torch.tensor([[-4.0, -4.0], [-2.0, -7.0]], requires_grad=True)
    loss, _, _ = dpo_loss(policy, torch.tensor([[-4.0, -4.0], [-3.0, -3.0]]), beta=0.5)
    loss.mean().backward()
    assert (policy.grad[:, 0] < 0).all() and (policy.grad[:, 1] > 0).all()  # descent raises chosen, lowers rejected
    assert policy.grad[0, 0] == -policy.grad[0, 1]


class LogitsModel(torch.nn.Module):
    """A 'model' whose logits are parameters: the gradient shows which positions carry loss."""

    def __init__(self, rows: int, width: int, vocab: int = 50257):
        super().__init__()
        self.logits = torch.nn.Parameter(torch.randn(rows, width, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx):
        return self.logits


def _pairs(entries, tokenizer, length=256):
    dataset = PreferenceDataset(entries, tokenizer, length)
    return dataset, collate_preferences(dataset.pairs, allowed_max_length=length)


def test_prompt_and_padding_tokens_carry_no_loss(tokenizer, mirror_dir):
    entries = read_preferences(mirror_dir / "instruction-data-with-preference.json")[:2]
    dataset, (inputs, targets, _) = _pairs(entries, tokenizer)
    model = LogitsModel(4, inputs.shape[-1])
    batch = (inputs, targets, torch.zeros(2, 2))
    DpoObjective(beta=0.1, nll_weight=0.5)(model, batch).backward()
    touched = model.logits.grad.abs().sum(-1).view(2, 2, -1) > 0  # [B, 2, T] positions with a gradient
    assert torch.equal(touched, targets != IGNORE_INDEX)
    for row, (chosen, rejected, _) in enumerate(dataset.pairs):
        for col, (ids, prompt_len) in enumerate((chosen, rejected)):
            assert not touched[row, col, : prompt_len - 1].any()  # the prompt's targets
            assert touched[row, col, prompt_len - 1 : len(ids)].all()  # the response and its end-of-text
            assert not touched[row, col, len(ids) :].any()  # padding


def test_the_collate_is_stage_4s_with_the_prompt_masked(tokenizer, mirror_dir):
    entries = read_preferences(mirror_dir / "instruction-data-with-preference.json")[:3]
    for length in (256, 60):  # 60 cuts the longer responses
        dataset, (inputs, targets, reference) = _pairs(entries, tokenizer, length)
        sequences = [example for pair in dataset.pairs for example in pair[:2]]
        flat_inputs, flat_targets = collate_instructions(sequences, allowed_max_length=length, mask_prompt=True)
        assert torch.equal(inputs.flatten(0, 1), flat_inputs) and torch.equal(targets.flatten(0, 1), flat_targets)
        counts = (targets != IGNORE_INDEX).sum(-1)  # [B, 2]
        assert counts.tolist() == [[counted_targets(e, length) for e in pair[:2]] for pair in dataset.pairs]
        assert reference.shape == (3, 2) and reference.isnan().all()  # no reference stored yet


def test_objective_adds_the_chosen_nll(tokenizer, mirror_dir):
    entries = read_preferences(mirror_dir / "instruction-data-with-preference.json")[:2]
    _, (inputs, targets, _) = _pairs(entries, tokenizer, 96)
    model = GPTModel(SMALL).eval()
    sums, counts = sequence_logprobs(model, inputs, targets)
    reference = sums.detach() + torch.tensor([[0.3, -0.2], [0.1, 0.4]])
    batch = (inputs, targets, reference)
    plain = DpoObjective(0.1, 0.0, "sum")(model, batch)
    guarded = DpoObjective(0.1, 2.0, "sum")(model, batch)
    chosen_nll = -(sums[:, 0] / counts[:, 0]).mean()
    assert guarded.item() == pytest.approx(plain.item() + 2.0 * chosen_nll.item(), rel=1e-5)
    expected = -torch.nn.functional.logsigmoid(0.1 * (torch.tensor([-0.3, -0.1]) - torch.tensor([0.2, -0.4]))).mean()
    assert plain.item() == pytest.approx(expected.item(), rel=1e-5)


def test_entries_without_chosen_or_rejected_are_one_line_errors(tmp_path, mirror_dir):
    entries = json.loads((mirror_dir / "instruction-data-with-preference.json").read_text())[:5]
    del entries[3]["rejected"]
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"prefs\.json: entry 3: missing key 'rejected'"):
        read_preferences(path)
    entries[3]["rejected"] = ["not", "text"]
    path.write_text(json.dumps(entries))
    with pytest.raises(DataError, match=r"entry 3: 'rejected' must be a string, got a list"):
        read_preferences(path)


def test_micro_batches_weigh_pairs_not_tokens(tokenizer, mirror_dir):
    """grad_accum cuts a batch of pairs of unequal length: the step equals the one-piece step."""
    from gptcore.training.step import StepRunner, make_optimizer

    entries = read_preferences(mirror_dir / "instruction-data-with-preference.json")[:4]
    _, (inputs, targets, _) = _pairs(entries, tokenizer, 96)
    torch.manual_seed(1)
    start = GPTModel(SMALL)
    sums, _ = sequence_logprobs(start.eval(), inputs, targets)
    batch = (inputs, targets, sums.detach() + 0.25)
    weights = []
    for accum in (1, 2, 4):
        model = GPTModel(SMALL)
        model.load_state_dict(start.state_dict())
        runner = StepRunner(
            model, make_optimizer(model.parameters(), 1e-2, 0.0), DpoObjective(0.5), torch.device("cpu"), "fp32", accum
        )
        runner.step(batch)
        weights.append(model.out_head.weight.detach().clone())
    assert torch.allclose(weights[0], weights[1], atol=1e-6) and torch.allclose(weights[0], weights[2], atol=1e-6)


# --- the stages -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory, mirror_dir):
    root = tmp_path_factory.mktemp("preferences")
    entries = json.loads((mirror_dir / "instruction-data-with-preference.json").read_text())
    (root / "prefs.json").write_text(json.dumps(entries[:60]))  # 51 train, 6 test, 3 validation
    return root / "prefs.json"


def _prepare(workdir, data, model, mirror_dir, **overrides):
    params = {**RUN, "preferences": {**PREFS, **overrides}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("prepare_preferences") + ["--data", str(data), "--model", str(model), "--out-dir", "prepared"]
    return subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=_env(mirror_dir))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, mirror_dir, stage_inputs, preference_data):
    workdir = tmp_path_factory.mktemp("prepared")
    proc = _prepare(workdir, preference_data, stage_inputs / "lm.safetensors", mirror_dir)
    assert proc.returncode == 0, proc.stderr
    assert "51 train, 3 validation, 6 test pairs" in proc.stdout
    return workdir / "prepared"


def test_stored_reference_equals_a_fresh_computation(prepared, stage_inputs, tokenizer):
    from gptcore.recipes.preferences import reference_logprobs

    info = json.loads((prepared / "reference.json").read_text())
    assert info["allowed_max_length"] == 96 and info["precision"] == "fp32"
    model = load_model(stage_inputs / "lm.safetensors")
    for split in ("train", "validation", "test"):
        entries = read_preferences(prepared / f"{split}.json", with_reference=True)
        dataset = PreferenceDataset(entries, tokenizer, 96)  # also checks the stored token counts
        sums, counts = reference_logprobs(model, dataset, 3, 96, torch.device("cpu"), "fp32")  # another batching
        stored = torch.tensor([[e["reference_logprobs"][k] for k in ("chosen", "rejected")] for e in entries])
        assert torch.allclose(sums, stored, rtol=1e-5, atol=1e-4), split
        assert counts.tolist() == [[e["reference_tokens"][k] for k in ("chosen", "rejected")] for e in entries]


def test_a_bad_entry_stops_prepare_in_one_line(tmp_path, mirror_dir, stage_inputs, preference_data):
    entries = json.loads(preference_data.read_text())
    entries[7]["chosen"] = None
    (tmp_path / "bad.json").write_text(json.dumps(entries))
    proc = _prepare(tmp_path, tmp_path / "bad.json", stage_inputs / "lm.safetensors", mirror_dir)
    assert proc.returncode == 1 and proc.stderr.count("\n") == 1 and not (tmp_path / "prepared").exists()
    assert "entry 7: 'chosen' must be a string, got null" in proc.stderr


def test_training_holds_one_model_and_starts_at_ln2(prepared, stage_inputs):
    from gptcore.recipes.preferences import finetune_preferences

    def models_alive() -> int:
        gc.collect()
        return sum(type(o) is GPTModel for o in gc.get_objects())  # type(): no proxy warnings

    held_elsewhere = models_alive()  # other tests' fixtures may still hold models in a full run
    alive = []

    def count_models(history):
        alive.append(models_alive() - held_elsewhere)

    params = PreferencesParams(**{**PREFS, "epochs": 1, "eval_every": 4})
    run = RunConfig(**RUN)
    outcome = finetune_preferences(stage_inputs / "lm.safetensors", prepared, params, run, None, False, count_models)
    assert alive and set(alive) == {1}  # the policy only: the reference is the stored log-probs
    before, last = outcome.history[0], outcome.history[-1]
    assert before["val_loss"] == pytest.approx(LN2, abs=1e-5) and before["val_margin"] == pytest.approx(0, abs=1e-5)
    assert last["train_loss"] < LN2 and last["train_margin"] > 0  # lr 1e-3 on 12 steps: the pairs move apart
    for key in ("test_loss", "test_margin", "test_accuracy", "val_chosen_reward", "val_rejected_reward"):
        assert key in outcome.metrics


def test_reference_of_another_model_is_refused(prepared, stage_inputs):
    from gptcore.recipes.preferences import finetune_preferences

    params, run = PreferencesParams(**PREFS), RunConfig(**RUN)
    with pytest.raises(DataError, match="computed with another model"):
        finetune_preferences(stage_inputs / "lm-no-dropout.safetensors", prepared, params, run, None, False)


def _preferences_run(workdir, inputs, prepared, **overrides) -> StageRun:
    params = {**RUN, "preferences": {**PREFS, "epochs": 2, "progress_minutes": 0.0, **overrides}}
    (workdir / "params.yaml").write_text(yaml.safe_dump(params))
    cmd = _stage("finetune_preferences") + [
        "--model",
        str(inputs / "lm.safetensors"),
        "--data-dir",
        str(prepared),
        "--out",
        "model.safetensors",
        "--adapter-out",
        "adapter.safetensors",
        "--metrics",
        "metrics.json",
        "--plots",
        "plots",
        "--progress-dir",
        "ck",
    ]
    lora = overrides.get("method") == "lora"
    outputs = ["model.safetensors", "metrics.json", "plots", *(["adapter.safetensors"] if lora else [])]
    return StageRun(
        workdir, cmd, _progress_saved, outputs, {"metrics.json": {"train_seconds"}}, live=("metrics.json", "plots")
    )


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [{}, {"method": "lora", "lora": {"rank": 4, "alpha": 8.0}, "nll_weight": 0.5}])
def test_finetune_preferences_resumes_exactly(tmp_path, mirror_dir, stage_inputs, prepared, overrides):
    log = _kill_and_resume(
        lambda d: _preferences_run(d, stage_inputs, prepared, **overrides), tmp_path, _env(mirror_dir)
    )
    assert "resuming from" in log
    metrics = json.loads((tmp_path / "interrupted" / "metrics.json").read_text())
    assert metrics["val_loss_before"] == pytest.approx(LN2, abs=1e-5) and 0 <= metrics["test_accuracy"] <= 1
    assert (tmp_path / "interrupted" / "plots" / "images" / "chosen_logprob.png").is_file()


def test_encode_pair_shares_the_prompt(tokenizer, mirror_dir):
    entry = read_preferences(mirror_dir / "instruction-data-with-preference.json")[0]
    (chosen, chosen_prompt), (rejected, rejected_prompt) = encode_pair(entry, tokenizer)
    assert chosen_prompt == rejected_prompt and chosen[:chosen_prompt] == rejected[:rejected_prompt]
    assert tokenizer.decode(chosen[chosen_prompt:]).strip().endswith(entry["chosen"].strip()[-10:])


def test_prepare_split_matches_stage_4(mirror_dir, stage_inputs, tmp_path):
    """The same 935 / 110 / 55 entries as prepare_instructions, in file order."""
    from gptcore.data.instructions import read_instructions, split_instructions

    prefs = read_preferences(mirror_dir / "instruction-data-with-preference.json")
    plain = read_instructions(mirror_dir / "instruction-data.json")
    split = PrepareInstructionsParams()
    ours = split_instructions(prefs, split.train_ratio, split.test_ratio, split.shuffle_seed)
    theirs = split_instructions(plain, split.train_ratio, split.test_ratio, split.shuffle_seed)
    for name in ("train", "validation", "test"):
        assert [(e["instruction"], e["input"], e["output"]) for e in ours[name]] == [
            (e["instruction"], e["input"], e["output"]) for e in theirs[name]
        ]
    assert [len(ours[n]) for n in ("train", "test", "validation")] == [935, 110, 55]


@pytest.mark.slow
def test_finetune_preferences_runs_unchanged_under_torchrun(tmp_path, mirror_dir, stage_inputs, prepared):
    """One process vs two gloo processes, each cutting its half of every batch of pairs into two
    micro-batches: the same losses, rewards and accuracies (dropout is off in DPO, so no per-rank masks)."""

    torchrun = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    env = {**_env(mirror_dir), "OMP_NUM_THREADS": "1"}
    metrics = {}
    for name, launcher, grad_accum in (("one", [], 1), ("two", torchrun, 2)):
        (tmp_path / name).mkdir()
        run = _preferences_run(tmp_path / name, stage_inputs, prepared, epochs=1, grad_accum=grad_accum)
        proc = subprocess.run(
            [run.cmd[0], *launcher, *run.cmd[1:]], cwd=run.workdir, capture_output=True, text=True, env=env
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count("finetune_preferences: ") == 1  # rank 0 alone writes
        metrics[name] = json.loads((run.workdir / "metrics.json").read_text())
    one, two = metrics["one"], metrics["two"]
    assert two["steps"] == one["steps"] > 5
    for key, value in one.items():
        if key.endswith(("loss", "reward", "margin", "accuracy", "logprob")):
            assert two[key] == pytest.approx(value, abs=1e-5), key
