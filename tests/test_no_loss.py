"""Nothing lost, third round (issue 19): run folders never nest, deleting never follows a link nor crosses
another run, what cannot be read is never a reason to delete, and every output path is checked before the work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import REPO, snapshot, subprocess_env, write

from sentiment import checkpoint as ckpt
from sentiment import rundir
from sentiment.cli import main
from sentiment.errors import CheckpointError

pytestmark = pytest.mark.usefixtures("one_thread")


def cli(model_dir: Path, data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["train", "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--device", "cpu",
            "--precision", "fp32", "--max_length", "64", "--epochs", "1", "--n_train", "16", "--n_test", "8",
            "--micro_batch_size", "4", "--log_every", "0", "--save_every", "2", "--output_dir", str(out), *extra]


def refused(argv: list[str], capsys) -> str:
    """Run the CLI, expect a refusal: exit 2 and one `error:` line on stderr (no traceback), returned. (predict and
    evaluate say their engine's decisions on stderr before it.)"""
    code = main(argv)
    stderr = capsys.readouterr().err
    err = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert code == 2 and len(err) == 1 and "Traceback" not in stderr, stderr
    return err[0]


@pytest.fixture(scope="module")
def finished(tiny_dirs, tmp_path_factory) -> Path:
    """A finished tiny run (4 steps, checkpoints at steps 2 and 4); tests copy it."""
    out = tmp_path_factory.mktemp("no_loss") / "a"
    assert main(cli(*tiny_dirs, out, "--keep_last", "2")) == 0
    return out


def copy_of(run: Path, dest: Path, started: bool = False) -> Path:
    """A copy of `run`; started=True: as if killed before its last writes (no model/, report.md, results.json)."""
    shutil.copytree(run, dest, symlinks=True)
    for name in ("results.json", "report.md", "model", "plots") if started else ():
        if os.path.lexists(dest / name):
            ckpt.remove(dest / name)
    return dest


# ----------------------------------------------------------------------------- runs never nest


@pytest.mark.parametrize("inside", ["plots/runB", "checkpoints/runB", "model/runB", "tensorboard/x/runB",
                                    ".model.tmp/runB", "link_to_plots/runB"])
def test_a_run_inside_another_runs_files_is_refused(inside, finished, tiny_dirs, tmp_path, capsys):
    a = copy_of(finished, tmp_path / "a")
    (tmp_path / "link_to_plots").symlink_to(a / "plots", target_is_directory=True)
    out = (tmp_path if inside.startswith("link") else a) / inside
    before = snapshot(a)
    err = refused(cli(*tiny_dirs, out), capsys)
    assert "lies inside" in err and f"of the run in {a}" in err and "outside its run files" in err
    assert snapshot(a) == before and not os.path.lexists(a / inside)


@pytest.mark.parametrize("where", ["plots", "checkpoints", "model"])
@pytest.mark.parametrize("flags", [["--overwrite", "true"], ["--resume", "auto", "--keep_last", "0"]],
                         ids=["overwrite", "resume_keep_last_0"])
def test_a_run_moved_into_another_runs_files_is_never_deleted(where, flags, finished, tiny_dirs, tmp_path, capsys):
    a = copy_of(finished, tmp_path / "a", started="resume" in flags[0])
    (a / where).mkdir(exist_ok=True)
    copy_of(finished, a / where / "runB")  # put there by hand: sentiment itself refuses to create it
    before = snapshot(a)
    err = refused(cli(*tiny_dirs, a, *flags), capsys)
    assert "holds another run inside its run files" in err and str(a / where / "runB") in err
    assert snapshot(a) == before


def test_deleting_never_follows_a_link_nor_crosses_a_run(finished, tmp_path):
    users = write(tmp_path / "users" / "weights.bin", b"mine")
    (tmp_path / "link").symlink_to(tmp_path / "users", target_is_directory=True)
    ckpt.remove(tmp_path / "link")
    assert not os.path.lexists(tmp_path / "link") and Path(users).read_bytes() == b"mine"
    holder = copy_of(finished, tmp_path / "holder" / "deep" / "runB").parent.parent
    with pytest.raises(CheckpointError, match="holds another run"):
        ckpt.remove(holder)
    assert (holder / "deep" / "runB" / rundir.MARKER).is_file()


# ----------------------------------------------------------------------------- links among a run's files


def test_a_symlinked_model_folder_is_refused_before_training_and_unlinked_by_overwrite(finished, tiny_dirs, tmp_path,
                                                                                      capsys):
    a = copy_of(finished, tmp_path / "a", started=True)
    user = tmp_path / "user_models"
    write(user / "keep.txt", "a user's file")
    (a / "model").symlink_to(user, target_is_directory=True)
    before = snapshot(a)
    err = refused(cli(*tiny_dirs, a, "--resume", "auto"), capsys)
    assert f"{a / 'model'} is a symbolic link (to {user})" in err and "--overwrite true" in err
    assert snapshot(a) == before and not (a / ".model.old").exists()
    assert main(cli(*tiny_dirs, a, "--overwrite", "true")) == 0  # the link goes, never its target
    assert (a / "model").is_dir() and not (a / "model").is_symlink() and (a / "results.json").is_file()
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"]


def test_save_model_replaces_a_link_and_never_its_target(tiny_dirs, tmp_path):
    from sentiment.model import load_model, load_tokenizer

    user = tmp_path / "user"
    write(user / "keep.txt", "x")
    (tmp_path / "model").symlink_to(user, target_is_directory=True)
    ckpt.save_model(load_model(str(tiny_dirs[0])), load_tokenizer(str(tiny_dirs[0])), tmp_path / "model")
    assert (tmp_path / "model" / "config.json").is_file() and not (tmp_path / "model").is_symlink()
    assert sorted(p.name for p in user.iterdir()) == ["keep.txt"]
    assert not os.path.lexists(tmp_path / ".model.old")


# ----------------------------------------------------------------------------- unreadable checkpoints


class FutureClass:  # stands for a class of a newer sentiment version, which this install lacks
    pass


@pytest.mark.parametrize("damage", ["truncated", "random_bytes", "class_this_install_lacks"])
def test_resume_auto_refuses_when_no_checkpoint_loads(damage, finished, tiny_dirs, tmp_path, capsys, monkeypatch):
    a = copy_of(finished, tmp_path / "a", started=True)
    for path in ckpt.checkpoint_paths(a / ckpt.CHECKPOINT_DIR):
        if damage == "truncated":
            path.write_bytes(path.read_bytes()[:200])
        elif damage == "random_bytes":
            path.write_bytes(os.urandom(4096))
        else:
            monkeypatch.setattr(FutureClass, "__module__", "sentiment.future_version")
            module = type(sys)("sentiment.future_version")
            module.FutureClass = FutureClass
            monkeypatch.setitem(sys.modules, "sentiment.future_version", module)
            torch.save({**torch.load(path, weights_only=False), "extra": FutureClass()}, path)
            monkeypatch.delitem(sys.modules, "sentiment.future_version")
    before = snapshot(a)
    err = refused(cli(*tiny_dirs, a, "--resume", "auto"), capsys)
    assert "none of the 2 checkpoint(s)" in err and "step_0000004.pt" in err and "nothing was changed" in err
    assert "restore them" in err and "--overwrite true" in err
    assert snapshot(a) == before
    assert main(cli(*tiny_dirs, a, "--resume", "auto", "--overwrite", "true")) == 0  # asked for: a fresh run
    assert (a / "results.json").is_file()


def test_damaged_marker_says_how_to_continue_its_checkpoints(finished, tiny_dirs, tmp_path, capsys):
    for content in ("", "{not json", '{"program": "sentiment"}'):
        a = copy_of(finished, tmp_path / f"a{len(content)}", started=True)
        (a / rundir.MARKER).write_text(content)
        before = snapshot(a)
        err = refused(cli(*tiny_dirs, a, "--resume", "auto"), capsys)
        newest = a / ckpt.CHECKPOINT_DIR / "step_0000004.pt"
        assert "damaged run marker" in err and f"--resume {newest} --output_dir NEW_FOLDER" in err
        assert snapshot(a) == before
    assert main(cli(*tiny_dirs, tmp_path / "continued", "--resume", str(newest))) == 0  # the hint, followed


# ----------------------------------------------------------------------------- output paths, before the work


@pytest.mark.parametrize("command, output, expected", [
    ("predict", "nofolder/p.jsonl", "the folder nofolder does not exist; create it first"),
    ("evaluate", "nofolder/e.json", "the folder nofolder does not exist; create it first"),
    ("predict", "{folder}", "is a folder; pass a file path"),
    ("evaluate", "{folder}", "is a folder; pass a file path"),
    ("predict", "p.txt", "'.txt' suffix; the format is read from it: name the file with one of .jsonl, .csv, .tsv, "
                         ".parquet"),
    ("predict", "p.json", "'.json' suffix"),
    ("predict", "p", "no suffix"),
    ("evaluate", "e.csv", "name the file with one of .json"),
    ("predict", "{run}/model/p.jsonl", "lies inside model/ of the run in"),  # the next save replaces model/
    ("evaluate", "{run}/checkpoints/e.json", "lies inside checkpoints/ of the run in"),
])
def test_an_output_path_is_checked_before_any_work(command, output, expected, finished, tiny_dirs, tmp_path,
                                                   monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "afolder").mkdir()
    output = output.format(folder="afolder", run=finished)
    before = snapshot(finished)
    texts = ["a great film"] if command == "predict" else ["--data_dir", str(tiny_dirs[1]), "--n_test", "0"]
    err = refused([command, "--model_name_or_path", str(finished), *texts, "--output", output, "--overwrite", "true",
                   "--device", "cpu"], capsys)
    assert expected in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afolder"] and not any((tmp_path / "afolder").iterdir())
    assert snapshot(finished) == before


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_predictions_are_written_in_the_format_their_suffix_names(suffix, finished, tmp_path):
    out = tmp_path / f"p{suffix}"
    assert main(["predict", "--model_name_or_path", str(finished), "good", "bad film", "--output", str(out),
                 "--device", "cpu"]) == 0
    table = {".jsonl": lambda p: pd.read_json(p, lines=True), ".csv": pd.read_csv,
             ".tsv": lambda p: pd.read_csv(p, sep="\t"), ".parquet": pd.read_parquet}[suffix](out)
    assert list(table.columns) == ["label", "prob_neg", "prob_pos"] and len(table) == 2
    assert ((table.prob_neg + table.prob_pos - 1).abs() < 1e-6).all()


def test_dash_means_stdout(finished, tiny_dirs, tmp_path):
    run = lambda *args: subprocess.run([sys.executable, "-m", "sentiment", *args, "--model_name_or_path",  # noqa: E731
                                        str(finished), "--output", "-", "--device", "cpu"], cwd=tmp_path,
                                       env=subprocess_env(PYTHONPATH=str(REPO)), capture_output=True, text=True,
                                       timeout=300)
    predicted = run("predict", "good", "bad film")
    assert predicted.returncode == 0, predicted.stderr
    rows = [json.loads(line) for line in predicted.stdout.splitlines()]
    assert [sorted(r) for r in rows] == [["label", "prob_neg", "prob_pos"]] * 2
    evaluated = run("evaluate", "--data_dir", str(tiny_dirs[1]), "--n_test", "0")
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads(evaluated.stdout)["n"] == 48  # printed once: `-` is that very stdout
    assert not os.path.lexists(tmp_path / "-")


def test_plot_writes_only_into_a_run_folder(finished, tmp_path, capsys):
    mine = tmp_path / "mine"  # a user's folder holding copies of a run's files, but no marker
    write(mine / "plots" / "loss.png", b"a user's figure")
    for name in ("metrics.jsonl", "results.json", "config.json"):
        shutil.copy(finished / name, mine / name)
    before = snapshot(mine)
    err = refused(["plot", str(mine)], capsys)
    assert "is not a run folder" in err and rundir.MARKER in err
    assert snapshot(mine) == before and not (mine / "report.md").exists()
    run = copy_of(finished, tmp_path / "run")  # a run folder whose plots/ links to a user's folder
    shutil.rmtree(run / "plots", ignore_errors=True)
    (run / "plots").symlink_to(mine / "plots", target_is_directory=True)
    assert "is a symbolic link" in refused(["plot", str(run)], capsys)
    assert snapshot(mine) == before


# ----------------------------------------------------------------------------- the weak cases


@pytest.mark.parametrize("text", ["\x00\x01\x1b\x07\x7f", "\u200b\u200b", "\ufeff \t\ufffd"],
                         ids=["control", "zero_width", "bom_replacement"])
def test_a_text_of_only_control_characters_is_empty(text, finished, tiny_dirs, tmp_path, capsys):
    rows = [json.loads(line) for line in (tiny_dirs[1] / "train.jsonl").read_text().splitlines()]
    rows[3]["text"] = text
    write(tmp_path / "train.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    err = refused(cli(tiny_dirs[0], tiny_dirs[1], tmp_path / "run", "--train_file", str(tmp_path / "train.jsonl"),
                      "--test_file", str(tiny_dirs[1] / "test.jsonl")), capsys)
    assert f"{tmp_path / 'train.jsonl'} line 4: empty or missing text" in err
    err = refused(["predict", "--model_name_or_path", str(finished), "fine", text], capsys)
    assert "text 2 of 2 is empty" in err


def test_weak_inputs_get_true_one_line_errors(finished, tiny_dirs, tmp_path, capsys):
    checkpoint = next((finished / ckpt.CHECKPOINT_DIR).glob("step_*.pt"))
    err = refused(["predict", "--model_name_or_path", str(checkpoint), "good"], capsys)
    assert "is a file; it takes a model folder" in err and "goes to --resume" in err and "hub" not in err.split(";")[0]
    err = refused(cli(*tiny_dirs, tmp_path / "r", "--train_file", str(tiny_dirs[1]),
                      "--test_file", str(tiny_dirs[1] / "test.jsonl")), capsys)
    assert f"data file {tiny_dirs[1]} is a folder" in err and "--data_dir" in err
    for lr in (["--lr", "-1e-3"], ["--lr=-1e-3"], ["--lr", "-.5"]):
        assert "must be > 0" in refused(cli(*tiny_dirs, tmp_path / "r", *lr), capsys)
    assert not (tmp_path / "r").exists()


def test_a_flag_given_twice_is_said(tiny_dirs, tmp_path, capsys):
    assert main(cli(*tiny_dirs, tmp_path / "r", "--epochs", "2", "--max_steps", "1")) == 0
    out = capsys.readouterr().out
    assert "note: --epochs is given 2 times (1, then 2); the last one is used" in out
    assert json.loads((tmp_path / "r" / "config.json").read_text())["epochs"] == 2


def test_a_resumed_runs_speed_is_over_all_its_steps(finished, tiny_dirs, tmp_path):
    """Killed just before results.json, then resumed: no step is left, yet the run's speed is that of its steps."""
    a = copy_of(finished, tmp_path / "a", started=True)
    assert main(cli(*tiny_dirs, a, "--resume", "auto")) == 0
    steps = [r for r in map(json.loads, (a / "metrics.jsonl").read_text().splitlines()) if "split" not in r]
    results = json.loads((a / "results.json").read_text())
    assert len(steps) == 4 and results["samples_per_second"] > 0
    assert results["samples_per_second"] == pytest.approx(sum(r["samples"] for r in steps)
                                                          / sum(r["step_ms"] / 1e3 for r in steps))


# ----------------------------------------------------------------------------- resume with a field changed


def test_a_moved_model_or_data_folder_resumes_and_a_changed_one_is_refused(finished, tiny_dirs, tmp_path, capsys):
    """A cluster's scratch path renamed: the same model and data elsewhere are the same run (the checkpoint's
    fingerprint compares what they hold); a model whose config changed is not, and other fields stay fixed."""
    a = copy_of(finished, tmp_path / "a", started=True)
    moved_model, moved_data = tmp_path / "moved" / "model", tmp_path / "moved" / "data"
    shutil.copytree(tiny_dirs[0], moved_model)
    shutil.copytree(tiny_dirs[1], moved_data)
    changed = [["--precision", "bf16"], ["--max_length", "32"], ["--seed", "7"], ["--micro_batch_size", "2"]]
    before = snapshot(a)
    for flags in changed:
        err = refused(cli(moved_model, moved_data, a, "--resume", "auto", *flags), capsys)
        assert f"these fields differ from its run: {flags[0][2:]}" in err
    config = json.loads((moved_model / "config.json").read_text())
    (moved_model / "config.json").write_text(json.dumps({**config, "intermediate_size": 2 * config["intermediate_size"]}))
    err = refused(cli(moved_model, moved_data, a, "--resume", "auto"), capsys)
    assert "the model differs from what its run used" in err
    assert snapshot(a) == before
    (moved_model / "config.json").write_text(json.dumps(config))
    assert main(cli(moved_model, moved_data, a, "--resume", "auto")) == 0
    assert json.loads((a / "results.json").read_text())["steps"] == 4
