"""scripts/bench_gpu.py and bench_gpu_figures.py (issue 22 item 3): `--quick` runs every part and every contender
end to end on the CPU (tiny random BERT, a hundred synthetic reviews; the compile rows with TORCH_COMPILE_DISABLE,
as the CPU's inductor takes a minute), and its table and JSON hold every row with sane numbers (no timing
assertions); the real mode's commands parse as the programs they go to; the figures' arithmetic by hand."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
from conftest import REPO, load_script, subprocess_env

from sentiment.cli import parse

bench = load_script("bench_gpu")
figures = load_script("bench_gpu_figures")
tutorial = load_script("trainer_tutorial")
TRAINING = [(part, name) for part in ("tutorial", "full") for name in bench.CONTENDERS]
EVERY = TRAINING + [("inference", "ours"), ("inference", "trainer_predict")] + [("accuracy", n) for n in bench.PATHS]
QUICK = [k for k in EVERY if k[0] != "full" or k[1] in bench.QUICK_FULL]  # --quick: each program's full part once


def test_quick_runs_every_part_and_contender(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "bench_gpu.py"), "--quick", "--work",
                           str(tmp_path / "work"), str(out)], capture_output=True, text=True, env=subprocess_env(),
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["part"], r["name"]): r for r in report["rows"]}
    assert sorted(rows) == sorted(QUICK) and all(r["status"] == "ok" for r in rows.values())
    assert report["matmul"]["tflops"] > 0 and report["facts"]["arch"]["layers"] == 2
    for key in (k for k in TRAINING if k in QUICK):
        r = rows[key]
        assert r["wall_s"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and math.isfinite(r["model_tflops"])
        assert r["steps"] == r["total_steps"] > 0 and 0 <= r["padded_fraction"] < 1 and r["peak_mem_mb"] > 0
        assert 0 <= r["accuracy"] <= 1 and r["projected_wall_s"] is None, key
    for part in ("tutorial", "full"):
        assert rows[(part, "ours_packed")]["padded_fraction"] == 0
        assert rows[(part, "ours_packed")]["attention"] == "packed_sdpa"
    assert (rows[("tutorial", "trainer_tutorial")]["precision"], rows[("tutorial", "trainer_best")]["precision"]) == \
        ("fp32", "bf16")
    tutorial_style, best = rows[("tutorial", "trainer_tutorial")], rows[("tutorial", "trainer_best")]
    assert tutorial_style["padded_fraction"] > best["padded_fraction"]
    for name in ("ours", "trainer_predict"):
        assert rows[("inference", name)]["reviews_per_second"] > 0 and 0 <= rows[("inference", name)]["accuracy"] <= 1
    for name in bench.PATHS:
        assert 0 <= rows[("accuracy", name)]["accuracy"] <= 1 and isinstance(rows[("accuracy", name)]["equal"], bool)
    table = (out / "bench.md").read_text()
    assert sum(line.startswith("| ") and " | ok | " in line for line in table.splitlines()) == len(QUICK)
    assert "TFLOP/s measured here" in table


def real_context(tmp_path, *flags: str):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.parquet").write_bytes(b"")  # the command builder only checks that it exists
    args = bench.parse_args(["--data", str(tmp_path / "data"), "--model", "MINILM", "--work", str(tmp_path / "w"),
                             *flags, str(tmp_path / "out")])
    ctx = bench.context(args, [])
    ctx.heldout = ("HELD_TRAIN", "HELD_TEST")
    return ctx


def test_real_commands_parse_as_their_programs_take_them(tmp_path):
    """The real mode's rows (bert-base at 512 tokens, 25,000 reviews) are never run on the CPU: their command lines
    are checked against sentiment's parser and trainer_tutorial.py's instead."""
    ctx = real_context(tmp_path, "--trainer_compile")
    jobs = bench.schedule(ctx)
    order = [(part, name) for part, names, _ in jobs for name in names]
    compiled = [("tutorial", "ours_compile"), ("full", "ours_compile")]
    assert order == [k for k in EVERY if k not in compiled] + compiled  # the slowest to compile go last
    assert [len(names) for _, names, _ in jobs] == [1] * 10 + [3, 1, 1]  # the accuracy paths side by side
    for part, names, _ in jobs:
        for name in names:
            cmd = bench.build_row(ctx, part, name)["cmd"]
            if cmd[1] == "-m":
                command, _, cfg = parse(cmd[3:])
                assert command == ("evaluate" if part == "inference" else "train")
                if command == "train":
                    assert cfg.padding == ("none" if name == "ours_packed" else "dynamic")
                    assert cfg.compile == (name == "ours_compile") and cfg.precision == "auto"
                    size = ctx.sizes[part]
                    assert (cfg.n_train, cfg.micro_batch_size, cfg.max_length, cfg.truncation) == \
                        (size["n_train"], size["batch"], size["max_length"], size["truncation"])
                continue
            args = tutorial.parse_args(cmd[2:])
            if part == "inference":
                assert args.predict and args.precision == "bf16" and args.n_test == 0
                continue
            best = name == "trainer_best"
            assert (args.padding, args.precision, args.group_by_length, args.torch_compile) == \
                (("dynamic", "bf16", True, True) if best else ("max_length", "fp32", False, False))
            assert args.optim == ("adamw_torch_fused" if best else "") and args.step_log.endswith("steps.jsonl")
            assert (args.n_train, args.batch_size, args.truncation) == \
                ((1000, 8, "head") if part == "tutorial" else (0, 32, "head_tail"))


def test_boxes_keep_half_of_every_later_cap(tmp_path):
    ctx = real_context(tmp_path, "--parts", "tutorial,accuracy")
    jobs = bench.schedule(ctx)
    assert [names for _, names, _ in jobs] == [("trainer_tutorial",), ("trainer_best",), ("ours",), ("ours_packed",),
                                               bench.PATHS, ("ours_compile",)]
    ctx.deadline = bench.time.monotonic() + 1000
    assert bench.box_for(ctx, 0, jobs) == 55  # plenty left: the cap
    ctx.deadline = bench.time.monotonic() + 150
    later = sum(cap for _, _, cap in jobs[1:]) * bench.FLOOR  # half of every later cap stays reserved
    assert bench.box_for(ctx, 0, jobs) == pytest.approx(150 - later, abs=1)


def test_steady_state_leaves_out_warmup_and_outliers():
    facts = {"layers": 2, "hidden": 4, "non_embedding_params": 100}
    rows = [{"samples": 2, "tokens": 20, "padded": 40, "seconds": 5.0} for _ in range(2)]  # warm-up: 10% of 20
    rows += [{"samples": 2, "tokens": 20, "padded": 40, "seconds": 1.0} for _ in range(16)]
    rows += [{"samples": 2, "tokens": 10, "padded": 10, "seconds": 0.25},  # padding-free: same time per token
             {"samples": 2, "tokens": 20, "padded": 40, "seconds": 9.0}]  # a recompile: left out
    got = figures.steady(rows, facts, matmul_flops=1e3)
    assert (got["steady_steps"], got["left_out"]) == (17, 1)
    assert got["tokens_per_s"] == pytest.approx((16 * 20 + 10) / 16.25)
    flops = 16 * 20 * (6 * 100 + 12 * 2 * 4 * 10) + 10 * (6 * 100 + 12 * 2 * 4 * 5)  # 6N + 12 L H s per real token
    assert got["mfu"] == pytest.approx(flops / 16.25 / 1e3)
    assert got["padded_fraction"] == pytest.approx(1 - 390 / 770)
    stopped = {"status": "timeout (40 s box)", "wall_s": 40.0, "steps": 19, "total_steps": 100, "step_s": 0.5}
    assert figures.projected_wall(stopped) == pytest.approx(40 + 81 * 0.5)
    assert figures.projected_wall({**stopped, "status": "ok"}) is None


def test_accuracy_rows_agree_within_two_standard_errors():
    rows = [{"part": "accuracy", "name": n, "accuracy": a, "n_test": 1000}
            for n, a in (("ours", 0.80), ("ours_packed", 0.81), ("ours_compile", 0.70))]
    figures.agreement(rows)
    assert [r["equal"] for r in rows] == [True, True, False]  # 2 SE of 0.8 on 1000 = 0.025
    assert rows[1]["delta"] == pytest.approx(0.01)


def test_trainer_step_rows_count_each_steps_own_batches():
    counter = tutorial.CountingCollator(lambda feats: {"attention_mask": __import__("torch").tensor(feats)})
    counter.active = True
    counter([[1, 1, 0], [1, 0, 0]])
    counter([[1, 1, 1]])  # collated ahead, as accelerate's loader does
    assert counter.take(1) == (2, 3, 6) and counter.take(1) == (1, 3, 3) and counter.take(1) == (0, 0, 0)
    assert (counter.real_tokens, counter.padded_tokens) == (6, 9)
