"""scripts/benchmark.py and scripts/trainer_tutorial.py helpers (issue 3; the CPU allocator decision is in
test_malloc.py). The benchmark itself is a script, not a timed test: `python scripts/benchmark.py --quick`
validates it."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script


def test_contenders_parse_and_trainers_never_run_auto():
    bench = load_script("benchmark")
    assert bench.parse_contenders("ours:auto,tutorial:auto,best:bf16,ours:auto") == [
        ("ours", "auto"), ("tutorial", "fp32"), ("best", "bf16")]
    with pytest.raises(SystemExit):
        bench.parse_contenders("theirs:fp32")
    args = bench.parse_args(["--precision", "auto"])
    assert args.contenders == "ours:auto,tutorial:fp32,best:fp32"
    quick = bench.parse_args(["--quick"])
    assert (quick.n_train, quick.max_length, quick.repeats) == (32, 128, 1)


def test_ratios_are_trainer_wall_over_ours(tmp_path):
    bench = load_script("benchmark")
    runs = {"ours:fp32": [{"wall_s": 10.0}, {"wall_s": 12.0}], "best:fp32": [{"wall_s": 13.0}, {"wall_s": 12.0}]}
    for key, records in runs.items():
        for r in records:
            r.update(samples_per_second=4.0 if key.startswith("ours") else 3.0, tokens_per_second=1.0,
                     padded_fraction=0.1, max_rss_mb=1.0, accuracy=0.5, loss=0.7)
    lines, summary = bench.summarize_training(runs, [("ours", "fp32"), ("best", "fp32")])
    ratio = summary["ratios"]["ours:fp32 vs best:fp32"]
    assert ratio["wall_ratio"] == pytest.approx(12.5 / 11.0)
    assert ratio["paired"] == pytest.approx([1.3, 1.0])
    assert ratio["met"] is True and ratio["train_speed_ratio"] == pytest.approx(4 / 3)
    assert any("1.14x" in line and "met" in line for line in lines)


def test_read_ours_counts_real_and_padded_tokens(tmp_path):
    bench = load_script("benchmark")
    (tmp_path / "results.json").write_text(json.dumps(
        {"accuracy": 0.8, "loss": 0.5, "samples_per_second": 8.0, "train_seconds": 2.0, "peak_mem_mb": 100.0}))
    rows = [{"step": 1, "tokens": 90, "padded_fraction": 0.1}, {"step": 2, "tokens": 50, "padded_fraction": 0.5},
            {"step": 2, "split": "test", "accuracy": 0.8}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    got = bench.read_ours(tmp_path)
    assert got["tokens_per_second"] == pytest.approx(70.0)
    assert got["padded_fraction"] == pytest.approx(1 - 140 / 200)


def test_counting_collator_counts_only_while_active():
    tutorial = load_script("trainer_tutorial")
    counter = tutorial.CountingCollator(lambda feats: {"attention_mask": torch.tensor(feats)})
    counter([[1, 1, 0, 0]])
    counter.active = True
    counter([[1, 1, 1, 0], [1, 0, 0, 0]])
    assert (counter.real_tokens, counter.padded_tokens) == (4, 8)


def test_inference_ceiling_counts_the_encoder_linears_on_the_real_tokens(tiny_dirs):
    import argparse

    from sentiment.model import load_model

    bench = load_script("benchmark")
    model_dir, data_dir = tiny_dirs
    args = argparse.Namespace(data_dir=str(data_dir), inference_reviews=0, max_length=64)  # 0 = all 48
    ceiling = bench.inference_ceiling(args, model_dir, "bf16")
    config = load_model(str(model_dir)).config
    h, i, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    per_token = 2 * layers * (4 * h * h + 2 * h * i)  # q, k, v, attention output; FFN in and out
    assert ceiling["reviews"] == 48 and 48 < ceiling["tokens"] <= 48 * 64
    assert ceiling["linear_tflop"] * 1e12 == pytest.approx(per_token * ceiling["tokens"])
    assert ceiling["linear_s"] > 0
    assert ceiling["reviews_per_second"] == pytest.approx(48 / ceiling["linear_s"])
