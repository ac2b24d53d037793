"""scripts/seeds.py: the aggregation over seeds (pure), and two seeds of the tiny model end to end."""

import json
import math
import subprocess
import sys

import pytest

from conftest import REPO, cli_args, load_script, subprocess_env

seeds = load_script("seeds")


def test_aggregate_gives_mean_and_sample_std_of_every_metric():
    runs = {2: {"accuracy": 0.8, "f1": 0.7, "precision": 0.6, "recall": 0.9, "loss": 0.5, "best_val_accuracy": 0.75},
            1: {"accuracy": 0.9, "f1": 0.8, "precision": 0.7, "recall": 1.0, "loss": 0.3, "best_val_accuracy": 0.85}}
    summary = seeds.aggregate(runs)
    assert summary["seeds"] == [1, 2]
    assert list(summary["metrics"]) == ["accuracy", "f1", "precision", "recall", "loss", "best_val_accuracy"]
    accuracy = summary["metrics"]["accuracy"]
    assert accuracy["values"] == [0.9, 0.8]  # in seed order
    assert accuracy["mean"] == pytest.approx(0.85)
    assert accuracy["std"] == pytest.approx(math.sqrt(2 * 0.05 ** 2 / (2 - 1)))  # n - 1
    assert summary["metrics"]["loss"]["std"] == pytest.approx(math.sqrt(0.02))
    assert "± 0.0707" in seeds.table(summary)


def test_aggregate_of_one_seed_has_no_std_and_skips_missing_metrics():
    summary = seeds.aggregate({7: {"accuracy": 0.5, "f1": 0.4, "precision": 0.3, "recall": 0.2, "loss": 0.7,
                                   "best_val_accuracy": None}})
    assert summary["metrics"]["accuracy"] == {"mean": 0.5, "std": None, "values": [0.5]}
    assert "best_val_accuracy" not in summary["metrics"]  # no validation split
    assert "0.5000 ± -" in seeds.table(summary)


def script(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "seeds.py"), *args], capture_output=True,
                          text=True, env=subprocess_env(), cwd=REPO, timeout=300)


def test_two_seeds_of_the_tiny_model(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    flags = cli_args(dict(model_name_or_path=model_dir, data_dir=data_dir, n_train=0, n_test=0, val_fraction=0.25,
                          max_length=64, epochs=1, lr=3e-3, device="cpu", precision="fp32", log_every=0))
    out = tmp_path / "seeds"
    done = script(["--seeds", "1,2", "--output_dir", str(out), "--", *flags])
    assert done.returncode == 0, done.stderr
    summary = json.loads((out / "seeds.json").read_text())
    assert summary["seeds"] == [1, 2]
    for seed in (1, 2):
        results = json.loads((out / f"seed_{seed}" / "results.json").read_text())
        config = json.loads((out / f"seed_{seed}" / "config.json").read_text())
        assert config["seed"] == seed and config["val_fraction"] == 0.25
        assert summary["metrics"]["accuracy"]["values"][seed - 1] == results["accuracy"]
        assert summary["metrics"]["best_val_accuracy"]["values"][seed - 1] == results["best_val_accuracy"]
    assert summary["metrics"]["loss"]["std"] > 0  # different seeds, different runs
    assert done.stdout.splitlines()[-1] == f"seeds: summary written to {out / 'seeds.json'}"

    # again with --resume auto: the two finished seeds return their results; a third that fails stops the script
    # with its error line, and the summary of the two stays
    (out / "seed_3").mkdir()
    (out / "seed_3" / "notes.txt").write_text("not a run")
    failed = script(["--seeds", "1,2,3", "--output_dir", str(out), "--", *flags, "--resume", "auto"])
    assert failed.returncode == 1
    assert failed.stdout.count("is finished; its results stay in") == 2
    assert failed.stderr.splitlines()[-1].startswith(f"seeds: seed 3 failed (exit code 2): error: output_dir {out}")
    assert json.loads((out / "seeds.json").read_text()) == summary


def test_the_per_seed_flags_are_the_scripts(tmp_path):
    done = script(["--seeds", "1", "--output_dir", str(tmp_path), "--", "--seed", "3"])
    assert done.returncode == 2 and "--seed is set per seed by this script" in done.stderr
