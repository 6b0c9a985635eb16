"""The package's shape as the README states it: folders by concern, a light core, logging instead of
prints, one formatter and linter."""

from __future__ import annotations

import ast
import json
import subprocess
import sys

import pytest

from tests.conftest import REPO

PACKAGE = REPO / "gptcore"
# The entry points: the CLI and the wrapper every stage script and verb runs in may print; so may a
# module that is a program of its own (`python -m ...`), from its `__main__` block or `main()`.
ENTRY_POINTS = {"gptcore/cli.py", "gptcore/entry.py", "gptcore/__main__.py"}
HEAVY = ("pydantic", "requests", "tqdm", "tensorflow", "yaml", "fastapi")


def _new_modules_after(statement: str) -> set[str]:
    """Top-level package names a fresh interpreter imports for `statement`, beyond what `import torch` does."""
    code = (
        "import sys, json, torch; before = set(sys.modules); "
        f"{statement}; "
        "print(json.dumps(sorted({m.split('.')[0] for m in set(sys.modules) - before})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("module", ["gptcore.model", "gptcore.config", "gptcore.weights"])
def test_the_core_imports_no_heavy_dependency(module):
    """The model, its config and its weights file need torch and safetensors, nothing of the pipeline."""
    assert _new_modules_after(f"import {module}") & set(HEAVY) == set()


def test_folders_name_the_concerns():
    folders = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").is_file()}
    assert {"training", "inference", "convert", "export", "recipes", "serve", "data", "params", "bench"} <= folders
    for folder in folders:  # each says what it holds
        assert ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text())), folder


def test_modules_stay_small():
    sizes = {p.relative_to(REPO).as_posix(): len(p.read_text().splitlines()) for p in PACKAGE.rglob("*.py")}
    assert {path: n for path, n in sizes.items() if n > 450} == {}


def _is_program(tree: ast.Module) -> bool:
    return any(
        isinstance(node, ast.If)
        and isinstance(node.test, ast.Compare)
        and ast.unparse(node.test) == "__name__ == '__main__'"
        for node in tree.body
    )


def test_the_library_logs_instead_of_printing():
    printing = []
    for path in PACKAGE.rglob("*.py"):
        name = path.relative_to(REPO).as_posix()
        tree = ast.parse(path.read_text())
        if name in ENTRY_POINTS or _is_program(tree):
            continue
        printing += [
            f"{name}:{node.lineno}"
            for node in ast.walk(tree)
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        ]
    assert printing == []


def test_log_lines_reach_stderr_through_the_entry_point(capsys):
    import logging

    from gptcore.entry import run_entry

    def main():
        logging.getLogger("gptcore.recipes.example").info("resuming from here")
        logging.getLogger("gptcore.recipes.example").debug("a detail")

    assert run_entry(main) == 0
    assert capsys.readouterr().err == "resuming from here\n"
    assert run_entry(main, verbosity=-1) == 0
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("command", [["format", "--check"], ["check"]])
def test_ruff(command):
    result = subprocess.run(
        [sys.executable, "-m", "ruff", *command, "--no-cache", "gptcore", "stages", "tests", "benchmarks"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
