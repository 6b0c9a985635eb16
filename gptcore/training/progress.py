"""Saved training progress and exact resume: the progress file, the RNG states of every process, and
the fingerprint (params, inputs, code) that keeps stale progress out of a changed run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from gptcore.atomic import atomic_path, write_json
from gptcore.device import world_size
from gptcore.errors import WeightsError

logger = logging.getLogger(__name__)


class Progress:
    """Training progress in a folder: `state.pt` (model, optimizer, data position, RNG, history); under
    strategy fsdp the model and optimizer are in `shards-<step>/` instead, one file per process written
    by torch.distributed.checkpoint, and state.pt names that folder.

    Loaded with weights_only=True (no code is unpickled). A fingerprint of the params and inputs that
    produced it guards against mixing stale progress into a changed run. `finish()` drops the heavy
    state once the stage's outputs are written and leaves a small `done.json`.
    """

    def __init__(self, folder: str | os.PathLike, fingerprint: str, every_seconds: float = 600.0):
        self.folder = Path(folder)
        self.path = self.folder / "state.pt"
        self.fingerprint = fingerprint
        self.every_seconds = every_seconds
        self.last_saved = time.monotonic()

    def load(self) -> dict[str, Any] | None:
        if not self.path.is_file():
            return None
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as err:  # a corrupt progress file must not block a fresh start
            logger.info(f"note: ignoring unreadable progress file {self.path} ({type(err).__name__}); starting afresh")
            return None
        if state.get("fingerprint") != self.fingerprint:
            logger.info(f"note: {self.path} was made with other params, inputs or code; starting afresh")
            return None
        if "shards" in state and not (self.folder / state["shards"]).is_dir():
            logger.info(f"note: {self.path} names shards {state['shards']} that are missing; starting afresh")
            return None
        logger.info(f"resuming from {self.path} at step {state['step']}")
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Write state.pt atomically. Sharded progress names its DCP folder in `shards` (written before
        by every process); the folders of earlier saves go once state.pt no longer names them."""
        (self.folder / "done.json").unlink(missing_ok=True)
        with atomic_path(self.path) as tmp:
            torch.save({**state, "fingerprint": self.fingerprint}, tmp)
        self.last_saved = time.monotonic()
        for folder in self.shard_folders():
            if folder.name != state.get("shards"):
                shutil.rmtree(folder, ignore_errors=True)

    def shard_folders(self) -> list[Path]:
        """The DCP folders of sharded progress (`shards-<step>`, strategy fsdp)."""
        return sorted(p for p in self.folder.glob("shards-*") if p.is_dir())

    def due(self) -> bool:
        return time.monotonic() - self.last_saved >= self.every_seconds

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run complete: keep a summary, drop the (large) resumable state."""
        write_json(self.folder / "done.json", {"fingerprint": self.fingerprint, **summary})
        self.path.unlink(missing_ok=True)
        for folder in self.shard_folders():
            shutil.rmtree(folder, ignore_errors=True)


def rng_state() -> dict[str, Any]:
    state = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def all_rng_states(world: int) -> list[dict[str, Any]]:
    """Every process's RNG state, in rank order (a collective under torchrun: all processes call it)."""
    if world == 1:
        return [rng_state()]
    import torch.distributed as dist

    states: list[Any] = [None] * world
    dist.all_gather_object(states, rng_state())
    return states


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def own_rng_state(saved: Any, world: int, rank_: int, progress: Progress | None) -> dict[str, Any]:
    """This process's RNG state from the progress file (a list in rank order; one dict in older files)."""
    states = [saved] if isinstance(saved, dict) else list(saved)
    if len(states) != world:
        where = progress.path if progress is not None else "the progress file"
        raise WeightsError(
            f"{where}: progress of {len(states)} process(es) cannot resume in {world}; "
            f"launch {len(states)} or delete it to start afresh"
        )
    return states[rank_]


def check_same_start(step: int, progress: Progress | None) -> None:
    """Every process must start from the step the main one starts from, or their collectives pair up
    wrongly and the run hangs or crashes far from the cause (e.g. workers of an earlier launch, still
    alive, rewrote the progress file while this launch's processes read it)."""
    import torch.distributed as dist

    steps = [None] * world_size()
    dist.all_gather_object(steps, step)
    if len(set(steps)) > 1:
        where = progress.path if progress is not None else "the progress file"
        raise WeightsError(
            f"{where}: the processes resumed from different steps {steps}; is an earlier run "
            "still writing it? Stop it and launch again"
        )


def open_progress(
    folder: str | os.PathLike | None, params, *identity: Any, inputs: Iterable[str | os.PathLike] = ()
) -> Progress | None:
    """The progress folder of a training stage, or None without one.

    Progress belongs to one run: its params section (all but how often it saves), whatever else
    identifies it (run config, precision), the digests of its input files, and the library's code
    (progress made by other code is not resumed: the result would mix two versions).
    """
    if folder is None:
        return None
    from gptcore.download import sha256_of

    knobs = {k: v for k, v in params.to_dict().items() if k != "progress_minutes"}
    key = fingerprint(knobs, *identity, [sha256_of(path) for path in inputs], code_digest())
    return Progress(folder, key, every_seconds=60 * params.progress_minutes)


def code_digest() -> str:
    """SHA-256 over the source of every module of the gptcore package (file names and bytes, sorted)."""
    root = Path(__file__).resolve().parent.parent  # the gptcore package
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def fingerprint(*parts: Any) -> str:
    """A digest of the params and inputs of a run: progress made under another one is not resumed."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()
