"""Shared fixtures: the offline mirror, a seeded tiny model config, and a throwaway copy of the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from gptcore.config import GPTConfig

REPO = Path(__file__).resolve().parents[1]
# What an end-to-end DVC run needs from the project (outputs and caches are left behind).
REPO_FILES = ["dvc.yaml", "params.yaml", "stages", "gptcore", ".dvc/config", ".dvc/plots", ".dvcignore", "vendor"]


def _mirror_path() -> Path:
    """GPTCORE_MIRROR made absolute where it was set (the tests also run stages in other folders)."""
    env = os.environ.get("GPTCORE_MIRROR")
    return (Path(env).expanduser() if env else REPO.parent / "shared" / "mirror").resolve()


@pytest.fixture(scope="session")
def mirror_dir() -> Path:
    path = _mirror_path()
    if not (path / "gpt2" / "encoder.json").is_file():
        pytest.fail(f"the offline mirror is missing at {path}; set GPTCORE_MIRROR")
    return path


@pytest.fixture(autouse=True)
def _offline_mirror(monkeypatch, mirror_dir, tmp_path_factory):
    """Every test runs offline: downloads come from the mirror, caches live in a temporary folder."""
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror_dir))
    monkeypatch.setenv("GPTCORE_CACHE", str(tmp_path_factory.getbasetemp() / "gptcore-cache"))


@pytest.fixture
def tiny_config() -> GPTConfig:
    torch.manual_seed(123)
    return GPTConfig(
        vocab_size=50257, context_length=32, emb_dim=32, n_heads=4, n_layers=2, drop_rate=0.0, qkv_bias=True
    )


@pytest.fixture(scope="session")
def tokenizer(mirror_dir):
    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    from gptcore.tokenizer import get_tokenizer

    return get_tokenizer(mirror_dir / "gpt2")


# A language model small enough for a stage to run in seconds, with the real vocabulary and a context
# that holds an SMS message (the longest is 120 tokens) and a short instruction prompt.
TINY_LM = {
    "vocab_size": 50257,
    "context_length": 128,
    "emb_dim": 32,
    "n_heads": 2,
    "n_layers": 2,
    "drop_rate": 0.1,
    "qkv_bias": False,
}


@pytest.fixture(scope="session")
def stage_inputs(tmp_path_factory, mirror_dir) -> dict[str, Path]:
    """Real data cut small: SMS splits and instruction entries from the mirror, a tiny LM, a fake judge script."""
    from gptcore.data.sms import fetch_collection, read_collection, split_collection, to_csv_text
    from gptcore.model import GPTModel
    from gptcore.weights import save_model

    root = tmp_path_factory.mktemp("inputs")
    os.environ.setdefault("GPTCORE_MIRROR", str(mirror_dir))
    fetch_collection("https://example.invalid/sms.zip", root / "SMSSpamCollection")
    splits = split_collection(read_collection(root / "SMSSpamCollection"))
    for split, rows in {"train": 200, "validation": 24, "test": 40}.items():
        (root / f"{split}.csv").write_text(to_csv_text(splits[split][:rows]))

    entries = json.loads((mirror_dir / "instruction-data.json").read_text())
    (root / "train.json").write_text(json.dumps(entries[:64]))
    (root / "val.json").write_text(json.dumps(entries[64:72]))
    (root / "test.json").write_text(json.dumps(entries[72:96]))

    torch.manual_seed(0)
    save_model(GPTModel(GPTConfig(**TINY_LM)), root / "lm.safetensors")
    # Without dropout, for comparisons across process counts (each rank would draw its own masks).
    save_model(GPTModel(GPTConfig(**{**TINY_LM, "drop_rate": 0.0})), root / "lm-no-dropout.safetensors")
    return root


class RepoCopy:
    """A fresh git + DVC working copy of the project in a temporary folder, for end-to-end stage runs."""

    def __init__(self, root: Path):
        self.root = root

    def set_params(self, updates: dict) -> None:
        """Deep-merge `updates` into the copy's params.yaml."""
        path = self.root / "params.yaml"
        params = yaml.safe_load(path.read_text())
        _merge(params, updates)
        path.write_text(yaml.safe_dump(params, sort_keys=False))

    def run(self, *args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
        proc = subprocess.run(args, cwd=self.root, env=env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
            )
        return proc

    def dvc(self, *args: str, **kwargs) -> subprocess.CompletedProcess:
        return self.run(sys.executable, "-m", "dvc", *args, **kwargs)

    def read_json(self, rel: str):
        import json

        return json.loads((self.root / rel).read_text())


def _merge(base: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


@pytest.fixture
def repo_copy(tmp_path) -> RepoCopy:
    root = tmp_path / "repo"
    root.mkdir()
    for rel in REPO_FILES:
        src, dst = REPO / rel, root / rel
        if src.is_dir():
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    copy = RepoCopy(root)
    copy.run("git", "init", "-q")
    copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "add", "-A")
    copy.run("git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "copy")
    return copy


def pytest_collection_modifyitems(config, items):
    """Mark every test that runs a GGUF in llama.cpp (asks for the llama_cpp fixture), so that CI runs
    them alone (`pytest -m llama_cpp`) once the llama extra is installed."""
    for item in items:
        if "llama_cpp" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.llama_cpp)
