"""Long jobs: max_steps drives the schedule, evaluation every N steps, early stopping, keep_last 0, and the
elapsed/ETA clock of the step line. The tiny model has 96 training reviews: 12 steps per epoch at batch 8."""

import json
from pathlib import Path

import pytest

from sentiment import checkpoint as ckpt
from sentiment.errors import ConfigError
from sentiment.loop import lr_at
from sentiment.runlog import hms
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def rows(out: Path) -> tuple[list[dict], list[dict]]:
    """(step rows, eval rows) of metrics.jsonl."""
    parsed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in parsed if "split" not in r], [r for r in parsed if "split" in r]


def test_max_steps_shorter_than_the_epochs_sets_the_schedule_and_evaluates_at_the_end(tiny_config):
    cfg = tiny_config(epochs=3, max_steps=5, warmup_ratio=0.2)
    results = train(cfg)
    steps, evals = rows(Path(cfg.output_dir))
    assert results["steps"] == 5 and [r["step"] for r in steps] == [1, 2, 3, 4, 5]
    # warmup is 20% of max_steps (1 step), and the decay reaches 0 at max_steps, not at 3 epochs
    assert [r["lr"] for r in steps] == [lr_at(s, 5, 1, cfg.lr) for s in range(5)]
    assert [r["step"] for r in evals] == [5]  # the last step is evaluated even mid-epoch


def test_max_steps_longer_than_the_epochs_runs_more_epochs(tiny_config):
    cfg = tiny_config(epochs=1, max_steps=30)
    train(cfg)
    steps, evals = rows(Path(cfg.output_dir))
    assert [r["epoch"] for r in steps] == [s // 12 + 1 for s in range(30)]
    assert [r["step"] for r in evals] == [12, 24, 30]


def test_eval_every_evaluates_and_checkpoints_between_epoch_ends(tiny_config):
    cfg = tiny_config(epochs=2, val_fraction=0.25, eval_every=4, keep_last=100)  # 72 train reviews: 9 steps/epoch
    train(cfg)
    out = Path(cfg.output_dir)
    _, evals = rows(out)
    assert [r["step"] for r in evals] == [4, 8, 9, 12, 16, 18]
    assert all(r["split"] == "val" for r in evals)
    saved = sorted(int(p.stem.split("_")[1]) for p in (out / "checkpoints").glob("step_*.pt"))
    assert saved == [4, 8, 9, 12, 16, 18]  # every evaluation is a checkpoint: the best one can be loaded


def test_early_stopping_stops_after_patience_evaluations_without_a_better_accuracy(tiny_config, capsys):
    # lr 1e-9: the weights barely move, so the validation accuracy never beats the first evaluation's
    cfg = tiny_config(epochs=5, val_fraction=0.25, lr=1e-9, early_stopping_patience=2)
    results = train(cfg)
    _, evals = rows(Path(cfg.output_dir))
    assert [r["step"] for r in evals] == [9, 18, 27]  # best at epoch 1, then two evaluations without progress
    assert results["steps"] == 27
    assert "early stopping: no better val accuracy in 2 evaluations; the best was at step 9" in capsys.readouterr().out
    # the finished run is final: resuming returns its results, it does not train on
    assert train(cfg.__class__(**{**cfg.to_dict(), "resume": "auto"})) == results


def test_early_stopping_needs_a_validation_split(tiny_config):
    with pytest.raises(ConfigError, match="early_stopping_patience watches the validation accuracy"):
        tiny_config(early_stopping_patience=2)


def test_progress_counts_evaluations_since_the_best():
    progress = ckpt.Progress(step=10)
    assert progress.new_best(0.7) and progress.evals_since_best == 0
    assert not progress.new_best(0.7)  # equal is not better
    assert not progress.new_best(0.6)
    assert progress.evals_since_best == 2 and progress.best_step == 10
    assert progress.out_of_patience(2) and not progress.out_of_patience(3) and not progress.out_of_patience(0)


def test_keep_last_0_deletes_the_checkpoints_at_a_clean_finish_only(tiny_config):
    cfg = tiny_config(epochs=2, val_fraction=0.25, keep_last=0)
    results = train(cfg)
    out = Path(cfg.output_dir)
    assert not (out / "checkpoints").exists()  # no optimizer state left behind
    assert (out / "model" / "model.safetensors").is_file()
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert train(cfg.__class__(**{**cfg.to_dict(), "resume": "auto"})) == results
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_keep_last_0_still_keeps_what_resume_needs_during_the_run(tmp_path):
    for step in (3, 6, 9):
        ckpt.save_checkpoint(tmp_path, {"step": step, "best_step": 3}, keep_last=0)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["step_0000003.pt", "step_0000009.pt"]  # the newest (resume) and the best


def test_step_line_clock():
    assert hms(0) == "0:00" and hms(75.9) == "1:15" and hms(3723) == "1:02:03"


def test_a_run_killed_after_stopping_early_is_finished_by_resume_without_training_on(tiny_config):
    cfg = tiny_config(epochs=5, val_fraction=0.25, lr=1e-9, early_stopping_patience=2)
    results = train(cfg)
    out = Path(cfg.output_dir)
    metrics = (out / "metrics.jsonl").read_text()
    for name in ("results.json", "report.md"):  # as if killed in the final evaluation, after the last checkpoint
        (out / name).unlink()
    resumed = train(cfg.__class__(**{**cfg.to_dict(), "resume": "auto"}))
    assert resumed["steps"] == results["steps"] == 27 and resumed["accuracy"] == results["accuracy"]
    assert (out / "metrics.jsonl").read_text() == metrics  # not one step more
