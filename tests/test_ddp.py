"""DDP on CPU (issue 4): 2 processes under torchrun with gloo match one process at the same global batch.

Three runs on the same data, fp32, dropout off, the default shuffled + length-grouped order:
(a) 1 process x micro-batch 16, (b) 1 process x micro-batch 8 x accumulation 2, (c) torchrun 2 processes
x micro-batch 8. 81 training reviews make each epoch's last global batch a single review, so in (b) and
(c) one micro-batch slot is empty (a weight-0 stand-in keeps every rank stepping: no hang). 47 test
reviews in eval batches of 16 give rank 0 two batches and rank 1 one. Run (c) also records, with an
audit hook, every file rank 1 writes under the run folder (there must be none), and its console output
(none either).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import AUDIT_HOOK, REPO, audited_folders, cli_args, read_metrics, saved_weights, torchrun

from sentiment.config import Config
from sentiment.data import eval_batches
from sentiment.commands import evaluate_model
from sentiment.heatmaps import read_monitor
from sentiment.train import train

N_TEST = 47  # odd: not divisible by the world size nor by the eval batch


def settings(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=81, n_test=N_TEST,
                  eval_batch_size=16, max_length=64, epochs=2, micro_batch_size=16, lr=3e-3, dropout=0.0,
                  device="cpu", precision="fp32", output_dir=str(output_dir), log_every=0,
                  monitor_every=3)  # the per-layer monitor watches every run: it must change no weight
    return {**values, **overrides}


def ddp_threads() -> int:
    """What engine.setup_engine gives each of 2 local CPU ranks; in-process comparisons use the same."""
    return max(1, (os.cpu_count() or 1) // 2)


# the sentiment CLI, with rank 1's file writes recorded (see conftest.AUDIT_HOOK)
AUDITED_CLI = AUDIT_HOOK + """
from sentiment.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def ddp_run(tiny_dirs, tmp_path_factory) -> dict:
    """Run (c) under torchrun: its output folder, per-rank console logs and rank 1's file writes."""
    folder = tmp_path_factory.mktemp("ddp")
    watch, audit, logs = audited_folders(folder, "logs")
    script = folder / "audited_cli.py"
    script.write_text(AUDITED_CLI)
    run = watch / "run"
    values = settings(*tiny_dirs, run, micro_batch_size=8)
    torchrun(["--log-dir", str(logs), "--redirects", "3", str(script), "train", *cli_args(values)],
             env={"AUDIT_WATCH": str(watch), "AUDIT_LOGS": str(audit)})
    [attempt] = logs.glob("*/attempt_0")
    return {"run": run, "values": values, "audit": audit, "watch": watch,
            "console": {(rank, stream): (attempt / str(rank) / f"{stream}.log").read_text()
                        for rank in (0, 1) for stream in ("stdout", "stderr")}}


@pytest.fixture(scope="module")
def single_runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """Runs (a) micro-batch 16 and (b) micro-batch 8 x accumulation 2, in this process."""
    folder = tmp_path_factory.mktemp("single")
    runs = {"a": folder / "a", "b": folder / "b"}
    train(Config(**settings(*tiny_dirs, runs["a"])))
    train(Config(**settings(*tiny_dirs, runs["b"], micro_batch_size=8, grad_accum_steps=2)))
    return runs


def test_two_processes_match_one_process_and_accumulation(ddp_run, single_runs):
    runs = {**single_runs, "c": ddp_run["run"]}
    weights = {name: saved_weights(run) for name, run in runs.items()}
    rows = {name: read_metrics(run)[0] for name, run in runs.items()}
    assert [r["step"] for r in rows["a"]] == list(range(1, 13))  # ceil(81 / 16) = 6 steps x 2 epochs
    for name in ("b", "c"):
        assert weights[name].keys() == weights["a"].keys()
        diff = max((weights[name][k] - weights["a"][k]).abs().max().item() for k in weights["a"])
        print(f"run ({name}) vs (a): max |weight difference| {diff:.2e}")
        assert diff <= 1e-5, f"run ({name}) weights differ from run (a) by {diff:.2e}"
        assert [r["step"] for r in rows[name]] == [r["step"] for r in rows["a"]]
        assert [r["lr"] for r in rows[name]] == [r["lr"] for r in rows["a"]]
        np.testing.assert_allclose([r["loss"] for r in rows[name]], [r["loss"] for r in rows["a"]],
                                   rtol=1e-5, atol=1e-7, err_msg=f"per-step losses of run ({name})")
        np.testing.assert_allclose([r["grad_norm"] for r in rows[name]], [r["grad_norm"] for r in rows["a"]],
                                   rtol=1e-4, atol=1e-7, err_msg=f"per-step gradient norms of run ({name})")
    # the short last global batch (one review) was stepped by every process, none hung
    assert rows["a"][5]["samples"] == 1 and rows["c"][5]["samples"] == 1
    # the global batch and the schedule are printed, the same however the batch is split
    assert ("batch: global 16 = micro 8 x accum 1 x world 2 | 6 steps/epoch x 2 epochs = 12 steps"
            in ddp_run["console"][0, "stdout"])


def test_the_monitor_sees_the_same_figures_on_two_processes(ddp_run, single_runs):
    """Per-layer gradient norms read after DDP's all-reduce, weights the same on every rank: the monitor's figures
    on 2 processes x micro 8 are those of 1 process x 16 and of 1 x 8 x accumulation 2, to float rounding."""
    rows = {name: read_monitor(run) for name, run in {**single_runs, "c": ddp_run["run"]}.items()}
    assert [r["step"] for r in rows["a"]] == [3, 6, 9, 12]
    for name in ("b", "c"):
        assert [r["step"] for r in rows[name]] == [3, 6, 9, 12]
        for a, other in zip(rows["a"], rows[name]):
            for key in ("grad_norm", "weight_norm", "update_ratio"):
                np.testing.assert_allclose(other[key], a[key], rtol=1e-4,
                                           err_msg=f"run ({name}) {key}, step {a['step']}")


def test_ddp_evaluation_counts_each_example_once_and_matches_one_process(ddp_run, tiny_dirs):
    two = json.loads((ddp_run["run"] / "results.json").read_text())["test"]
    assert two["n"] == N_TEST and sum(map(sum, two["confusion_matrix"])) == N_TEST
    # the same weights, evaluated by one process
    threads = torch.get_num_threads()
    torch.set_num_threads(ddp_threads())
    try:
        saved = str(ddp_run["run"] / "model")
        one = evaluate_model(Config(**settings(*tiny_dirs, "unused", model_name_or_path=saved)))
    finally:
        torch.set_num_threads(threads)
    one.pop("reviews_per_second")
    assert one == two


def test_evaluate_command_on_two_processes_where_one_has_no_batch(tiny_dirs, tmp_path):
    """47 reviews in one eval batch of 64: rank 1 has nothing to evaluate, and must neither hang nor count."""
    model_dir, data_dir = tiny_dirs
    values = dict(model_name_or_path=model_dir, data_dir=data_dir, n_test=N_TEST, eval_batch_size=64,
                  max_length=64, device="cpu", precision="fp32")
    out = torchrun(["-m", "sentiment", "evaluate", *cli_args(values)], timeout=180)
    two = json.loads(out[out.index("\n{") + 1: out.rindex("}") + 1])
    threads = torch.get_num_threads()
    torch.set_num_threads(ddp_threads())
    try:
        one = evaluate_model(Config(**{k: str(v) if isinstance(v, Path) else v for k, v in values.items()}))
    finally:
        torch.set_num_threads(threads)
    for metrics in (one, two):
        metrics.pop("reviews_per_second")
    assert two["n"] == N_TEST and sum(map(sum, two["confusion_matrix"])) == N_TEST
    assert one == two


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
@pytest.mark.parametrize("batch_size", [1, 16, 64])
def test_eval_batches_deal_every_example_to_exactly_one_rank(world_size, batch_size):
    lengths = np.random.default_rng(0).integers(3, 60, size=N_TEST)
    dealt = [i for rank in range(world_size)
             for batch in eval_batches(lengths, batch_size, world_size, rank) for i, _ in batch]
    assert sorted(dealt) == list(range(N_TEST))


def test_only_rank_zero_writes_files_and_logs(ddp_run):
    run, watch = ddp_run["run"], ddp_run["watch"]
    [record] = ddp_run["audit"].glob("writes_rank*.txt")
    assert record.name == "writes_rank1.txt"
    lines = record.read_text().splitlines()
    assert lines[:1] == [f"open {os.path.realpath(watch / 'probe_rank1')}"]  # the hook saw its probe
    assert lines[1:] == [], "rank 1 wrote under the run folder"
    assert ddp_run["console"][1, "stdout"] == "" and ddp_run["console"][1, "stderr"] == ""
    assert "test | accuracy" in ddp_run["console"][0, "stdout"]
    names = {p.name for p in run.rglob("*")}
    assert {"config.json", "metrics.jsonl", "results.json", "model.safetensors"} <= names
    assert [n for n in names if n.startswith(".")] == [".sentiment-run.json"]  # the marker; no temp or probe files
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000012.pt"]
    rng = torch.load(run / "checkpoints" / "step_0000012.pt", weights_only=False)["rng"]
    assert len(rng) == 2  # every rank's RNG state, gathered by rank 0


def test_slurm_script_parses_and_launches_one_torchrun_per_node():
    script = REPO / "scripts" / "slurm_ddp.sbatch"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    assert "--rdzv_backend=c10d" in text and "--nnodes=\"$SLURM_JOB_NUM_NODES\"" in text
    assert "-m sentiment train --resume auto \"$@\"" in text  # a requeued job continues where it stopped
