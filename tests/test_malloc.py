"""malloc.py (CPU): glibc keeps freed memory for reuse (--keep_freed_memory, on by default), unless the
environment already chose the allocator's behaviour.

The effect is measured, not assumed: in a fresh process (this one is left as it is), a 64 MB tensor is
allocated, written and freed over and over, counting the minor page faults each round costs. glibc's
defaults serve a block that large with fresh pages from mmap and unmap them on free, so every round faults
every page again; keeping freed memory, the rounds reuse the same pages and fault none.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest
from conftest import REPO, subprocess_env

from sentiment import malloc
from sentiment.engine import setup_engine
from sentiment.train import train

GLIBC = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's (Linux); elsewhere the flag changes nothing")

ROUNDS, STEADY = 40, 10  # the last STEADY of ROUNDS rounds are compared
BLOCK = 64 * 2**20  # bytes: over glibc's largest mmap threshold (32 MB)

# argv[1]: "untouched" (glibc defaults), "configure=true|false" (malloc.configure), "engine=true|false"
# (setup_engine(keep_freed_memory=...)); prints the decision line and each round's minor page faults
PROBE = f"""
import json, resource, sys
import torch
from sentiment import malloc
from sentiment.engine import setup_engine

how, _, value = sys.argv[1].partition("=")
if how == "configure":
    decision = malloc.configure(value == "true")
elif how == "engine":
    engine = setup_engine("cpu", "fp32", keep_freed_memory=value == "true")
    decision = next(d for d in engine.decisions if d.startswith("malloc="))
else:
    decision = ""
torch.ones(1).sum()  # torch's first-call allocations, out of the way
faults = []
for _ in range({ROUNDS}):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = torch.ones({BLOCK} // 4)  # float32: BLOCK bytes; ones() writes every page
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({{"decision": decision, "faults": faults}}))
"""


def malloc_decision(engine) -> str:
    return next(d for d in engine.decisions if d.startswith("malloc="))


def probe(mode: str) -> tuple[str, int]:
    """(decision line, page faults of the last STEADY rounds) of the probe in a fresh process."""
    env = subprocess_env()
    for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "LD_PRELOAD"):  # the user's choice, if any
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    return result["decision"], sum(result["faults"][-STEADY:])


@needs_glibc
def test_keeping_freed_memory_stops_refaulting_a_large_block_every_round():
    """The first rounds may still fault (torch's 64-byte aligned blocks leave small remainders that keep glibc
    from merging a freed block until its per-size cache fills); from then on the block is reused. Without it,
    every round faults every page: the cost the flag removes from each training step."""
    _, untouched = probe("untouched")
    decision, kept = probe("configure=true")
    assert decision.startswith("malloc=keep freed memory for reuse (CPU: large tensors are otherwise re-faulted")
    assert untouched >= STEADY * BLOCK // 2**21  # each round faults every page (2 MB ones, if huge pages)
    assert kept * 10 < untouched, f"{kept} page faults kept vs {untouched} with glibc's defaults"


@needs_glibc
@pytest.mark.parametrize("mode", ["configure=false", "engine=false"])
def test_keep_freed_memory_false_leaves_malloc_alone(mode):
    """--keep_freed_memory false: glibc's defaults stay (every round faults again), and the decision says so."""
    _, untouched = probe("untouched")
    decision, faults = probe(mode)
    assert decision == "malloc=glibc defaults (--keep_freed_memory false: peak RSS ~1 GB lower, ~15-25% slower at 512 tokens)"
    assert faults > untouched / 2


def test_the_config_flag_reaches_the_engine(tiny_config, capsys):
    """keep_freed_memory=false in the config is what train() passes on: the run header and results.json
    carry the decision."""
    results = train(tiny_config(epochs=1, n_train=8, n_test=8, keep_freed_memory=False))
    expected = "malloc=glibc defaults (--keep_freed_memory false: peak RSS ~1 GB lower, ~15-25% slower at 512 tokens)"
    if malloc.chosen_outside():  # the environment running these tests chose already: that decision wins
        expected = f"malloc=as the environment sets it ({malloc.chosen_outside()})"
    assert [d for d in results["engine"] if d.startswith("malloc=")] == [expected]
    assert f"engine: {expected}\n" in capsys.readouterr().out


def test_malloc_left_alone_when_the_environment_chose(monkeypatch, capsys):
    """glibc's MALLOC_*_THRESHOLD_ variables or a preloaded jemalloc/tcmalloc win over the flag, whatever it says."""
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")  # the opt-out the decision line names
    engine = setup_engine(device="cpu", precision="fp32", seed=0)
    assert "malloc=as the environment sets it (MALLOC_TRIM_THRESHOLD_=131072)" in engine.decisions
    assert not any(d.startswith("malloc=keep") for d in engine.decisions)
    assert "engine: malloc=as the environment sets it (MALLOC_TRIM_THRESHOLD_=131072)" in capsys.readouterr().out
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_")
    monkeypatch.setenv("LD_PRELOAD", "/usr/lib/x86_64-linux-gnu/libjemalloc.so.2")
    for keep in (True, False):
        assert malloc_decision(setup_engine(device="cpu", precision="fp32", seed=0, keep_freed_memory=keep)) == (
            "malloc=as the environment sets it (LD_PRELOAD=/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)")
    monkeypatch.setenv("LD_PRELOAD", "/opt/lib/libfoo.so")  # another preload does not replace malloc
    assert malloc.chosen_outside() == ""


@pytest.mark.skipif(GLIBC, reason="checks the message where glibc is absent")
def test_without_glibc_the_flag_says_it_changes_nothing():
    assert not malloc.keep_freed_memory()
    assert malloc.configure(True) == "malloc=unchanged (not glibc: --keep_freed_memory has no effect here)"
