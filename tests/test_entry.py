"""The entry-point wrapper: relative folder variables become absolute where they were set."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from gptcore.entry import absolute_path_env


def test_relative_folders_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"GPTCORE_MIRROR": "../shared/mirror", "GPTCORE_CACHE": "/abs/cache", "OTHER": "rel"}
    absolute_path_env(env)
    assert env == {
        "GPTCORE_MIRROR": str(tmp_path.parent / "shared" / "mirror"),
        "GPTCORE_CACHE": "/abs/cache",
        "OTHER": "rel",
    }


def test_a_child_started_elsewhere_reads_the_same_mirror(tmp_path, mirror_dir):
    """As the README's test command sets it: GPTCORE_MIRROR relative to the folder it was typed in; a
    stage started from there, which starts a process in another folder, still finds the mirror."""
    here = tmp_path / "repo"
    (here / "elsewhere").mkdir(parents=True)
    os.symlink(mirror_dir, tmp_path / "mirror")
    child = (
        "import os, subprocess, sys; from gptcore.entry import run_entry; "
        "run_entry(lambda: subprocess.run([sys.executable, '-c', "
        "'import os; from gptcore.download import mirror_root; print(mirror_root())'], cwd='elsewhere', check=True))"
    )
    env = {**os.environ, "GPTCORE_MIRROR": "../mirror"}
    proc = subprocess.run([sys.executable, "-c", child], cwd=here, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(tmp_path / "mirror")


def test_a_missing_extra_is_one_line_naming_it(capsys):
    """`gptcore serve` without the serve extra: one line with the extra and its install command."""
    from gptcore.entry import run_entry

    def needs_fastapi():
        raise ModuleNotFoundError("No module named 'fastapi'", name="fastapi")

    assert run_entry(needs_fastapi) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'fastapi', from gptcore's serve extra" in err
    assert "pip install -c constraints.txt -e '.[serve]'" in err

    def needs_something_else():
        raise ModuleNotFoundError("No module named 'nothing_we_know'", name="nothing_we_know")

    with pytest.raises(ModuleNotFoundError):  # not a known extra: a bug, shown as one
        run_entry(needs_something_else)
