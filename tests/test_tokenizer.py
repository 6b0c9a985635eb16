"""The offline tokenizer equals tiktoken's own `gpt2` encoding (fed from the mirror, never the network)."""

import hashlib
import shutil

import pytest
import tiktoken

from gptcore.errors import DataError
import gptcore.tokenizer as tokenizer_module
from gptcore.tokenizer import BASE_URL, EOT_ID, encode, encode_text, get_tokenizer

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
