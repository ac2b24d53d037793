"""labels.py and the labels of data.py: the label set from integers, names or a ClassLabel, in a deterministic
order (or --label_names'), each row's label as a class id, unknown test labels refused, stratified splits and
metrics for N classes."""

import datasets
import numpy as np
import pytest
from conftest import ROWS, write_rows

from sentiment.config import Config
from sentiment.data import IMDB_LABELS, load_splits, read_split
from sentiment.errors import ConfigError, DataError
from sentiment.evaluate import compute_metrics, f1_key
from sentiment.labels import (as_class, check_every_class, class_counts, encode, names_from_data, parse_names,
                              stratified_split)
from sentiment.tiny import make_tokenizer

# ----------------------------------------------------------------------------- one value, one class


@pytest.mark.parametrize("value, expected", [
    (0, 0), (3, 3), (np.int64(4), 4), (1.0, 1), (np.float32(2.0), 2), (True, 1), (np.bool_(False), 0),
    ("neg", "neg"), ("  very good ", "very good"), ("0", "0")])
def test_as_class(value, expected):
    assert as_class(value) == expected


@pytest.mark.parametrize("value", [-1, -2.0, 0.5, float("nan"), "", "  ", None, [1]])
def test_as_class_refuses_what_is_no_class(value):
    assert as_class(value) is None


def test_as_class_reads_a_class_label_index_through_its_names():
    names = ["b", "a", "c"]
    assert [as_class(v, names) for v in (0, 1, 2, np.int64(2))] == ["b", "a", "c", "c"]
    assert as_class(3, names) is None and as_class(-1, names) is None  # -1 = unlabeled in hub datasets


@pytest.mark.parametrize("text, names", [("", ()), ("neg,pos", ("neg", "pos")), (" a , b ,c", ("a", "b", "c")),
                                         ("very bad,bad,good", ("very bad", "bad", "good"))])
def test_parse_names(text, names):
    assert parse_names(text) == names


@pytest.mark.parametrize("text, why", [("a,,b", "empty name"), ("a,b,a", "names a twice"), ("a", "one class")])
def test_label_names_field_is_checked(text, why):
    with pytest.raises(ConfigError, match=rf"^label_names='{text}' .*{why}.*e\.g\. neg,pos"):
        Config(label_names=text)


# ----------------------------------------------------------------------------- the label set of a split


@pytest.mark.parametrize("values, names", [
    ([1, 0, 1], IMDB_LABELS),  # 0/1: the binary names (IMDb's)
    ([True, False], IMDB_LABELS),
    ([2, 0, 1, 2], ("0", "1", "2")),
    ([4.0, 0.0, 3.0, 1.0, 2.0], ("0", "1", "2", "3", "4")),
    (["pos", "neg", "neutral", "pos"], ("neg", "neutral", "pos")),  # names: sorted
    (["10", "2", "7"], ("2", "7", "10")),  # whole numbers as text: numerically
    ([10, 1, 3, 7, 1], ("1", "3", "7", "10")),  # integers not from 0 (star ratings): names, numerically
    ([1, 1], IMDB_LABELS),  # only 1s: IMDb's pos alone (refused later as one class), not a class "1"
    ([" b", "a ", "b"], ("a", "b"))])
def test_names_from_data(values, names):
    assert names_from_data(values, None, "f", IMDB_LABELS) == names


def test_names_from_data_order_is_the_same_in_any_row_order():
    values = ["topic_c", "topic_a", "topic_b", "topic_a", "topic_e", "topic_d"]
    orders = {names_from_data(list(np.random.default_rng(seed).permutation(values)), None, "f", IMDB_LABELS)
              for seed in range(5)}
    assert orders == {("topic_a", "topic_b", "topic_c", "topic_d", "topic_e")}


def test_names_from_data_refuses_names_mixed_with_numbers():
    with pytest.raises(DataError, match=r"^f: the labels mix names \('neg'\) and numbers \(1\); use one kind, or "
                                        r"give --label_names \(numbers are then indices into it\)$"):
        names_from_data(["neg", 1, "neg"], None, "f", IMDB_LABELS)


def test_class_label_names_are_the_label_set_in_their_order():
    assert names_from_data([0, 1], ["pos", "neg", "meh"], "f", IMDB_LABELS) == ("pos", "neg", "meh")


def test_encode_gives_ids_and_names_the_first_bad_row(tmp_path):
    names = ("bad", "good", "ok")
    assert encode(["ok", 0, "good", 2.0, True], None, names, "f", "--label_names") == [2, 0, 1, 2, 1]
    path = write_rows(tmp_path / "t.jsonl", [{"text": "a", "label": "good"}, {"text": "b", "label": "great"}])
    with pytest.raises(DataError, match=rf"^{path} line 2: label 'great' is not one of --label_names \(bad, good, "
                                        r"ok\); add it to --label_names or fix the row$"):
        encode(["good", "great"], None, names, str(path), "--label_names")
    with pytest.raises(DataError, match=r"^f row 1 \(0-based\): label 3 is not a class index of the model's labels "
                                        r"\(0\.\.2: bad, good, ok\); fix the row$"):
        encode([0, 3], None, names, "f", "the model's labels")
    with pytest.raises(DataError, match=r"label -1 is not a class \(a name, or an index 0\.\.2; -1 marks an "
                                        r"unlabeled row"):
        encode([-1], None, names, "f", "the training data's labels")


# ----------------------------------------------------------------------------- reading labeled files


def write_class_label(path, labels, names):
    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"text": [f"review {i}" for i in range(len(labels))], "label": labels},
                               features=features).to_parquet(str(path))
    return str(path)


def rows_of(labels: list) -> list[dict]:
    return [{"text": f"review {i} of class {label}", "label": label} for i, label in enumerate(labels)]


@pytest.mark.parametrize("n", [3, 5])
def test_n_classes_from_ints_strings_and_a_class_label(tmp_path, n):
    ids = [i % n for i in range(4 * n)][::-1]  # every class, the last one first
    words = [f"class_{chr(ord('a') + i)}" for i in range(n)]
    ints = write_rows(tmp_path / "i.jsonl", rows_of(ids))
    strings = write_rows(tmp_path / "s.csv", rows_of([words[i] for i in ids]))
    class_label = write_class_label(tmp_path / "c.parquet", ids, words[::-1])  # stored index i is words[n-1-i]
    for path, names, expected in ((ints, tuple(map(str, range(n))), ids), (strings, tuple(words), ids),
                                  (class_label, tuple(words[::-1]), ids)):
        ds = read_split(Config(train_file=str(path)), "train")
        assert tuple(ds.features["label"].names) == names  # the names travel with the data
        assert ds["label"] == expected


def test_float_and_boolean_labels_are_read(tmp_path):
    """A pandas export often writes 0.0/1.0, a boolean column true/false: both are the classes 0/1."""
    floats = write_rows(tmp_path / "f.jsonl", [{"text": r["text"], "label": float(r["label"])} for r in ROWS])
    bools = write_rows(tmp_path / "b.parquet", [{"text": r["text"], "label": bool(r["label"])} for r in ROWS])
    for path in (floats, bools):
        assert read_split(Config(train_file=str(path)), "train")["label"] == [r["label"] for r in ROWS]
    halves = write_rows(tmp_path / "h.jsonl", ROWS[:3] + [{"text": "meh", "label": 0.5}])
    with pytest.raises(DataError, match=r"h\.jsonl line 4: label 0\.5 is not a class"):
        read_split(Config(train_file=str(halves)), "train")


def test_label_names_set_the_order_and_name_integer_labels(tmp_path):
    path = write_rows(tmp_path / "s.jsonl", rows_of(["pos", "neg", "neutral", "pos"]))
    ds = read_split(Config(train_file=str(path), label_names="pos,neutral,neg"), "train")
    assert tuple(ds.features["label"].names) == ("pos", "neutral", "neg") and ds["label"] == [0, 2, 1, 0]
    ints = write_rows(tmp_path / "i.jsonl", rows_of([0, 2, 1]))
    ds = read_split(Config(train_file=str(ints), label_names="low,mid,high"), "train")
    assert tuple(ds.features["label"].names) == ("low", "mid", "high") and ds["label"] == [0, 2, 1]
    with pytest.raises(DataError, match=r"s\.jsonl line 3: label 'neutral' is not one of --label_names \(neg, pos\)"):
        read_split(Config(train_file=str(path), label_names="neg,pos"), "train")


def test_class_label_names_decide_the_class_not_the_stored_index(tmp_path):
    stored = [0, 0, 1, 0, 1, 1]
    write_class_label(tmp_path / "train.parquet", stored, ["pos", "neg"])
    write_class_label(tmp_path / "test.parquet", stored, ["neg", "pos"])  # the same integers, the other names
    splits = load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())
    assert splits.names == ("pos", "neg")  # the training data's ClassLabel order
    assert splits.train.labels[np.argsort(splits.train.texts)].tolist() == stored
    assert splits.test.labels[np.argsort(splits.test.texts)].tolist() == [1, 1, 0, 1, 0, 0]  # test's neg: class 1


def test_a_test_label_the_training_data_lacks_is_refused(tmp_path):
    write_rows(tmp_path / "train.csv", rows_of(["neg", "pos", "neg", "pos"]))
    write_rows(tmp_path / "test.csv", rows_of(["neg", "neutral", "pos"]))
    with pytest.raises(DataError, match=rf"^{tmp_path / 'test.csv'} line 3: label 'neutral' is not one of the "
                                        r"training data's labels \(neg, pos\); a model cannot predict a class it never "
                                        r"saw: drop these rows, or add the class to the training data$"):
        load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())
    write_rows(tmp_path / "test.csv", rows_of([0, 1, 2]))  # integers: indices into the training data's 2 classes
    with pytest.raises(DataError, match=r"test\.csv line 4: label 2 is not a class index of the training data's "
                                        r"labels \(0\.\.1: neg, pos\)"):
        load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())


def test_every_class_needs_a_training_review(tmp_path):
    check_every_class(np.array([0, 1, 2]), ("a", "b", "c"))
    with pytest.raises(DataError, match=r"^training data has only one class \(a: 0, b: 3, c: 0\)"):
        check_every_class(np.array([1, 1, 1]), ("a", "b", "c"))
    with pytest.raises(DataError, match=r"^training data has no review of class b \(a: 2, b: 0, c: 1\); raise "
                                        r"--n_train, or check the label column and --label_names$"):
        check_every_class(np.array([0, 0, 2]), ("a", "b", "c"))
    write_rows(tmp_path / "train.jsonl", rows_of([0, 2, 0, 2]))  # class 1 of 0..2 never occurs
    write_rows(tmp_path / "test.jsonl", rows_of([0, 1, 2]))
    with pytest.raises(DataError, match=r"no review of class 1 \(0: 2, 1: 0, 2: 2\)"):
        load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())


# ----------------------------------------------------------------------------- stratified splits, N classes


def test_stratified_split_keeps_every_class_share():
    ids = np.repeat([0, 1, 2, 3], [40, 20, 100, 40])  # 20%, 10%, 50%, 20%
    train_idx, val_idx = stratified_split(ids, 0.25, seed=3)
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(200))
    assert np.bincount(ids[val_idx]).tolist() == [10, 5, 25, 10]
    assert np.bincount(ids[train_idx]).tolist() == [30, 15, 75, 30]
    assert np.array_equal(stratified_split(ids, 0.25, seed=3)[1], val_idx)
    assert not np.array_equal(stratified_split(ids, 0.25, seed=4)[1], val_idx)


def test_stratified_split_refuses_what_cannot_hold_every_class():
    ids = np.repeat([0, 1, 2, 3, 4], 4)  # 5 classes, 20 reviews: 0.1 holds out 2
    with pytest.raises(DataError, match=r"val_fraction=0\.1 of 20 reviews leaves too few for a split that holds "
                                        r"each of the 5 classes"):
        stratified_split(ids, 0.1, seed=0)
    with pytest.raises(DataError, match=r"needs at least 2 reviews of each class, got a: 1, b: 9, c: 10"):
        stratified_split(np.repeat([0, 1, 2], [1, 9, 10]), 0.2, seed=0, names=("a", "b", "c"))


# ----------------------------------------------------------------------------- metrics


def test_metrics_for_n_classes_match_a_count_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 2])
    preds = np.array([0, 1, 0, 1, 2, 2, 2, 2, 0, 2])
    probs = np.eye(3)[preds] * 0.7 + 0.1  # rows sum to 1, argmax = preds
    m = compute_metrics(labels, probs, np.full(10, 0.5), ("x", "y", "z"))
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 1, 1], [1, 0, 4]]
    assert m["accuracy"] == pytest.approx(7 / 10) and m["loss"] == pytest.approx(0.5) and m["n"] == 10
    # by hand: precision = diagonal / column sum, recall = diagonal / row sum
    by_hand = {"x": (2 / 3, 2 / 3, 3), "y": (1 / 2, 1 / 2, 2), "z": (4 / 5, 4 / 5, 5)}
    for name, (precision, recall, support) in by_hand.items():
        f1 = 2 * precision * recall / (precision + recall)
        assert m["per_class"][name] == pytest.approx({"precision": precision, "recall": recall, "f1": f1,
                                                      "support": support})
    assert m["macro_f1"] == pytest.approx((2 / 3 + 1 / 2 + 4 / 5) / 3)
    assert "f1" not in m and "precision" not in m and f1_key(m) == "macro_f1"  # no "positive class" beyond 2


def test_binary_metrics_keep_their_keys_and_add_macro_f1():
    labels, preds = np.array([0, 0, 1, 1, 1]), np.array([0, 1, 1, 1, 0])
    m = compute_metrics(labels, np.eye(2)[preds], np.zeros(5), ("neg", "pos"))
    assert list(m) == ["loss", "accuracy", "precision", "recall", "f1", "macro_f1", "per_class", "confusion_matrix",
                       "n"]
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((2 / 3, 2 / 3, 2 / 3))  # of class 1, pos
    assert m["confusion_matrix"] == [[1, 1], [1, 2]] and f1_key(m) == "f1"
    assert m["macro_f1"] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert m["per_class"]["neg"]["support"] == 2 and m["per_class"]["pos"]["support"] == 3


def test_class_counts_name_each_class():
    assert class_counts(np.array([2, 0, 2]), ("a", "b", "c")) == "a: 1, b: 0, c: 2"


def test_star_ratings_as_integers_are_classes_named_by_their_number(tmp_path):
    """IMDb's ratings 1-4 and 7-10 as the label column: 8 classes "1".."10" (no 0, 5, 6), each rating its own, in
    train and test alike; never indices into a 0..10 range with empty classes."""
    write_rows(tmp_path / "train.jsonl", rows_of([1, 2, 3, 4, 7, 8, 9, 10] * 2))
    write_rows(tmp_path / "test.jsonl", rows_of([10, 1, 7]))
    splits = load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())
    assert splits.names == ("1", "2", "3", "4", "7", "8", "9", "10")
    assert splits.test.labels[np.argsort(splits.test.texts)].tolist() == [7, 0, 4]  # rows_of's texts sort in order
    write_rows(tmp_path / "test.jsonl", rows_of([5]))
    with pytest.raises(DataError, match=r"label 5 is not one of the training data's labels \(1, 2, 3, 4, 7, 8"):
        load_splits(Config(data_dir=str(tmp_path), n_train=0, n_test=0, max_length=16), make_tokenizer())
