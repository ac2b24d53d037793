"""Never lose a run (issue 5): exact resume, SIGKILL / SIGTERM / a kill during a checkpoint write,
a resume with a changed result-affecting field, and non-finite steps.

Every comparison is bitwise: weights with torch.equal, metrics.jsonl rows with ==, after dropping
the timing fields. Dropout stays on (the tiny model's own 0.1), so the RNG states must resume too.
One uninterrupted in-process run is the reference. Everything runs on one CPU thread (in-process and
OMP_NUM_THREADS=1 in the subprocesses), so a kill in a subprocess and a resume in this process are
bitwise comparable; subprocess imports cost seconds, so only the runs to be killed are subprocesses.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import (REPO, cli_args, is_timing, last_step, metrics_rows, read_metrics, saved_weights,
                      sigterm_at_step, subprocess_env)
from safetensors.torch import load_file, save_file

from sentiment import checkpoint as ckpt
from sentiment.config import Config
from sentiment.errors import ConfigError, TrainingError
from sentiment.model import load_model
from sentiment.tiny import make_reviews, make_tokenizer, write_jsonl
from sentiment.train import train


# 64 reviews, micro-batch 8, 3 epochs: 8 steps per epoch, 24 steps, an evaluation at steps 8, 16, 24
TOTAL_STEPS = 24


def settings(model_dir: Path, data_dir: Path, output_dir: Path) -> dict:
    return dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=64, n_test=0,
                max_length=64, epochs=3, micro_batch_size=8, lr=3e-3, device="cpu", precision="fp32",
                output_dir=str(output_dir), log_every=0)  # dropout: the model's own (0.1)


# ----------------------------------------------------------------------------- comparing runs


def rows(run: Path) -> list[dict]:
    """metrics.jsonl without the timing fields (which differ between any two runs)."""
    return [{k: v for k, v in row.items() if not is_timing(k)} for row in metrics_rows(run)]


def assert_same_run(run: Path, reference: Path) -> None:
    """Bitwise: the final weights, every metrics row (loss, lr, grad_norm, eval metrics) and the results."""
    got, want = saved_weights(run), saved_weights(reference)
    assert got.keys() == want.keys()
    differing = [k for k in want if not torch.equal(got[k], want[k])]
    assert not differing, f"weights differ from the uninterrupted run: {differing[:5]}"
    got_rows, want_rows = rows(run), rows(reference)
    assert len(got_rows) == len(want_rows) == TOTAL_STEPS + 3
    for got_row, want_row in zip(got_rows, want_rows):
        assert got_row == want_row
    results = [{k: v for k, v in json.loads((r / "results.json").read_text()).items()
                if not is_timing(k)} for r in (run, reference)]
    assert results[0] == results[1]
    # report.md's misclassified reviews come from the final test evaluation, which a resume repeats
    section = [(r / "report.md").read_text().split("## Misclassified test reviews")[1].split("## Config")[0]
               for r in (run, reference)]
    assert section[0] == section[1]


# ----------------------------------------------------------------------------- subprocess runs


def start(values: dict, log: Path, program: list[str] | None = None, **extra_env: str) -> subprocess.Popen:
    """`python -m sentiment train` (or `program`) in the background, output to `log`."""
    program = program or ["-m", "sentiment", "train"]
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, *program, *cli_args(values)], cwd=REPO,
                                env=subprocess_env(**extra_env), stdout=out, stderr=subprocess.STDOUT)


def signal_at_step(proc: subprocess.Popen, run: Path, step: int, sig: int, log: Path) -> None:
    """Send `sig` once metrics.jsonl shows `step`, at a random instant within the following step."""
    deadline = time.monotonic() + 240
    while last_step(run) < step:
        assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)
    time.sleep(random.uniform(0, 0.01))
    proc.send_signal(sig)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


@pytest.fixture(scope="module")
def reference(tiny_dirs, tmp_path_factory) -> tuple[dict, Path]:
    """(settings, output_dir) of the uninterrupted run that the interrupted runs must reproduce."""
    values = settings(*tiny_dirs, tmp_path_factory.mktemp("reference") / "run")
    train(Config(**values))
    return values, Path(values["output_dir"])


def resume_in_process(values: dict, capsys) -> str:
    """`--resume auto` on the run in values["output_dir"], in this process; returns what it printed."""
    earlier = capsys.readouterr().out
    train(Config(**{**values, "output_dir": str(values["output_dir"]), "resume": "auto"}))
    output = capsys.readouterr().out
    print(earlier + output, end="")  # still shown if the test fails
    return output


def test_sigkill_at_a_random_step_then_resume_auto_is_bitwise_identical(reference, tmp_path, capsys):
    values, reference_run = reference
    run, log = tmp_path / "run", tmp_path / "log.txt"
    values = {**values, "output_dir": run, "save_every": 1}
    kill_at = random.randint(3, 10)  # leaves 14+ steps: the kill lands before the end
    print(f"SIGKILL after step {kill_at}")  # shown if the test fails
    proc = start(values, log)
    signal_at_step(proc, run, kill_at, signal.SIGKILL, log)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert not (run / "model").exists(), "the run finished before the kill: the test proved nothing"

    # the row of step k is written before step k's checkpoint: the kill may have come in between
    newest_valid = ckpt.find_resume("auto", run).step
    assert newest_valid >= kill_at - 1
    output = resume_in_process(values, capsys)
    assert f"resuming at step {newest_valid}" in output
    assert_same_run(run, reference_run)


def test_sigterm_checkpoints_says_how_to_resume_and_resumes_bitwise(reference, tmp_path, capsys):
    values, reference_run = reference
    run, log = tmp_path / "run", tmp_path / "log.txt"
    values = {**values, "output_dir": run}  # save_every 0: only the SIGTERM checkpoint mid-epoch
    stop_at = random.randint(3, 10)
    print(f"SIGTERM after step {stop_at}")
    proc = start(values, log)
    signal_at_step(proc, run, stop_at, signal.SIGTERM, log)
    assert proc.wait(timeout=60) == 143  # 128 + SIGTERM, what SLURM and schedulers expect
    output = log.read_text()
    assert "SIGTERM received" in output
    assert "checkpoint written. Resume with the same flags plus --resume auto" in output
    stopped = last_step(run)
    assert ckpt.checkpoint_paths(run / "checkpoints")[0].name == f"step_{stopped:07d}.pt"
    assert not (run / "model").exists()

    output = resume_in_process(values, capsys)  # the same flags plus --resume auto, as the message says
    assert f"resuming at step {stopped}" in output
    assert_same_run(run, reference_run)


KILL_DURING_SAVE = """
import io, os, signal, sys, torch
kill_at, calls, real_save = int(os.environ["KILL_AT_SAVE"]), [0], torch.save
def save(obj, f, *args, **kwargs):
    if "step_" not in str(getattr(f, "name", "")):
        return real_save(obj, f, *args, **kwargs)
    calls[0] += 1
    if calls[0] < kill_at:
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    f.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])  # half of the checkpoint is on disk
    f.flush()
    os.fsync(f.fileno())
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = save
from sentiment.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_during_a_checkpoint_write_resumes_from_the_previous_checkpoint(reference, tmp_path, capsys):
    values, reference_run = reference
    run, log = tmp_path / "run", tmp_path / "log.txt"
    values = {**values, "output_dir": run, "save_every": 1, "keep_last": 3}
    kill_at = random.randint(4, TOTAL_STEPS - 4)  # killed while writing step_{kill_at}
    print(f"SIGKILL while writing the checkpoint of step {kill_at}")
    script = tmp_path / "kill_during_save.py"
    script.write_text(KILL_DURING_SAVE)
    proc = start(values, log, program=[str(script), "train"], KILL_AT_SAVE=str(kill_at))
    assert proc.wait(timeout=240) == -signal.SIGKILL, log.read_text()[-3000:]
    folder = run / "checkpoints"
    assert (folder / f".step_{kill_at:07d}.pt.tmp").exists()  # the torn write, never renamed into place
    assert [p.name for p in ckpt.checkpoint_paths(folder)][0] == f"step_{kill_at - 1:07d}.pt"
    # worse still: the newest complete checkpoint is torn too (e.g. a disk that lied about fsync)
    newest = folder / f"step_{kill_at - 1:07d}.pt"
    newest.write_bytes(newest.read_bytes()[:1000])

    output = resume_in_process(values, capsys)
    assert f"checkpoint {newest} is corrupt or unreadable" in output
    assert f"resuming at step {kill_at - 2}" in output
    assert_same_run(run, reference_run)


# ----------------------------------------------------------------------------- in-process


@pytest.mark.parametrize("signal_at", [TOTAL_STEPS // 2, 8], ids=["mid-epoch", "epoch-end"])
def test_sigterm_in_process_checkpoints_the_step_it_stops_at_and_resumes_bitwise(signal_at, reference, tiny_dirs,
                                                                                  tmp_path, capsys):
    """A real SIGTERM, sent from another thread once metrics.jsonl shows step `signal_at`: the run finishes the
    step it is in, checkpoints it (the only checkpoint: keep_last 1), exits 143 without saving a model, and a
    resume finishes as the uninterrupted run did. At step 8 the signal normally lands during the epoch's
    evaluation, before the run decides whether to stop: the stop and the epoch-end checkpoint coincide."""
    run = tmp_path / "run"
    cfg = Config(**settings(*tiny_dirs, run))
    assert sigterm_at_step(run, signal_at, lambda: train(cfg)) == 143
    stopped = last_step(run)
    assert stopped in (signal_at, signal_at + 1), f"SIGTERM after step {signal_at}, stopped after step {stopped}"
    assert [p.name for p in ckpt.checkpoint_paths(run / "checkpoints")] == [f"step_{stopped:07d}.pt"]
    assert f"stopped by SIGTERM after step {stopped}; checkpoint written." in capsys.readouterr().out
    assert not (run / "model").exists()

    train(Config(**{**settings(*tiny_dirs, run), "resume": "auto"}))
    assert_same_run(run, reference[1])


def test_resume_with_a_changed_lr_is_refused_and_names_the_field(tiny_config):
    cfg = tiny_config(epochs=1)
    train(cfg)
    out = Path(cfg.output_dir)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError) as refused:
        train(tiny_config(epochs=1, lr=1e-3, resume="auto"))
    assert "these fields differ from its run: lr; " in str(refused.value)
    with pytest.raises(ConfigError, match=r"its run: lr, micro_batch_size; "):
        train(tiny_config(epochs=1, lr=1e-3, micro_batch_size=4, resume="auto"))
    after = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before  # a refused resume touches nothing
    # a field that changes nothing is allowed; the run is finished, so its results are kept as they are
    assert train(tiny_config(epochs=1, resume="auto", log_every=5)) == json.loads((out / "results.json").read_text())
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


# ----------------------------------------------------------------------------- non-finite steps


EMBEDDINGS, MASK = "bert.embeddings.word_embeddings.weight", make_tokenizer().mask_token_id


def inputs_with_nan_steps(tiny_dirs, folder: Path, bad_steps: set[int]) -> dict:
    """Config values for a run whose optimizer steps in `bad_steps` (1-based) have a NaN loss, from its inputs
    alone: a copy of the tiny model whose [MASK] embedding row is inf (as a corrupt file could leave it), and
    64 training reviews read in file order (no shuffling, no length grouping: step k reads reviews 8k-8..8k-1)
    where one review of each bad step contains "[MASK]". Attention spreads the inf through that review to its
    logits; no other review reads the row, so every other step is finite and gives the row a zero gradient."""
    model_dir, data_dir = tiny_dirs
    shutil.copytree(model_dir, folder / "model")
    weights = load_file(str(folder / "model" / "model.safetensors"))
    weights[EMBEDDINGS][MASK] = math.inf
    save_file(weights, str(folder / "model" / "model.safetensors"), metadata={"format": "pt"})
    reviews = make_reviews(64)
    for step in bad_steps:
        reviews[8 * step - 5]["text"] = "[MASK] " + reviews[8 * step - 5]["text"]  # first: never truncated
    write_jsonl(folder / "data" / "train.jsonl", reviews)
    shutil.copy(data_dir / "test.jsonl", folder / "data" / "test.jsonl")  # no [MASK]: evaluation stays finite
    return dict(model_name_or_path=str(folder / "model"), data_dir=str(folder / "data"), n_train=0, n_test=0,
                shuffle=False, group_by_length=False, epochs=1, micro_batch_size=8)


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_loss_skips_the_step_and_logs_it(tiny_dirs, tiny_config, tmp_path, capsys):
    """Steps 3 and 4 have a NaN loss: each is logged (row and line, even with log_every 0) and skipped, leaving
    the weights and AdamW's state exactly as they were; step 5 is clean again and the count of bad steps resets."""
    cfg = tiny_config(**inputs_with_nan_steps(tiny_dirs, tmp_path, {3, 4}), save_every=1, keep_last=8)
    results = train(cfg)
    out = Path(cfg.output_dir)
    train_rows = read_metrics(out)[0]
    assert [r["step"] for r in train_rows if r["skipped"]] == [3, 4]
    assert all(math.isnan(r["loss"]) for r in train_rows if r["skipped"])
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train_rows if not r["skipped"])
    printed = capsys.readouterr().out
    assert "step 3/8 |" in printed and "step 4/8 |" in printed and printed.count("SKIPPED (non-finite)") == 2

    # a checkpoint after every step: the state before and after each one
    states = [ckpt.load_checkpoint(ckpt.checkpoint_path(out, step)) for step in range(1, 9)]
    before = [load_model(cfg.model_name_or_path).state_dict()] + [s["model"] for s in states[:-1]]
    moved = [not same_weights(b, s["model"]) for b, s in zip(before, states)]
    assert moved == [True, True, False, False, True, True, True, True]
    assert [int(s["optimizer"]["state"][0]["step"]) for s in states] == [1, 2, 2, 2, 3, 4, 5, 6]  # AdamW's updates
    assert [s["bad_steps"] for s in states] == [0, 0, 1, 2, 0, 0, 0, 0]  # consecutive: a clean step resets it

    assert math.isfinite(results["loss"])
    final = saved_weights(out)  # no update wrote a non-finite number: the inf row is the one given, untouched
    assert [k for k, w in final.items() if not torch.isfinite(w).all()] == [EMBEDDINGS]
    assert torch.isinf(final[EMBEDDINGS][MASK]).all()
    assert torch.isfinite(final[EMBEDDINGS][torch.arange(len(final[EMBEDDINGS])) != MASK]).all()


def test_repeated_nans_stop_the_run_with_the_last_good_checkpoint_intact(tiny_config):
    """lr 1e8 without clipping: AdamW's first update moves every weight by about the lr, and from step 2 on
    every gradient overflows. Three non-finite steps in a row (max_bad_steps) stop the run with one error
    naming the newest checkpoint, which holds the last good weights (those after step 1) and loads."""
    cfg = tiny_config(epochs=1, n_train=64, lr=1e8, max_grad_norm=0.0, max_bad_steps=3, save_every=1, keep_last=3)
    with pytest.raises(TrainingError, match=r"^3 consecutive steps had a non-finite loss or gradient \(last at "
                                            r"step 4\); the newest checkpoint, .*step_0000003\.pt, is intact\. "
                                            r"Lower --lr"):
        train(cfg)
    out = Path(cfg.output_dir)
    assert [r["step"] for r in read_metrics(out)[0] if r["skipped"]] == [2, 3, 4]
    # step 4 raised before its checkpoint
    assert [p.name for p in ckpt.checkpoint_paths(out / "checkpoints")] == [
        "step_0000003.pt", "step_0000002.pt", "step_0000001.pt"]
    newest, after_step_1 = (ckpt.load_checkpoint(ckpt.checkpoint_path(out, step))["model"] for step in (3, 1))
    assert all(torch.isfinite(w).all() for w in newest.values())
    assert same_weights(newest, after_step_1)  # the skipped steps 2 and 3 changed nothing
    model = load_model(cfg.model_name_or_path)
    assert not same_weights(after_step_1, model.state_dict())  # step 1 did update them
    model.load_state_dict(newest)  # loadable as it is


# ----------------------------------------------------------------------------- signals to the whole group, disks


def test_sigterm_to_the_process_group_with_dataloader_workers_checkpoints_and_resumes(reference, tmp_path, capsys):
    """What SLURM and Ctrl-C do: the signal reaches every process of the group, DataLoader workers included."""
    values, reference_run = reference
    run, log = tmp_path / "run", tmp_path / "log.txt"
    values = {**values, "output_dir": run, "num_workers": 2}
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "sentiment", "train", *cli_args(values)], cwd=REPO, env=subprocess_env(),
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 240
    while last_step(run) < 5:
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    output = log.read_text()
    assert "checkpoint written. Resume with the same flags plus --resume auto" in output
    assert "Traceback" not in output and "killed by signal" not in output
    stopped = last_step(run)
    output = resume_in_process({**values, "num_workers": 0}, capsys)  # workers change nothing in the math
    assert f"resuming at step {stopped}" in output
    assert_same_run(run, reference_run)


def test_sigterm_during_the_final_evaluation_says_what_happens_next(tiny_dirs, tmp_path, capsys):
    model_dir, _ = tiny_dirs
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", make_reviews(32, seed=3))
    write_jsonl(data / "test.jsonl", make_reviews(4000, seed=4))  # a final evaluation long enough to hit
    run, log = tmp_path / "run", tmp_path / "log.txt"
    values = {**settings(model_dir, data, run), "n_train": 32, "val_fraction": 0.25, "epochs": 2}
    proc = start(values, log)
    deadline = time.monotonic() + 240
    while "best model:" not in log.read_text():  # printed just before the final test evaluation
        assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.002)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 143, log.read_text()[-3000:]
    assert ("SIGTERM received during the final evaluation: training is finished and checkpointed; stopping now. "
            "Run the same command with --resume auto to evaluate and save the model") in log.read_text()
    assert not (run / "results.json").exists()
    results = train(Config(**{**values, "resume": "auto"}))
    assert (run / "results.json").is_file() and results["steps"] == 2 * 3
    assert results == train(Config(**{**values, "output_dir": str(tmp_path / "uninterrupted")})) | {
        k: results[k] for k in results if is_timing(k) or k == "samples_per_second"}


@pytest.mark.parametrize("limit", ["tmpfs", "file_size"])
def test_disk_full_at_a_checkpoint_is_one_line_and_resumes_bitwise(limit, reference, tmp_path, capsys):
    """A full disk: a small tmpfs that holds one checkpoint but not two (where this machine lets us mount
    one), and a file-size limit that no checkpoint fits (EFBIG, the same writes fail): one error line
    naming the folder, no temp file left, the earlier checkpoint intact, a bitwise resume once there is space."""
    values, reference_run = reference
    tmpfs = limit == "tmpfs"
    if tmpfs:
        (tmp_path / "fs").mkdir()
        try:
            mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(tmp_path / "fs")],
                                     capture_output=True).returncode == 0
        except OSError:
            mounted = False
        if not mounted:
            pytest.skip("cannot mount a tmpfs here (needs root); the file_size case covers the same writes")
    run = (tmp_path / "fs" / "run") if tmpfs else (tmp_path / "run")
    values = {**values, "output_dir": str(run), "save_every": 1}
    try:
        size = _checkpoint_size(values, tmp_path)
        if tmpfs:  # the first checkpoint fits, the second does not while the first is still there
            subprocess.run(["mount", "-o", f"remount,size={size * 3 // 2}", str(tmp_path / "fs")], check=True)
            limit = None
        else:
            limit = size // 2  # no checkpoint fits; the small files (config, metrics) do
        proc = subprocess.run([sys.executable, "-m", "sentiment", "train", *cli_args(values)], cwd=REPO, env=subprocess_env(),
                              capture_output=True, text=True, timeout=240,
                              preexec_fn=(lambda: _limit_file_size(limit)) if limit else None)
        assert proc.returncode == 2, proc.stderr[-3000:]
        err = [line for line in proc.stderr.splitlines() if line.startswith("error")]
        assert "Traceback" not in proc.stderr and len(err) == 1, proc.stderr[-3000:]
        assert err[0].startswith(f"error: no space left for the run in {run / 'checkpoints'} (")
        assert "free space there, then rerun with --resume auto" in err[0]
        assert not [p for p in run.rglob("*.tmp")], "a temp file was left filling the disk"
        kept = ckpt.checkpoint_paths(run / "checkpoints")
        if tmpfs:
            assert [p.name for p in kept] == ["step_0000001.pt"] and ckpt.load_checkpoint(kept[0])["step"] == 1
            subprocess.run(["mount", "-o", "remount,size=64m", str(tmp_path / "fs")], check=True)
        else:
            assert kept == []
        output = resume_in_process(values, capsys)
        assert ("resuming at step 1" if tmpfs else "starting a fresh run") in output
        assert_same_run(run, reference_run)
    finally:
        if tmpfs:
            subprocess.run(["umount", str(tmp_path / "fs")], check=False)


def _checkpoint_size(values: dict, tmp_path: Path) -> int:
    """Bytes of one checkpoint of this run (from a 1-step run elsewhere)."""
    probe = {**values, "output_dir": str(tmp_path / "size_probe"), "n_train": 8, "epochs": 1}
    train(Config(**probe))
    return ckpt.checkpoint_paths(Path(probe["output_dir"]) / "checkpoints")[0].stat().st_size


def _limit_file_size(limit: int) -> None:
    import resource

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG from write() instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


# ----------------------------------------------------------------------------- a kill at every write

KILL_AT_EVERY_WRITE = """
import json, os, signal, sys
import torch
from sentiment.cli import main

argv, root = json.loads(sys.argv[1]), sys.argv[2]
PRIMITIVES = ("replace", "rename", "unlink", "rmdir")  # what makes a written file visible, or removes one


def child(out, kill_at, extra=(), wait=True):
    # one run in a forked child: this process imported everything once, so each run costs no start-up
    pid = os.fork()
    if pid == 0:
        log = os.open(out + ".log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        os.dup2(log, 1), os.dup2(log, 2)
        torch.set_num_threads(1)
        real, count = {name: getattr(os, name) for name in PRIMITIVES}, [0]

        def counting(name):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return real[name](*args, **kwargs)
            return call

        for name in PRIMITIVES:
            setattr(os, name, counting(name))
        code = main([*argv, "--output_dir", out, *extra])
        os.write(1, f"\\nwrites: {count[0]}\\n".encode())
        os._exit(code)
    return os.waitpid(pid, 0)[1] if wait else pid


assert child(root + "/warmup", 0) == 0  # fills the tokenization cache, whose writes would shift the count
assert child(root + "/reference", 0) == 0
writes = int(open(root + "/reference.log").read().rsplit("writes: ", 1)[1])
for first in range(1, writes + 1, 2):  # two runs at a time, one per core
    outs = {n: f"{root}/kill_{n:03d}" for n in range(first, min(first + 2, writes + 1))}
    for n, pid in [(n, child(out, n, wait=False)) for n, out in outs.items()]:
        status = os.waitpid(pid, 0)[1]
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, (n, status)
    for n, pid in [(n, child(out, 0, ["--resume", "auto"], wait=False)) for n, out in outs.items()]:
        assert os.waitpid(pid, 0)[1] == 0, open(outs[n] + ".log").read()[-3000:]
print(writes)
"""


def test_a_kill_at_every_write_resumes_to_the_same_model_and_results(tiny_dirs, tmp_path):
    """SIGKILL before each change a run makes to what is on disk (each rename, unlink and rmdir), then
    `--resume auto`: every prefix of the writes is a consistent state. With a validation split, so the
    best checkpoint (read from the newest checkpoint itself) decides which model is saved."""
    values = {**settings(*tiny_dirs, tmp_path), "n_train": 24, "val_fraction": 0.25, "micro_batch_size": 6}
    argv = ["train", *cli_args({k: v for k, v in values.items() if k != "output_dir"})]
    script = tmp_path / "kill_at_every_write.py"
    script.write_text(KILL_AT_EVERY_WRITE)
    proc = subprocess.run([sys.executable, str(script), json.dumps(argv), str(tmp_path)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    writes = int(proc.stdout.split()[-1])
    assert writes >= 10  # marker, config, 3 checkpoints and their pruning, model, report, results, lock
    reference = tmp_path / "reference"
    for n in range(1, writes + 1):
        run = tmp_path / f"kill_{n:03d}"
        got, want = saved_weights(run), saved_weights(reference)
        assert all(torch.equal(got[k], want[k]) for k in want), f"kill at write {n}: other weights"
        assert rows(run) == rows(reference), f"kill at write {n}: other metrics"
        results = [{k: v for k, v in json.loads((r / "results.json").read_text()).items() if not is_timing(k)}
                   for r in (run, reference)]
        assert results[0] == results[1], f"kill at write {n}: other results"
