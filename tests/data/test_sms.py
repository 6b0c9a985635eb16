"""SMS data: safe extraction and validation of the zip, the book's balanced split, the dataset."""

from __future__ import annotations

import csv
import subprocess
import sys
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from gptcore.data.sms import (
    MIRROR_NAME,
    SmsDataset,
    encode_texts,
    extract_collection,
    fetch_collection,
    read_collection,
    read_split,
    split_collection,
    to_csv_text,
)
from gptcore.errors import DataError

REPO = Path(__file__).resolve().parents[2]
URL = "https://archive.ics.uci.edu/static/public/228/sms+spam+collection.zip"


@pytest.fixture(scope="module")
def collection_bytes(mirror_dir) -> bytes:
    with zipfile.ZipFile(mirror_dir / MIRROR_NAME) as archive:
        return archive.read("SMSSpamCollection")


@pytest.fixture(scope="module")
def collection_file(collection_bytes, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("sms") / "SMSSpamCollection"
    path.write_bytes(collection_bytes)
    return path


def book_splits(path: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """The book's chapter 6 procedure, written out independently (with quoting disabled, per DESIGN.md)."""
    df = pd.read_csv(path, sep="\t", header=None, names=["Label", "Text"], quoting=csv.QUOTE_NONE)
    num_spam = df[df["Label"] == "spam"].shape[0]
    ham_subset = df[df["Label"] == "ham"].sample(num_spam, random_state=123)
    balanced_df = pd.concat([ham_subset, df[df["Label"] == "spam"]])
    balanced_df["Label"] = balanced_df["Label"].map({"ham": 0, "spam": 1})
    df = balanced_df.sample(frac=1, random_state=123).reset_index(drop=True)
    train_end = int(len(df) * 0.7)
    validation_end = train_end + int(len(df) * 0.1)
    return df[:train_end], df[train_end:validation_end], df[validation_end:]


# --- the split -----------------------------------------------------------------------------------------


def test_collection_counts(collection_file):
    frame = read_collection(collection_file)
    assert len(frame) == 5574
    assert frame["Label"].value_counts().to_dict() == {"ham": 4827, "spam": 747}


def test_splits_are_the_reference_procedures(collection_file, tmp_path):
    splits = split_collection(read_collection(collection_file))
    assert [len(splits[n]) for n in ("train", "validation", "test")] == [1045, 149, 300]
    assert [int(splits[n]["Label"].sum()) for n in ("train", "validation", "test")] == [517, 79, 151]
    # The same rows in the same order as the book's procedure, and the same after a CSV round trip.
    for ours, reference, name in zip(
        (splits[n] for n in ("train", "validation", "test")),
        book_splits(collection_file),
        ("train", "validation", "test"),
    ):
        expected = reference.reset_index(drop=True)[["Label", "Text"]]
        pd.testing.assert_frame_equal(ours[["Label", "Text"]], expected, check_dtype=False)
        path = tmp_path / f"{name}.csv"
        path.write_text(to_csv_text(ours), encoding="utf-8")
        pd.testing.assert_frame_equal(read_split(path), expected, check_dtype=False)
        assert path.read_text(encoding="utf-8").startswith("Label,Text\n")


def test_split_balances_classes(collection_file):
    splits = split_collection(read_collection(collection_file))
    both = pd.concat(splits.values())
    assert both["Label"].value_counts().to_dict() == {0: 747, 1: 747}


def test_read_split_keeps_texts_that_look_like_missing_values(tmp_path):
    path = tmp_path / "s.csv"
    path.write_text('Label,Text\n0,NA\n1,"a, ""quoted"" text"\n0,null\n', encoding="utf-8")
    frame = read_split(path)
    assert frame["Text"].tolist() == ["NA", 'a, "quoted" text', "null"]
    assert frame["Label"].tolist() == [0, 1, 0]


@pytest.mark.parametrize(
    "content, message",
    [("Label,Text\n2,hi\n", "row 2: label"), ("Text,Label\nhi,0\n", "columns"), ("Label,Text\n", "empty")],
)
def test_read_split_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "s.csv"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message):
        read_split(path)


# --- download, extraction, validation -------------------------------------------------------------------


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_fetch_collection_from_the_mirror(tmp_path):
    out = tmp_path / "raw" / "SMSSpamCollection"
    counts = fetch_collection(URL, out, backup_url="https://example.invalid/x.zip", expected_rows=5574)
    assert counts == {"ham": 4827, "spam": 747}
    assert read_collection(out).shape == (5574, 2)
    assert sorted(p.name for p in out.parent.iterdir()) == ["SMSSpamCollection"]


def test_member_is_found_by_name_next_to_a_readme(tmp_path, collection_bytes):
    path = _zip(tmp_path / "a.zip", {"readme": b"SMS Spam Collection v.1\n", "SMSSpamCollection": collection_bytes})
    assert extract_collection(path) == collection_bytes


GOOD_ROWS = b"ham\tOk lar...\nspam\tWIN a prize now\n"
BAD_INPUTS = {
    "corrupt zip": (None, "not a readable zip"),
    "truncated zip": ("truncated", "not a readable zip"),
    "no data file": ({"readme": b"hello"}, "no SMSSpamCollection"),
    "parent-dir member": ({"../x": b"evil", "SMSSpamCollection": GOOD_ROWS}, "unsafe member path '../x'"),
    "absolute member": ({"/etc/x": b"evil", "SMSSpamCollection": GOOD_ROWS}, "unsafe member path '/etc/x'"),
    "third label": ({"SMSSpamCollection": GOOD_ROWS + b"eggs\tmaybe\n"}, "line 3: label 'eggs'"),
    "row without tab": ({"SMSSpamCollection": GOOD_ROWS + b"ham no tab here\n"}, "line 3: no tab"),
    "not UTF-8": ({"SMSSpamCollection": GOOD_ROWS + b"ham\t\xff\xfe\n"}, "line 3: not UTF-8"),
    "wrong row count": ({"SMSSpamCollection": GOOD_ROWS}, "2 messages; expected 5,574"),
}


@pytest.fixture
def bad_mirror(tmp_path, monkeypatch, collection_bytes):
    """A mirror folder whose SMS zip is built by the test."""
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    monkeypatch.setenv("GPTCORE_MIRROR", str(mirror))

    def build(spec) -> Path:
        target = mirror / MIRROR_NAME
        if spec is None:
            target.write_bytes(b"PK\x03\x04 this is not really a zip archive" * 10)
        elif spec == "truncated":
            whole = _zip(tmp_path / "whole.zip", {"SMSSpamCollection": collection_bytes}).read_bytes()
            target.write_bytes(whole[: len(whole) // 2])
        else:
            _zip(target, spec)
        return target

    return build


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_inputs_are_one_line_errors_and_leave_nothing(case, bad_mirror, tmp_path):
    spec, message = BAD_INPUTS[case]
    bad_mirror(spec)
    out_dir = tmp_path / "raw"
    out_dir.mkdir()
    with pytest.raises(DataError) as err:
        fetch_collection(URL, out_dir / "SMSSpamCollection", expected_rows=5574)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert MIRROR_NAME in str(err.value)  # names the file
    assert list(out_dir.iterdir()) == []


def test_download_stage_reports_one_line_and_writes_nothing(bad_mirror, tmp_path):
    bad_mirror({"readme": b"hello"})
    out = tmp_path / "raw" / "SMSSpamCollection"
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "stages" / "download_sms.py"),
            "--params",
            str(REPO / "params.yaml"),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: ") and "no SMSSpamCollection" in proc.stderr
    assert not out.exists()


# --- the dataset -----------------------------------------------------------------------------------------


def test_dataset_pads_to_the_longest_training_text_and_cuts_the_others(tokenizer):
    train_texts = ["hello there", "a much longer message than the first one, with more tokens"]
    ids = encode_texts(tokenizer, train_texts)
    train = SmsDataset(ids, [0, 1])
    longest = max(len(s) for s in ids)
    assert train.max_length == longest
    x, y = train[0]
    assert x.tolist() == ids[0] + [50256] * (longest - len(ids[0])) and int(y) == 0
    test = SmsDataset(encode_texts(tokenizer, ["word " * 100]), [1], max_length=train.max_length)
    assert test.inputs.shape == (1, longest) and 50256 not in test.inputs.tolist()[0]
    capped = SmsDataset(ids, [0, 1], context_length=4)
    assert capped.max_length == 4 and capped.inputs.shape == (2, 4)


def test_endoftext_in_a_message_is_plain_text(tokenizer):
    (ids,) = encode_texts(tokenizer, ["see <|endoftext|> here"])
    assert 50256 not in ids
