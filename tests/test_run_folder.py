"""Nothing lost off the happy path (issue 10): a folder we did not mark is never touched, a finished
run stays final, a resume checks what it resumes, one writer per run folder, the best checkpoint is
whatever the newest checkpoint names, and a run that cannot go on says so without a traceback."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, sigterm_at_step, snapshot, subprocess_env, write

from sentiment import checkpoint as ckpt
from sentiment import rundir
from sentiment.cli import main
from sentiment.config import Config
from sentiment.errors import CheckpointError, ConfigError, TrainingError
from sentiment.tiny import VOCAB, make_reviews, make_tokenizer, write_jsonl
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tiny_copy(tiny_dirs, tmp_path) -> tuple[Path, Path]:
    """(model_dir, data_dir) copies this test may change."""
    model_dir, data_dir = (tmp_path / "tiny" / "model", tmp_path / "tiny" / "data")
    shutil.copytree(tiny_dirs[0], model_dir)
    shutil.copytree(tiny_dirs[1], data_dir)
    return model_dir, data_dir


def cli(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--device", "cpu",
            "--precision", "fp32", "--max_length", "64", "--epochs", "1", "--n_train", "16", "--n_test", "8",
            "--micro_batch_size", "4", "--log_every", "0", "--output_dir", str(out), *extra]


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a refusal: nonzero exit and one `error:` line, returned."""
    code = main(argv)
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert code != 0 and len(err) == 1 and err[0].startswith("error: "), err
    assert "Traceback" not in err[0]
    return err[0]


# ----------------------------------------------------------------------------- folders we do not own


@pytest.mark.parametrize("flags", [[], ["--resume", "auto"], ["--overwrite", "true"],
                                   ["--resume", "auto", "--overwrite", "true"]],
                         ids=["plain", "resume_auto", "overwrite", "resume_auto_overwrite"])
def test_a_folder_we_did_not_mark_is_never_touched(flags, tiny_dirs, tmp_path, capsys):
    out = tmp_path / "myproject"  # a user's folder that happens to hold files with our names
    write(out / "config.json", '{"mine": true}')
    write(out / "model" / "x.bin", b"\x00user weights")
    write(out / "plots" / "fig1.png", b"\x89PNG user figure")
    write(out / "notes.txt", "mine")
    before = snapshot(out)
    err = refused(cli(*tiny_dirs, out, *flags), capsys)
    assert "holds files that sentiment did not write" in err and "pass a new or empty --output_dir" in err
    assert snapshot(out) == before
    assert not (out / rundir.MARKER).exists() and not (out / rundir.LOCK).exists()


@pytest.mark.parametrize("where", ["model_folder", "inside_model_folder", "inside_data_dir"])
def test_output_dir_in_the_model_or_data_folder_is_refused(where, tiny_copy, capsys):
    model_dir, data_dir = tiny_copy
    out = {"model_folder": model_dir, "inside_model_folder": model_dir / "run",
           "inside_data_dir": data_dir / "run"}[where]
    before = snapshot(model_dir.parent)
    err = refused(cli(model_dir, data_dir, out, "--resume", "auto"), capsys)
    assert "inside the --" in err and "pass an --output_dir outside it" in err
    assert snapshot(model_dir.parent) == before


def test_an_input_inside_the_runs_own_files_is_refused(tiny_copy, tmp_path, capsys):
    """Fine-tuning RUN/model again into RUN would replace the very model it starts from."""
    model_dir, data_dir = tiny_copy
    out = tmp_path / "run"
    assert main(cli(model_dir, data_dir, out)) == 0
    before = snapshot(out)
    err = refused(cli(out / "model", data_dir, out, "--overwrite", "true"), capsys)
    assert "lies inside the run files of output_dir" in err
    assert snapshot(out) == before


# ----------------------------------------------------------------------------- finished runs are final


def test_a_finished_run_is_final_whatever_resume_names(tiny_copy, tmp_path, capsys):
    model_dir, data_dir = tiny_copy
    out, other = tmp_path / "run", tmp_path / "other"
    assert main(cli(model_dir, data_dir, out)) == 0
    assert main(cli(model_dir, data_dir, other, "--seed", "7")) == 0
    results = json.loads((out / "results.json").read_text())
    other_checkpoint = ckpt.checkpoint_paths(other / "checkpoints")[0]
    shutil.rmtree(out / "checkpoints")  # a user reclaiming disk space: the run is still finished
    before = snapshot(out)
    capsys.readouterr()

    assert main(cli(model_dir, data_dir, out, "--resume", "auto")) == 0
    assert "the run in" in capsys.readouterr().out and snapshot(out) == before
    assert train(Config(**{**_config(model_dir, data_dir, out), "resume": "auto"})) == results
    err = refused(cli(model_dir, data_dir, out), capsys)
    assert "holds a finished run; --resume auto returns its results" in err
    err = refused(cli(model_dir, data_dir, out, "--resume", "auto", "--lr", "1e-3"), capsys)
    assert "these fields differ from its run: lr;" in err
    err = refused(cli(model_dir, data_dir, out, "--resume", str(other_checkpoint), "--seed", "7"), capsys)
    assert "belongs to another run than the one in output_dir" in err
    assert snapshot(out) == before


def _config(model_dir: Path, data_dir: Path, out: Path, **overrides) -> dict:
    return {"model_name_or_path": str(model_dir), "data_dir": str(data_dir), "device": "cpu", "precision": "fp32",
            "max_length": 64, "epochs": 1, "n_train": 16, "n_test": 8, "micro_batch_size": 4, "log_every": 0,
            "output_dir": str(out), **overrides}


def test_a_checkpoint_of_another_run_continues_only_in_a_new_folder(tiny_copy, tmp_path, capsys):
    model_dir, data_dir = tiny_copy
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main(cli(model_dir, data_dir, a, "--epochs", "2", "--keep_last", "2")) == 0
    assert sigterm_at_step(b, 2, lambda: train(Config(**_config(model_dir, data_dir, b, epochs=2)))) == 143
    before = snapshot(b)
    first_epoch = ckpt.checkpoint_path(a, 4)
    err = refused(cli(model_dir, data_dir, b, "--epochs", "2", "--resume", str(first_epoch)), capsys)
    assert "belongs to another run" in err and snapshot(b) == before
    assert main(cli(model_dir, data_dir, c, "--epochs", "2", "--resume", str(first_epoch))) == 0  # a fork: fine
    assert "resuming at step 4" in capsys.readouterr().out
    assert json.loads((c / rundir.MARKER).read_text())["run_id"] != json.loads((a / rundir.MARKER).read_text())["run_id"]


# ----------------------------------------------------------------------------- a resume checks what it resumes


def test_resume_refuses_changed_training_data(tiny_copy, tmp_path, capsys):
    model_dir, data_dir = tiny_copy
    out = tmp_path / "run"
    values = _config(model_dir, data_dir, out, n_train=0, epochs=2)
    assert sigterm_at_step(out, 3, lambda: train(Config(**values))) == 143  # checkpointed, then stopped
    # the case: the train file cut to 60 rows with flipped labels, same flags
    rows = [{**r, "label": 1 - r["label"]} for r in make_reviews(60, seed=5)]
    original = (data_dir / "train.jsonl").read_bytes()
    write_jsonl(data_dir / "train.jsonl", rows)
    before = snapshot(out)
    with pytest.raises(CheckpointError, match=r"the training data differs from what its run used"):
        train(Config(**{**values, "resume": "auto"}))
    assert snapshot(out) == before
    (data_dir / "train.jsonl").write_bytes(original)  # put back: the resume goes on
    assert train(Config(**{**values, "resume": "auto"}))["steps"] == 2 * 96 // 4


def test_resume_refuses_a_changed_tokenizer(tiny_copy, tmp_path):
    model_dir, data_dir = tiny_copy
    out = tmp_path / "run"
    values = _config(model_dir, data_dir, out, n_train=0, epochs=2)
    assert sigterm_at_step(out, 3, lambda: train(Config(**values))) == 143  # checkpointed, then stopped
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        (model_dir / name).unlink(missing_ok=True)
    from transformers import BertTokenizerFast

    vocab = {w: i for i, w in enumerate(reversed(VOCAB))}  # the same words and size, other ids
    BertTokenizerFast(vocab=vocab, do_lower_case=True).save_pretrained(model_dir)
    with pytest.raises((CheckpointError, ConfigError), match=r"tokenizer"):
        train(Config(**{**values, "resume": "auto"}))


# ----------------------------------------------------------------------------- one writer


def test_a_second_run_on_the_same_folder_fails_at_once_naming_the_first(tiny_dirs, tmp_path, capsys):
    out = tmp_path / "run"
    argv = cli(*tiny_dirs, out, "--n_train", "0", "--epochs", "40", "--micro_batch_size", "2")
    with open(tmp_path / "first.log", "wb") as log:
        first = subprocess.Popen([sys.executable, "-m", "sentiment", *argv], cwd=REPO, env=subprocess_env(),
                                 stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not (out / "metrics.jsonl").exists():  # the first run holds the folder and is training
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-2000:]
            assert time.monotonic() < deadline
            time.sleep(0.01)
        started = time.monotonic()
        err = refused(cli(*tiny_dirs, out, "--resume", "auto"), capsys)
        assert f"is in use by another run (PID {first.pid} on host {socket.gethostname()})" in err
        assert time.monotonic() - started < 10  # at once: before loading the model or the data
        err = refused(cli(*tiny_dirs, out, "--overwrite", "true"), capsys)
        assert f"(PID {first.pid} on host" in err
    finally:
        first.terminate()
        first.wait(timeout=60)


@pytest.mark.parametrize("holder, said", [
    ("4194999@{here}", "PID 4194999 of this machine, which no longer holds it"),
    ("4194999@otherhost", "PID 4194999 on host otherhost, which this machine cannot see; no process holds the lock "
                          "now as far as this file system tells"),
    ("4194999", "PID 4194999 (its machine was not recorded)")], ids=["this_host", "other_host", "older_version"])
def test_a_lock_left_by_a_dead_process_is_taken_over(holder, said, tiny_dirs, tmp_path, capsys):
    """Only this machine's processes can be known to be gone: another host's PID is never called "not running"."""
    out = tmp_path / "run"
    write(out / rundir.LOCK, holder.format(here=socket.gethostname()))  # no process holds the lock any more
    assert main(cli(*tiny_dirs, out)) == 0
    assert f"taking over the lock left by {said}" in capsys.readouterr().out
    assert not (out / rundir.LOCK).exists()  # a clean exit leaves no lock file


def test_run_lock_unit(tmp_path):
    folder = tmp_path / "new"
    with rundir.RunLock(folder, say=print):
        assert (folder / rundir.LOCK).read_text() == f"{os.getpid()}@{socket.gethostname()}"
        with pytest.raises(ConfigError, match=rf"in use by another run \(PID {os.getpid()} on host "):
            with rundir.RunLock(folder, say=print):
                pass
    assert not folder.exists()  # created by the lock and left empty: removed again
    (tmp_path / "kept").mkdir()
    with rundir.RunLock(tmp_path / "kept", say=print):
        write(tmp_path / "kept" / "config.json", "{}")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == ["config.json"]


def test_inspect_names_every_state(tmp_path):
    assert rundir.inspect(tmp_path / "absent").state == "absent"
    write(tmp_path / "empty" / rundir.LOCK, "")
    assert rundir.inspect(tmp_path / "empty").state == "empty"  # only our own lock file
    write(tmp_path / "foreign" / "a.txt", "x")
    assert rundir.inspect(tmp_path / "foreign").state == "foreign"
    write(tmp_path / "bad_marker" / rundir.MARKER, "{not json")
    write(tmp_path / "bad_marker" / "model" / "x.bin", "x")
    assert rundir.inspect(tmp_path / "bad_marker").state == "damaged"  # ours once; refused with a way forward
    (tmp_path / "ours").mkdir()
    rundir.mark(tmp_path / "ours", "abc", "pretrain")
    assert rundir.inspect(tmp_path / "ours") == rundir.RunFolder(tmp_path / "ours", "new", "abc", "pretrain")
    write(tmp_path / "older" / rundir.MARKER, '{"run_id": "def", "program": "sentiment"}')  # before markers named it
    assert rundir.inspect(tmp_path / "older").command == "train"
    write(tmp_path / "odd" / rundir.MARKER, '["run_id"]')  # valid JSON, not a marker: damaged, not a crash
    write(tmp_path / "odd" / "a.txt", "x")
    assert rundir.inspect(tmp_path / "odd").state == "damaged"
    write(tmp_path / "ours" / "metrics.jsonl", "")
    assert rundir.inspect(tmp_path / "ours").state == "started"
    write(tmp_path / "ours" / "results.json", "{}")
    assert rundir.inspect(tmp_path / "ours").state == "finished"
    write(tmp_path / "a_file", "x")
    with pytest.raises(CheckpointError, match="is a file, not a folder"):
        rundir.inspect(tmp_path / "a_file")


# ----------------------------------------------------------------------------- bookkeeping


def test_pruning_keeps_the_last_and_the_best_named_by_the_newest(tmp_path):
    def state(step: int, best_step: int) -> dict:
        return {"step": step, "best_step": best_step}

    for step, best in [(1, 1), (2, 2), (3, 2), (4, 2), (5, 5)]:
        ckpt.save_checkpoint(tmp_path, state(step, best), keep_last=2)
        names = [p.name for p in ckpt.checkpoint_paths(tmp_path / "checkpoints")]
        expected = sorted({step, step - 1, best} - {0}, reverse=True)
        assert names == [f"step_{s:07d}.pt" for s in expected]


def test_a_checkpoint_without_what_resume_needs_is_refused(tmp_path):
    path = tmp_path / "step_0000003.pt"
    torch.save({"model": {}, "step": 3}, path)  # no config, optimizer, rng...
    with pytest.raises(CheckpointError, match=r"is not a sentiment checkpoint \(it lacks optimizer, scaler"):
        ckpt.load_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"is a folder; pass a checkpoint file in it"):
        ckpt.find_resume(str(tmp_path), tmp_path / "out")


def test_repeated_nans_before_any_checkpoint_say_so(tiny_config):
    cfg = tiny_config(epochs=1, n_train=32, lr=1e6, max_grad_norm=0.0, max_bad_steps=2)  # blows up at step 2
    with pytest.raises(TrainingError, match=r"\(last at step 3\); no checkpoint was written yet\. Lower --lr"):
        train(cfg)


def test_fingerprint_sees_tokens_labels_and_vocabulary(tiny_dirs):
    import datasets

    from sentiment.data import tokenize

    tok = make_tokenizer()
    ds = datasets.Dataset.from_list(make_reviews(10))
    split = tokenize(ds, tok, 64, "head")
    base = ckpt.fingerprint(tok, split, None)
    assert base == ckpt.fingerprint(make_tokenizer(), tokenize(ds, tok, 64, "head"), None)
    flipped = datasets.Dataset.from_list([{**r, "label": 1 - r["label"]} for r in make_reviews(10)])
    assert ckpt.fingerprint(tok, tokenize(flipped, tok, 64, "head"), None)["training data"] != base["training data"]
    shorter = tokenize(ds, tok, 16, "head")
    assert ckpt.fingerprint(tok, shorter, None)["training data"] != base["training data"]
    assert ckpt.fingerprint(tok, split, split)["validation data"] != base["validation data"]
