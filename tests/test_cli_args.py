"""Command-line arguments: numbers out of range stop argparse (usage + one error line, exit 2), every
option has help text, and every --help shows the defaults."""

from __future__ import annotations

import argparse
import os
import runpy
import subprocess
import sys

import pytest

from conftest import REPO
from gptcore.arguments import HelpFormatter, port_number, positive_int
from gptcore.cli import build_parser

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


@pytest.mark.parametrize("verb", ["convert", "generate", "classify", "serve", "export", "bench"])
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
    "script", ["benchmarks/greedy_agreement.py", "benchmarks/allocators.py", "gptcore/bench/serving.py"]
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
