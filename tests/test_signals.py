"""Signals as a scheduler, a terminal and an impatient user send them (issue 19's sweep): to the whole process group
of a real `sentiment train` subprocess, before training starts, mid-evaluation, twice, and as SIGHUP. Each ends in
one message and an exit status of 128 + the signal, and the run continues with --resume auto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, subprocess_env

from sentiment.tiny import make_reviews, write_jsonl


@pytest.fixture(scope="module")
def long_texts(tmp_path_factory) -> Path:
    """3,000 reviews of 200-400 words: seconds to read and tokenize, and to evaluate, on the tiny model."""
    path = tmp_path_factory.mktemp("signals") / "long.jsonl"
    write_jsonl(path, make_reviews(3000, seed=1, min_words=200, max_words=400))
    return path


def argv(tiny_dirs, out: Path, train_file: Path, test_file: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "sentiment", "train", "--model_name_or_path", str(tiny_dirs[0]), "--train_file",
            str(train_file), "--test_file", str(test_file), "--n_train", "0", "--n_test", "0", "--max_length", "64",
            "--micro_batch_size", "8", "--device", "cpu", "--precision", "fp32", "--log_every", "1",
            "--output_dir", str(out), *extra]


def signal_when(command: list[str], log: Path, ready, signals: list[int]) -> int:
    """Run `command` in a session of its own, send `signals` (one after another) to its whole process group as
    soon as ready(output so far) is true, and return its exit status."""
    with open(log, "wb") as f:
        proc = subprocess.Popen(command, cwd=REPO, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not ready(log.read_text(errors="replace")):
            assert proc.poll() is None, f"ended before the signal: {log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.005)
        for sig in signals:
            os.killpg(proc.pid, sig)
        return proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def finish(command: list[str]) -> dict:
    done = subprocess.run([*command, "--resume", "auto"], cwd=REPO, env=subprocess_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(Path(command[command.index("--output_dir") + 1], "results.json").read_text())


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT], ids=["TERM", "HUP", "INT"])
def test_a_signal_before_training_stops_at_once_and_leaves_nothing(sig, tiny_dirs, long_texts, tmp_path):
    out = tmp_path / "run"
    command = argv(tiny_dirs, out, long_texts, tiny_dirs[1] / "test.jsonl", "--max_steps", "2")
    status = signal_when(command, tmp_path / "log", lambda text: "engine: seed=" in text, [sig])  # now reading
    text = (tmp_path / "log").read_text()
    assert status == 128 + sig, text[-3000:]
    assert "Traceback" not in text
    assert f"{signal.Signals(sig).name} received before training started" in text
    assert not out.exists() or not any(p.name != ".sentiment-run.lock" for p in out.iterdir())
    if sig == signal.SIGTERM:  # what the message says to do (the other signals leave the same state)
        assert finish(command)["steps"] == 2


def test_sigterm_during_a_mid_epoch_evaluation_checkpoints_after_it(tiny_dirs, long_texts, tmp_path):
    out = tmp_path / "run"
    command = argv(tiny_dirs, out, tiny_dirs[1] / "train.jsonl", long_texts, "--eval_every", "2", "--max_steps", "4")
    status = signal_when(command, tmp_path / "log", lambda text: "step 2/4" in text, [signal.SIGTERM])
    text = (tmp_path / "log").read_text()
    assert status == 143 and "stopped by SIGTERM after step 2; checkpoint written" in text, text[-3000:]
    assert finish(command)["steps"] == 4
    evals = [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "split" in r]
    assert evals == [2, 4]  # the evaluation the signal landed in is kept, once


def test_ctrl_c_twice_quits_at_once_and_the_run_resumes(tiny_dirs, tmp_path):
    out = tmp_path / "run"
    command = argv(tiny_dirs, out, tiny_dirs[1] / "train.jsonl", tiny_dirs[1] / "test.jsonl", "--save_every", "1",
                   "--epochs", "1")
    status = signal_when(command, tmp_path / "log", lambda text: "step 3/" in text, [signal.SIGINT, signal.SIGINT])
    text = (tmp_path / "log").read_text()
    assert status == 130 and "Traceback" not in text, text[-3000:]
    assert not [p for p in out.rglob(".*.tmp")]  # a write cut by the second Ctrl-C leaves no temp file
    assert finish(command)["steps"] == 12
