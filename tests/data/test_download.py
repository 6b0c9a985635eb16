"""gptcore.download and the OpenAI checkpoint download, against a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import gzip
import hashlib
import os
import re
import socket
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml

from gptcore.convert.openai_download import CHECKPOINT_FILES, download_checkpoint
from gptcore.download import download, fetch
from gptcore.errors import ConfigError, DownloadError
from tests.conftest import REPO

BODY = bytes(range(251)) * 12000  # 3 MB (reads go by 1 MB chunks), offsets distinguishable


class Handler(BaseHTTPRequestHandler):
    """Serves `server.files` with Range/If-Range/ETag, misbehaving as `server.faults` scripts, one per request."""

    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest output clean
        pass

    def do_GET(self):
        server = self.server
        server.requests.append((self.path, dict(self.headers)))
        fault = server.faults.pop(0) if server.faults else None
        if fault == "short":  # repeats: put back now, before the client sees this reply end and the
            server.faults.insert(0, "short")  # test sets a new list (which a later insert would land in)
        if isinstance(fault, tuple):  # (status, Retry-After)
            self.send_response(fault[0])
            self.send_header("Retry-After", fault[1])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if fault in (503, 404):
            self.send_response(fault)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in server.files:
            self.send_error(404)
            return
        body = server.files[self.path]
        etag = '"' + hashlib.sha256(body).hexdigest()[:16] + '"'
        start = 0
        match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
        if_range = self.headers.get("If-Range")
        if match and fault != "ignore_range" and (if_range is None or if_range == etag):
            start = int(match.group(1))
            if start >= len(body):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        if fault == "gzip_if_asked" and "gzip" in self.headers.get("Accept-Encoding", ""):
            payload = gzip.compress(body)
            self.send_response(200)
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        offset = start + 7 if fault == "wrong_range" else start
        payload = body[offset:]
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {offset}-{len(body) - 1}/{len(body)}")
        self.send_header("ETag", etag)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if fault in ("drop", "short"):
            # Half the body, then the connection goes away: a reset mid-download ("short" always does it).
            self.wfile.write(payload[: len(payload) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.files, httpd.requests, httpd.faults = {}, [], []
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield httpd
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def network(monkeypatch):
    """Downloads go to the (local) network, not the mirror."""
    monkeypatch.delenv("GPTCORE_MIRROR", raising=False)


def get(server, dest, **kwargs):
    return download(f"{server.url}/f.bin", dest, backoff=0, show_progress=False, **kwargs)


def test_plain_download(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]  # no .part / sidecar left
    assert server.requests[0][1]["Accept-Encoding"] == "identity"


def test_dropped_connection_resumes_with_range(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = ["drop"]
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY
    first, second = (headers for _, headers in server.requests)
    assert "Range" not in first
    have = int(re.fullmatch(r"bytes=(\d+)-", second["Range"]).group(1))
    assert 0 < have < len(BODY)
    assert second["If-Range"].startswith('"')  # the ETag of the first response


def test_503_is_retried(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = [503, 503]
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert len(server.requests) == 3


def test_retry_after_is_honoured(server, network, tmp_path, monkeypatch):
    import email.utils
    import time

    from gptcore import download as download_module

    sleeps: list[float] = []
    monkeypatch.setattr(download_module.time, "sleep", sleeps.append)
    server.files["/f.bin"] = BODY
    in_30s = email.utils.formatdate(time.time() + 30, usegmt=True)
    server.faults = [(429, "4"), (503, in_30s), (503, "0"), (503, "not a date")]
    download(f"{server.url}/f.bin", tmp_path / "f.bin", retries=5, backoff=0.25, show_progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY
    # Seconds or an HTTP date when longer than the backoff (0.25, 0.5, 1, 2), else the backoff.
    assert sleeps[0] == 4.0 and 28 <= sleeps[1] <= 30 and sleeps[2:] == [1.0, 2.0]


def test_persistent_503_gives_up(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = [503] * 10
    with pytest.raises(DownloadError, match=r"failed after 3 attempts: HTTP 503") as info:
        get(server, tmp_path / "f.bin", retries=2)
    assert not (tmp_path / "f.bin").exists()
    # the one line names the way out: the mirror, and the check of what params.yaml needs
    assert (
        "\n" not in str(info.value) and "set GPTCORE_MIRROR" in str(info.value) and "gptcore doctor" in str(info.value)
    )


def test_wrong_size_is_an_error(server, network, tmp_path):
    # The server announces the full Content-Length but never delivers it.
    server.files["/f.bin"] = BODY
    server.faults = ["short"]
    with pytest.raises(DownloadError, match=r"f\.bin: failed after 3 attempts: .*(connection lost|bytes)"):
        get(server, tmp_path / "f.bin", retries=2)
    assert not (tmp_path / "f.bin").exists()


def test_wrong_digest_is_an_error(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    with pytest.raises(DownloadError, match="SHA-256 .* does not match .*; the download was deleted"):
        get(server, tmp_path / "f.bin", sha256="0" * 64)
    assert not (tmp_path / "f.bin").exists()


def test_wrong_digest_in_the_mirror_keeps_the_mirror_file(tmp_path, monkeypatch):
    (tmp_path / "mirror").mkdir()
    (tmp_path / "mirror" / "f.bin").write_bytes(BODY)
    monkeypatch.setenv("GPTCORE_MIRROR", str(tmp_path / "mirror"))
    with pytest.raises(
        DownloadError, match="mirror/f.bin: SHA-256 .*; the mirror's file is left as it is, nothing was copied"
    ):
        fetch("https://example.invalid/f.bin", tmp_path / "f.bin", sha256="0" * 64)
    assert (tmp_path / "mirror" / "f.bin").read_bytes() == BODY and not (tmp_path / "f.bin").exists()


def test_404_is_not_retried(server, network, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        get(server, tmp_path / "f.bin")
    assert len(server.requests) == 1


def test_partial_file_from_an_earlier_run_is_resumed(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = ["short"]
    with pytest.raises(DownloadError):
        get(server, tmp_path / "out" / "f.bin", retries=0, partial_dir=tmp_path / "partial")
    part = tmp_path / "partial" / "f.bin.part"
    have = part.stat().st_size
    assert 0 < have < len(BODY)
    server.faults, server.requests = [], []
    get(server, tmp_path / "out" / "f.bin", partial_dir=tmp_path / "partial")
    assert (tmp_path / "out" / "f.bin").read_bytes() == BODY
    assert server.requests[0][1]["Range"] == f"bytes={have}-"
    assert list((tmp_path / "partial").iterdir()) == []


def test_changed_file_is_fetched_afresh_not_spliced(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = ["short"]
    with pytest.raises(DownloadError):
        get(server, tmp_path / "f.bin", retries=0)
    new = BODY[::-1]
    server.files["/f.bin"], server.faults = new, []
    get(server, tmp_path / "f.bin")  # If-Range no longer matches: the server sends it whole
    assert (tmp_path / "f.bin").read_bytes() == new


def test_partial_file_of_another_url_is_discarded(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    (tmp_path / "f.bin.part").write_bytes(b"x" * 1000)  # no sidecar: unknown origin
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert "Range" not in server.requests[0][1]


@pytest.mark.parametrize("fault", ["ignore_range", "wrong_range"])
def test_server_that_mishandles_range(server, network, tmp_path, fault):
    server.files["/f.bin"] = BODY
    server.faults = ["drop", fault]
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_whole_partial_file_is_kept(server, network, tmp_path):
    # A run that stopped between the last byte and the rename: the server answers 416 */size.
    server.files["/f.bin"] = BODY
    server.faults = ["short"]
    with pytest.raises(DownloadError):
        get(server, tmp_path / "f.bin", retries=0)
    (tmp_path / "f.bin.part").write_bytes(BODY)
    server.faults, server.requests = [], []
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY
    assert len(server.requests) == 1


def test_no_compressed_body(server, network, tmp_path):
    server.files["/f.bin"] = BODY
    server.faults = ["gzip_if_asked"]
    get(server, tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_fetch_serves_the_mirror_path_without_network(server, tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    (mirror / "gpt2" / "models" / "124M").mkdir(parents=True)
    (mirror / "gpt2" / "models" / "124M" / "hparams.json").write_bytes(b"{}")
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))
    fetch(f"{server.url}/124M/hparams.json", tmp_path / "h.json", mirror_name="gpt2/models/124M/hparams.json")
    assert (tmp_path / "h.json").read_bytes() == b"{}"
    with pytest.raises(DownloadError, match=r"gpt2/models/124M/vocab\.bpe: not in the mirror"):
        fetch(f"{server.url}/124M/vocab.bpe", tmp_path / "v.bpe", mirror_name="gpt2/models/124M/vocab.bpe")
    assert server.requests == []


def openai_files(size: str) -> dict[str, bytes]:
    return {name: f"{size}/{name}".encode() * 1000 for name in CHECKPOINT_FILES}


def test_download_checkpoint_over_http(server, network, tmp_path, monkeypatch):
    sleeps = []
    monkeypatch.setattr("gptcore.download.time.sleep", sleeps.append)
    for name, body in openai_files("124M").items():
        server.files[f"/gpt-2/models/124M/{name}"] = body
    server.faults = ["drop", 503]
    out = download_checkpoint(
        f"{server.url}/gpt-2/models",
        "124M",
        tmp_path / "openai" / "124M",
        partial_dir=tmp_path / "partial",
        show_progress=False,
    )
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".source"} == openai_files("124M")
    assert (out / ".source").read_text().startswith(f"{server.url}/gpt-2/models/124M")
    assert [p.name for p in (tmp_path / "partial").iterdir()] == []
    assert sleeps == [1.0, 2.0]  # exponential backoff between the attempts


def test_download_checkpoint_resumes_an_interrupted_run(server, network, tmp_path):
    for name, body in openai_files("355M").items():
        server.files[f"/m/355M/{name}"] = body
    del server.files["/m/355M/model.ckpt.meta"]
    args = (f"{server.url}/m", "355M", tmp_path / "out")
    with pytest.raises(DownloadError, match=r"355M/model\.ckpt\.meta: HTTP 404"):
        download_checkpoint(*args, partial_dir=tmp_path / "partial", show_progress=False)
    assert not (tmp_path / "out").exists()
    server.files["/m/355M/model.ckpt.meta"] = openai_files("355M")["model.ckpt.meta"]
    server.requests = []
    download_checkpoint(*args, partial_dir=tmp_path / "partial", show_progress=False)
    assert [path for path, _ in server.requests] == [
        "/m/355M/model.ckpt.meta",
        "/m/355M/model.ckpt.data-00000-of-00001",
    ]
    # Another address: nothing fetched from the first one is reused.
    server.files.update({f"/n/355M/{k}": v for k, v in openai_files("355M").items()})
    server.files["/n/355M/model.ckpt.meta"] = b"new"
    (tmp_path / "partial" / ".source").write_text(f"{server.url}/m/355M mirror=None")
    (tmp_path / "partial" / "model.ckpt.meta").write_bytes(b"stale")
    download_checkpoint(
        f"{server.url}/n", "355M", tmp_path / "out", partial_dir=tmp_path / "partial", show_progress=False
    )
    assert (tmp_path / "out" / "model.ckpt.meta").read_bytes() == b"new"


def test_download_checkpoint_from_the_mirror(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    folder = mirror / "gpt2" / "models" / "774M"
    folder.mkdir(parents=True)
    for name, body in openai_files("774M").items():
        (folder / name).write_bytes(body)
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))
    out = download_checkpoint("https://example.invalid/gpt-2/models", "774M", tmp_path / "out", show_progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != ".source"} == openai_files("774M")
    (folder / "vocab.bpe").unlink()
    # A folder fetched whole from the same place is kept (the foundation stage re-runs without a download)
    assert download_checkpoint("https://example.invalid/gpt-2/models", "774M", out, show_progress=False) == out
    with pytest.raises(DownloadError, match=r"gpt2/models/774M/vocab\.bpe: not in the mirror") as info:
        download_checkpoint("https://example.invalid/gpt-2/models", "774M", tmp_path / "out2", show_progress=False)
    assert "gptcore doctor" in str(info.value) and "`foundation: scratch`" in str(info.value)  # the ways out
    assert not (tmp_path / "out2").exists()


def test_download_checkpoint_rejects_unknown_size(tmp_path):
    with pytest.raises(ConfigError, match="unknown OpenAI GPT-2 size '700M'"):
        download_checkpoint("https://example.invalid", "700M", tmp_path / "out")


def test_the_first_stage_without_network_or_mirror_names_the_way_out(server, tmp_path):
    """`dvc repro`'s first stage, offline with no mirror: one line that names GPTCORE_MIRROR and the doctor.
    (The server answers 404, as a captive portal might: the same line as after the retries of a
    refused connection, without their wait.)"""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["download_corpus"]["url"] = f"{server.url}/the-verdict.txt"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in ("GPTCORE_MIRROR", "GPTCORE_DEBUG")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, str(REPO / "stages" / "download_corpus.py"), "--out", "data/raw/the-verdict.txt"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    (line,) = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 1 and "HTTP 404" in line
    assert "set GPTCORE_MIRROR to a folder laid out like ../shared/mirror" in line and "gptcore doctor" in line
    assert not (tmp_path / "data" / "raw" / "the-verdict.txt").exists()
