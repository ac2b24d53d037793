"""rows.py: where a bad row is in its file (1-based lines for JSONL and CSV, 0-based rows otherwise). Labels as
classes: test_labels.py."""

import json

import pytest
from conftest import ROWS, write_rows

from sentiment.config import Config
from sentiment.data import read_split
from sentiment.errors import DataError
from sentiment.rows import csv_line, first_bad_json_line, json_line, row_location

# ----------------------------------------------------------------------------- where a bad row is


def test_json_line_counts_file_lines_and_skips_blank_ones(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n   \n'  # lines 1-3
                    '{"text": "b", "label": 0}\r\n{"text": "c\u2028d", "label": 0}\n')  # 4, 5: U+2028 ends no line
    assert [json_line(str(path), row) for row in range(3)] == [1, 4, 5]
    assert read_split(Config(train_file=str(path)), "train")["text"] == ["a", "b", "c\u2028d"]  # as datasets reads it


def test_csv_line_counts_quoted_multi_line_fields(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text('text,label\n\na,1\n"b\nstill b\n\nstill b",0\n  \nc,1\n')
    assert read_split(Config(train_file=str(path)), "train")["text"] == ["a", "b\nstill b\n\nstill b", "c"]
    assert [csv_line(str(path), row) for row in range(3)] == [3, 4, 9]  # the header is line 1


def test_row_location(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('text,label\n"x\ny",1\nz,0\n')
    jsonl_path = write_rows(tmp_path / "t.jsonl", ROWS)
    array = tmp_path / "a.json"
    array.write_text(json.dumps(ROWS, indent=2))
    assert row_location(str(csv_path), 1) == f"{csv_path} line 4"
    assert row_location(str(jsonl_path), 7) == f"{jsonl_path} line 8"
    assert row_location(str(array), 7) == f"{array} row 7 (0-based)"  # one JSON array: no line per row
    parquet = write_rows(tmp_path / "t.parquet", ROWS)
    assert row_location(str(parquet), 3) == f"{parquet} row 3 (0-based)"
    assert row_location("stanfordnlp/imdb", 3) == "stanfordnlp/imdb row 3 (0-based)"


def test_first_bad_json_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"text": "a", "label": 1}\n\n{"text": "b", "label": 0}\n{"text": "c", label: 0}\n{oops\n')
    assert first_bad_json_line(str(path)) == (4, "Expecting property name enclosed in double quotes")
    path.write_text('{"text": "a", "label": 1}\n[1, 2]\n')
    assert first_bad_json_line(str(path)) == (2, "not a JSON object")
    path.write_text('[\n  {"text": "a", "label": 1},\n  {"text": "b" "label": 0}\n]\n')
    assert first_bad_json_line(str(path)) == (3, "Expecting ',' delimiter")
    path.write_text('{"text": "a", "label": 1}\n\n')
    assert first_bad_json_line(str(path)) is None


def test_bad_rows_are_named_by_their_line(tmp_path):
    csv_path = tmp_path / "t.csv"
    csv_path.write_text('text,label\n"a\nlong review",1\n"b\n\nc",0\n,1\n')
    with pytest.raises(DataError, match=rf"^{csv_path} line 7: empty or missing text; fill in its text$"):
        read_split(Config(train_file=str(csv_path)), "train")
    parquet = write_rows(tmp_path / "t.parquet", ROWS[:5] + [{"text": " ", "label": 1}])
    with pytest.raises(DataError, match=rf"^{parquet} row 5 \(0-based\): empty or missing text"):
        read_split(Config(train_file=str(parquet)), "train")
