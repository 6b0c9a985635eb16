"""Verified, resumable downloads, and the offline mirror (GPTCORE_MIRROR) that can stand in for them."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path

import requests
from tqdm.auto import tqdm

from gptcore.atomic import atomic_path
from gptcore.errors import DownloadError
from gptcore.retry import retry_delay

MIRROR_ENV = "GPTCORE_MIRROR"
CHUNK = 1 << 20
# The way out of a failed download, ending its one line: the mirror for offline use, and the check.
OFFLINE_HINT = (
    f"offline? set {MIRROR_ENV} to a folder laid out like ../shared/mirror (README: Quick start); "
    "`gptcore doctor` checks everything params.yaml needs"
)
MIRROR_HINT = "`gptcore doctor` lists every file params.yaml needs (README: Quick start)"
# ... and of a failed OpenAI checkpoint, which a run can do without.
NO_OPENAI_HINT = (
    "or finetune from no OpenAI weights: `foundation: scratch` or `foundation: pretrained` in params.yaml, "
    "as the quick start does (params-quickstart.yaml)"
)


def mirror_root() -> Path | None:
    """The mirror folder named by GPTCORE_MIRROR, or None when downloads go to the network."""
    root = os.environ.get(MIRROR_ENV)
    if not root:
        return None
    path = Path(root).expanduser()
    if not path.is_dir():
        raise DownloadError(f"{MIRROR_ENV}={root}: not a folder")
    return path


def cache_dir() -> Path:
    """Where files fetched for the library itself (the tokenizer) are kept: GPTCORE_CACHE or ~/.cache."""
    return Path(os.environ.get("GPTCORE_CACHE") or Path.home() / ".cache" / "gptcore")


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch(
    url: str,
    dest: str | os.PathLike,
    *,
    mirror_name: str | None = None,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    show_progress: bool = True,
    partial_dir: str | os.PathLike | None = None,
) -> Path:
    """Put the file at `url` at `dest`, from the mirror when GPTCORE_MIRROR is set, else the network.

    Args:
        mirror_name: the file's path inside the mirror (defaults to the URL's last component).
        sha256: the expected digest, checked before the file is put in place.
        partial_dir: where an unfinished download waits to be resumed (default: beside `dest`).
    """
    dest = Path(dest)
    root = mirror_root()
    if root is not None:
        source = root / (mirror_name or url.rsplit("/", 1)[-1])
        if not source.is_file():
            raise DownloadError(f"{source}: not in the mirror ({MIRROR_ENV}={root}); needed for {url}; {MIRROR_HINT}")
        with atomic_path(dest) as tmp:
            shutil.copyfile(source, tmp)
            _verify_digest(tmp, sha256, str(source), mirrored=True)
        return dest
    download(
        url,
        dest,
        sha256=sha256,
        retries=retries,
        backoff=backoff,
        timeout=timeout,
        show_progress=show_progress,
        partial_dir=partial_dir,
    )
    return dest


class _Transient(Exception):
    """A fault worth retrying: connection lost, timeout, 5xx, 408/429, short body."""

    def __init__(self, message: str, retry_after: str | None = None):
        super().__init__(message)
        self.retry_after = retry_after  # the server's Retry-After header, if it sent one


def download(
    url: str,
    dest: str | os.PathLike,
    *,
    sha256: str | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 60.0,
    show_progress: bool = True,
    session: requests.Session | None = None,
    partial_dir: str | os.PathLike | None = None,
) -> Path:
    """Stream `url` into `dest`: resumes a partial `.part` file with HTTP Range, retries transient
    faults with exponential backoff (longer where the server's Retry-After asks for it), checks the
    size against Content-Length and the digest if given, and renames into place only when complete.

    The `.part` file lives in `partial_dir` (default: beside `dest`), so that a later call resumes it;
    a sidecar `.part.json` remembers the URL and the server's validator (ETag or Last-Modified), sent
    as If-Range: a file that changed on the server since is fetched afresh, never spliced.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = Path(partial_dir or dest.parent) / (dest.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    session = session or requests.Session()
    for attempt in range(retries + 1):
        try:
            _stream(session, url, part, timeout, show_progress)
            break
        except _Transient as err:
            if attempt == retries:
                raise DownloadError(f"{url}: failed after {retries + 1} attempts: {err}; {OFFLINE_HINT}") from None
            time.sleep(retry_delay(attempt, backoff, err.retry_after))
    _verify_digest(part, sha256, url)
    os.replace(part, dest)
    _sidecar(part).unlink(missing_ok=True)
    return dest


def _sidecar(part: Path) -> Path:
    return part.with_name(part.name + ".json")


def _resume_state(part: Path, url: str) -> tuple[int, str | None]:
    """Bytes already in `part` and the validator to send with If-Range; (0, None) to start afresh."""
    if not part.exists():
        return 0, None
    try:
        state = json.loads(_sidecar(part).read_text())
    except (OSError, ValueError):
        state = {}
    if not isinstance(state, dict) or state.get("url") != url:
        part.unlink()  # a partial file of unknown or other origin: never splice it
        return 0, None
    return part.stat().st_size, state.get("validator")


_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


def _stream(session: requests.Session, url: str, part: Path, timeout: float, show_progress: bool) -> None:
    have, validator = _resume_state(part, url)
    # identity: a compressed body would not match Content-Length, nor resume at a byte offset.
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
        if validator:
            headers["If-Range"] = validator
    try:
        response = session.get(url, headers=headers, stream=True, timeout=timeout)
    except (requests.ConnectionError, requests.Timeout) as err:
        raise _Transient(f"{type(err).__name__}") from None
    with response:
        if response.status_code == 416 and have:
            if response.headers.get("Content-Range", "").strip() == f"bytes */{have}":
                return  # the partial file is already whole (a run stopped just before its rename)
            part.unlink()  # longer than the file: start over
            raise _Transient("range not satisfiable; restarting")
        if response.status_code >= 500 or response.status_code in (408, 429):
            raise _Transient(f"HTTP {response.status_code}", response.headers.get("Retry-After"))
        if response.status_code >= 400:
            raise DownloadError(f"{url}: HTTP {response.status_code} {response.reason}; {OFFLINE_HINT}")
        if response.status_code == 206:
            match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
            if not match or int(match.group(1)) != have:
                part.unlink()
                raise _Transient(f"bad Content-Range {response.headers.get('Content-Range')!r}; restarting")
        else:
            have = 0  # the server ignored our Range, or the file changed (If-Range): take it afresh
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        etag = response.headers.get("ETag")
        # If-Range takes only a strong validator: a weak ETag (W/...) falls back to Last-Modified.
        validator = (etag if etag and not etag.startswith("W/") else None) or response.headers.get("Last-Modified")
        _sidecar(part).write_text(json.dumps({"url": url, "validator": validator}))
        bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, desc=part.name[:-5], disable=not show_progress)
        try:
            with open(part, "ab" if have else "wb") as f:
                for chunk in response.iter_content(CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as err:
            raise _Transient(f"connection lost after {part.stat().st_size} bytes ({type(err).__name__})") from None
        finally:
            bar.close()
    size = part.stat().st_size
    if total is not None and size != total:
        if size > total:
            part.unlink()
            raise DownloadError(f"{url}: got {size} bytes, more than the {total} announced")
        raise _Transient(f"got {size} of {total} bytes")


def _verify_digest(path: Path, sha256: str | None, source: str, mirrored: bool = False) -> None:
    """Delete `path` (our download or copy) unless its SHA-256 is `sha256`; the error says what was kept."""
    if sha256 is None:
        return
    actual = sha256_of(path)
    if actual != sha256:
        path.unlink(missing_ok=True)
        what = "the mirror's file is left as it is, nothing was copied" if mirrored else "the download was deleted"
        raise DownloadError(f"{source}: SHA-256 {actual[:12]}… does not match the expected {sha256[:12]}…; {what}")
