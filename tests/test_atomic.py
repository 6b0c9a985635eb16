"""Atomic outputs: old or new content only, nothing left beside the target, the usual permissions."""

import os
import stat
import sys
import threading

import pytest

from gptcore.atomic import atomic_dir, atomic_path, write_json, write_text


@pytest.fixture
def umask_027():
    previous = os.umask(0o027)
    yield 0o027
    os.umask(previous)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX permissions")
def test_outputs_get_the_permissions_open_and_mkdir_give(tmp_path, umask_027):
    write_text(tmp_path / "a.txt", "a")
    write_json(tmp_path / "new" / "b.json", {"b": 1})
    with atomic_dir(tmp_path / "folder") as folder:
        (folder / "c").write_text("c")
    assert _mode(tmp_path / "a.txt") == _mode(tmp_path / "new" / "b.json") == 0o640  # 0666 & ~027
    assert _mode(tmp_path / "folder") == 0o750  # 0777 & ~027 (mkdtemp would give 0700)


def test_a_failed_block_leaves_the_old_content_and_nothing_beside(tmp_path):
    target = tmp_path / "out.txt"
    write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError
    with pytest.raises(RuntimeError):
        with atomic_dir(tmp_path / "folder") as folder:
            (folder / "x").write_text("x")
            raise RuntimeError
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_concurrent_writers_each_get_their_own_temporary_file(tmp_path):
    """Temporary names are unique (O_EXCL), so writers of the same target never share one."""
    errors = []

    def write(i):
        try:
            for _ in range(20):
                write_text(tmp_path / "same.txt", f"{i}\n" * 1000)
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    lines = set((tmp_path / "same.txt").read_text().splitlines())
    assert len(lines) == 1  # one writer's whole content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["same.txt"]
