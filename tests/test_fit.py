"""fit.py: the split arithmetic, `--micro_batch_size auto` (its probe sees a simulated out-of-memory above
SENTIMENT_PROBE_MAX_BATCH, so the search runs on the CPU), and the header's memory estimate."""

import json
import logging
import math

import pytest
import torch

from conftest import read_metrics

from sentiment.config import Config
from sentiment.presets import build_config, coerce
from sentiment.engine import Engine
from sentiment.errors import ConfigError
from sentiment.fit import (PROBE_LIMIT_ENV, BatchPlan, divisors, fit_micro_batch, memory_estimate, memory_lines,
                           plan_batch, split_batch)
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- the arithmetic


def test_divisors():
    assert divisors(1) == [1]
    assert divisors(12) == [1, 2, 3, 4, 6, 12]
    assert divisors(7) == [1, 7]


@pytest.mark.parametrize("global_batch, world, max_micro, expected", [
    (8, 1, 8, (8, 1)), (8, 1, 100, (8, 1)), (8, 1, 5, (4, 2)), (8, 1, 1, (1, 8)), (8, 1, 3, (2, 4)),
    (12, 1, 5, (4, 3)), (7, 1, 6, (1, 7)),  # a prime share: only 1 or all of it
    (32, 4, 8, (8, 1)), (32, 4, 7, (4, 2)), (32, 4, 3, (2, 4)), (24, 2, 5, (4, 3)), (6, 6, 4, (1, 1)),
])
def test_split_batch_takes_the_largest_divisor_that_fits(global_batch, world, max_micro, expected):
    micro, accum = split_batch(global_batch, world, max_micro)
    assert (micro, accum) == expected
    assert micro * accum * world == global_batch and micro <= max_micro


@pytest.mark.parametrize("global_batch, world, max_micro, match", [
    (8, 3, 8, "a global batch of 8 cannot be shared by 3 processes; set --global_batch_size to a multiple of 3"),
    (4, 8, 1, "a global batch of 4 cannot be shared by 8 processes"),
    (0, 1, 1, "a global batch of 0 cannot be shared"),
    (8, 1, 0, "a micro-batch of at most 0 reviews is no micro-batch"),
])
def test_split_batch_refuses_the_impossible(global_batch, world, max_micro, match):
    with pytest.raises(ConfigError, match=match):
        split_batch(global_batch, world, max_micro)


def test_plan_batch():
    assert plan_batch(Config(), 1) == BatchPlan(8, 1, 1, 8)  # the tutorial's, untouched
    assert plan_batch(Config(micro_batch_size=4, grad_accum_steps=3), 2) == BatchPlan(4, 3, 2, 24)
    derived = plan_batch(Config(micro_batch_size=4, global_batch_size=32), 2)  # accum follows
    assert (derived.micro, derived.accum, derived.global_batch) == (4, 4, 32)
    assert derived.why == "grad_accum_steps=4 (global_batch_size 32 / (micro 4 x world 2))"
    assert plan_batch(Config(micro_batch_size=0), 1) == BatchPlan(0, 0, 1, 8)  # auto: the tutorial's 8
    assert plan_batch(Config(micro_batch_size=0, global_batch_size=64), 4) == BatchPlan(0, 0, 4, 64)
    with pytest.raises(ConfigError, match="global_batch_size=24 over 4 processes is 6 reviews each, not a multiple "
                                          "of micro_batch_size=4; pick a divisor, or --micro_batch_size auto"):
        plan_batch(Config(micro_batch_size=4, global_batch_size=24), 4)
    with pytest.raises(ConfigError, match="a global batch of 8 cannot be shared by 3 processes"):
        plan_batch(Config(micro_batch_size=0), 3)
    with pytest.raises(ConfigError, match="cannot be shared by 3 processes"):
        plan_batch(Config(micro_batch_size=4, global_batch_size=8), 3)


def test_auto_is_micro_batch_size_0_from_the_command_line_and_a_file(tmp_path):
    assert coerce("micro_batch_size", "auto") == 0 and coerce("micro_batch_size", "AUTO") == 0
    assert build_config(overrides={"micro_batch_size": "auto"}).micro_batch_size == 0
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"micro_batch_size": "auto", "global_batch_size": 32}))
    assert build_config(config_file=str(file)).micro_batch_size == 0
    with pytest.raises(ConfigError, match="--grad_accum_steps expects int, got 'auto'"):
        coerce("grad_accum_steps", "auto")  # the word is for micro_batch_size only
    with pytest.raises(ConfigError, match="grad_accum_steps=2 is derived"):
        Config(micro_batch_size=4, global_batch_size=16, grad_accum_steps=2)
    with pytest.raises(ConfigError, match="global_batch_size=10 is not a multiple of micro_batch_size=4"):
        Config(micro_batch_size=4, global_batch_size=10)


# ----------------------------------------------------------------------------- the estimate


def test_memory_estimate_counts_weights_gradients_and_adamw():
    params = [(1000, 4, True), (500, 4, False), (100, 2, True)]  # a frozen fp32 block, an fp16 trainable one
    est = memory_estimate(params, activations=10_000, free=100_000)
    assert est == {"weights": 6200, "gradients": 4200, "adamw": 8400, "activations": 10_000,
                   "total": 6200 + 4200 + 8400 + 10_000, "fits": True}
    assert memory_estimate(params, None, None)["fits"] is None  # free memory unknown (MPS)
    assert memory_estimate(params, None, 6200)["total"] == 18_800  # not measured: the rest alone
    assert memory_estimate(params, None, 12_599)["fits"] is False  # weights are loaded: 12600 still to come
    assert memory_estimate(params, None, 12_600)["fits"] is True
    assert memory_estimate(params, math.inf, 10**12)["fits"] is False  # the probe ran out of memory


def test_memory_lines_warn_with_the_fixes():
    plan = BatchPlan(8, 1, 1, 8, tokens=512)
    est = memory_estimate([(110_000_000, 4, True)], 3e9, 80e9)
    assert memory_lines(est, 80e9, plan, "cuda:0") == [
        "memory: weights 440 MB + gradients 440 MB + AdamW 880 MB + activations 3 GB at micro 8 x 512 tokens "
        "(measured) = 4.76 GB | cuda:0 free: 80 GB"]
    small = memory_lines(memory_estimate([(110_000_000, 4, True)], 3e9, 2e9), 2e9, plan, "cuda:0")
    assert small[1] == ("warning: this run will not fit in cuda:0 memory (4.32 GB needed besides the weights, 2 GB "
                        "free); fixes: "
                        "--micro_batch_size auto (the largest micro-batch that fits, same global batch), "
                        "--gradient_checkpointing true, or --precision bf16 (fp16 on GPUs without bf16)")
    cpu = memory_lines(memory_estimate([(1000, 4, True)], None, 10**9), 10**9, BatchPlan(8, 1, 1, 8), "cpu")
    assert cpu == ["memory: weights 4 KB + gradients 4 KB + AdamW 8 KB + activations not measured on cpu = 16 KB+ "
                   "| cpu free: 1 GB"]
    over = memory_lines(memory_estimate([(1000, 4, True)], math.inf, 10**9), 10**9, plan, "cuda:0")
    assert "activations over the device's memory at micro 8 x 512 tokens (probe) = ?" in over[0]
    assert over[1].startswith("warning: this run will not fit in cuda:0 memory (forward + backward at micro 8 x 512 "
                              "tokens ran out of memory); fixes: --micro_batch_size auto")


def test_cpu_memory_is_mem_available():
    free = Engine(torch.device("cpu"), "fp32").memory()
    assert free["allocated"] is None and free["peak"] is None
    assert free["free"] is None or free["free"] > 0


# ----------------------------------------------------------------------------- auto, end to end


def header(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "sentiment"]


def run(tiny_config, out, **overrides):
    values = dict(n_train=40, n_test=8, epochs=2, dropout=0.1, output_dir=str(out))  # dropout on: RNG matters
    values.update(overrides)
    return train(tiny_config(**values))


def test_auto_with_a_simulated_limit_equals_the_split_by_hand(tiny_config, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sentiment")
    monkeypatch.setenv(PROBE_LIMIT_ENV, "3")  # the "device" holds 3 reviews: of 8's divisors, 2 fits and 4 does not
    auto = run(tiny_config, tmp_path / "auto", micro_batch_size=0)
    lines = header(caplog)
    assert "batch: global 8 = micro 2 x accum 4 x world 1 | 5 steps/epoch x 2 epochs = 10 steps | warmup 0 steps" \
        in lines
    assert ("fit: micro_batch_size=2 grad_accum_steps=4 (auto: the largest divisor of the 8 reviews per process "
            "that fits forward + backward + AdamW at 64 tokens, fp32, gradient checkpointing off; 4, 8 did not; "
            "2 x 4 x world 1 = global batch 8)") in lines
    assert auto["batch"] == {"global": 8, "micro": 2, "accum": 4, "world": 1}
    assert json.loads((tmp_path / "auto" / "config.json").read_text())["micro_batch_size"] == 0  # as asked
    monkeypatch.delenv(PROBE_LIMIT_ENV)
    by_hand = run(tiny_config, tmp_path / "hand", micro_batch_size=2, grad_accum_steps=4)
    assert by_hand["batch"] == auto["batch"]
    numbers = [[(r["loss"], r["lr"], r["grad_norm"]) for r in read_metrics(tmp_path / run_)[0]] for run_ in ("auto", "hand")]
    assert numbers[0] == numbers[1] and len(numbers[0]) == 10
    weights = [(tmp_path / run_ / "model" / "model.safetensors").read_bytes() for run_ in ("auto", "hand")]
    assert weights[0] == weights[1]  # bitwise: the probe changed no RNG state, gradient or weight
    # (that another split gives the same numbers up to rounding, dropout off, is test_train's accumulation tests)


def test_auto_on_cpu_without_the_knob_keeps_the_global_batch_whole(tiny_config, tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="sentiment")
    monkeypatch.delenv(PROBE_LIMIT_ENV, raising=False)
    results = run(tiny_config, tmp_path / "r", micro_batch_size=0, global_batch_size=16, epochs=1)
    assert results["batch"] == {"global": 16, "micro": 16, "accum": 1, "world": 1}
    assert ("fit: micro_batch_size=16 grad_accum_steps=1 (auto on cpu: no device memory to probe; the whole share "
            "of the global batch of 16 per forward)") in header(caplog)
    memory = [line for line in header(caplog) if line.startswith("memory: ")]
    assert len(memory) == 1 and "activations not measured on cpu" in memory[0], memory


def test_a_fixed_micro_batch_over_the_limit_is_warned_about_before_the_first_step(tiny_config, tmp_path, monkeypatch,
                                                                                    caplog):
    caplog.set_level(logging.INFO, logger="sentiment")
    monkeypatch.setenv(PROBE_LIMIT_ENV, "4")  # simulated: the warning, not an out-of-memory (the CPU has room)
    run(tiny_config, tmp_path / "r", micro_batch_size=8, epochs=1, log_every=1)
    lines = header(caplog)
    warning = next(i for i, line in enumerate(lines) if line.startswith("warning: this run will not fit in cpu"))
    assert "--micro_batch_size auto" in lines[warning] and "--gradient_checkpointing true" in lines[warning]
    assert warning < next(i for i, line in enumerate(lines) if line.startswith("step 1/"))


def test_the_probe_leaves_no_trace(tiny_config, tiny_dirs, monkeypatch):
    from sentiment.data import ReviewDataset, collator, load_splits
    from sentiment.model import load_model, load_tokenizer

    monkeypatch.setenv(PROBE_LIMIT_ENV, "2")
    cfg = tiny_config(micro_batch_size=0, global_batch_size=12)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    split = load_splits(cfg, tokenizer).train
    model = load_model(cfg.model_name_or_path)
    engine = Engine(torch.device("cpu"), "fp32")
    before, rng = {k: v.clone() for k, v in model.state_dict().items()}, torch.get_rng_state()
    plan = fit_micro_batch(plan_batch(cfg, 1), cfg, engine, model, ReviewDataset(split), collator(cfg, 0))
    assert (plan.micro, plan.accum) == (2, 6)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is None for p in model.parameters())
    assert not model.training  # as it was
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_auto_under_torchrun_equals_the_split_by_hand(tiny_dirs, tmp_path):
    """2 CPU processes: each probes (the knob says 4 reviews do not fit), both take micro 2 x accum 2, and the
    weights are those of the same split typed by hand, bit for bit."""
    from conftest import cli_args, torchrun

    base = dict(model_name_or_path=str(tiny_dirs[0]), data_dir=str(tiny_dirs[1]), n_train=32, n_test=8,
                max_length=64, epochs=1, device="cpu", precision="fp32", log_every=0)
    out = torchrun(["-m", "sentiment", "train", *cli_args({**base, "micro_batch_size": "auto",
                                                           "output_dir": str(tmp_path / "auto")})],
                   env={PROBE_LIMIT_ENV: "3"})
    assert "fit: micro_batch_size=2 grad_accum_steps=2 (auto: the largest divisor of the 4 reviews per process" in out
    torchrun(["-m", "sentiment", "train", *cli_args({**base, "micro_batch_size": 2, "grad_accum_steps": 2,
                                                     "output_dir": str(tmp_path / "hand")})])
    weights = [(tmp_path / run_ / "model" / "model.safetensors").read_bytes() for run_ in ("auto", "hand")]
    assert weights[0] == weights[1]
