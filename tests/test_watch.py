"""Watching the loop (issue 21): the per-layer monitor, the profiler, the memory snapshot's message and the peak
memory per phase. The monitor's figures are checked against the weights themselves (two consecutive checkpoints),
against another split of the same global batch, and for leaving the weights bitwise as they were; the 2-process
check is in test_ddp.py, which monitors its runs."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import load_script, read_metrics, saved_weights

from sentiment import checkpoint as ckpt
from sentiment.engine import Engine
from sentiment.errors import TrainingError
from sentiment.heatmaps import monitor_lines, read_monitor
from sentiment.loop import out_of_memory_is_an_error
from sentiment.model import load_mlm_model, load_model, load_model_config
from sentiment.monitor import layer_groups
from sentiment.profiler import FORWARD, phase_shares
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def group_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """layer_groups' groups as parameter names."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {group: [names[id(p)] for p in params] for group, params in layer_groups(model)}


def test_layer_groups_are_the_layers_a_reader_thinks_in(tiny_dirs):
    model_dir = str(tiny_dirs[0])
    model = load_model(model_dir)
    groups = group_names(model)
    assert list(groups) == ["embeddings", "layer 1", "layer 2", "pooler", "classifier"]
    assert all(n.startswith("bert.encoder.layer.0.") for n in groups["layer 1"])
    assert groups["classifier"] == ["classifier.weight", "classifier.bias"]
    every = [n for names in groups.values() for n in names]
    assert sorted(every) == sorted(n for n, _ in model.named_parameters())  # each tensor once, none left out
    # a masked LM: its head is `cls`, its decoder tied to the embeddings (counted there), its pooler frozen (left out)
    mlm, _ = load_mlm_model(model_dir, load_model_config(model_dir))
    groups = group_names(mlm)
    assert list(groups) == ["embeddings", "layer 1", "layer 2", "cls"]
    assert "bert.embeddings.word_embeddings.weight" in groups["embeddings"]


def test_a_family_without_layers_gets_one_group_per_module():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    assert list(group_names(model)) == ["0", "2"]


def by_name(state: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([state[n].flatten() for n in names])


def test_update_ratios_are_the_change_between_two_checkpoints(tiny_config, tmp_path):
    """Every step checkpointed: the monitor's |Δθ|/|θ| of step s is |θ_s - θ_(s-1)| / |θ_(s-1)| of the saved
    weights, group by group; its weight norm is |θ_(s-1)|; its gradient norms make up the step's grad_norm."""
    cfg = tiny_config(max_steps=5, monitor_every=1, save_every=1, keep_last=10, weight_decay=0.01, max_grad_norm=0.5)
    train(cfg)
    rows, (steps, _) = read_monitor(tmp_path / "run"), read_metrics(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    groups = group_names(load_model(cfg.model_name_or_path))
    states = {s: ckpt.load_checkpoint(ckpt.checkpoint_path(tmp_path / "run", s))["model"] for s in range(1, 6)}
    for row in rows[1:]:
        s = row["step"]
        assert row["layers"] == list(groups)
        for i, names in enumerate(groups.values()):
            before, after = by_name(states[s - 1], names), by_name(states[s], names)
            assert row["weight_norm"][i] == pytest.approx(before.norm().item(), rel=1e-5)
            assert row["update_ratio"][i] == pytest.approx(((after - before).norm() / before.norm()).item(),
                                                           rel=1e-4, abs=1e-12)
            assert row["numel"][i] == before.numel()
    for row, step in zip(rows, steps):
        assert math.hypot(*row["grad_norm"]) == pytest.approx(step["grad_norm"], rel=1e-5)


def test_the_same_figures_however_the_global_batch_is_split(tiny_config, tmp_path):
    """micro 4 x accum 2 against micro 8 x accum 1 (dropout off, so the masks do not depend on the split): the
    gradients differ by float rounding only, and so do the figures, to 1e-4 relative."""
    figures = {}
    for micro, accum in ((8, 1), (4, 2)):
        run = tmp_path / f"m{micro}"
        train(tiny_config(max_steps=4, monitor_every=2, micro_batch_size=micro, grad_accum_steps=accum,
                          dropout=0.0, output_dir=str(run)))
        figures[micro] = read_monitor(run)
    assert [r["step"] for r in figures[8]] == [2, 4]
    for a, b in zip(figures[8], figures[4]):
        for key in ("grad_norm", "weight_norm", "update_norm", "update_ratio"):
            np.testing.assert_allclose(b[key], a[key], rtol=1e-4, err_msg=f"{key} at step {a['step']}")


def test_watching_changes_no_weight_and_writes_its_views(tiny_config, tmp_path):
    """The monitor and the profiler on: the same weights, bit for bit, as without; the trace is JSON with the
    steps, the forward label, autograd's backward and AdamW's step in it; the report reads both."""
    plain, watched = tmp_path / "plain", tmp_path / "watched"
    train(tiny_config(max_steps=7, output_dir=str(plain)))
    results = train(tiny_config(max_steps=7, output_dir=str(watched), monitor_every=3, profile_steps=2,
                                report_to="tensorboard"))
    a, b = saved_weights(plain), saved_weights(watched)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = read_monitor(watched)
    assert [r["step"] for r in rows] == [3, 6]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(watched / "tensorboard"))
    events.Reload()
    ratios = events.Scalars("monitor/update_ratio/layer_1")
    assert [(e.step, e.value) for e in ratios] == [(r["step"], pytest.approx(r["update_ratio"][1])) for r in rows]

    trace = json.loads((watched / "profile" / "trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    # steps 4-5, after 3 warm-up steps; torch counts the loop's iterations from 0
    assert {"ProfilerStep#3", "ProfilerStep#4", FORWARD, "Optimizer.step#AdamW.step"} <= names
    assert "ProfilerStep#2" not in names and "ProfilerStep#5" not in names
    assert any(n.startswith("autograd::engine::evaluate_function") for n in names)
    summary = json.loads((watched / "profile" / "summary.json").read_text())
    assert summary["steps"] == [4, 5] and summary["top_operations"]
    assert 0 < summary["phases"]["forward"] < 1 and 0 < summary["phases"]["backward"] < 1
    report = (watched / "report.md").read_text()
    assert "## Per-layer monitor" in report and "## Profile" in report and "profile/trace.json" in report
    assert "![per-layer update ratio" in report and (watched / "plots" / "update_ratio.png").is_file()
    assert list(results["peak_rss_mb"]) == ["load", "tokenize", "train", "evaluate"]
    assert all(mb > 0 for mb in results["peak_rss_mb"].values())
    assert results["peak_mem_mb"] >= max(results["peak_rss_mb"].values())


def test_phase_shares_count_nested_and_overlapping_events_once():
    events = [("ProfilerStep*", 0, 100), ("ProfilerStep*", 100, 200),
              ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", 0, 10),
              (FORWARD, 10, 50), ("aten::addmm", 20, 30),  # inside the forward: not a phase of its own
              ("autograd::engine::evaluate_function: AddmmBackward0", 50, 80),
              ("autograd::engine::evaluate_function: MulBackward0", 70, 90),  # overlaps the one before
              ("gloo:all_reduce", 60, 95), ("Optimizer.step#AdamW.step", 90, 99),
              (FORWARD, 190, 250)]  # runs past the profiled steps: only its first 10 count
    shares = phase_shares(events)
    assert shares == {"data": 0.05, "forward": 0.25, "backward": 0.2, "optimizer": 0.045, "communication": 0.175}


def test_out_of_memory_names_the_snapshot_and_the_viewer():
    snapshot = Path("runs/x/memory_snapshot.pickle")
    with pytest.raises(TrainingError) as raised:
        with out_of_memory_is_an_error(32, 512, 64, lambda: snapshot):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    assert str(raised.value).endswith(
        "keep the global batch of 64. What filled the memory: drop runs/x/memory_snapshot.pickle on "
        "https://pytorch.org/memory_viz (--memory_snapshot true adds each allocation's stack)")
    # on a CPU there is no allocator snapshot: the line stays as it was
    cpu = Engine(torch.device("cpu"), "fp32")
    with pytest.raises(TrainingError) as raised:
        with out_of_memory_is_an_error(32, 512, 64, lambda: cpu.write_memory_snapshot(snapshot)):
            raise torch.OutOfMemoryError("out of memory")
    assert str(raised.value).endswith("keep the global batch of 64")


def test_the_report_reads_the_heatmaps(tmp_path):
    """Synthetic rows: the head moves 1e-3 of its norm per step, the embeddings 1e-5; the lr halves."""
    rows = [{"step": s, "every": 2, "layers": ["embeddings", "layer 1", "classifier"], "numel": [100, 100, 4],
             "grad_norm": [0.1, 0.2, 0.3], "weight_norm": [10.0, 10.0, 1.0], "update_norm": [1e-4, 1e-3, 1e-3],
             "update_ratio": [1e-5, 1e-4, 1e-3], "monitor_ms": ms} for s, ms in ((2, 3.0), (4, 5.0))]
    (tmp_path / "monitor.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "la')
    text = "\n".join(monitor_lines(tmp_path, [{"step": 2, "lr": 1e-3}, {"step": 4, "lr": 5e-4}]))
    assert "2 monitored steps (2-4), 3 groups" in text  # the row cut by a kill is skipped
    assert ("Moved most: **classifier** (1.0e-03 of its norm per step); least: **embeddings** (1.0e-05), "
            "100x less") in text
    assert "67% of the (layer, step) ratios fall inside 0.0001..0.01" in text and "33% below it, 0% above" in text
    assert "learning rate went from 1.0e-03 to 5.0e-04" in text
    # rms(Δθ)/lr of the classifier: 1e-3 / √4 / lr, at steps 2 and 4: 0.5 and 1.0, median 0.75
    assert "classifier 0.75" in text and "Cost: 4.0 ms per monitored step" in text
    assert monitor_lines(tmp_path / "elsewhere", []) == []


def test_the_cost_script_times_the_monitor_against_adamw(tiny_dirs, capsys):
    assert load_script("monitor_cost").main(["--model", str(tiny_dirs[0]), "--repeats", "2"]) == 0
    out = capsys.readouterr().out
    assert "in 5 groups" in out and "AdamW step: median" in out and "monitor: median" in out
