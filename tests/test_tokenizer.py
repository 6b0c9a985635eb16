"""The offline tokenizer equals tiktoken's own `gpt2` encoding (fed from the mirror, never the network)."""

import functools
import hashlib
import os
import shutil
import subprocess
import sys
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
import tiktoken

import gptcore.tokenizer as tokenizer_module
from gptcore.errors import DataError, DownloadError
from gptcore.tokenizer import BASE_URL, EOT_ID, FILES, _build, encode, encode_text, find_tokenizer_files, get_tokenizer

REPO = Path(__file__).resolve().parents[1]

TEXTS = [
    "Hello, world! Every effort moves you.",
    "  leading spaces\tand\ttabs\n\n\nnewlines   trailing   ",
    "Ünïcödé: naïve café, 東京, emoji 🤖🚀, Ελληνικά, русский",
    "numbers 1234567 3.14159 and punctuation ?!?... ---",
    "I'm you're we'll they've she'd it's",
    "Some text<|endoftext|>Another text",
    "",
]


@pytest.fixture(scope="module")
def reference(mirror_dir, tmp_path_factory):
    """tiktoken.get_encoding('gpt2') with its download cache pre-filled from the mirror (no network)."""
    cache = tmp_path_factory.mktemp("tiktoken-cache")
    for name in ("vocab.bpe", "encoder.json"):
        key = hashlib.sha1(f"{BASE_URL}/{name}".encode()).hexdigest()
        shutil.copyfile(mirror_dir / "gpt2" / name, cache / key)
    mp = pytest.MonkeyPatch()
    mp.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    tiktoken.registry.ENCODINGS.pop("gpt2", None)
    enc = tiktoken.get_encoding("gpt2")
    mp.undo()
    return enc


@pytest.mark.parametrize("text", TEXTS)
def test_matches_tiktoken_gpt2(text, reference, tokenizer):
    ours = encode(tokenizer, text)
    assert ours == reference.encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer.decode(ours) == text


def test_endoftext_is_50256(tokenizer):
    assert tokenizer.n_vocab == 50257
    assert encode(tokenizer, "<|endoftext|>") == [EOT_ID]
    assert tokenizer.eot_token == EOT_ID


def test_reads_a_model_folder(tmp_path, mirror_dir, monkeypatch):
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(mirror_dir / "gpt2" / name, tmp_path / name)
    monkeypatch.delenv("GPTCORE_MIRROR")
    assert get_tokenizer(tmp_path).encode("hello world") == [31373, 995]


def test_rejects_a_wrong_vocabulary(tmp_path, mirror_dir, monkeypatch):
    shutil.copyfile(mirror_dir / "gpt2" / "encoder.json", tmp_path / "encoder.json")
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b\n")
    monkeypatch.delenv("GPTCORE_MIRROR")
    with pytest.raises(DataError, match="vocab.bpe"):
        get_tokenizer(tmp_path)


def test_uses_the_cache_without_mirror(tmp_path, mirror_dir, monkeypatch):
    cache = tmp_path / "cache"
    (cache / "gpt2").mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copyfile(mirror_dir / "gpt2" / name, cache / "gpt2" / name)
    monkeypatch.delenv("GPTCORE_MIRROR")
    monkeypatch.setenv("GPTCORE_CACHE", str(cache))
    assert encode(get_tokenizer(), "Hi<|endoftext|>") == [17250, EOT_ID]


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    """A cache folder of this test's own, and no tokenizer built before (get_tokenizer memoises builds)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("GPTCORE_CACHE", str(cache))
    _build.cache_clear()
    yield cache / "gpt2"
    _build.cache_clear()


@pytest.fixture
def offline(monkeypatch):
    """No mirror and no network: every HTTP request raises (and is counted), retries do not wait."""
    attempts = []

    def refuse(self, url, *args, **kwargs):
        attempts.append(url)
        raise requests.ConnectionError(f"network blocked by the test: {url}")

    def go_offline():
        monkeypatch.delenv("GPTCORE_MIRROR", raising=False)
        monkeypatch.setattr(requests.Session, "get", refuse)
        monkeypatch.setattr("gptcore.download.retry_delay", lambda *args: 0.0)
        _build.cache_clear()
        return attempts

    return go_offline


def _cached_digests(folder):
    return {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in FILES}


def test_first_use_fills_the_cache_from_the_mirror_then_works_offline(empty_cache, offline):
    assert not empty_cache.exists()
    assert get_tokenizer().encode("hello world") == [31373, 995]
    assert _cached_digests(empty_cache) == FILES
    attempts = offline()
    assert find_tokenizer_files() == empty_cache
    assert encode(get_tokenizer(), "hello world<|endoftext|>") == [31373, 995, EOT_ID]
    assert attempts == []
    assert sorted(p.name for p in empty_cache.iterdir()) == sorted(FILES)  # no partial files left behind


def test_first_use_fills_the_cache_from_the_network_then_works_offline(empty_cache, offline, mirror_dir, monkeypatch):
    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(mirror_dir / "gpt2")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.delenv("GPTCORE_MIRROR")
        monkeypatch.setattr("gptcore.tokenizer.BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
        assert get_tokenizer().encode("hello world") == [31373, 995]
    finally:
        server.shutdown()
        server.server_close()
    assert _cached_digests(empty_cache) == FILES
    attempts = offline()
    assert get_tokenizer().encode("hello world") == [31373, 995] and attempts == []


def test_without_cache_mirror_or_network_the_error_names_both(empty_cache, offline):
    attempts = offline()
    with pytest.raises(DownloadError) as err:
        get_tokenizer()
    message = str(err.value)
    assert "GPTCORE_MIRROR" in message and str(empty_cache) in message and "\n" not in message
    assert f"{BASE_URL}/encoder.json" in message and len(attempts) == 3  # the first try and two retries
    assert not (empty_cache / "encoder.json").exists()


def test_a_damaged_cache_file_is_fetched_again(empty_cache, mirror_dir):
    empty_cache.mkdir(parents=True)
    shutil.copyfile(mirror_dir / "gpt2" / "vocab.bpe", empty_cache / "vocab.bpe")
    (empty_cache / "encoder.json").write_text("{}")  # e.g. a disk that filled up
    assert get_tokenizer().encode("hello world") == [31373, 995]
    assert _cached_digests(empty_cache) == FILES


def test_an_explicit_folder_must_hold_the_files(tmp_path):
    with pytest.raises(DataError, match="encoder.json and vocab.bpe not found"):
        get_tokenizer(tmp_path)


def test_a_fresh_process_starts_offline_from_the_cache(empty_cache, tmp_path, tiny_config):
    """`gptcore generate` in a new process, with no mirror and every proxied request refused, once the
    cache is filled: no entry point fetches the tokenizer again."""
    from gptcore.model import GPTModel
    from gptcore.weights import save_model

    get_tokenizer()  # fills the cache from the mirror
    save_model(GPTModel(tiny_config), tmp_path / "tiny.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "GPTCORE_MIRROR" and k.lower() != "no_proxy"}
    env.update(HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gptcore",
            "generate",
            "--model",
            str(tmp_path / "tiny.safetensors"),
            "--prompt",
            "Hello",
            "--max-new-tokens",
            "2",
            "--device",
            "cpu",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("Hello")


@pytest.mark.parametrize("text", TEXTS)
def test_user_text_is_ordinary_text(text, reference, tokenizer):
    assert encode_text(tokenizer, text) == reference.encode_ordinary(text)
    assert EOT_ID not in encode_text(tokenizer, "Some text<|endoftext|>Another text")


def test_chunked_encoding_equals_tiktoken(reference, tokenizer, monkeypatch):
    """Cut into many small chunks, mixed text still encodes exactly as tiktoken encodes it whole."""
    import random

    rng = random.Random(0)
    alphabet = ["a", "Z", "é", "東", "7", "!", "'s", " ", "  ", "\n", "\n\n", "\t", " \n ", "\x1c", "🙂", "--"]
    text = "".join(rng.choice(alphabet) for _ in range(20_000))
    monkeypatch.setattr(tokenizer_module, "CHUNK_CHARS", 37)
    assert encode_text(tokenizer, text) == reference.encode_ordinary(text)


def test_very_long_inputs_never_fail(tokenizer):
    """tiktoken panics (a Rust stack overflow) on a ~1M whitespace run; a 1 MB word is fine either way."""
    word = "x" * (1 << 20)
    assert tokenizer.decode(encode_text(tokenizer, word)) == word
    spaces = "a" + " " * 1_000_000 + "b"
    assert tokenizer.decode(encode_text(tokenizer, spaces)) == spaces
    mixed = ("word " * 200_000) + "\n" * 300_000
    assert tokenizer.decode(encode_text(tokenizer, mixed)) == mixed


def test_datasets_read_special_token_text_as_text(tokenizer):
    """Instruction and SMS data take `<|endoftext|>` in their text literally, as the server and CLI do."""
    from gptcore.data.instructions import encode_example
    from gptcore.data.sms import encode_texts

    entry = {"instruction": "Repeat <|endoftext|>", "input": "", "output": "<|endoftext|>"}
    ids, _ = encode_example(entry, tokenizer)
    assert EOT_ID not in ids
    assert EOT_ID not in encode_texts(tokenizer, ["win <|endoftext|> now"])[0]


def test_the_verdict_encodes_as_before(mirror_dir, tokenizer):
    """Stage 1's corpus holds no special-token text: encode_text gives the ids `encode` gave."""
    text = (mirror_dir / "the-verdict.txt").read_text(encoding="utf-8")
    assert encode_text(tokenizer, text) == encode(tokenizer, text)
