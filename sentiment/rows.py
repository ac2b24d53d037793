"""Checking a split row by row, and saying where a bad row is.

The text and label columns present, each text non-empty (labels.py reads the labels as classes). A bad
row is named by its 1-based line for JSONL and CSV files (what an editor shows), by its 0-based row index
for parquet, the hub and aclImdb folders.
"""

from __future__ import annotations

import csv
import json
import unicodedata
from pathlib import Path

from sentiment.errors import DataError


def is_blank(text: str) -> bool:
    """True for a text with nothing to read: only white space, control and format characters (a NUL, an
    escape, a zero-width space) or U+FFFD, all of which BERT's tokenizers drop, so it would be [CLS] [SEP] alone."""
    return all(c.isspace() or c == "\ufffd" or unicodedata.category(c) in ("Cc", "Cf") for c in text)


# ----------------------------------------------------------------------------- checking a split


def check_split(ds, source: str, text_column: str = "text", label_column: str = "label"):
    """The split as columns `text` and `label` (its values and feature as they are: labels.py reads them), from
    the columns named; refuse empty texts, naming where they are. `source` is the file read (for line numbers),
    a folder or a hub id."""
    missing = [c for c in (text_column, label_column) if c not in ds.column_names]
    if missing:
        raise DataError(f"{source} has no column {' or '.join(map(repr, missing))}; its columns are "
                        f"{', '.join(ds.column_names)}: name the text and label columns with --text_column and "
                        f"--label_column (now {text_column!r} and {label_column!r})")
    if len(ds) == 0:
        raise DataError(f"{source} holds no rows")
    try:
        texts = list(ds[text_column])  # decodes every text: a non-UTF-8 JSONL file loads, then fails here
    except UnicodeDecodeError:
        raise DataError(f"{source} is not UTF-8 text; re-encode it (e.g. iconv -f latin1 -t utf-8)") from None
    for row, text in enumerate(texts):
        if not isinstance(text, str) or is_blank(text):
            raise DataError(f"{row_location(source, row)}: empty or missing text; fill in its text")
    ds = ds.select_columns([text_column, label_column])
    return ds.rename_columns({text_column: "text", label_column: "label"})  # a ClassLabel stays one


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
