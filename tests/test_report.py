"""Figures, report.md and TensorBoard scalars of a finished tiny run (one run shared by the tests here)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import read_metrics

from sentiment import cli, rundir
from sentiment import figures as figures_module
from sentiment import report as report_module
from sentiment.config import Config
from sentiment.errors import ConfigError
from sentiment.figures import FIGURES, best_eval, epoch_ends, plot_run, read_run
from sentiment.report import misclassified, read_misclassified, redraw, write_report
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


@pytest.fixture(scope="module")
def run_without_val(tiny_dirs, tmp_path_factory):
    """A 1-epoch tiny run without a validation split: one evaluation, on test, at its last step (~3 s)."""
    model_dir, data_dir = tiny_dirs
    out = tmp_path_factory.mktemp("report") / "noval"
    train(Config(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0, max_length=64,
                 epochs=1, micro_batch_size=8, lr=3e-3, device="cpu", precision="fp32", output_dir=str(out),
                 log_every=0))
    return out


def copy_run(run: Path, dest: Path, names=("metrics.jsonl", "results.json", "config.json", "report.md")) -> Path:
    names = (rundir.MARKER, *names)  # a run folder: plot writes into no other
    dest.mkdir()
    for name in names:
        shutil.copy(run / name, dest / name)
    return dest


def test_plot_command_writes_readable_pngs(finished_run, capsys):
    image = pytest.importorskip("matplotlib.image")
    assert cli.main(["plot", str(finished_run)]) == 0
    printed = capsys.readouterr().out.split()
    pngs = sorted(p.rsplit("/", 1)[1] for p in printed if p.endswith(".png"))  # redraw adds report.md
    assert pngs == sorted(FIGURES)  # val and results exist: every figure
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
    assert text.count(" (P = ") == min(wrong, 5)


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
    text = write_report(run, [{"text": "Dull <b>and</b> | long.", "label": "pos", "predicted": "neg", "p": 0.97}
                              ]).read_text()
    assert "pip install matplotlib" in text and "![" not in text
    assert "true **pos**, predicted **neg** (P = 0.970)" in text
    assert "&lt;b&gt;" in text and "\\|" in text  # review text cannot inject HTML or break a table
    assert not (run / "plots").exists()


def test_plot_of_a_folder_without_metrics_fails_clearly(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "is not a run folder" in capsys.readouterr().err
    rundir.mark(tmp_path, "abc", "train")
    assert cli.main(["plot", str(tmp_path)]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_misclassified_picks_the_most_confident_mistakes():
    labels = np.array([0, 1, 1, 0, 1, 0])
    p_pos = np.array([0.9, 0.45, 0.8, 0.2, 0.01, 0.51])  # wrong: 0 (0.9), 1 (0.45), 4 (0.01), 5 (0.51)
    texts = [f"review {i} " + "word " * 100 for i in range(6)]
    texts[4] = "line one<br />line two"
    got = misclassified(texts, labels, np.stack([1 - p_pos, p_pos], axis=1), ("neg", "pos"), k=3)
    assert [g["p"] for g in got] == pytest.approx([0.99, 0.9, 0.55])  # the probability of the wrong answer
    assert [(g["label"], g["predicted"]) for g in got] == [("pos", "neg"), ("neg", "pos"), ("pos", "neg")]
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
    results = json.loads((finished_run / "results.json").read_text())
    for name in ("accuracy", "f1", "loss"):  # the final test metrics, written with the config as hparams
        assert [e.value for e in events.Scalars(f"test/{name}")] == pytest.approx([results[name]])
    assert "config/text_summary" in events.Tags()["tensors"]


# ----------------------------------------------------------------------------- the figures' axes


def drawn(fig):
    fig.draw_without_rendering()  # lays out ticks and labels as savefig would
    return fig.axes[0]


def tick_labels(ax, axis: str) -> list[str]:
    """The tick labels a reader sees on `axis`: major and minor, non-empty, within the limits."""
    lo, hi = sorted(getattr(ax, f"get_{axis}lim")())
    ticks = getattr(ax, f"{axis}axis").get_major_ticks() + getattr(ax, f"{axis}axis").get_minor_ticks()
    return [t.label1.get_text() for t in ticks
            if t.label1.get_visible() and t.label1.get_text() and lo <= t.get_loc() <= hi]


def eval_row(step: int, accuracy: float, split: str = "val") -> dict:
    return {"step": step, "epoch": 1, "split": split, "accuracy": accuracy, "f1": accuracy - 0.1, "loss": 0.5}


def test_one_evaluation_sits_inside_an_integer_step_axis():
    pytest.importorskip("matplotlib")
    ax = drawn(figures_module._accuracy_figure([eval_row(34, 0.8)], None, last=34))  # the 1-epoch run
    lo, hi = ax.get_xlim()
    assert lo <= 33 and hi >= 35  # padding on both sides of the point
    ticks = [t for t in ax.get_xticks() if lo <= t <= hi]
    assert len(ticks) >= 3 and all(float(t).is_integer() for t in ticks), ticks
    accuracy_line = next(line for line in ax.get_lines() if line.get_label() == "val accuracy")
    assert accuracy_line.get_marker() == "o"


def test_accuracy_figure_marks_the_selected_step_only_with_validation():
    pytest.importorskip("matplotlib")
    rows = [eval_row(10, 0.7), eval_row(20, 0.9), eval_row(30, 0.9), eval_row(40, 0.8)]
    assert best_eval(rows)["step"] == 20  # a later tie is no better: train.py kept step 20's checkpoint
    ax = drawn(figures_module._accuracy_figure(rows, None, last=40))
    selected = [line for line in ax.get_lines() if "selected" in str(line.get_label())]
    assert len(selected) == 1 and list(selected[0].get_xdata()) == [20, 20]
    assert "step 20" in selected[0].get_label()
    test_rows = [eval_row(10, 0.7, "test"), eval_row(20, 0.9, "test")]
    assert best_eval(test_rows) is None  # no validation split: the final model, nothing selected
    ax = drawn(figures_module._accuracy_figure(test_rows, None, last=20))
    assert not [line for line in ax.get_lines() if "selected" in str(line.get_label())]


def test_loss_figure_draws_a_line_at_each_epoch_end():
    pytest.importorskip("matplotlib")
    rows = [{"step": s, "epoch": e, "loss": 0.7} for s, e in [(1, 1), (2, 1), (3, 2), (4, 2), (5, 3), (6, 3)]]
    assert epoch_ends(rows) == [2, 4]  # the last epoch's end is the run's end, no boundary
    ax = drawn(figures_module._loss_figure(np.array([r["step"] for r in rows]), rows, [], last=6))
    boundaries = [line.get_xdata()[0] for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert boundaries == [2, 4]
    assert [line.get_label() for line in ax.get_lines()].count("epoch end") == 1  # one legend entry


@pytest.mark.parametrize("norms", [[0.04, 0.3, 3.5, 0.2], [0.25, 0.3, 0.49, 0.4], [0.05, 0.3, 30.0, 2.0]])
def test_grad_norm_axis_has_readable_ticks(norms):
    pytest.importorskip("matplotlib")
    rows = [{"step": i + 1, "epoch": 1, "grad_norm": n, "clipped": n > 1} for i, n in enumerate(norms)]
    ax = drawn(figures_module._grad_norm_figure(np.arange(1, len(rows) + 1), rows, 1.0, last=len(rows)))
    labels = tick_labels(ax, "y")
    assert len(labels) >= 3, labels  # a log axis over 0.04..3.5 used to label only 10^-1 and 10^0
    assert not any("$" in label for label in labels)  # plain numbers, not 3x10^-1 mathtext


# ----------------------------------------------------------------------------- report.md: wording and redraw


def final_metrics(run: Path) -> str:
    return (run / "report.md").read_text().split("## Final metrics")[1].split("## Engine decisions")[0]


def test_report_names_the_selected_model(finished_run):
    _, eval_rows, _, _ = read_run(finished_run)
    val = [r for r in eval_rows if r["split"] == "val"]
    best = next(r for r in val if r["accuracy"] == max(v["accuracy"] for v in val))  # the first of the best
    text = final_metrics(finished_run)
    assert f"with the selected model (best val accuracy, step {best['step']}):" in text
    assert f"(step {best['step']}), val: accuracy {best['accuracy']:.4f}" in text
    assert text.count("(selected)") == 1 and "final model" not in text


def test_report_without_validation_names_the_final_model(run_without_val):
    text = final_metrics(run_without_val)
    assert "with the final model:" in text
    assert "selected" not in text and "best val" not in text
    assert "of the final model" in (run_without_val / "report.md").read_text()


def test_redraw_rewrites_report_md_and_keeps_the_misclassified_reviews(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = copy_run(finished_run, tmp_path / "run")
    old = (run / "report.md").read_text()
    (run / "report.md").write_text(old.replace("with the selected model", "with the best model by val").replace(
        "(selected)", ""))  # as an older version wrote it
    kept = read_misclassified(run / "report.md")
    assert kept == read_misclassified(finished_run / "report.md") and kept  # the tiny run makes mistakes
    written = redraw(run)
    assert written[-1] == run / "report.md" and sorted(p.name for p in written[:-1]) == sorted(FIGURES)
    new = (run / "report.md").read_text()
    assert "best model by val" not in new and "with the selected model (best val accuracy, step" in new
    assert read_misclassified(run / "report.md") == kept
    section = lambda text: text.split(report_module.MISCLASSIFIED)[1].split("## Config")[0]  # noqa: E731
    assert section(new).replace(str(run), "") == section(old).replace(str(finished_run), "")


def test_redraw_of_a_run_in_progress_draws_figures_only(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = copy_run(finished_run, tmp_path / "run", names=("metrics.jsonl", "config.json"))
    written = redraw(run)
    assert written and all(p.suffix == ".png" for p in written)
    assert not (run / "report.md").exists()  # train.py writes it when the run finishes


def test_redraw_without_a_report_says_the_reviews_are_not_known(finished_run, tmp_path):
    pytest.importorskip("matplotlib")
    run = copy_run(finished_run, tmp_path / "run", names=("metrics.jsonl", "results.json", "config.json"))
    redraw(run)
    text = (run / "report.md").read_text()
    assert "Not known" in text and "None: every test review" not in text and " (P = " not in text
    assert read_misclassified(run / "report.md") is None  # and a second redraw keeps saying so


def test_misclassified_reviews_read_back_as_written(finished_run, tmp_path, monkeypatch):
    run = copy_run(finished_run, tmp_path / "run", names=("metrics.jsonl", "results.json", "config.json"))
    real = importlib.util.find_spec  # no figures: this is about the text
    monkeypatch.setattr(report_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))
    items = [{"text": 'Dull <b>and</b> | long & "odd" a\\|b …', "label": "pos", "predicted": "neg", "p": 0.969},
             {"text": "Great fun.", "label": "very | <bad>", "predicted": "pos", "p": 0.988}]  # any class name
    for given in (items, []):
        write_report(run, given)
        assert read_misclassified(run / "report.md") == given
