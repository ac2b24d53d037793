"""runlog.py: what a run reports, fed by hand: the peak FLOP/s behind MFU, the fixed-format step line, the
time spent waiting for batches, and RunLog's rows (metrics.jsonl) and lines (stdout)."""

from __future__ import annotations

import json
import math
import os
import time

import pytest
import torch
from conftest import read_metrics

from sentiment.config import Config
from sentiment.engine import Engine
from sentiment.model import count_params
from sentiment.runlog import RunLog, StepClock, TimedBatches, flops_per_token, format_step, peak_flops
from sentiment.tiny import make_model

CPU = Engine(device=torch.device("cpu"), precision="fp32")


class H100(Engine):
    """An engine that reports an H100's name (its device stays the CPU): a GPU's rows carry MFU."""

    @property
    def device_name(self) -> str:
        return "NVIDIA H100 80GB HBM3"


def test_peak_flops_by_gpu_name_and_precision():
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp16") == 989e12
    assert peak_flops("NVIDIA H100 80GB HBM3", "fp32") == 989e12 / 2  # TF32: half the bf16 rate
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16") == 312e12
    assert peak_flops("NVIDIA L40S", "bf16") == 362e12 and peak_flops("NVIDIA L4", "bf16") == 121e12  # not L4's
    assert peak_flops("NVIDIA L40", "bf16") == 181e12 and peak_flops("NVIDIA H100 PCIe", "bf16") == 756e12
    assert peak_flops("cpu", "bf16") is None and peak_flops("NVIDIA GeForce GTX 1080", "fp32") is None


ROW = {"step": 3, "epoch": 1, "loss": 0.693147, "lr": 2.5e-5, "grad_norm": 1.23456, "clipped": True,
       "skipped": False, "samples_per_s": 123.45, "tokens_per_s": 45678.0, "padded_fraction": 0.13,
       "step_ms": 250.4, "data_ms": 1.2, "fwd_bwd_ms": 200.6, "opt_ms": 48.6, "elapsed_s": 75.9, "eta_s": 3723.0}


def test_format_step_line():
    assert format_step(ROW, 10) == ("step 3/10 | epoch 1 | loss 0.6931 | lr 2.5e-05 | grad_norm 1.235 (clipped) | "
                                    "123.5 ex/s | 45.7k tok/s | pad 13% | 250 ms (data 1, fwd+bwd 201, opt 49) | "
                                    "1:15 elapsed, ETA 1:02:03")


def test_format_step_adds_scale_mfu_and_skipped_when_present():
    row = {**ROW, "clipped": False, "skipped": True, "loss": math.nan, "scale": 65536.0, "mfu": 0.4151}
    assert format_step(row, 10).endswith("| loss nan | lr 2.5e-05 | grad_norm 1.235 | 123.5 ex/s | 45.7k tok/s | "
                                         "pad 13% | 250 ms (data 1, fwd+bwd 201, opt 49) | 1:15 elapsed, ETA 1:02:03 | "
                                         "scale 65536 | mfu 41.5% | "
                                         "SKIPPED (non-finite)")


def slow_batches(n: int, seconds: float):
    for i in range(n):
        time.sleep(seconds)  # a slow loader: the wait to be measured
        yield i


def test_timed_batches_add_up_the_wait_for_batches_only():
    batches = TimedBatches(slow_batches(3, 0.05))
    start = time.perf_counter()
    for _ in batches:
        time.sleep(0.1)  # the step's own work: not waiting
    elapsed = time.perf_counter() - start
    assert batches.waited >= 3 * 0.05
    assert batches.waited <= elapsed - 3 * 0.1  # the time spent in the loop body is not counted


def run_steps(log: RunLog, batches: TimedBatches, steps: list[int], skipped=(), grad_norm=0.5) -> list[dict]:
    """Log optimizer steps by hand: 8 samples, 300 real of 512 tokens each, the loss NaN on skipped steps."""
    rows = []
    for step in steps:
        clock = StepClock(batches)
        next(batches)
        clock.synced()
        loss = math.nan if step in skipped else 0.5
        rows.append(log.step(step, 1, loss, 1e-4, grad_norm, step in skipped, None, [8, 300, 512], clock))
    return rows


def step_lines(printed: str) -> list[str]:
    return [line.split(" |")[0] for line in printed.splitlines() if line.startswith("step ")]


def test_run_log_writes_a_row_per_step_and_eval_and_prints_every_log_every(tmp_path, capsys):
    cfg = Config(log_every=2, max_grad_norm=1.0)
    batches = TimedBatches(slow_batches(5, 0.01))
    with RunLog(tmp_path, cfg, CPU, make_model(), total_steps=5, start_step=0) as log:
        returned = run_steps(log, batches, [1, 2, 3, 4, 5], skipped={3})
        log.eval(5, 1, "val", {"loss": 0.5, "accuracy": 0.75, "f1": 0.7}, is_best=True)
    steps, evals = read_metrics(tmp_path)
    assert [(r["step"], r["skipped"]) for r in steps] == [(1, False), (2, False), (3, True), (4, False), (5, False)]
    assert [json.dumps(r) for r in steps] == [json.dumps(r) for r in returned]  # the row returned is the row written
    assert evals == [{"step": 5, "epoch": 1, "split": "val", "loss": 0.5, "accuracy": 0.75, "f1": 0.7}]
    printed = capsys.readouterr().out
    assert step_lines(printed) == ["step 1/5", "step 2/5", "step 3/5", "step 4/5"]  # first, every 2nd, skipped
    assert "eval epoch 1 | val | loss 0.5000 | accuracy 0.7500 | f1 0.7000 | best so far" in printed

    row = steps[0]
    assert (row["samples"], row["tokens"], row["padded_fraction"]) == (8, 300, 1 - 300 / 512)
    assert not row["clipped"] and "mfu" not in row and "scale" not in row  # no GPU peak, no fp16 scaler
    assert row["data_ms"] >= 10  # each batch took 10 ms to arrive
    assert row["step_ms"] == pytest.approx(row["data_ms"] + row["fwd_bwd_ms"] + row["opt_ms"])
    assert row["samples_per_s"] == pytest.approx(8 / (row["step_ms"] / 1e3))
    assert log.samples_per_second == pytest.approx(5 * 8 / log.train_seconds)


def test_a_resumed_run_prints_its_first_step_and_log_every_0_only_skipped_steps(tmp_path, capsys):
    batches = TimedBatches(range(10))
    with RunLog(tmp_path, Config(log_every=4), CPU, make_model(), total_steps=20, start_step=10) as log:
        run_steps(log, batches, [11, 12, 13])
    assert step_lines(capsys.readouterr().out) == ["step 11/20", "step 12/20"]
    with RunLog(tmp_path, Config(log_every=0), CPU, make_model(), total_steps=20, start_step=13) as log:
        run_steps(log, batches, [14, 15, 16], skipped={15})
    assert step_lines(capsys.readouterr().out) == ["step 15/20"]
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == [11, 12, 13, 14, 15, 16]  # appended


def test_clipped_and_mfu_on_a_gpu(tmp_path):
    """A gradient norm over max_grad_norm is marked clipped; with a known GPU peak the row has the MFU: the
    model's training FLOPs for the step's padded tokens over the step time, as a share of the peak."""
    model = make_model()
    engine = H100(device=torch.device("cpu"), precision="bf16")
    with RunLog(tmp_path, Config(log_every=0, max_grad_norm=1.0), engine, model, 1, 0) as log:
        [row] = run_steps(log, TimedBatches(range(1)), [1], grad_norm=2.0)
    assert row["clipped"]
    c = model.config
    flops = flops_per_token(c.num_hidden_layers, c.hidden_size, 512 / 8, count_params(model)[1]) * 512
    assert row["mfu"] == pytest.approx(flops / (row["step_ms"] / 1e3) / 989e12)


def test_the_log_closes_its_file_when_the_loop_raises(tmp_path):
    with pytest.raises(RuntimeError, match="out of data"):
        with RunLog(tmp_path, Config(log_every=0), CPU, make_model(), total_steps=5, start_step=0) as log:
            run_steps(log, TimedBatches(range(1)), [1])
            raise RuntimeError("out of data")
    try:  # its descriptor is closed (or, reused since, no longer the file)
        still_open = os.path.samestat(os.fstat(log.file.fd), os.stat(tmp_path / "metrics.jsonl"))
    except OSError:
        still_open = False
    assert not still_open
    assert [r["step"] for r in read_metrics(tmp_path)[0]] == [1]
