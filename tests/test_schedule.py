"""The learning-rate schedule: `lr_at` must be transformers' linear warmup/decay, step for step."""

import math

import pytest
import torch
from transformers import get_linear_schedule_with_warmup

from sentiment.loop import lr_at


def reference_lrs(total_steps: int, warmup_steps: int, peak_lr: float) -> list[float]:
    """The lr transformers' scheduler sets for updates 0..total_steps-1 (as the Trainer steps it)."""
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([param], lr=peak_lr)
    sched = get_linear_schedule_with_warmup(opt, warmup_steps, total_steps)
    lrs = []
    for _ in range(total_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("total_steps, warmup_steps", [(375, 0), (375, 23), (10, 1), (7, 6), (1, 0), (50, 50)])
def test_lr_at_matches_transformers(total_steps, warmup_steps):
    peak = 5e-5
    ours = [lr_at(step, total_steps, warmup_steps, peak) for step in range(total_steps)]
    theirs = reference_lrs(total_steps, warmup_steps, peak)
    assert ours == pytest.approx(theirs, rel=1e-12, abs=1e-18)


def test_shape_of_the_schedule():
    peak, total, warmup = 1e-3, 100, 10
    assert lr_at(0, total, warmup, peak) == 0.0  # the first warmup update runs at lr 0, as in transformers
    assert lr_at(5, total, warmup, peak) == pytest.approx(peak / 2)
    assert lr_at(warmup, total, warmup, peak) == pytest.approx(peak)  # the peak right after warmup
    assert lr_at(total, total, warmup, peak) == 0.0  # reaches 0 at the end
    assert lr_at(total + 5, total, warmup, peak) == 0.0  # and never goes negative
    decay = [lr_at(s, total, warmup, peak) for s in range(warmup, total)]
    assert all(a > b for a, b in zip(decay, decay[1:]))  # strictly decreasing after warmup


def test_no_warmup_starts_at_peak_and_decays_linearly():
    # the tutorial: no warmup, linear decay to 0 over 3 epochs x 125 steps
    lrs = [lr_at(s, 375, 0, 5e-5) for s in range(375)]
    assert lrs[0] == 5e-5
    assert lrs[-1] == pytest.approx(5e-5 / 375)
    diffs = [a - b for a, b in zip(lrs, lrs[1:])]
    assert max(diffs) - min(diffs) < 1e-18  # constant slope
    assert not any(math.isnan(x) for x in lrs)
