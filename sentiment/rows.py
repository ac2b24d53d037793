"""Checking a split row by row, and saying where a bad row is.

Text present; labels to 0/1 (ints, exact floats, booleans, neg/pos names, a `ClassLabel`'s names);
two classes to train on. A bad row is named by its 1-based line for JSONL and CSV files (what an
editor shows), by its 0-based row index for parquet, the hub and aclImdb folders.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

import numpy as np

from sentiment.errors import DataError

LABEL_NAMES = ("neg", "pos")
LABEL_SPELLINGS = (("neg", "negative", "0"), ("pos", "positive", "1"))  # case and spaces ignored


def is_blank(text: str) -> bool:
    """True for a text with nothing to read: only white space, control and format characters (a NUL, an
    escape, a zero-width space) or U+FFFD, all of which BERT's tokenizers drop, so it would be [CLS] [SEP] alone."""
    return all(c.isspace() or c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf") for c in text)


# ----------------------------------------------------------------------------- labels


def label_from_name(name: str) -> int | None:
    """0 for neg/negative/0, 1 for pos/positive/1, else None."""
    text = name.strip().lower()
    for label, spellings in enumerate(LABEL_SPELLINGS):
        if text in spellings:
            return label
    return None


def class_label_ids(names: list[str], source: str) -> tuple[int, ...]:
    """A `datasets.ClassLabel`'s class indices as 0/1, through its names: names ["pos", "neg"] store pos
    as 0, so the stored integers taken as they are would flip every label."""
    ids = tuple(label_from_name(name) for name in names)
    unknown = [name for name, label in zip(names, ids) if label is None]
    if unknown:
        raise DataError(f"{source}: the label column is a ClassLabel with names {names}; "
                        f"{', '.join(map(repr, unknown))} are not neg/pos (or negative/positive, 0/1); "
                        "rename the classes or store the labels as 0/1")
    return ids


def normalize_label(value, class_ids: tuple[int, ...] | None = None) -> int | None:
    """0/1 from 0/1 (ints, exact floats such as a pandas export's 1.0, booleans) or a neg/pos name;
    with `class_ids`, an integer is a ClassLabel index mapped through them. None: not a binary label."""
    if isinstance(value, str):
        return label_from_name(value)
    if isinstance(value, (bool, np.bool_)):
        value = int(value)  # False = neg, True = pos
    elif isinstance(value, (float, np.floating)):
        if not float(value).is_integer():  # 0.5 (or nan) is a score, not a class
            return None
        value = int(value)
    if not isinstance(value, (int, np.integer)):
        return None
    if class_ids is not None:
        return class_ids[value] if 0 <= value < len(class_ids) else None  # -1 = unlabeled in hub datasets
    return int(value) if value in (0, 1) else None


def class_counts(labels: np.ndarray) -> str:
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=2)
    return f"neg: {counts[0]}, pos: {counts[1]}"


def check_two_classes(labels: np.ndarray) -> None:
    """Refuse a training set of one class: the tutorial's shuffled subsample of IMDb never is one, so the
    labels are broken, and a classifier would only learn to always answer that class."""
    if (np.bincount(np.asarray(labels, dtype=np.int64), minlength=2) == 0).any():
        raise DataError(f"training data has only one class ({class_counts(labels)}); "
                        "check the label column or raise --n_train")


# ----------------------------------------------------------------------------- checking a split


def check_split(ds, source: str):
    """Require `text` and `label`; labels to 0/1; refuse empty texts and bad labels, naming where they are.
    `source` is the file read (for line numbers), a folder or a hub id."""
    import datasets

    missing = [c for c in ("text", "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{source} lacks column(s) {', '.join(missing)} (has {', '.join(ds.column_names)}); "
                        "rename them to text and label")
    if len(ds) == 0:
        raise DataError(f"{source} holds no rows")
    try:
        texts = list(ds["text"])  # decodes every text: a non-UTF-8 JSONL file loads, then fails here
    except UnicodeDecodeError:
        raise DataError(f"{source} is not UTF-8 text; re-encode it (e.g. iconv -f latin1 -t utf-8)") from None
    for row, text in enumerate(texts):
        if not isinstance(text, str) or is_blank(text):
            raise DataError(f"{row_location(source, row)}: empty or missing text; fill in its text")
    feature = ds.features["label"]
    class_ids = class_label_ids(feature.names, source) if isinstance(feature, datasets.ClassLabel) else None
    values = list(ds["label"])
    labels = [normalize_label(v, class_ids) for v in values]
    for row, label in enumerate(labels):
        if label is None:
            raise DataError(f"{row_location(source, row)}: label {values[row]!r} is not 0/1 or neg/pos; "
                            "this is a binary task (unlabeled rows, label -1, cannot train)")
    return ds.select_columns(["text"]).add_column("label", labels)


# ----------------------------------------------------------------------------- where a row is


def row_location(source: str, row: int) -> str:
    """`FILE line N` (1-based) for data row `row` of a JSONL or CSV file; `SOURCE row N (0-based)` for
    parquet, a JSON array, the hub or a folder. Reads the file again: for the error path only."""
    path = Path(source)
    line = None
    if path.suffix.lower() == ".csv" and path.is_file():
        line = csv_line(source, row)
    elif path.suffix.lower() in (".jsonl", ".json") and path.is_file() and not _is_json_array(source):
        line = json_line(source, row)
    return f"{source} line {line}" if line is not None else f"{source} row {row} (0-based)"


def _lines(path: str) -> list[str]:
    # JSON lines end at "\n" only; str.splitlines would also split at U+2028 inside a review
    return Path(path).read_text(encoding="utf-8", errors="replace").split("\n")


def _is_json_array(path: str) -> bool:
    return Path(path).read_text(encoding="utf-8", errors="replace").lstrip().startswith("[")


def json_line(path: str, row: int) -> int | None:
    """The 1-based line of JSONL record `row`; blank lines hold no record (the reader skips them)."""
    records = [number for number, line in enumerate(_lines(path), start=1) if line.strip()]
    return records[row] if row < len(records) else None


def csv_line(path: str, row: int) -> int | None:
    """The 1-based line where CSV data row `row` starts: the header is line 1, a quoted field may span
    lines (the csv module counts them), blank lines hold no row (pandas skips them)."""
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        index = -1  # the header is record -1
        while True:
            start = reader.line_num + 1
            record = next(reader, None)
            if record is None:
                return None
            if not record or (len(record) == 1 and not record[0].strip()):
                continue
            if index == row:
                return start
            index += 1


def first_bad_json_line(path: str) -> tuple[int, str] | None:
    """(1-based line, reason) of the first line of a JSONL file that is not a JSON object, or None.
    A file holding one JSON array is parsed whole: the parser's error knows its line."""
    if _is_json_array(path):
        try:
            json.loads(Path(path).read_text(encoding="utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            return e.lineno, e.msg
        return None
    for number, line in enumerate(_lines(path), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            return number, e.msg
        if not isinstance(record, dict):
            return number, "not a JSON object"
    return None
