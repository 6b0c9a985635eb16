"""The score cache: every judgement a line of data/judge/scores.jsonl, keyed by its prompt and settings."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

from gptcore.atomic import atomic_path
from gptcore.params.schema import JudgeParams
from gptcore.recipes.judge.client import request_options


def cache_key(prompt: str, params: JudgeParams) -> str:
    """The cache key of one judgement: the prompt and every judge setting that changes the answer."""
    settings = {
        "prompt": prompt,
        "model": params.model,
        "options": request_options(params),
        "structured": params.structured,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


class ScoreCache:
    """data/judge/scores.jsonl: one JSON record per judged entry, keyed by `cache_key`.

    Records are appended one line at a time with fsync, so a kill leaves at most a partial last line;
    that line (or any line that is not a record) is ignored with a note and the file is rewritten
    without it, atomically, before anything is appended. A later record for a key replaces an
    earlier one (a failure retried on the next run).
    """

    def __init__(self, path: str | os.PathLike, warn: Callable[[str], None]):
        self.path = Path(path)
        self.records: dict[str, dict] = {}
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        bad = []
        for number, line in enumerate(raw.split(b"\n"), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                record = None
            if (
                isinstance(record, dict)
                and isinstance(record.get("key"), str)
                and record.get("status") in ("scored", "failed")
            ):
                self.records[record["key"]] = record
            else:
                bad.append(number)
        if bad:
            warn(
                f"{self.path}: ignored {len(bad)} unreadable line(s) ({', '.join(map(str, bad[:5]))}); "
                "those entries are asked again"
            )
        if bad or (raw and not raw.endswith(b"\n")):
            self.rewrite()

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, record: dict) -> None:
        self.records[record["key"]] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with open(self.path, "ab") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())

    def rewrite(self) -> None:
        """Write the latest record of every key, atomically (old file or new, never half)."""
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                for record in self.records.values():
                    f.write(json.dumps(record, ensure_ascii=False) + "\n")
                f.flush()
                os.fsync(f.fileno())
