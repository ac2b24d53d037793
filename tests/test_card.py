"""The model card (sentiment.card): loads back with huggingface_hub, holds the metadata and the run's own
figures, and says what was selected and where the data came from."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sentiment.card import model_card
from sentiment.config import Config
from sentiment.train import train

REPO = Path(__file__).resolve().parents[1]
NUMBER = re.compile(r"(?<![\w.])\d+(?:\.\d+)?(?:e[-+]?\d+)?")  # 42, 0.5000, 1e-08; not the 1 of F1


@pytest.fixture(scope="module")
def tiny_run(tiny_dirs, tmp_path_factory):
    """(config dict, results) of a 2-epoch tiny run with a validation split (~5 s)."""
    model_dir, data_dir = tiny_dirs
    cfg = Config(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0, max_length=64,
                 epochs=2, micro_batch_size=8, lr=3e-3, val_fraction=0.25, device="cpu", precision="fp32",
                 output_dir=str(tmp_path_factory.mktemp("card") / "run"), log_every=0)
    return cfg.to_dict(), train(cfg)


def load(text: str, tmp_path):
    from huggingface_hub import ModelCard

    (tmp_path / "README.md").write_text(text)
    return ModelCard.load(tmp_path / "README.md")


def without_val(cfg: dict, results: dict) -> tuple[dict, dict]:
    """The same run as if it had had no validation split (what train.py records then)."""
    return {**cfg, "val_fraction": 0.0}, {**results, "best_val_accuracy": None}


def test_card_loads_back_with_its_metadata_and_metrics(tiny_run, tmp_path):
    cfg, results = tiny_run
    card = load(model_card(cfg, results, cfg["model_name_or_path"]), tmp_path)
    data = card.data
    assert (data.license, data.language, data.library_name, data.pipeline_tag) == (
        "unknown", "en", "transformers", "text-classification")
    assert data.base_model is None  # a local folder is no hub id
    assert data.datasets is None  # local files are not claimed to be the hub's IMDb
    assert {"accuracy", "f1"} <= set(data.metrics)
    values = {r.metric_type: r.metric_value for r in data.eval_results}
    assert values == {m: results["test"][m] for m in ("accuracy", "f1", "precision", "recall")}
    assert {r.dataset_split for r in data.eval_results} == {"test"}


def test_card_figures_are_the_runs_own(tiny_run, tmp_path):
    cfg, results = tiny_run
    text = load(model_card(cfg, results, cfg["model_name_or_path"]), tmp_path).text
    t = results["test"]
    row = (f"| {t['accuracy']:.4f} | {t['macro_f1']:.4f} | {t['f1']:.4f} | {t['precision']:.4f} | {t['recall']:.4f} "
           f"| {t['loss']:.4f} |")
    assert "| accuracy | macro-F1 | F1 (pos) | precision | recall | loss |" in text and row in text
    for name, m in t["per_class"].items():  # each class with its support: an imbalance shows
        assert f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |" in text
    assert f"best validation accuracy {results['best_val_accuracy']:.4f}" in text
    assert f"| batch | 8 reviews = micro 8 x accum 1 x world {results['environment']['world_size']} |" in text
    assert f"| optimizer steps | {results['steps']} |" in text
    assert "| precision | fp32" in text  # the engine's decision
    # every number in the card is one the run recorded: in config, in results, or the batch they multiply to
    known = set()
    for value in [*cfg.values(), *_leaves(results), cfg["micro_batch_size"] * cfg["grad_accum_steps"]]:
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            known |= {str(value), f"{value:g}", f"{value:.4f}", f"{value:.1f}", f"{value:.0f}"}
        elif isinstance(value, str):
            known |= set(NUMBER.findall(value))
    prose = re.sub(r"`[^`]*`", "", text)  # paths and names in backticks may hold digits of their own
    assert set(NUMBER.findall(prose)) - known <= {"0"}, "a figure the run did not record"  # 0: "decay to 0"



def _leaves(value):
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, list):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def test_card_without_validation_says_so(tiny_run, tmp_path):
    cfg, results = without_val(*tiny_run)
    text = load(model_card(cfg, results, cfg["model_name_or_path"]), tmp_path).text
    assert "- validation: none" in text
    assert "with the final model (no validation split" in text
    assert "selected model" not in text and "best validation accuracy" not in text


def test_card_names_hub_base_model_and_dataset(tiny_run, tmp_path):
    cfg, results = tiny_run
    cfg = {**cfg, "data_dir": "", "train_file": "", "test_file": "", "dataset": "imdb", "n_train": 1000}
    card = load(model_card(cfg, results, "bert-base-uncased"), tmp_path)
    assert card.data.base_model == "bert-base-uncased"
    assert card.data.datasets == ["stanfordnlp/imdb"]  # the tutorial's alias, resolved
    assert {r.dataset_type for r in card.data.eval_results} == {"stanfordnlp/imdb"}
    assert "hub dataset `stanfordnlp/imdb` (train split), 1000 reviews drawn with seed 42" in card.text
    assert 'pipeline("text-classification", model="PATH/TO/RUN/model")' in card.text
    assert "sentiment predict --model_name_or_path PATH/TO/RUN" in card.text


def test_card_names_the_data_files(tiny_run, tmp_path):
    cfg, results = tiny_run
    cfg = {**cfg, "data_dir": "", "train_file": "data/train.parquet", "test_file": "data/test.parquet"}
    card = load(model_card(cfg, results, cfg["model_name_or_path"]), tmp_path)
    assert card.data.datasets is None
    assert "- train: local file `data/train.parquet`, all its reviews" in card.text
    assert "- test: local file `data/test.parquet`" in card.text


def test_import_stays_light():
    code = "import sys, sentiment.card; print('huggingface_hub' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    assert out.stdout.strip() == "False"

