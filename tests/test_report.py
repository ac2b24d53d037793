"""Figures, report.md and TensorBoard scalars of a finished tiny run (one run shared by the tests here)."""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import pytest
from conftest import load_script, read_metrics

from sentiment import cli
from sentiment import report as report_module
from sentiment.config import Config
from sentiment.errors import ConfigError
from sentiment.report import FIGURES, misclassified, plot_run, write_report
from sentiment.train import train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def finished_run(tiny_dirs, tmp_path_factory):
    """A 2-epoch tiny run with a validation split and TensorBoard on (~5 s)."""
    model_dir, data_dir = tiny_dirs
    out = tmp_path_factory.mktemp("report") / "run"
    train(Config(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0, max_length=64,
                 epochs=2, micro_batch_size=8, lr=3e-3, warmup_ratio=0.2, val_fraction=0.25, device="cpu",
                 precision="fp32", output_dir=str(out), log_every=0, report_to="tensorboard"))
    return out


def test_plot_script_writes_readable_pngs(finished_run, capsys):
    image = pytest.importorskip("matplotlib.image")
    assert load_script("plot_run").main([str(finished_run)]) == 0
    printed = capsys.readouterr().out.split()
    assert sorted(p.rsplit("/", 1)[1] for p in printed) == sorted(FIGURES)  # val and results exist: every figure
    for name in FIGURES:
        path = finished_run / "plots" / name
        data = path.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000, name
        pixels = image.imread(path)  # (H, W, 4) floats in [0, 1]
        assert pixels.shape[0] > 200 and pixels.shape[1] > 300 and pixels.shape[2] in (3, 4), name
        assert pixels[..., :3].std() > 0.05, f"{name} is blank"


def test_report_md_has_every_section(finished_run):
    text = (finished_run / "report.md").read_text()  # written by train() itself
    for heading in ("## Final metrics", "## Engine decisions", "## Figures", "## Misclassified test reviews",
                    "## Config"):
        assert heading in text, heading
    results = json.loads((finished_run / "results.json").read_text())
    assert f"{results['test']['accuracy']:.4f}" in text
    for decision in results["engine"]:
        assert f"- {decision}" in text
    if importlib.util.find_spec("matplotlib"):
        for name in FIGURES:
            assert f"](plots/{name})" in text, name
    assert json.loads(text.split("```json\n")[1].split("```")[0])["lr"] == 3e-3
    # the final model's test mistakes: as many as it made, at most 5
    wrong = round((1 - results["test"]["accuracy"]) * results["test"]["n"])
    assert text.count("P(pos) = ") == min(wrong, 5)


def test_report_and_plot_without_matplotlib(finished_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    for name in ("metrics.jsonl", "results.json", "config.json"):
        shutil.copy(finished_run / name, run / name)
    real = importlib.util.find_spec
    monkeypatch.setattr(report_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    with pytest.raises(ConfigError, match="pip install matplotlib"):
        plot_run(run)
    text = write_report(run, [{"text": "Dull <b>and</b> | long.", "label": 1, "p_pos": 0.03}]).read_text()
    assert "pip install matplotlib" in text and "![" not in text
    assert "true **pos**, P(pos) = 0.030" in text
    assert "&lt;b&gt;" in text and "\\|" in text  # review text cannot inject HTML or break a table
    assert not (run / "plots").exists()


def test_plot_of_a_folder_without_metrics_fails_clearly(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_misclassified_picks_the_most_confident_mistakes():
    labels = np.array([0, 1, 1, 0, 1, 0])
    p_pos = np.array([0.9, 0.45, 0.8, 0.2, 0.01, 0.51])  # wrong: 0 (0.9), 1 (0.45), 4 (0.01), 5 (0.51)
    texts = [f"review {i} " + "word " * 100 for i in range(6)]
    texts[4] = "line one<br />line two"
    got = misclassified(texts, labels, np.stack([1 - p_pos, p_pos], axis=1), k=3)
    assert [g["p_pos"] for g in got] == pytest.approx([0.01, 0.9, 0.45])
    assert [g["label"] for g in got] == [1, 0, 1]
    assert got[0]["text"] == "line one line two"
    assert len(got[1]["text"]) <= report_module.TEXT_CHARS + 2 and got[1]["text"].endswith("…")


def test_tensorboard_scalars_read_back(finished_run):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert list((finished_run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(finished_run / "tensorboard"))
    events.Reload()
    train_rows, eval_rows = read_metrics(finished_run)
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == [r["step"] for r in train_rows]
    assert [e.value for e in loss] == pytest.approx([r["loss"] for r in train_rows], rel=1e-6)
    accuracy = events.Scalars("val/accuracy")
    assert [e.value for e in accuracy] == pytest.approx([r["accuracy"] for r in eval_rows if r["split"] == "val"])
    assert {"train/lr", "train/grad_norm", "train/tokens_per_s"} <= set(events.Tags()["scalars"])
