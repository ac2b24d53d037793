"""fp16 on CPU, for real: torch's CPU autocast computes in float16 and GradScaler("cpu") scales the loss,
so the whole fp16 path of the loop runs here: loss scaling, overflow skips, the scale halving and growing,
the NaN policy, and a bitwise resume of the scaler's state. No function is patched: overflows are forced
through the engine's own loss-scaling settings (`init_scale`, `growth_interval`) or a model's weights.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from sentiment import checkpoint as ckpt
from sentiment import rundir
from sentiment.config import Config
from sentiment.engine import Engine, setup_engine
from sentiment.loop import is_bad, step_totals
from sentiment.tiny import make_model, make_reviews, make_tokenizer
from sentiment.train import run

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# overflows from the start: 2**24 halves to the tiny model's ~2**18 in a few skipped steps; a short
# growth_interval then doubles it within the run, and it overflows (and halves) again
FORCED = dict(init_scale=2.0**24, growth_interval=4)


def settings(tiny_dirs, out: Path, **overrides) -> Config:
    """tiny_config's settings (conftest.py), for module-scoped runs."""
    model_dir, data_dir = tiny_dirs
    values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0, max_length=64,
                  epochs=2, micro_batch_size=8, lr=3e-3, device="cpu", precision="fp16", output_dir=str(out),
                  log_every=0)
    return Config(**{**values, **overrides})


def train_with(cfg: Config, init_scale: float = 2.0**16, growth_interval: int = 2000) -> dict:
    """What train(cfg) does, with the engine's loss-scaling settings changed (the defaults are torch's)."""
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
    engine = dataclasses.replace(engine, init_scale=init_scale, growth_interval=growth_interval)
    try:
        with rundir.RunLock(Path(cfg.output_dir), engine.print):
            return run(cfg, engine)
    finally:
        engine.close()


def is_timing(key: str) -> bool:
    """Fields that measure the machine, not the math (as in test_resume.py)."""
    return key.endswith(("_ms", "_s", "_seconds", "_per_second")) or key in ("peak_mem_mb", "peak_rss_mb", "mfu",
                                                                             "environment")


def rows(out: Path) -> list[dict]:
    """metrics.jsonl without the timing fields."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if not is_timing(k)} for line in lines]


def step_rows(out: Path) -> list[dict]:
    return [r for r in rows(out) if "split" not in r]


def assert_scale_follows_the_skips(steps: list[dict], growth_interval: int) -> None:
    """GradScaler's rule, read back from the rows: a skipped step halves the scale for the next step, and
    `growth_interval` clean steps in a row double it; nothing else changes it."""
    scale, clean = steps[0]["scale"], 0
    for row in steps:
        assert row["scale"] == scale, f"step {row['step']}: scale {row['scale']}, expected {scale}"
        if row["skipped"]:
            scale, clean = scale / 2, 0
        else:
            clean += 1
            if clean == growth_interval:
                scale, clean = scale * 2, 0
    for row, following in itertools.pairwise(steps):
        assert (following["scale"] == row["scale"] / 2) == row["skipped"]


# ----------------------------------------------------------------------------- full runs


@pytest.fixture(scope="module")
def learned(tiny_dirs, tmp_path_factory) -> dict[str, tuple[dict, list[dict]]]:
    """{precision: (results, step rows)} of two tiny runs long enough to learn (6 epochs, 72 steps), fp16 and fp32."""
    runs = {}
    for precision in ("fp16", "fp32"):
        out = tmp_path_factory.mktemp(precision) / "run"
        results = train_with(settings(tiny_dirs, out, epochs=6, precision=precision))
        runs[precision] = results, step_rows(out)
    return runs


@pytest.fixture(scope="module")
def forced(tiny_dirs, tmp_path_factory) -> tuple[Config, Path]:
    """(config, output dir) of an fp16 run with FORCED loss scaling: 4 epochs, 48 steps."""
    cfg = settings(tiny_dirs, tmp_path_factory.mktemp("forced") / "run", epochs=4, max_bad_steps=3)
    train_with(cfg, **FORCED)
    return cfg, Path(cfg.output_dir)


def test_fp16_run_on_cpu_learns_and_logs_the_scale(learned):
    results, steps = learned["fp16"]
    assert "precision=fp16 (requested: on CPU fp16 is emulated and slower than fp32" in results["engine"][1]
    assert len(steps) == 72 and all(row["scale"] == 2.0**16 for row in steps)  # no overflow at torch's default
    assert not any(row["skipped"] for row in steps)
    assert all("scale" not in row for row in learned["fp32"][1])  # fp32 has no loss scale to log
    # measured (seed 42, padding-free batches, the default): train loss 0.69 at step 1, 0.435 on average over the
    # last epoch in fp16 and in fp32, test accuracy 0.917 in fp32 (chance: accuracy 0.5, loss ln 2 = 0.693); length-grouped padded batches,
    # the default before: 0.979 and 0.126. Those differ by their dropout draws alone: at dropout 0 both give 0.294
    assert results["accuracy"] >= 0.85
    assert steps[0]["loss"] == pytest.approx(math.log(2), abs=0.02)
    assert sum(row["loss"] for row in steps[-12:]) / 12 < 0.5


def test_fp16_and_fp32_losses_agree_step_by_step(learned):
    fp16, fp32 = ([row["loss"] for row in learned[p][1]] for p in ("fp16", "fp32"))
    diffs = [abs(a - b) for a, b in zip(fp16, fp32)]
    # measured (seeds 42, 7, 3): the first 24 steps differ by at most 4.2e-5 (fp16's rounding alone); over
    # 72 steps the trajectories drift apart, by at most 1.1e-3 (1.7e-4 at seed 42). Tolerances: ~10x / ~5x that.
    assert max(diffs[:24]) < 5e-4
    assert max(diffs) < 5e-3
    assert 0 < max(diffs)  # fp16 really ran: its rounding shows
    assert learned["fp16"][0]["accuracy"] == pytest.approx(learned["fp32"][0]["accuracy"], abs=2 / 48)


def test_skipped_steps_are_exactly_where_the_scale_halves(forced, learned):
    cfg, out = forced
    steps = step_rows(out)
    skipped = [row["step"] for row in steps if row["skipped"]]
    assert skipped[:4] == [1, 2, 3, 4]  # 2**24 overflows: skipped, halved, skipped again, ...
    assert steps[0]["scale"] == FORCED["init_scale"]
    assert_scale_follows_the_skips(steps, FORCED["growth_interval"])
    scales = [row["scale"] for row in steps]
    assert any(b == 2 * a for a, b in itertools.pairwise(scales))  # it grew too
    # an overflow is the scaler's business: its loss is finite, and the run went on past max_bad_steps (3)
    # skipped steps in a row, where fp32 would have stopped
    assert all(math.isfinite(row["loss"]) and not math.isfinite(row["grad_norm"]) for row in steps if row["skipped"])
    assert (out / "results.json").is_file() and len(skipped) > cfg.max_bad_steps
    assert_scale_follows_the_skips(learned["fp16"][1], 2000)  # the rule holds in a plain run too


def last_step(out: Path) -> int:
    """The highest step in metrics.jsonl so far (a half-written row is ignored)."""
    steps = [0]
    if (out / "metrics.jsonl").exists():
        for line in (out / "metrics.jsonl").read_text().splitlines():
            try:
                steps.append(json.loads(line)["step"])
            except (json.JSONDecodeError, KeyError):
                pass
    return max(steps)


def test_sigterm_then_resume_restores_the_scaler_bitwise(forced, tiny_dirs, tmp_path):
    cfg, reference = forced
    out = tmp_path / "run"
    cfg = dataclasses.replace(cfg, output_dir=str(out))
    # mid-way through the first clean steps after the overflows: the growth count is under way
    stop_after, done = 7, threading.Event()

    def sigterm_at_step() -> None:
        deadline = time.monotonic() + 120
        while last_step(out) < stop_after and not done.is_set() and time.monotonic() < deadline:
            time.sleep(0.002)
        if not done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)  # as a scheduler would; the loop's handler runs in this thread

    late = []  # a SIGTERM after the run ended would otherwise kill pytest
    previous = signal.signal(signal.SIGTERM, lambda *_: late.append(True))
    watcher = threading.Thread(target=sigterm_at_step)
    watcher.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            train_with(cfg, **FORCED)
    finally:
        done.set()
        watcher.join()
        signal.signal(signal.SIGTERM, previous)
    assert stopped.value.code == 143 and not late
    step = last_step(out)
    print(f"stopped after step {step}")  # shown if the test fails
    assert stop_after <= step < 48 and not (out / "model").exists()
    saved = ckpt.load_checkpoint(ckpt.checkpoint_path(out, step))["scaler"]
    assert saved["scale"] == step_rows(reference)[step]["scale"]  # the scale of the next step

    train_with(dataclasses.replace(cfg, resume="auto"), **FORCED)
    got, want = rows(out), rows(reference)
    assert [(r["step"], r.get("scale"), r.get("loss")) for r in got] == [(r["step"], r.get("scale"), r.get("loss"))
                                                                        for r in want]
    assert got == want  # every other field too: grad norms, skips, evaluations
    assert (out / "model" / "model.safetensors").read_bytes() == (reference / "model" / "model.safetensors").read_bytes()


# ----------------------------------------------------------------------------- one step at a time


def one_step(engine: Engine, model, optimizer, scaler, batch: dict) -> tuple[float, float]:
    """One optimizer step as train.run takes it (one micro-batch, gradients clipped at 1.0); (loss, grad norm)."""
    with engine.autocast():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    loss = F.cross_entropy(logits.float(), batch["labels"])
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    loss_value, norm_value, _ = step_totals(engine, loss.detach(), grad_norm, torch.zeros(3))
    if (math.isfinite(loss_value) and math.isfinite(norm_value)) or scaler.is_enabled():
        scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, norm_value


def step_setup(engine: Engine):
    """(model, optimizer, scaler, batch): the tiny model on 8 synthetic reviews. Dropout is off (eval mode),
    so the same batch gives the same gradients: only the scale decides whether a step overflows."""
    model = engine.wrap(make_model()).eval()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=engine.fused_adamw)
    reviews = make_reviews(8, seed=5)
    batch = dict(make_tokenizer()([r["text"] for r in reviews], padding=True, return_tensors="pt"))
    batch["labels"] = torch.tensor([r["label"] for r in reviews])
    return model, optimizer, engine.grad_scaler(), batch


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def unchanged(model, before: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_an_overflow_skips_the_update_and_halves_the_scale_then_clean_steps_double_it():
    engine = Engine(device=torch.device("cpu"), precision="fp16", init_scale=2.0**40, growth_interval=2)
    model, optimizer, scaler, batch = step_setup(engine)
    skips = 0
    while True:
        before, scale = snapshot(model), scaler.get_scale()
        loss, norm = one_step(engine, model, optimizer, scaler, batch)
        if math.isfinite(norm):
            break
        skips += 1
        assert unchanged(model, before)  # no update, not even Adam's step count (fused AdamW gets the
        assert all(s["step"] == 0 for s in optimizer.state.values())  # overflow flag and skips in its kernel)
        assert scaler.get_scale() == scale / 2
        assert math.isfinite(loss) and not is_bad(loss, norm, scaler)  # the scaler explains it
        assert skips < 40
    assert skips >= 10  # from 2**40 down to where the tiny model's fp16 gradients fit (~2**18 here)
    assert not unchanged(model, before)  # the first clean step updated the weights
    assert scaler.get_scale() == scale  # 1 clean step of growth_interval 2: no growth yet
    before = snapshot(model)
    assert math.isfinite(one_step(engine, model, optimizer, scaler, batch)[1])
    assert not unchanged(model, before)
    assert scaler.get_scale() == 2 * scale  # 2 clean steps in a row: doubled


def test_nan_policy_under_fp16_counts_only_what_the_scaler_cannot_explain():
    fp16, fp32 = (Engine(device=torch.device("cpu"), precision=p).grad_scaler() for p in ("fp16", "fp32"))
    assert fp16.is_enabled() and not fp32.is_enabled()
    assert not is_bad(0.69, math.inf, fp16)  # overflowing gradients: skipped and the scale halved, by design
    assert not is_bad(0.69, math.nan, fp16)
    assert is_bad(math.nan, math.nan, fp16) and is_bad(math.inf, 1.0, fp16)  # a non-finite loss counts
    assert is_bad(0.69, math.inf, fp32)  # without loss scaling nothing explains a non-finite gradient

    # a real forward overflow: 1e5 is an ordinary fp32 bias but beyond fp16's largest value (65504), so the
    # logits are inf at any loss scale; lowering the scale cannot fix it, and max_bad_steps must see it
    engine = Engine(device=torch.device("cpu"), precision="fp16")
    model, optimizer, scaler, batch = step_setup(engine)
    with torch.no_grad():
        model.classifier.bias.fill_(1e5)
    before, scale = snapshot(model), scaler.get_scale()
    loss, norm = one_step(engine, model, optimizer, scaler, batch)
    assert not math.isfinite(loss) and is_bad(loss, norm, scaler)
    assert unchanged(model, before) and scaler.get_scale() == scale / 2  # the scaler skipped it all the same
    fp32_engine = Engine(device=torch.device("cpu"), precision="fp32")
    loss, norm = one_step(fp32_engine, model, optimizer, fp32_engine.grad_scaler(), batch)
    assert math.isfinite(loss)  # the same weights in fp32 are fine
