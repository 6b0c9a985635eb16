"""The GPT-2 BPE tokenizer as a tiktoken encoding, built offline from encoder.json and vocab.bpe."""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks

from gptcore.download import MIRROR_ENV, cache_dir, fetch, sha256_of
from gptcore.errors import DataError, DownloadError

BASE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main"
# The digests tiktoken itself checks for its `gpt2` encoding.
FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
ENDOFTEXT = "<|endoftext|>"
EOT_ID = 50256
# GPT-2's pre-tokenisation pattern (tiktoken's r50k pattern).
PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def find_tokenizer_files(folder: str | os.PathLike | None = None) -> Path:
    """A folder holding GPT-2's encoder.json and vocab.bpe: `folder` if given, else the cache.

    The cache (`cache_dir()/gpt2`) is filled on first use, from the mirror when GPTCORE_MIRROR is set,
    else from OpenAI's server, and every later call finds the files there, with neither. Cached files
    are checked against their digests; a damaged one is fetched again.
    """
    if folder is not None:
        folder = Path(folder)
        if not _holds_files(folder):
            raise DataError(f"{folder}: encoder.json and vocab.bpe not found")
        return folder
    target = cache_dir() / "gpt2"
    if _holds_files(target, verify=True):
        return target
    _fill_cache(target)
    return target


# A first use without a network should fail in seconds, not after download()'s default of five retries.
FETCH_RETRIES = 2


def _fill_cache(target: Path) -> None:
    """Fetch the tokenizer files into `target` (mirror or network); one error line if that fails."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        # A private partial folder: processes that start together (torchrun ranks) never share a .part file.
        with tempfile.TemporaryDirectory(prefix=".fetch.", dir=target) as partial:
            for name, digest in FILES.items():
                fetch(
                    f"{BASE_URL}/{name}",
                    target / name,
                    mirror_name=f"gpt2/{name}",
                    sha256=digest,
                    retries=FETCH_RETRIES,
                    partial_dir=partial,
                )
    except DownloadError as err:
        raise DownloadError(
            f"GPT-2's tokenizer files are not in the cache {target} and could not be fetched ({err}); "
            f"set {MIRROR_ENV} to a mirror folder, or put encoder.json and vocab.bpe in {target} "
            "(they are fetched once, then used offline)"
        ) from None


def _holds_files(folder: Path, verify: bool = False) -> bool:
    if not all((folder / name).is_file() for name in FILES):
        return False
    return not verify or all(sha256_of(folder / name) == digest for name, digest in FILES.items())


@functools.lru_cache(maxsize=4)
def _build(folder: str) -> tiktoken.Encoding:
    paths = {name: Path(folder) / name for name in FILES}
    for name, digest in FILES.items():
        if sha256_of(paths[name]) != digest:
            raise DataError(f"{paths[name]}: not GPT-2's {name} (SHA-256 mismatch)")
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(paths["vocab.bpe"]), encoder_json_file=str(paths["encoder.json"])
    )
    return tiktoken.Encoding(
        name="gpt2",
        explicit_n_vocab=50257,
        pat_str=PATTERN,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT_ID},
    )


def get_tokenizer(folder: str | os.PathLike | None = None) -> tiktoken.Encoding:
    """GPT-2's tokenizer, identical to tiktoken.get_encoding("gpt2"); `<|endoftext|>` is 50256."""
    return _build(str(find_tokenizer_files(folder).resolve()))


def encode(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of text where `<|endoftext|>` is the special token (the book's corpus convention).

    Only for text we write ourselves; user text goes through `encode_text`.
    """
    return tokenizer.encode(text, allowed_special={ENDOFTEXT})


# A chunk handed to tiktoken at once, and the longest whitespace run it gets in one piece. tiktoken's
# regex engine gives up (a Rust panic, not an exception) on a whitespace run of ~1M characters (fancy-regex's
# backtracking limit; measured with tiktoken 0.14), and BPE cost grows with the piece: both stay bounded.
CHUNK_CHARS = 1 << 16
MAX_SPACE_RUN = 100_000
# Characters that are whitespace for the pre-tokeniser's `\s` for certain (str.isspace() also counts
# \x1c-\x1f, which `\s` does not).
ASCII_SPACE = frozenset(" \t\n\r\x0b\x0c")


def encode_text(tokenizer: tiktoken.Encoding, text: str) -> list[int]:
    """Token ids of user text, as ordinary text: `<|endoftext|>` spelled in it is just characters.

    The one entry point for text a user or a data file supplies (CLI, Python API, server, datasets).
    Any length: the text is cut only where GPT-2's pre-tokeniser cuts anyway (before a whitespace
    character that follows a non-whitespace one: no pattern of it spans that point), so the ids equal
    `tokenizer.encode_ordinary(text)`; the exception is a whitespace run longer than MAX_SPACE_RUN, which
    is encoded in pieces (where tiktoken itself may fail).
    """
    ids: list[int] = []
    for chunk in _chunks(text):
        ids.extend(tokenizer.encode_ordinary(chunk))
    return ids


def _chunks(text: str):
    """Consecutive pieces of text, each ending at a safe boundary (see encode_text): about CHUNK_CHARS
    long, longer where no boundary comes sooner."""
    start, n = 0, len(text)
    while n - start > CHUNK_CHARS:
        cut = _safe_cut_before(text, start, start + CHUNK_CHARS) or _safe_cut_after(text, start + CHUNK_CHARS)
        yield text[start:cut]
        start = cut
    if start < n:
        yield text[start:]


def _is_safe(text: str, i: int) -> bool:
    return text[i] in ASCII_SPACE and not text[i - 1].isspace()


def _safe_cut_before(text: str, start: int, end: int) -> int | None:
    """The last safe boundary in (start, end], or None."""
    for i in range(end, start, -1):
        if _is_safe(text, i):
            return i
    return None


def _safe_cut_after(text: str, end: int) -> int:
    """The first safe boundary after `end`; within a whitespace run longer than MAX_SPACE_RUN, a forced
    cut (tiktoken could not encode that run whole); the end of the text if neither comes."""
    run = 0
    for i in range(end + 1, len(text)):
        if _is_safe(text, i):
            return i
        run = run + 1 if text[i].isspace() else 0
        if run >= MAX_SPACE_RUN:
            return i
    return len(text)
