"""Bad inputs a user can really meet, fed to the real entry points: each gives a non-zero exit, one line
on stderr that names the file (and row, entry or variable), no traceback, and no output left behind."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from gptcore import GPTModel, save_model
from gptcore.config import GPTConfig

REPO = Path(__file__).resolve().parents[1]
SMS_ROWS = "ham\tHello there\nspam\tWIN a prize now\n"


@dataclass
class Case:
    """A stage (or CLI) run on one bad input; `expect` must all appear in its single error line."""

    name: str
    argv: list[str]
    make: Callable[[Path], None]
    expect: list[str]
    env: dict[str, str] = field(default_factory=dict)


def _write(rel: str, data: bytes | str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        path = tmp / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data if isinstance(data, bytes) else data.encode())

    return make


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _mirror_with(rel: str, data: bytes) -> Callable[[Path], None]:
    """A mirror holding one (bad) file, in place of the real one."""
    return _write(f"mirror/{rel}", data)


def _weights(kind: str) -> Callable[[Path], None]:
    def make(tmp: Path) -> None:
        path = tmp / "in" / "model.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        config = GPTConfig(
            vocab_size=50257,
            context_length=32,
            emb_dim=16,
            n_heads=2,
            n_layers=1,
            num_classes=2 if kind == "classifier" else None,
        )
        save_model(GPTModel(config), path)
        if kind == "truncated":
            path.write_bytes(path.read_bytes()[:5000])
        elif kind == "pickle":
            path.write_bytes(pickle.dumps(_Evil()))

    return make


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def _params(text: str) -> Callable[[Path], None]:
    return _write("params.yaml", text)


def _stage(name: str, *args: str) -> list[str]:
    return [sys.executable, str(REPO / "stages" / f"{name}.py"), *args]


PRETRAIN_OUT = [
    "--out",
    "out/m.safetensors",
    "--metrics",
    "out/m.json",
    "--plots",
    "out/plots",
    "--sample",
    "out/s.txt",
    "--progress-dir",
    "out/ck",
]
CLASSIFIER_OUT = [
    "--out",
    "out/c.safetensors",
    "--adapter-out",
    "out/adapter.safetensors",
    "--metrics",
    "out/c.json",
    "--plots",
    "out/plots",
    "--progress-dir",
    "out/ck",
]
SPLITS = ["--train", "in/train.csv", "--validation", "in/validation.csv", "--test", "in/test.csv"]
GOOD_SPLIT = "Label,Text\n0,hello\n1,win\n"


def _good_splits(tmp: Path) -> None:
    for split in ("train", "validation", "test"):
        _write(f"in/{split}.csv", GOOD_SPLIT)(tmp)


def _both(*makers):
    def make(tmp: Path) -> None:
        for maker in makers:
            maker(tmp)

    return make


CASES = [
    # Stage 1
    Case(
        "corpus not UTF-8",
        _stage("pretrain", "--corpus", "in/corpus.txt", *PRETRAIN_OUT),
        _write("in/corpus.txt", b"caf\xe9 au lait " * 200),
        ["corpus.txt", "UTF-8"],
    ),
    Case(
        "corpus empty",
        _stage("pretrain", "--corpus", "in/corpus.txt", *PRETRAIN_OUT),
        _write("in/corpus.txt", ""),
        ["corpus.txt", "empty"],
    ),
    Case(
        "params unknown key",
        _stage("pretrain", "--corpus", "in/corpus.txt", *PRETRAIN_OUT),
        _both(_write("in/corpus.txt", "text " * 500), _params("pretrain:\n  epoch: 3\n")),
        ["params.yaml", "epoch"],
    ),
    Case(
        "params wrong type",
        _stage("pretrain", "--corpus", "in/corpus.txt", *PRETRAIN_OUT),
        _both(_write("in/corpus.txt", "text " * 500), _params("pretrain:\n  lr: fast\n")),
        ["params.yaml", "pretrain.lr"],
    ),
    # Stage 3 data
    Case(
        "sms zip corrupt",
        _stage("download_sms", "--out", "out/SMSSpamCollection"),
        _mirror_with("sms+spam+collection.zip", b"PK\x03\x04 this is not really a zip"),
        ["sms+spam+collection.zip", "zip"],
    ),
    Case(
        "sms zip truncated",
        _stage("download_sms", "--out", "out/SMSSpamCollection"),
        _mirror_with("sms+spam+collection.zip", _zip({"SMSSpamCollection": SMS_ROWS.encode() * 100})[:150]),
        ["sms+spam+collection.zip"],
    ),
    Case(
        "sms zip without the data file",
        _stage("download_sms", "--out", "out/SMSSpamCollection"),
        _mirror_with("sms+spam+collection.zip", _zip({"readme": b"hello"})),
        ["sms+spam+collection.zip", "SMSSpamCollection"],
    ),
    Case(
        "sms zip member ../x",
        _stage("download_sms", "--out", "out/SMSSpamCollection"),
        _mirror_with("sms+spam+collection.zip", _zip({"../x": b"x", "SMSSpamCollection": SMS_ROWS.encode()})),
        ["unsafe", "../x"],
    ),
    Case(
        "sms zip absolute member",
        _stage("download_sms", "--out", "out/SMSSpamCollection"),
        _mirror_with("sms+spam+collection.zip", _zip({"/etc/x": b"x", "SMSSpamCollection": SMS_ROWS.encode()})),
        ["unsafe", "/etc/x"],
    ),
    Case(
        "sms third label",
        _stage("prepare_sms", "--collection", "in/SMSSpamCollection", *[a.replace("in/", "out/") for a in SPLITS]),
        _write("in/SMSSpamCollection", SMS_ROWS + "eggs\tbuy now\n"),
        ["SMSSpamCollection", "row 3", "eggs"],
    ),
    Case(
        "sms row without tab",
        _stage("prepare_sms", "--collection", "in/SMSSpamCollection", *[a.replace("in/", "out/") for a in SPLITS]),
        _write("in/SMSSpamCollection", SMS_ROWS + "spam no tab here\n"),
        ["SMSSpamCollection"],
    ),
    Case(
        "sms not UTF-8",
        _stage("prepare_sms", "--collection", "in/SMSSpamCollection", *[a.replace("in/", "out/") for a in SPLITS]),
        _write("in/SMSSpamCollection", SMS_ROWS.encode() + b"ham\tcaf\xe9\n"),
        ["SMSSpamCollection"],
    ),
    Case(
        "sms empty",
        _stage("prepare_sms", "--collection", "in/SMSSpamCollection", *[a.replace("in/", "out/") for a in SPLITS]),
        _write("in/SMSSpamCollection", ""),
        ["SMSSpamCollection"],
    ),
    # Stage 3 model
    Case(
        "classifier foundation truncated",
        _stage("finetune_classifier", "--foundation", "in/model.safetensors", *SPLITS, *CLASSIFIER_OUT),
        _both(_weights("truncated"), _good_splits),
        ["model.safetensors"],
    ),
    Case(
        "classifier foundation is a pickle with code",
        _stage("finetune_classifier", "--foundation", "in/model.safetensors", *SPLITS, *CLASSIFIER_OUT),
        _both(_weights("pickle"), _good_splits),
        ["model.safetensors"],
    ),
    # Stage 4
    Case(
        "instructions invalid JSON",
        _stage("prepare_instructions", "--data", "in/data.json", "--out-dir", "out/prepared"),
        _write("in/data.json", '[{"instruction": "a", '),
        ["data.json", "JSON"],
    ),
    Case(
        "instructions not a list",
        _stage("prepare_instructions", "--data", "in/data.json", "--out-dir", "out/prepared"),
        _write("in/data.json", '{"instruction": "a"}'),
        ["data.json", "list"],
    ),
    Case(
        "instructions missing key",
        _stage("prepare_instructions", "--data", "in/data.json", "--out-dir", "out/prepared"),
        _write(
            "in/data.json",
            json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "a", "input": ""}]),
        ),
        ["data.json", "1", "output"],
    ),
    Case(
        "instructions non-string field",
        _stage("prepare_instructions", "--data", "in/data.json", "--out-dir", "out/prepared"),
        _write("in/data.json", json.dumps([{"instruction": "a", "input": 5, "output": "b"}])),
        ["data.json", "0", "input"],
    ),
    Case(
        "instructions empty file",
        _stage("prepare_instructions", "--data", "in/data.json", "--out-dir", "out/prepared"),
        _write("in/data.json", ""),
        ["data.json"],
    ),
    Case(
        "responses not a list",
        _stage(
            "judge",
            "--responses",
            "in/test.json",
            "--scores",
            "out/scores.jsonl",
            "--metrics",
            "out/j.json",
            "--scores-table",
            "out/j.csv",
            "--histogram-table",
            "out/h.csv",
            "--histogram-png",
            "out/j.png",
        ),
        _write("in/test.json", "{}"),
        ["test.json"],
    ),
    Case(
        "judge URL refuses connections",
        _stage(
            "judge",
            "--responses",
            "in/test.json",
            "--scores",
            "out/scores.jsonl",
            "--metrics",
            "out/j.json",
            "--scores-table",
            "out/j.csv",
            "--histogram-table",
            "out/h.csv",
            "--histogram-png",
            "out/j.png",
        ),
        _both(
            _write(
                "in/test.json", json.dumps([{"instruction": "a", "input": "", "output": "b", "model_response": "c"}])
            ),
            _params("judge:\n  url: http://127.0.0.1:9\n  retries: 0\n  timeout: 2\n"),
        ),
        ["127.0.0.1:9", "ollama"],
    ),
    # Stage 2 and the CLI
    Case(
        "checkpoint folder without files",
        [sys.executable, "-m", "gptcore", "convert", "in/ckpt", "out/m.safetensors"],
        _write(
            "in/ckpt/hparams.json", json.dumps({"n_vocab": 50257, "n_ctx": 32, "n_embd": 16, "n_head": 2, "n_layer": 1})
        ),
        ["in/ckpt"],
    ),
    Case(
        "generate with a truncated weights file",
        [sys.executable, "-m", "gptcore", "generate", "--model", "in/model.safetensors", "--prompt", "x"],
        _weights("truncated"),
        ["model.safetensors"],
    ),
    Case(
        "generate with an empty prompt",
        [sys.executable, "-m", "gptcore", "generate", "--model", "in/model.safetensors", "--prompt", ""],
        _weights("good"),
        ["prompt is empty"],
    ),
    Case(
        "generate at temperature nan",
        [
            sys.executable,
            "-m",
            "gptcore",
            "generate",
            "--model",
            "in/model.safetensors",
            "--prompt",
            "x",
            "--temperature",
            "nan",
        ],
        _weights("good"),
        ["temperature", "finite"],
    ),
    Case(
        "serve a classifier",
        [sys.executable, "-m", "gptcore", "serve", "--model", "in/model.safetensors", "--port", "0"],
        _weights("classifier"),
        ["model.safetensors", "classifier"],
    ),
    Case(
        "generate with a pickle carrying code",
        [sys.executable, "-m", "gptcore", "generate", "--model", "in/model.safetensors", "--prompt", "x"],
        _weights("pickle"),
        ["model.safetensors"],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_clear_line(case: Case, tmp_path: Path, mirror_dir: Path):
    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    case.make(tmp_path)
    env = {**os.environ, "GPTCORE_DEBUG": ""}
    if (tmp_path / "mirror").is_dir():
        env["GPTCORE_MIRROR"] = str(tmp_path / "mirror")
    proc = subprocess.run(case.argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr
    if lines and lines[0].startswith("usage: "):  # rejected by argparse: its usage, then one error line (exit 2)
        assert proc.returncode == 2 and ": error: " in lines[-1], proc.stderr
        lines = ["error: " + lines[-1].split(": error: ", 1)[1]]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    for fragment in case.expect:
        assert fragment.lower() in lines[0].lower(), lines[0]
    left = [p for p in (tmp_path / "out").rglob("*") if p.is_file()] if (tmp_path / "out").exists() else []
    assert left == [], left
    assert not (tmp_path / "PWNED").exists()
