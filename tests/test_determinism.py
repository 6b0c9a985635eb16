"""Same params, same machine -> same bytes, at the default precision (`auto`: bf16 on CPUs with native
bf16): two `dvc repro -f` runs of the Stage 4 chain give byte-identical weights and responses."""

from __future__ import annotations

import pytest

SMALL_SCRATCH = {
    "foundation": "scratch",
    "prepare_instructions": {"train_ratio": 0.1, "test_ratio": 0.1},  # 110 train, 110 test entries
    "pretrain": {"model": {"context_length": 96, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.1}},
    "instructions": {
        "epochs": 1,
        "batch_size": 8,
        "eval_every": 40,
        "eval_batches": 1,
        "allowed_max_length": 96,
        "lr": 0.001,
    },
    "generate": {"max_new_tokens": 6, "batch_size": 8},
}
OUTPUTS = ["models/scratch/model.safetensors", "models/instruct/model.safetensors", "data/responses/test.json"]


@pytest.mark.slow
def test_two_forced_runs_give_the_same_bytes(repo_copy):
    repo_copy.set_params(SMALL_SCRATCH)
    repo_copy.dvc("repro", "generate_responses")
    first = {name: (repo_copy.root / name).read_bytes() for name in OUTPUTS}
    generation = repo_copy.read_json("metrics/generation.json")
    repo_copy.dvc("repro", "-f", "generate_responses")
    second = {name: (repo_copy.root / name).read_bytes() for name in OUTPUTS}
    for name in OUTPUTS:
        assert first[name] == second[name], f"{name} differs between two runs with the same params"
    assert generation["entries"] == 110
    from gptcore.device import resolve_device
    from gptcore.inference.decoding import resolve_decoding_precision

    assert generation["precision"] == resolve_decoding_precision("auto", resolve_device("auto"))[0]  # the default
