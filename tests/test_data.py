"""data.py: reading, label checks, subsets, the validation split, truncation, tokenization, batching, collate."""

import datasets
import numpy as np
import pytest
import torch
from conftest import ROWS, write_rows

from sentiment.config import Config
from sentiment.data import (Collator, ReviewDataset, collator, eval_batches, global_batches, load_splits,
                            micro_batches, read_split, take, tokenize, truncate_ids)
from sentiment.errors import DataError
from sentiment.labels import stratified_split
from sentiment.tiny import make_reviews, make_tokenizer

CLS, SEP = 101, 102


# ----------------------------------------------------------------------------- tokenizer


def test_known_word_tokenizes_to_its_id():
    tok = make_tokenizer()
    assert tok.convert_tokens_to_ids("great") == 5
    assert tok("Great movie")["input_ids"] == [tok.cls_token_id, 5, tok.convert_tokens_to_ids("movie"),
                                               tok.sep_token_id]
    assert tok.pad_token_id == 0


# ----------------------------------------------------------------------------- truncation


def test_no_truncation_when_short():
    ids = list(range(1000, 1010))
    for strategy in ("head", "tail", "head_tail"):
        assert truncate_ids(ids, 12, strategy, CLS, SEP) == [CLS, *ids, SEP]
        assert truncate_ids(ids, 512, strategy, CLS, SEP) == [CLS, *ids, SEP]


def test_head_keeps_the_start():
    ids = list(range(1000, 1020))
    assert truncate_ids(ids, 10, "head", CLS, SEP) == [CLS, *range(1000, 1008), SEP]


def test_tail_keeps_the_end():
    ids = list(range(1000, 1020))
    assert truncate_ids(ids, 10, "tail", CLS, SEP) == [CLS, *range(1012, 1020), SEP]


def test_head_tail_keeps_first_128_and_last_max_length_minus_130():
    ids = list(range(10_000, 10_000 + 1000))
    out = truncate_ids(ids, 512, "head_tail", CLS, SEP)
    assert len(out) == 512
    assert out[0] == CLS and out[-1] == SEP
    assert out[1:129] == ids[:128]
    assert out[129:-1] == ids[-(512 - 130):]
    assert CLS not in out[1:-1] and SEP not in out[1:-1]
    # the smallest max_length it allows: 128 head tokens + 2 tail tokens
    out = truncate_ids(ids, 132, "head_tail", CLS, SEP)
    assert out == [CLS, *ids[:128], *ids[-2:], SEP]


def test_exactly_full_is_not_truncated():
    ids = list(range(1000, 1010))
    for strategy in ("head", "tail"):
        assert truncate_ids(ids, 12, strategy, CLS, SEP) == [CLS, *ids, SEP]
        assert len(truncate_ids(ids + [7], 12, strategy, CLS, SEP)) == 12


def test_tokenize_applies_truncation_with_special_tokens():
    tok = make_tokenizer()
    words = ["great"] * 5 + ["movie"] * 20 + ["bad"] * 5  # 30 words
    ds = datasets.Dataset.from_dict({"text": [" ".join(words), "good"], "label": [1, 0]})
    cls, sep = tok.cls_token_id, tok.sep_token_id
    great, movie, bad, good = tok.convert_tokens_to_ids(["great", "movie", "bad", "good"])
    head = tokenize(ds, tok, 12, "head")
    assert head.ids(0).tolist() == [cls] + [great] * 5 + [movie] * 5 + [sep]
    assert head.ids(1).tolist() == [cls, good, sep]
    assert head.lengths.tolist() == [12, 3]
    assert head.labels.tolist() == [1, 0]
    tail = tokenize(ds, tok, 12, "tail")
    assert tail.ids(0).tolist() == [cls] + [movie] * 5 + [bad] * 5 + [sep]
    long_ds = datasets.Dataset.from_dict({"text": [" ".join(["great"] * 128 + ["movie"] * 100 + ["bad"] * 2)],
                                          "label": [1]})
    head_tail = tokenize(long_ds, tok, 132, "head_tail")
    assert head_tail.ids(0).tolist() == [cls] + [great] * 128 + [bad] * 2 + [sep]


# ----------------------------------------------------------------------------- collate


def items(lengths, labels=None, weights=None):
    labels = labels or [i % 2 for i in range(len(lengths))]
    weights = weights or [0.25] * len(lengths)
    return [(np.arange(1, n + 1, dtype=np.int32) + 10, y, w) for n, y, w in zip(lengths, labels, weights)]


def test_dynamic_padding_to_the_longest_rounded_up_to_8():
    batch = Collator(pad_id=0, multiple=8, max_length=512)(items([5, 13, 9], labels=[1, 0, 1],
                                                                  weights=[0.5, 0.25, 0.0]))
    assert batch["input_ids"].shape == (3, 16)
    assert batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(dim=1).tolist() == [5, 13, 9]
    for row, n in enumerate([5, 13, 9]):
        assert batch["input_ids"][row, :n].tolist() == list(range(11, 11 + n))
        assert (batch["input_ids"][row, n:] == 0).all()
        assert batch["attention_mask"][row, :n].eq(1).all() and batch["attention_mask"][row, n:].eq(0).all()
    assert batch["labels"].tolist() == [1, 0, 1]
    assert batch["weights"].tolist() == [0.5, 0.25, 0.0]
    assert batch["weights"].dtype == torch.float32


def test_dynamic_padding_exact_multiple_and_cap():
    assert Collator(multiple=8, max_length=512)(items([16, 3]))["input_ids"].shape == (2, 16)
    assert Collator(multiple=8, max_length=512)(items([17]))["input_ids"].shape == (1, 24)
    # rounding up never goes past max_length (the model's positions may end there)
    assert Collator(multiple=8, max_length=62)(items([61, 2]))["input_ids"].shape == (2, 62)
    assert Collator(multiple=64, max_length=100)(items([70]))["input_ids"].shape == (1, 100)


def test_pad_id_is_used():
    batch = Collator(pad_id=7, multiple=8, max_length=64)(items([2, 4]))
    assert batch["input_ids"][0, 2:].eq(7).all()


def test_padding_max_length_pads_every_batch_to_max_length():
    cfg = Config(padding="max_length", max_length=64)
    batch = collator(cfg, pad_id=0)(items([5, 9]))
    assert batch["input_ids"].shape == (2, 64)
    assert batch["attention_mask"].sum().item() == 14
    assert collator(Config(), 0).multiple == 8
    assert collator(Config(compile=True), 0).multiple == 64


def test_review_dataset_feeds_the_collator():
    tok = make_tokenizer()
    ds = datasets.Dataset.from_dict({"text": ["great film", "bad bad plot was dull"], "label": [1, 0]})
    split = tokenize(ds, tok, 64, "head")
    data = ReviewDataset(split)
    batch = Collator(pad_id=0, multiple=8, max_length=64)([data[(0, 0.5)], data[(1, 0.5)]])
    assert batch["input_ids"][0, :4].tolist() == tok("great film")["input_ids"]
    assert batch["labels"].tolist() == [1, 0]
    assert batch["input_ids"].shape == (2, 8)


# ----------------------------------------------------------------------------- global batches


def lengths_of(n, seed=0):
    return np.random.default_rng(seed).integers(5, 500, size=n)


@pytest.mark.parametrize("group_by_length", [True, False])
def test_global_batches_cover_each_index_once_and_are_seeded(group_by_length):
    lengths = lengths_of(1003)
    b0 = global_batches(lengths, 16, seed=42, epoch=0, group_by_length=group_by_length)
    assert sorted(np.concatenate(b0).tolist()) == list(range(1003))
    assert [len(b) for b in b0] == [16] * 62 + [11]  # only the last one short
    again = global_batches(lengths, 16, seed=42, epoch=0, group_by_length=group_by_length)
    assert all(np.array_equal(a, b) for a, b in zip(b0, again))
    b1 = global_batches(lengths, 16, seed=42, epoch=1, group_by_length=group_by_length)
    assert sorted(np.concatenate(b1).tolist()) == list(range(1003))
    assert not np.array_equal(np.concatenate(b0), np.concatenate(b1))  # each epoch differs
    other_seed = global_batches(lengths, 16, seed=43, epoch=0, group_by_length=group_by_length)
    assert not np.array_equal(np.concatenate(b0), np.concatenate(other_seed))


def padded_tokens(batches, lengths):
    return sum(len(b) * int(lengths[b].max()) for b in batches)


def test_group_by_length_cuts_padding_and_still_shuffles():
    lengths = lengths_of(2000)
    grouped = global_batches(lengths, 8, seed=42, epoch=0, group_by_length=True)
    random = global_batches(lengths, 8, seed=42, epoch=0, group_by_length=False)
    real = int(lengths.sum())
    waste_grouped = padded_tokens(grouped, lengths) / real - 1
    waste_random = padded_tokens(random, lengths) / real - 1
    assert waste_grouped < 0.05 < 0.3 < waste_random
    # not simply sorted: the batch order is random (the first batches are not the longest ones)
    maxima = [int(lengths[b].max()) for b in grouped]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


def test_short_last_batch_is_last_with_grouping():
    lengths = lengths_of(1001)
    for epoch in range(5):
        batches = global_batches(lengths, 8, seed=1, epoch=epoch, group_by_length=True)
        assert len(batches[-1]) == 1001 % 8
        assert all(len(b) == 8 for b in batches[:-1])


def test_no_shuffle_keeps_the_data_order():
    lengths = lengths_of(20)
    batches = global_batches(lengths, 8, seed=42, epoch=3, shuffle=False, group_by_length=False)
    assert [b.tolist() for b in batches] == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


# ----------------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("batch_len, world, accum", [(16, 1, 1), (16, 1, 2), (16, 2, 2), (12, 2, 4),
                                                     (3, 2, 2), (1, 2, 2), (5, 1, 4), (7, 3, 1)])
def test_micro_batch_weights_sum_to_one_over_the_global_batch(batch_len, world, accum):
    batch = np.arange(100, 100 + batch_len)
    seen, total_weight = [], 0.0
    for rank in range(world):
        mbs = micro_batches(batch, world, accum, rank)
        assert len(mbs) == accum  # every rank runs the same number of forward/backward passes
        for mb in mbs:
            assert len(mb) >= 1
            for index, weight in mb:
                total_weight += weight
                if weight > 0:
                    assert weight == pytest.approx(1 / batch_len)
                    seen.append(index)
                else:
                    assert index in batch  # a weight-0 stand-in is a real example
    assert total_weight == pytest.approx(1.0)
    assert sorted(seen) == batch.tolist()  # each real example counted exactly once


def test_empty_slots_get_weight_zero_stand_ins():
    batch = np.array([5, 6, 7])
    # 4 slots (2 ranks x 2 micro-steps) for 3 examples: slot 3 = micro-step 1 of rank 1 is empty
    assert micro_batches(batch, 2, 2, 0) == [[(5, 1 / 3)], [(7, 1 / 3)]]
    assert micro_batches(batch, 2, 2, 1) == [[(6, 1 / 3)], [(5, 0.0)]]


def test_micro_batches_split_into_contiguous_chunks():
    batch = np.arange(16)
    assert [i for i, _ in micro_batches(batch, 1, 2, 0)[0]] == list(range(8))
    assert [i for i, _ in micro_batches(batch, 1, 2, 0)[1]] == list(range(8, 16))


@pytest.mark.parametrize("n, batch_size, world", [(10, 4, 1), (10, 4, 2), (33, 8, 3), (2, 8, 4)])
def test_eval_batches_cover_each_index_once_across_ranks(n, batch_size, world):
    lengths = lengths_of(n)
    got = [i for rank in range(world) for b in eval_batches(lengths, batch_size, world, rank) for i, w in b]
    assert sorted(got) == list(range(n))
    for rank in range(world):
        for b in eval_batches(lengths, batch_size, world, rank):
            assert 1 <= len(b) <= batch_size
            assert all(w == 1.0 for _, w in b)


# ----------------------------------------------------------------------------- reading


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".jsonl"])
def test_read_local_files(tmp_path, suffix):
    train = write_rows(tmp_path / f"train{suffix}", ROWS)
    test = write_rows(tmp_path / f"other_test{suffix}", ROWS[:4])
    cfg = Config(train_file=str(train), test_file=str(test))
    ds = read_split(cfg, "train")
    assert ds["text"] == [r["text"] for r in ROWS]
    assert ds["label"] == [r["label"] for r in ROWS]
    assert len(read_split(cfg, "test")) == 4
    # the same files found by name in a data_dir
    write_rows(tmp_path / f"test{suffix}", ROWS[:3])
    cfg = Config(data_dir=str(tmp_path))
    assert read_split(cfg, "train")["text"] == [r["text"] for r in ROWS]
    assert len(read_split(cfg, "test")) == 3


def test_string_labels_are_mapped(tmp_path):
    rows = [{"text": r["text"], "label": "pos" if r["label"] else "neg"} for r in ROWS]
    ds = read_split(Config(train_file=str(write_rows(tmp_path / "t.csv", rows))), "train")
    assert ds["label"] == [r["label"] for r in ROWS]


# ----------------------------------------------------------------------------- data_dir


def test_data_dir_with_two_files_for_a_split_is_refused(tmp_path):
    write_rows(tmp_path / "train.csv", ROWS)
    write_rows(tmp_path / "train.parquet", ROWS)
    write_rows(tmp_path / "test.jsonl", ROWS)
    write_rows(tmp_path / "test.json", ROWS)
    cfg = Config(data_dir=str(tmp_path))
    with pytest.raises(DataError, match=rf"^data_dir {tmp_path} holds both train\.parquet and train\.csv for the "
                                        r"train split; keep one \(move the other away\)$"):
        read_split(cfg, "train")
    with pytest.raises(DataError, match=r"holds both test\.jsonl and test\.json for the test split"):
        read_split(cfg, "test")
    write_rows(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"holds train\.parquet, train\.csv and train\.jsonl for the train split; "
                                        r"keep one \(move the others away\)$"):
        read_split(cfg, "train")


def test_data_dir_with_acl_imdb_and_a_file_is_refused(tmp_path):
    (tmp_path / "train" / "pos").mkdir(parents=True)
    (tmp_path / "train" / "pos" / "0_9.txt").write_text("great")
    write_rows(tmp_path / "train.jsonl", ROWS)
    with pytest.raises(DataError, match=r"holds both train/pos/ \(aclImdb\) and train\.jsonl for the train"):
        read_split(Config(data_dir=str(tmp_path)), "train")


def test_empty_acl_imdb_review_names_its_file(tmp_path):
    for label in ("pos", "neg"):
        (tmp_path / "train" / label).mkdir(parents=True)
        (tmp_path / "train" / label / "0_5.txt").write_text("fine")
    (tmp_path / "train" / "neg" / "1_2.txt").write_text("  \n")
    with pytest.raises(DataError, match=r"train/neg/1_2\.txt is empty; fill it in or move it out of the folder"):
        read_split(Config(data_dir=str(tmp_path)), "train")


def test_extra_columns_are_dropped(tmp_path):
    rows = [{**r, "id": i} for i, r in enumerate(ROWS)]
    ds = read_split(Config(train_file=str(write_rows(tmp_path / "t.jsonl", rows))), "train")
    assert sorted(ds.column_names) == ["label", "text"]


def test_read_acl_imdb_folder(tmp_path):
    for split, n in (("train", 3), ("test", 2)):
        for label in ("pos", "neg"):
            folder = tmp_path / "aclImdb" / split / label
            folder.mkdir(parents=True)
            for i in range(n):
                (folder / f"{i}_{7 if label == 'pos' else 2}.txt").write_text(f"{label} review {i} <br /> é")
    (tmp_path / "aclImdb" / "train" / "unsup").mkdir()  # the real folder has unlabeled reviews: ignored
    (tmp_path / "aclImdb" / "train" / "unsup" / "0_0.txt").write_text("no label")
    cfg = Config(data_dir=str(tmp_path / "aclImdb"))
    train = read_split(cfg, "train")
    assert len(train) == 6
    assert sorted(zip(train["label"], train["text"])) == sorted(
        [(1, f"pos review {i} <br /> é") for i in range(3)] + [(0, f"neg review {i} <br /> é") for i in range(3)])
    assert sorted(read_split(cfg, "test")["label"]) == [0, 0, 1, 1]


# ----------------------------------------------------------------------------- subsets and splits


def test_take_is_the_tutorials_subset():
    rows = make_reviews(50, seed=3)
    ds = datasets.Dataset.from_list(rows)
    expected = ds.shuffle(seed=42).select(range(20))
    got = take(ds, 20, 42, "n_train")
    assert got["text"] == expected["text"] and got["label"] == expected["label"]
    assert take(ds, 0, 42, "n_train")["text"] == ds["text"]  # 0 = all, in file order
    assert take(ds, 20, 43, "n_train")["text"] != got["text"]
    with pytest.raises(DataError, match="n_train 51 is larger than the 50"):
        take(ds, 51, 42, "n_train")


def test_load_splits_selects_the_tutorials_reviews(tmp_path):
    """Through the whole pipeline: n_train/n_test reviews are ds.shuffle(seed=42).select(range(n))."""
    train_rows, test_rows = make_reviews(40, seed=5), make_reviews(30, seed=6)
    write_rows(tmp_path / "train.jsonl", train_rows)
    write_rows(tmp_path / "test.jsonl", test_rows)
    cfg = Config(data_dir=str(tmp_path), n_train=16, n_test=10, max_length=64)
    splits = load_splits(cfg, make_tokenizer())
    expected_train = datasets.Dataset.from_list(train_rows).shuffle(seed=42).select(range(16))
    expected_test = datasets.Dataset.from_list(test_rows).shuffle(seed=42).select(range(10))
    assert splits.train.texts == expected_train["text"]
    assert splits.train.labels.tolist() == expected_train["label"]
    assert splits.test.texts == expected_test["text"]
    assert splits.val is None


def test_load_splits_with_validation_fraction(tmp_path):
    write_rows(tmp_path / "train.jsonl", make_reviews(40, seed=5))
    write_rows(tmp_path / "test.jsonl", make_reviews(10, seed=6))
    cfg = Config(data_dir=str(tmp_path), n_train=0, n_test=0, val_fraction=0.25, max_length=64)
    splits = load_splits(cfg, make_tokenizer())
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 10)
    assert not set(splits.train.texts) & set(splits.val.texts)
    assert splits.val.labels.sum() == 5  # balanced, as the 40 are


def test_stratified_split_keeps_balance_and_is_seeded():
    labels = np.array([1] * 300 + [0] * 100)  # 75% positive
    train_idx, val_idx = stratified_split(labels, 0.1, seed=42)
    assert len(val_idx) == 40 and len(train_idx) == 360
    assert sorted(np.concatenate([train_idx, val_idx]).tolist()) == list(range(400))
    assert labels[val_idx].mean() == pytest.approx(0.75)
    assert labels[train_idx].mean() == pytest.approx(0.75)
    again_train, again_val = stratified_split(labels, 0.1, seed=42)
    assert np.array_equal(val_idx, again_val) and np.array_equal(train_idx, again_train)
    _, other_val = stratified_split(labels, 0.1, seed=7)
    assert not np.array_equal(val_idx, other_val)


def test_stratified_split_refuses_a_too_small_split():
    with pytest.raises(DataError, match="too few"):
        stratified_split(np.array([0, 1, 0, 1, 0]), 0.1, seed=0)


def test_stratified_split_refuses_a_class_of_one():
    with pytest.raises(DataError, match=r"^val_fraction=0\.2: a stratified split needs at least 2 reviews of each "
                                        r"class, got neg: 1, pos: 9; raise --n_train or set --val_fraction 0$"):
        stratified_split(np.array([1] * 9 + [0]), 0.2, seed=0, names=("neg", "pos"))


def test_load_splits_refuses_a_single_class_training_set(tmp_path):
    write_rows(tmp_path / "train.jsonl", [r for r in make_reviews(40, seed=5) if r["label"] == 1])
    write_rows(tmp_path / "test.jsonl", make_reviews(10, seed=6))
    cfg = Config(data_dir=str(tmp_path), n_train=12, n_test=0, max_length=64)
    with pytest.raises(DataError, match=r"^training data has only one class \(neg: 0, pos: 12\)"):
        load_splits(cfg, make_tokenizer())
