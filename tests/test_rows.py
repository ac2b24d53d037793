"""rows.py: labels to 0/1 (ints, exact floats, booleans, names, a ClassLabel's names), the two-class check,
and where a bad row is in its file (1-based lines for JSONL and CSV, 0-based rows otherwise)."""

import json

import datasets
import numpy as np
import pytest
from conftest import ROWS, write_rows

from sentiment.config import Config
from sentiment.data import load_splits, read_split
from sentiment.errors import DataError
from sentiment.rows import (check_two_classes, class_label_ids, csv_line, first_bad_json_line, json_line,
                            normalize_label, row_location)
from sentiment.tiny import make_tokenizer

# ----------------------------------------------------------------------------- labels


@pytest.mark.parametrize("value, expected", [
    (0, 0), (1, 1), (np.int64(1), 1), ("neg", 0), ("pos", 1), ("POS", 1), (" negative ", 0), ("positive", 1),
    ("0", 0), ("1", 1), (0.0, 0), (1.0, 1), (np.float32(1.0), 1), (False, 0), (True, 1), (np.bool_(True), 1),
    (np.bool_(False), 0)])
def test_normalize_label(value, expected):
    assert normalize_label(value) == expected


@pytest.mark.parametrize("value", [-1, 2, 2.0, 0.5, float("nan"), "neutral", "", "true", None, [1]])
def test_normalize_label_rejects(value):
    assert normalize_label(value) is None


def test_normalize_label_maps_a_class_index_through_the_class_names():
    flipped = (1, 0)  # ClassLabel(names=["pos", "neg"]): index 0 is pos
    assert [normalize_label(v, flipped) for v in (0, 1, np.int64(0))] == [1, 0, 1]
    assert normalize_label(2, flipped) is None and normalize_label(-1, flipped) is None  # -1 = unlabeled


@pytest.mark.parametrize("names, ids", [(["neg", "pos"], (0, 1)), (["pos", "neg"], (1, 0)),
                                        (["Negative", "POSITIVE"], (0, 1)), (["0", "1"], (0, 1))])
def test_class_label_ids(names, ids):
    assert class_label_ids(names, "f") == ids


def test_class_label_ids_refuses_names_that_are_not_neg_pos():
    with pytest.raises(DataError, match=r"^f: the label column is a ClassLabel with names \['bad', 'good'\]; "
                                        r"'bad', 'good' are not neg/pos"):
        class_label_ids(["bad", "good"], "f")
    with pytest.raises(DataError, match=r"'neutral' are not neg/pos"):
        class_label_ids(["neg", "pos", "neutral"], "f")


def test_two_classes_are_required_for_training():
    check_two_classes(np.array([0, 1, 1]))
    with pytest.raises(DataError, match=r"^training data has only one class \(neg: 0, pos: 3\); "):
        check_two_classes(np.array([1, 1, 1]))
    with pytest.raises(DataError, match=r"\(neg: 2, pos: 0\).*check the label column or raise --n_train$"):
        check_two_classes(np.array([0, 0]))


# ----------------------------------------------------------------------------- reading labels


def test_float_and_boolean_labels_are_read(tmp_path):
    """A pandas export often writes 0.0/1.0, a boolean column true/false: both are the 0/1 labels."""
    floats = write_rows(tmp_path / "f.jsonl", [{"text": r["text"], "label": float(r["label"])} for r in ROWS])
    bools = write_rows(tmp_path / "b.parquet", [{"text": r["text"], "label": bool(r["label"])} for r in ROWS])
    for path in (floats, bools):
        assert read_split(Config(train_file=str(path)), "train")["label"] == [r["label"] for r in ROWS]
    halves = write_rows(tmp_path / "h.jsonl", ROWS[:3] + [{"text": "meh", "label": 0.5}])
    with pytest.raises(DataError, match=r"h\.jsonl line 4: label 0\.5 is not 0/1 or neg/pos"):
        read_split(Config(train_file=str(halves)), "train")


def write_class_label(path, labels, names):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"text": [f"review {i}" for i in range(len(labels))], "label": labels},
                               features=features).to_parquet(str(path))
    return path


def test_class_label_names_decide_which_is_pos(tmp_path):
    """A dataset storing ClassLabel(names=["pos", "neg"]) keeps pos as 0: read through the names, not flipped."""
    stored = [0, 0, 1, 0, 1, 1]
    write_class_label(tmp_path / "train.parquet", stored, ["pos", "neg"])
    write_class_label(tmp_path / "test.parquet", stored, ["neg", "pos"])
    cfg = Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16)
    assert read_split(cfg, "train")["label"] == [1, 1, 0, 1, 0, 0]
    splits = load_splits(cfg, make_tokenizer())  # what training sees
    assert splits.train.labels[np.argsort(splits.train.texts)].tolist() == [1, 1, 0, 1, 0, 0]
    assert splits.test.labels[np.argsort(splits.test.texts)].tolist() == stored
    unknown = write_class_label(tmp_path / "u.parquet", [0, 1], ["bad", "good"])
    with pytest.raises(DataError, match=r"u\.parquet: the label column is a ClassLabel with names"):
        read_split(Config(train_file=str(unknown)), "train")
    unlabeled = write_class_label(tmp_path / "x.parquet", [0, 1, -1], ["neg", "pos"])
    with pytest.raises(DataError, match=r"x\.parquet row 2 \(0-based\): label -1 is not 0/1 or neg/pos"):
        read_split(Config(train_file=str(unlabeled)), "train")


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
