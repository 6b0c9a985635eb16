"""The UCI SMS Spam Collection: safe extraction, validation, the book's balanced split, and the dataset.

The file is `label<TAB>text` per line with no quoting; reading it with quoting disabled gives 5,574
messages (4,827 ham, 747 spam). The book reads it with pandas' default quoting, which merges three
lines into one garbage row (5,572 rows); the balanced split below is otherwise the book's, seed for seed.
"""

from __future__ import annotations

import csv
import io
import os
import tempfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

import pandas as pd
import torch
from torch.utils.data import Dataset

from gptcore.atomic import atomic_path
from gptcore.download import fetch, mirror_root
from gptcore.errors import DataError, DownloadError
from gptcore.tokenizer import encode_text

MEMBER = "SMSSpamCollection"
MIRROR_NAME = "sms+spam+collection.zip"  # the zip's name in GPTCORE_MIRROR, whichever address it came from
LABELS = ("ham", "spam")  # index = class id: ham 0, spam 1
PAD_ID = 50256  # <|endoftext|>, GPT-2's pad token as the book uses it
MAX_MEMBER_BYTES = 64 << 20  # the real file is 0.5 MB; anything far larger is not it (or a zip bomb)
SPLITS = ("train", "validation", "test")


def check_member_names(archive: zipfile.ZipFile, source: str) -> None:
    """Refuse archives with members that would land outside the folder they are extracted into."""
    for name in archive.namelist():
        path = PurePosixPath(name.replace("\\", "/"))
        if path.is_absolute() or ".." in path.parts or (path.parts and ":" in path.parts[0]):
            raise DataError(
                f"{source}: unsafe member path {name!r} in the zip (absolute or outside the folder); refusing it"
            )


def extract_collection(zip_path: str | os.PathLike, source: str | None = None) -> bytes:
    """The bytes of SMSSpamCollection inside the zip, found by name (UCI's zip also holds a readme).

    Only that member is read, into memory; `source` names the zip in error messages.
    """
    source = source or str(zip_path)
    try:
        with zipfile.ZipFile(zip_path) as archive:
            check_member_names(archive, source)
            found = [i for i in archive.infolist() if PurePosixPath(i.filename).name == MEMBER and not i.is_dir()]
            if not found:
                raise DataError(
                    f"{source}: no {MEMBER} in the zip (members: {', '.join(archive.namelist()[:5]) or 'none'})"
                )
            if len(found) > 1:
                raise DataError(f"{source}: {len(found)} members named {MEMBER} in the zip; expected one")
            if found[0].file_size > MAX_MEMBER_BYTES:
                raise DataError(f"{source}: {found[0].filename} is {found[0].file_size:,} bytes; expected about 0.5 MB")
            return archive.read(found[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, EOFError, NotImplementedError) as err:
        raise DataError(f"{source}: not a readable zip archive ({' '.join(str(err).split())})") from None


def validate_collection(data: bytes, source: str, expected_rows: int | None = None) -> dict[str, int]:
    """Check the raw file: UTF-8, every line `ham|spam<TAB>text`; return the label counts."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise DataError(f"{source}: line {line}: not UTF-8 (byte {err.start})") from None
    counts = dict.fromkeys(LABELS, 0)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline
    for number, line in enumerate(lines, start=1):
        label, tab, _ = line.partition("\t")
        if not tab:
            raise DataError(f"{source}: line {number}: no tab between label and text: {line[:40]!r}")
        if label not in counts:
            raise DataError(f"{source}: line {number}: label {label[:20]!r}; expected one of {', '.join(LABELS)}")
        counts[label] += 1
    if expected_rows is not None and len(lines) != expected_rows:
        raise DataError(f"{source}: {len(lines):,} messages; expected {expected_rows:,}")
    return counts


def fetch_collection(
    url: str, out: str | os.PathLike, *, backup_url: str | None = None, expected_rows: int | None = None
) -> dict[str, int]:
    """Download the zip (the mirror when GPTCORE_MIRROR is set, else url, then backup_url), take out
    SMSSpamCollection, validate it and write it to `out`; on any error nothing is written."""
    out = Path(out)
    with tempfile.TemporaryDirectory(prefix="gptcore-sms-") as tmp:
        zip_path = Path(tmp) / MIRROR_NAME
        addresses = [url] + ([backup_url] if backup_url and mirror_root() is None else [])
        for attempt, address in enumerate(addresses):
            try:
                fetch(address, zip_path, mirror_name=MIRROR_NAME)
                break
            except DownloadError:
                if attempt == len(addresses) - 1:
                    raise
        root = mirror_root()
        origin = str(root / MIRROR_NAME) if root is not None else address
        data = extract_collection(zip_path, source=origin)
        counts = validate_collection(data, f"{origin}: {MEMBER}", expected_rows)
    with atomic_path(out) as part:
        part.write_bytes(data)
    return counts


def read_collection(path: str | os.PathLike) -> pd.DataFrame:
    """The raw file as a DataFrame (Label: ham|spam, Text), parsed with quoting disabled."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro download_sms`")
    try:
        frame = pd.read_csv(
            path,
            sep="\t",
            header=None,
            names=["Label", "Text"],
            quoting=csv.QUOTE_NONE,
            dtype=str,
            keep_default_na=False,
            encoding="utf-8",
        )
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a tab-separated label/text file: {' '.join(str(err).split())}") from None
    bad = frame.index[~frame["Label"].isin(LABELS)]
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 1}: label {frame['Label'][bad[0]]!r}; expected ham or spam")
    missing = [label for label in LABELS if not (frame["Label"] == label).any()]
    if missing:
        raise DataError(f"{path}: no {' and no '.join(missing)} messages ({len(frame)} rows); expected both labels")
    return frame


def split_collection(
    frame: pd.DataFrame, seed: int = 123, train_frac: float = 0.7, validation_frac: float = 0.1
) -> dict[str, pd.DataFrame]:
    """The book's procedure: as many ham as spam (a seeded sample), ham then spam, a seeded shuffle,
    then a 70/10/20 cut. Labels become ham 0, spam 1."""
    spam = frame[frame["Label"] == "spam"]
    ham = frame[frame["Label"] == "ham"].sample(len(spam), random_state=seed)
    balanced = pd.concat([ham, spam])
    balanced = balanced.assign(Label=balanced["Label"].map({name: i for i, name in enumerate(LABELS)}))
    shuffled = balanced.sample(frac=1, random_state=seed).reset_index(drop=True)
    train_end = int(len(shuffled) * train_frac)
    validation_end = train_end + int(len(shuffled) * validation_frac)
    return {
        "train": shuffled[:train_end].reset_index(drop=True),
        "validation": shuffled[train_end:validation_end].reset_index(drop=True),
        "test": shuffled[validation_end:].reset_index(drop=True),
    }


def to_csv_text(frame: pd.DataFrame) -> str:
    """A split as written to data/prepared/sms/*.csv: pandas to_csv(index=False), columns Label, Text."""
    buffer = io.StringIO()
    frame[["Label", "Text"]].to_csv(buffer, index=False)
    return buffer.getvalue()


def read_split(path: str | os.PathLike) -> pd.DataFrame:
    """A prepared split (Label 0|1, Text); texts like "NA" stay texts."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: not found; run `dvc repro prepare_sms`")
    try:
        frame = pd.read_csv(path, dtype={"Text": str}, keep_default_na=False, encoding="utf-8")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as err:
        raise DataError(f"{path}: not a prepared split CSV: {' '.join(str(err).split())}") from None
    if list(frame.columns) != ["Label", "Text"]:
        raise DataError(f"{path}: columns {list(frame.columns)}; expected ['Label', 'Text']")
    labels = pd.to_numeric(frame["Label"], errors="coerce")
    bad = frame.index[~labels.isin(range(len(LABELS)))]
    if len(bad):
        raise DataError(f"{path}: row {bad[0] + 2}: label {frame['Label'][bad[0]]!r}; expected 0 or 1")
    if frame.empty:
        raise DataError(f"{path}: the split is empty")
    return frame.assign(Label=labels.astype(int))


def encode_texts(tokenizer, texts) -> list[list[int]]:
    """Token ids of each text; `<|endoftext|>` in a text is plain text, so the pad id is never a real token."""
    return [encode_text(tokenizer, text) for text in texts]


def pad_ids(ids: list[list[int]], max_length: int, pad_id: int = PAD_ID) -> torch.Tensor:
    """Cut each sequence to max_length and right-pad it with pad_id: LongTensor [N, max_length]."""
    out = torch.full((len(ids), max_length), pad_id, dtype=torch.long)
    for row, seq in enumerate(ids):
        seq = seq[:max_length]
        out[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    return out


class SmsDataset(Dataset):
    """(token ids [max_length], label) pairs: ids padded with 50256 to max_length, longer texts cut.

    max_length None (the training split): the longest sequence, capped at context_length. The
    validation and test splits pass the training split's max_length, as the book does.
    """

    def __init__(
        self,
        token_ids: list[list[int]],
        labels,
        max_length: int | None = None,
        context_length: int | None = None,
        pad_id: int = PAD_ID,
    ):
        if len(token_ids) != len(labels):
            raise ValueError(f"{len(token_ids)} texts but {len(labels)} labels")
        if max_length is None:
            max_length = max((len(seq) for seq in token_ids), default=1)
        if context_length is not None:
            max_length = min(max_length, context_length)
        self.max_length = max(1, max_length)
        self.pad_id = pad_id
        self.inputs = pad_ids(token_ids, self.max_length, pad_id)  # [N, max_length]
        self.labels = torch.as_tensor(list(labels), dtype=torch.long)  # [N]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inputs[i], self.labels[i]
