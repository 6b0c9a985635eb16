"""The one params model: any typo anywhere in params.yaml is one line naming its key path, and every
stage script validates the whole file before any work (exit 1, no traceback, nothing written)."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest
import yaml

from gptcore.config import OPENAI_SIZES
from gptcore.errors import ConfigError
from gptcore.params.choices import PRECISIONS
from gptcore.params.schema import FOUNDATIONS, ClassifierParams, Params
from tests.conftest import REPO, _merge
from tests.import_closure import dvc_stages

DEFAULTS = yaml.safe_load((REPO / "params.yaml").read_text())

# (what is wrong, the edit to params.yaml, the one line every stage prints)
BAD = [
    ("top-level typo", {"precison": "fp32"}, "error: params.yaml: precison: unknown key; did you mean precision?"),
    (
        "strategy typo",
        {"strategy": "fdsp"},
        "error: params.yaml: strategy: expected one of auto, ddp, fsdp, got 'fdsp'",
    ),
    (
        "bad launcher",
        {"launcher": "pyton"},
        "error: params.yaml: launcher: expected python or torchrun [options] (one line), got 'pyton'",
    ),
    (
        "section typo",
        {"classifer": {"lr": 0.001}},
        "error: params.yaml: classifer: unknown section; did you mean classifier?",
    ),
    (
        "key typo",
        {"generate": {"max_new_token": 5}},
        "error: params.yaml: generate.max_new_token: unknown key; did you mean max_new_tokens?",
    ),
    ("wrong type", {"classifier": {"lr": "fast"}}, "error: params.yaml: classifier.lr: expected a number, got 'fast'"),
    (
        "bad choice",
        {"classifier": {"trainable": "everything"}},
        "error: params.yaml: classifier.trainable: expected one of last_block, last_two_blocks, all, head, lora, got 'everything'",
    ),
    (
        "unknown foundation",
        {"foundation": "gpt3"},
        "error: params.yaml: foundation: expected one of gpt2-small, gpt2-medium, gpt2-large, gpt2-xl, pretrained, scratch, got 'gpt3'",
    ),
    (
        "the removed openai_models",
        {"openai_models": {"gpt2-large": "774M"}},
        "error: params.yaml: openai_models: no longer used: the foundation stage follows `foundation` alone; delete this key",
    ),
    (
        "renamed progress_minutes",
        {"pretrain": {"checkpoint_minutes": 5}},
        "error: params.yaml: pretrain: checkpoint_minutes: renamed to progress_minutes",
    ),
    (
        "zero max_grad_norm",
        {"pretrain": {"max_grad_norm": 0}},
        "error: params.yaml: pretrain.max_grad_norm: must be > 0, got 0",
    ),
    (
        "negative max_grad_norm",
        {"instructions": {"max_grad_norm": -1.0}},
        "error: params.yaml: instructions.max_grad_norm: must be > 0, got -1.0",
    ),
    (
        "clipping with step_in_backward true",
        {"classifier": {"step_in_backward": True}},
        "error: params.yaml: classifier: step_in_backward: true cannot clip gradients (the global norm needs every "
        "gradient before any update); set max_grad_norm: null, or step_in_backward: auto (off while clipping)",
    ),
    (
        "renamed precision",
        {"precision": "bf16"},
        "error: params.yaml: precision: unknown value 'bf16' (renamed: use bf16-mixed or bf16-true); "
        "expected one of auto, fp32, bf16-mixed, bf16-true, fp16-mixed",
    ),
]


def _params(updates: dict) -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    _merge(params, updates)
    return params


@pytest.mark.parametrize("updates, line", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_the_model_reports_one_line(updates, line):
    with pytest.raises(ConfigError) as info:
        Params.from_dict(_params(updates), where="params.yaml")
    assert f"error: {info.value}" == line


def test_the_shipped_params_validate():
    params = Params.from_dict(DEFAULTS, where="params.yaml")
    assert params.foundation == "gpt2-large"


@pytest.mark.parametrize("foundation", FOUNDATIONS)
def test_every_foundation_alone_is_a_valid_switch(foundation):
    """`dvc exp run -S foundation=NAME` edits this one key; nothing else has to change with it."""
    assert Params.from_dict({**DEFAULTS, "foundation": foundation}).foundation == foundation


def test_choices_are_declared_once():
    """The tuples the library uses are read from the Literal types, not written beside them."""
    assert PRECISIONS == ("auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed")
    assert FOUNDATIONS[:4] == tuple(OPENAI_SIZES)


@pytest.mark.parametrize(
    "value, message",
    [
        ("5e-5", "expected a number, got '5e-5' (YAML reads 5e-5 as text: write 5.0e-5)"),
        (True, "expected a number, got True"),
        (".nan", "expected a number, got '.nan'"),
        (float("inf"), "expected a finite number, got inf"),
        (0, "must be > 0, got 0"),
    ],
)
def test_number_strictness(value, message):
    with pytest.raises(ConfigError) as info:
        ClassifierParams.from_dict({"lr": value}, where="params.yaml classifier")
    assert str(info.value) == f"params.yaml classifier: lr: {message}"


def test_every_section_of_params_yaml_is_a_field_and_documented():
    assert set(DEFAULTS) == set(Params.model_fields)
    undocumented = [
        name
        for name, field in Params.model_fields.items()
        if not field.description and not (isinstance(field.annotation, type) and field.annotation.__doc__)
    ]
    assert undocumented == []


def _stage_argv(stage: dict) -> list[str]:
    """A dvc.yaml stage's command with its templating filled in, run with this interpreter."""
    cmd = " ".join(stage["cmd"].split())
    for name, value in {
        "${key}": "gpt2-large",
        "${item}": "774M",
        "${foundation}": "gpt2-large",
        "${launcher}": "python",
    }.items():
        cmd = cmd.replace(name, value)
    argv = shlex.split(cmd)
    while "=" in argv[0]:  # a launcher's environment assignment (GLIBC_TUNABLES=... python ...)
        argv = argv[1:]
    assert argv[0] == "python" and argv[1].startswith("stages/")
    return [sys.executable, str(REPO / argv[1]), *argv[2:]]


STAGES = dvc_stages(REPO)


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_stage_validates_the_whole_file_first(name, tmp_path):
    """A typo in a section the stage never reads still stops it, before it reads an input or writes."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params({"classifer": {"lr": 0.001}}), sort_keys=False))
    proc = subprocess.run(
        _stage_argv(STAGES[name]),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "GPTCORE_DEBUG": ""},
    )
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: params.yaml: classifer: unknown section; did you mean classifier?"
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]  # nothing written, no folder made


@pytest.mark.parametrize("updates, line", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_a_stage_prints_the_line(updates, line, tmp_path):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(updates), sort_keys=False))
    argv = _stage_argv(STAGES["download_corpus"])
    proc = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "GPTCORE_DEBUG": ""}
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (1, [line])
    assert "Traceback" not in proc.stderr and sorted(p.name for p in tmp_path.iterdir()) == ["params.yaml"]


THREE_WRONG = {"seed": "abc", "classifier": {"lr": "fast"}, "pretrain": {"epochs": 0}}
THREE_LINES = [
    "error: params.yaml: 3 problems:",
    "  seed: expected an integer, got 'abc'",
    "  pretrain.epochs: must be >= 1, got 0",
    "  classifier.lr: expected a number, got 'fast'",
]


DOC_CASES = [  # the inputs of docs/params.md's example lines, in their order
    {"precison": "fp32"},
    {"classifer": {"lr": 0.001}},
    {"classifier": {"lrr": 1.0}},
    {"classifier": {"lr": "fast"}},
    {"classifier": {"lr": "5e-5"}},
    {"classifier": {"trainable": "everything"}},
    {"foundation": "gpt3"},
    {"openai_models": {"gpt2-large": "774M"}},
    {"precision": "bf16"},
    {"pretrain": {"model": {"n_heads": 5}}},
    {"pretrain": {"warmup": 1.5}},
    {"pretrain": {"max_grad_norm": 0}},
    {"classifier": {"step_in_backward": True}},
    THREE_WRONG,  # the first line of the several-problems example
]


def test_the_documented_lines_are_the_real_ones():
    documented = [line for line in (REPO / "docs" / "params.md").read_text().splitlines() if line.startswith("error: ")]
    produced = []
    for updates in DOC_CASES:
        with pytest.raises(ConfigError) as info:
            Params.from_dict(_params(updates), where="params.yaml")
        produced.append(f"error: {info.value}".splitlines()[0])
    assert produced == documented


def test_every_problem_at_once_each_on_its_line_with_its_key_path(tmp_path):
    """A params.yaml with three wrong values: one error listing all three (fix once, not three times)."""
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(_params(THREE_WRONG), sort_keys=False))
    argv = _stage_argv(STAGES["download_corpus"])
    proc = subprocess.run(
        argv, cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "GPTCORE_DEBUG": ""}
    )
    assert (proc.returncode, proc.stderr.strip().splitlines()) == (1, THREE_LINES)
    with pytest.raises(ConfigError) as info:
        Params.from_dict(_params(THREE_WRONG), where="params.yaml")
    assert info.value.problems == [line.strip() for line in THREE_LINES[1:]]
    assert ("error: " + str(info.value)).splitlines() == THREE_LINES
    assert "\n".join(THREE_LINES) in (REPO / "docs" / "params.md").read_text()  # the documented example


def test_the_readme_experiment_table_names_every_top_level_param():
    """The README's `dvc exp show` drops every metric by name (a word without a dot) but the top-level
    params, which it lists: the list must be params.yaml's top-level keys that are not sections."""
    import re

    command = next(line for line in (REPO / "README.md").read_text().splitlines() if line.startswith("dvc exp show"))
    listed = re.search(r"\(\?!\(([a-z_|]+)\)\$\)", command).group(1).split("|")
    assert sorted(listed) == sorted(key for key, value in DEFAULTS.items() if not isinstance(value, dict))
