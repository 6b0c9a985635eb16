"""DVC must notice every code change: each stage's deps list the gptcore modules its script runs.

The closure is read from the source (tests/import_closure.py); after changing imports, run
`python tests/import_closure.py` to rewrite the deps in dvc.yaml.
"""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO
from tests.import_closure import declared_code_deps, dvc_stages, import_closure, stage_script

STAGES = dvc_stages(REPO)


def missing_and_extra(stage: dict) -> tuple[set[str], set[str]]:
    closure = import_closure(REPO, REPO / stage_script(stage))
    declared = declared_code_deps(stage)
    return closure - declared, declared - closure


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stage_deps_are_its_import_closure(name):
    missing, extra = missing_and_extra(STAGES[name])
    assert not missing, (
        f"stage {name}: runs {sorted(missing)} but dvc.yaml does not list them (python tests/import_closure.py)"
    )
    assert not extra, (
        f"stage {name}: lists {sorted(extra)}, which its script never imports: editing them would rerun it for nothing"
    )


def test_a_deleted_dep_line_is_reported():
    stage = STAGES["pretrain"]
    without = {**stage, "deps": [d for d in stage["deps"] if d != "gptcore/training/schedule.py"]}
    assert missing_and_extra(without) == ({"gptcore/training/schedule.py"}, set())


def test_the_package_init_stays_light():
    """Importing gptcore (as every stage does on the way to a submodule) pulls in no other module."""
    closure = import_closure(REPO, REPO / "gptcore" / "__init__.py")
    assert closure == set(), f"gptcore/__init__.py imports {sorted(closure)} at run time"


def test_serve_is_in_no_stage():
    """Editing the server (or the CLI) must not invalidate any pipeline stage (nor re-download 3 GB)."""
    for name, stage in STAGES.items():
        closure = import_closure(REPO, REPO / stage_script(stage))
        assert not {p for p in closure if p.startswith(("gptcore/serve", "gptcore/cli.py", "gptcore/bench/"))}, name


TINY = {
    "precision": "fp32",
    "pretrain": {
        "model": {"context_length": 64, "emb_dim": 32, "n_heads": 2, "n_layers": 2, "drop_rate": 0.0},
        "epochs": 1,
        "batch_size": 4,
        "eval_every": 5,
        "eval_batches": 1,
        "sample_tokens": 4,
    },
}
RUN = [
    "download_corpus",
    "pretrain",
    "init_scratch",
    "download_sms",
    "prepare_sms",
    "baseline_classifier",
    "download_instructions",
    "prepare_instructions",
]


@pytest.mark.slow
def test_dvc_status_lists_exactly_the_stages_that_import_an_edited_module(repo_copy):
    repo_copy.set_params(TINY)
    repo_copy.dvc("repro", *RUN)
    status = json.loads(repo_copy.dvc("status", "--json", *RUN).stdout or "{}")
    assert status == {}, status

    module = "gptcore/training/cross_entropy.py"
    with open(repo_copy.root / module, "a", encoding="utf-8") as f:
        f.write("\n# an edit\n")
    status = json.loads(repo_copy.dvc("status", "--json", *RUN).stdout or "{}")
    expected = {
        name for name in RUN if module in import_closure(repo_copy.root, repo_copy.root / stage_script(STAGES[name]))
    }
    assert expected >= {"pretrain", "prepare_instructions"}  # the edit matters to some, not all, of them
    assert set(status) == expected
