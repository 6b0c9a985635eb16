"""OpenAI's GPT-2 TensorFlow checkpoints as published files: fetch one size into a folder, all or nothing.

The `download_gpt2` stage (`fetch_openai_foundation`) fetches the checkpoint that params `foundation`
names into models/<foundation>/, the folder the `foundation` stage converts. Kept apart from the
converter (gptcore/convert/openai.py, which imports torch and TensorFlow) so that the download stage's
import closure, and with it its DVC dependencies, is only the downloader.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from gptcore.atomic import atomic_dir
from gptcore.config import OPENAI_SIZES
from gptcore.download import NO_OPENAI_HINT, fetch, mirror_root
from gptcore.errors import ConfigError, DownloadError

logger = logging.getLogger(__name__)

# The files OpenAI publishes per model size, small ones first (a bad address fails fast).
CHECKPOINT_FILES = (
    "checkpoint",
    "hparams.json",
    "encoder.json",
    "vocab.bpe",
    "model.ckpt.index",
    "model.ckpt.meta",
    "model.ckpt.data-00000-of-00001",
)
# The foundations that Stage 1 writes (models/<name>/model.safetensors); the others are OPENAI_SIZES' names.
STAGE1_FOUNDATIONS = ("pretrained", "scratch")


def check_foundation(foundation: str) -> None:
    """Raise ConfigError (one line, the valid names listed) unless `foundation` is an OpenAI or a Stage 1 name."""
    if foundation not in OPENAI_SIZES and foundation not in STAGE1_FOUNDATIONS:
        raise ConfigError(f"foundation: {foundation!r} is not one of {', '.join([*OPENAI_SIZES, *STAGE1_FOUNDATIONS])}")


def download_checkpoint(
    base_url: str,
    size: str,
    out: str | os.PathLike,
    *,
    partial_dir: str | os.PathLike | None = None,
    show_progress: bool = True,
) -> Path:
    """Fetch OpenAI's seven files of one GPT-2 size (`124M`…`1558M`) into the folder `out`, all or nothing.

    Files are fetched into `partial_dir` (default: a hidden folder beside `out`) and moved into `out`
    together once all are complete, so that an interrupted run resumes where it stopped. With
    GPTCORE_MIRROR set they come from `gpt2/models/<size>/<file>` in the mirror.
    """
    if size not in OPENAI_SIZES.values():
        raise ConfigError(f"unknown OpenAI GPT-2 size {size!r}; choose one of {', '.join(OPENAI_SIZES.values())}")
    out = Path(out)
    staging = Path(partial_dir) if partial_dir else out.with_name(f".{out.name}.download")
    source = f"{base_url.rstrip('/')}/{size}"
    origin = f"{source} mirror={mirror_root()}"
    if (
        (out / ".source").is_file()
        and (out / ".source").read_text() == origin
        and all((out / name).is_file() for name in CHECKPOINT_FILES)
    ):
        return out  # fetched whole before, from the same place (the folder is only ever written whole)
    _reset_staging(staging, origin)
    for name in CHECKPOINT_FILES:
        if not (staging / name).is_file():  # fetched whole by an earlier, interrupted run
            try:
                fetch(
                    f"{source}/{name}",
                    staging / name,
                    mirror_name=f"gpt2/models/{size}/{name}",
                    show_progress=show_progress,
                )
            except DownloadError as err:
                raise DownloadError(f"{err}; {NO_OPENAI_HINT}") from None
    with atomic_dir(out) as tmp:
        for name in CHECKPOINT_FILES:
            os.replace(staging / name, tmp / name)
        (tmp / ".source").write_text(origin)
    (staging / ".source").unlink(missing_ok=True)
    return out


def fetch_openai_foundation(
    foundation: str,
    models_dir: str | os.PathLike,
    *,
    base_url: str,
    partial_dir: str | os.PathLike,
    show_progress: bool = True,
) -> Path | None:
    """The `download_gpt2` stage: fetch the checkpoint of the OpenAI GPT-2 that `foundation` names into
    `models_dir/<foundation>/` (unfinished files wait in `partial_dir/<size>/`), and make sure that the
    folder of every OpenAI foundation exists: they are the stage's DVC outputs, so the others are kept as
    they are (a size fetched before stays) or made empty. Nothing is fetched for `pretrained`/`scratch`.

    Returns:
        the fetched folder, or None for a Stage 1 foundation.
    Raises:
        ConfigError: an unknown foundation name (the valid ones listed).
        DownloadError: a file that could not be fetched.
    """
    check_foundation(foundation)
    models_dir = Path(models_dir)
    for name in OPENAI_SIZES:
        (models_dir / name).mkdir(parents=True, exist_ok=True)
    if foundation in STAGE1_FOUNDATIONS:
        logger.info("foundation: %s comes from Stage 1; no OpenAI checkpoint to fetch", foundation)
        return None
    size = OPENAI_SIZES[foundation]
    return download_checkpoint(
        base_url, size, models_dir / foundation, partial_dir=Path(partial_dir) / size, show_progress=show_progress
    )


def _reset_staging(staging: Path, source: str) -> None:
    """Keep the files that `staging` holds only if they were fetched from the same source."""
    marker = staging / ".source"
    if marker.is_file() and marker.read_text() == source:
        return
    for name in CHECKPOINT_FILES:  # only our own files: never empty a folder wholesale
        for path in (staging / name, staging / f"{name}.part", staging / f"{name}.part.json"):
            path.unlink(missing_ok=True)
    staging.mkdir(parents=True, exist_ok=True)
    marker.write_text(source)
