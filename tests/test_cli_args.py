"""Command-line arguments: numbers out of range stop argparse (usage + one error line, exit 2), every
option has help text, and every --help shows the defaults."""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys

import pytest

from gptcore.arguments import HelpFormatter, port_number, positive_int
from gptcore.cli import build_parser
from tests.conftest import REPO

GENERATE = ["generate", "--model", "missing.safetensors", "--prompt", "Hi"]


def _gptcore(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "gptcore", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize(
    "args, error",
    [
        ([*GENERATE, "--max-new-tokens", "-5"], "argument --max-new-tokens: must be >= 0, got -5"),
        ([*GENERATE, "--max-new-tokens", "ten"], "argument --max-new-tokens: expected an integer, got 'ten'"),
        ([*GENERATE, "--top-k", "0"], "argument --top-k: must be >= 1, got 0"),
        ([*GENERATE, "--temperature", "-0.5"], "argument --temperature: must be >= 0, got -0.5"),
        ([*GENERATE, "--temperature", "nan"], "argument --temperature: expected a finite number, got 'nan'"),
        ([*GENERATE, "--temperature", "inf"], "argument --temperature: expected a finite number, got 'inf'"),
        ([*GENERATE, "--seed", "1.5"], "argument --seed: expected an integer, got '1.5'"),
        ([*GENERATE, "--device", "gpu"], "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
        (
            ["classify", "--model", "m.safetensors", "--device", "cuda:x", "hello"],
            "argument --device: expected auto, cpu, cuda, cuda:N or mps, got 'cuda:x'",
        ),
    ],
)
def test_bad_numbers_are_argparse_errors(args, error):
    proc = _gptcore(*args)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert lines[0].startswith(f"usage: gptcore {args[0]}")
    assert lines[-1] == f"gptcore {args[0]}: error: {error}"
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_help_shows_the_defaults():
    proc = _gptcore("generate", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for default in ("(default: 50)", "(default: 0.0)", "(default: auto)", "(default: fp32)"):
        assert default in text
    assert "(default: None)" not in text  # unset and required options say nothing rather than None


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def _undocumented(parser: argparse.ArgumentParser) -> list[str]:
    return [a.dest for a in parser._actions if not a.help and not isinstance(a, argparse._SubParsersAction)]


@pytest.mark.parametrize("verb", ["convert", "generate", "chat", "classify", "serve", "export", "bench"])
def test_every_verb_option_has_help_and_shows_defaults(verb):
    parser = _subparsers(build_parser())[verb]
    assert parser.formatter_class is HelpFormatter
    assert _undocumented(parser) == []


STAGES = sorted(p.stem for p in (REPO / "stages").glob("*.py"))


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_option_has_help_and_shows_defaults(stage, monkeypatch):
    """Run the stage's main() up to its parse_args, and look at the parser it built."""

    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    script = runpy.run_path(str(REPO / "stages" / f"{stage}.py"), run_name="stage_under_test")
    with pytest.raises(_Parsed) as parsed:
        script["main"]()
    parser = parsed.value.parser
    assert parser.formatter_class is HelpFormatter and _undocumented(parser) == []
    assert "(default: params.yaml)" in " ".join(parser.format_help().split())


@pytest.mark.parametrize(
    "script",
    [
        "benchmarks/greedy_agreement.py",
        "benchmarks/allocators.py",
        "benchmarks/first_hour.py",
        "benchmarks/cli_startup.py",
        "gptcore/bench/serving.py",
    ],
)
def test_every_benchmark_option_has_help_and_shows_defaults(script, monkeypatch):
    def capture(self, *args, **kwargs):
        raise _Parsed(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(_Parsed) as parsed:
        runpy.run_path(str(REPO / script), run_name="benchmark_under_test")["main"]()
    assert parsed.value.parser.formatter_class is HelpFormatter and _undocumented(parsed.value.parser) == []


def test_port_and_positive_bounds():
    assert [port_number("0"), port_number("65535"), positive_int("1")] == [0, 65535, 1]
    for parse, text, message in [
        (port_number, "65536", "must be in 0..65535, got 65536"),
        (port_number, "-1", "must be in 0..65535, got -1"),
        (positive_int, "0", "must be >= 1, got 0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            parse(text)


# The CLI answers at once: --help, each verb's --help and argument errors import no torch (nor numpy,
# pydantic: what makes a verb take seconds to start). Timed by benchmarks/cli_startup.py, not here.
_NO_HEAVY_IMPORTS = """
import sys
from gptcore.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(sorted(m for m in ("torch", "numpy", "pydantic", "pandas") if m in sys.modules))
"""


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        *[
            [verb, "--help"]
            for verb in ("convert", "export", "generate", "chat", "classify", "serve", "bench", "doctor")
        ],
        [*GENERATE, "--top-k", "0"],
        ["chat", "--model", "m.safetensors", "--temperature", "-1"],
        ["bench", "--model", "gpt3"],
        ["serve"],
    ],
)
def test_help_and_argument_errors_import_no_torch(args):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", _NO_HEAVY_IMPORTS, *args], cwd=REPO, env=env, capture_output=True, text=True
    )
    assert result.stdout.strip().splitlines()[-1] == "[]", result.stdout + result.stderr


def test_dir_of_the_package_is_its_public_api():
    import gptcore

    assert dir(gptcore) == sorted({*gptcore.__all__, "__version__"})
    assert len(gptcore.__all__) == len(set(gptcore.__all__))
    assert all(callable(getattr(gptcore, name)) for name in gptcore.__all__)
    assert dir(gptcore) == sorted({*gptcore.__all__, "__version__"})  # unchanged once the names are loaded


def test_a_folder_named_gptcore_in_the_working_directory_does_not_shadow_the_install(tmp_path):
    """The editable install is a .pth that puts the repository on sys.path (pyproject.toml's package-dir),
    so a regular package wins over the namespace package that the folder of a clone named gptcore makes."""
    import importlib.metadata
    import json

    # pip's record of the install (dist-info in site-packages); the checkout's own gptcore.egg-info, on
    # sys.path through the .pth, holds no direct_url.json.
    records = [d.read_text("direct_url.json") for d in importlib.metadata.distributions(name="gptcore")]
    url = next((json.loads(r).get("url") for r in records if r), None)
    if url != REPO.as_uri():
        pytest.skip(f"gptcore is not installed from this checkout (installed: {url})")
    (tmp_path / "gptcore" / "gptcore").mkdir(parents=True)  # the folder above a clone named gptcore
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    code = "import gptcore; print(gptcore.__file__)"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.stdout.strip() == str(REPO / "gptcore" / "__init__.py"), result.stdout + result.stderr
