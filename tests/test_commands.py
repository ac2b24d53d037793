"""`sentiment evaluate` / `sentiment predict` and the Python API on a trained tiny model: scoring files,
stdout for results only, run folders, the settings recorded with the model, and no untrained heads."""

import csv
import io
import json
import logging
from pathlib import Path

import pandas as pd
import pytest

import sentiment
from sentiment.cli import main
from sentiment.config import Config
from sentiment.errors import ModelError
from sentiment.tiny import make_model, make_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REVIEWS = ["great excellent wonderful movie", "awful boring terrible film", "superb moving acting",
           "dull weak worst plot", "loved it brilliant", "hated the bad ending"]


@pytest.fixture(scope="module")
def run(tiny_dirs, tmp_path_factory) -> Path:
    """A finished tiny run trained at max_length 64 (the tiny model has 128 positions; the default is 512)."""
    model_dir, data_dir = tiny_dirs
    out = tmp_path_factory.mktemp("commands") / "run"
    results = sentiment.train(Config(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0,
                                     max_length=64, epochs=6, lr=3e-3, dropout=0.0, device="cpu", precision="fp32",
                                     output_dir=str(out), log_every=0))
    assert results["model_dir"] == str(out / "model")  # train says where the model is
    return out


def predict_args(run: Path, *args: str) -> list[str]:
    return ["predict", "--model_name_or_path", str(run), "--device", "cpu", "--precision", "fp32", *args]


def test_predict_file_round_trip_keeps_the_input_order(run, tmp_path, capsys):
    pd.DataFrame({"id": range(len(REVIEWS)), "text": REVIEWS}).to_csv(tmp_path / "reviews.csv", index=False)
    assert main(predict_args(run, "--input", str(tmp_path / "reviews.csv"), "--output", str(tmp_path / "p.jsonl"))) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # results went to the file; messages to stderr
    assert "6 predictions written to" in captured.err
    rows = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [r["label"] for r in rows] == ["pos", "neg", "pos", "neg", "pos", "neg"]
    assert all(abs(r["prob_neg"] + r["prob_pos"] - 1) < 1e-6 for r in rows)
    assert rows == sentiment.predict(Config(model_name_or_path=str(run), device="cpu", precision="fp32"), REVIEWS)


def test_predict_reads_text_lines_and_stdin_and_writes_csv(run, tmp_path, monkeypatch, capsys):
    (tmp_path / "reviews.txt").write_text("\n".join(REVIEWS[:2]) + "\n\n")  # blank lines are not reviews
    assert main(predict_args(run, "--input", str(tmp_path / "reviews.txt"), "--output", str(tmp_path / "p.csv"))) == 0
    with open(tmp_path / "p.csv") as f:
        table = list(csv.DictReader(f))
    assert [row["label"] for row in table] == ["pos", "neg"] and set(table[0]) == {"label", "prob_neg", "prob_pos"}
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(REVIEWS[2:4])))
    capsys.readouterr()
    assert main(predict_args(run, "--input", "-")) == 0
    lines = capsys.readouterr().out.splitlines()  # stdout: a TSV line per review, nothing else
    assert [line.split("\t")[0] for line in lines] == ["pos", "neg"]
    assert [line.split("\t")[2] for line in lines] == REVIEWS[2:4]


def test_an_existing_output_is_kept_unless_overwrite(run, tmp_path, capsys):
    target = tmp_path / "p.jsonl"
    target.write_text("someone's results\n")
    assert main(predict_args(run, "fine", "--output", str(target))) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: {target} exists; pass another --output, or "
                                                        "--overwrite true to replace it")
    assert target.read_text() == "someone's results\n"
    assert main(predict_args(run, "fine", "--output", str(target), "--overwrite", "true")) == 0
    assert json.loads(target.read_text())["label"] in ("pos", "neg")


def test_a_missing_text_in_the_input_is_an_error(run, tmp_path, capsys):
    pd.DataFrame({"text": ["good", None, "bad"]}).to_parquet(tmp_path / "r.parquet")
    assert main(predict_args(run, "--input", str(tmp_path / "r.parquet"))) == 2
    assert capsys.readouterr().err.splitlines()[-1] == "error: text 2 of 3 is empty; remove it or give it a review"


def test_the_model_folder_and_the_run_folder_both_work(run, capsys):
    outputs = []
    for model in (run, run / "model"):
        assert main(["predict", REVIEWS[0], "--model_name_or_path", str(model), "--device", "cpu"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("pos\t")


def test_an_unfinished_run_folder_says_so(run, tmp_path, capsys):
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / ".sentiment-run.json").write_text(json.dumps({"run_id": "x", "program": "sentiment"}))
    assert main(["predict", "fine", "--model_name_or_path", str(unfinished)]) == 2
    assert "is a run that has saved no model yet" in capsys.readouterr().err


def test_the_recorded_max_length_is_used_unless_another_is_given(run, capsys):
    recorded = json.loads((run / "model" / "sentiment_config.json").read_text())
    assert (recorded["max_length"], recorded["truncation"]) == (64, "head")
    # the default 512 exceeds the tiny model's 128 positions: it runs only because 64 was recorded
    assert main(["predict", " ".join(["great"] * 300), "--model_name_or_path", str(run), "--device", "cpu"]) == 0
    assert "settings: max_length=64 (recorded in" in capsys.readouterr().err
    assert main(["predict", "fine", "--model_name_or_path", str(run), "--max_length", "32", "--device", "cpu"]) == 0
    assert "settings:" not in capsys.readouterr().err  # given on the command line: used as given


def test_an_untrained_head_is_refused(tmp_path):
    from transformers import BertModel

    encoder = tmp_path / "encoder"
    BertModel(make_model().config).save_pretrained(encoder)  # an encoder without a classification head
    make_tokenizer().save_pretrained(encoder)
    with pytest.raises(ModelError, match="has no trained classification head"):
        sentiment.predict(Config(model_name_or_path=str(encoder), max_length=64, device="cpu"), ["fine"])


def test_evaluate_writes_its_metrics_file(run, tiny_dirs, tmp_path, capsys):
    output = tmp_path / "eval.json"
    assert main(["evaluate", "--model_name_or_path", str(run), "--data_dir", str(tiny_dirs[1]), "--n_test", "0",
                 "--device", "cpu", "--precision", "fp32", "--output", str(output)]) == 0
    printed = capsys.readouterr().out
    assert json.loads(printed) == json.loads(output.read_text())
    results = json.loads((run / "results.json").read_text())
    assert json.loads(printed)["confusion_matrix"] == results["confusion_matrix"]


def test_python_api_is_the_cli(run, tiny_dirs):
    cfg = Config(model_name_or_path=str(run), data_dir=str(tiny_dirs[1]), n_test=0, device="cpu", precision="fp32")
    metrics = sentiment.evaluate(cfg)
    assert metrics["accuracy"] == json.loads((run / "results.json").read_text())["accuracy"]
    assert sentiment.__all__ == ["Config", "train", "evaluate", "predict"]


def test_a_notebook_can_quiet_the_run(tiny_config, capsys):
    logger = logging.getLogger("sentiment")
    logger.setLevel(logging.WARNING)
    try:
        sentiment.train(tiny_config(epochs=1, log_every=1))
    finally:
        logger.setLevel(logging.INFO)
    assert capsys.readouterr().out == ""
