"""Checkpoints that survive a kill at any instant, and the one function that writes a run's files.

A checkpoint is one `torch.save` file, written to a temp file, fsynced, then `os.replace`d into
place: a reader sees the old file or the new one, never half of one. Each checkpoint names the
best checkpoint so far (`best_step`), so which model is best is read from the newest checkpoint
itself: no second file to keep in step with it, whatever instant a kill comes at. `keep_last`
bounds the disk used; pruning comes after the new checkpoint is in place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sentiment.errors import CheckpointError

CHECKPOINT_DIR = "checkpoints"
RUN_MARKER = ".sentiment-run.json"  # what makes a folder a run folder (rundir.py); deleting never crosses one
TRAINING_CONFIG = "sentiment_config.json"  # in a saved model folder: the run's config (evaluate/predict read it)
NAME = re.compile(r"^step_(\d+)\.pt$")
# what resume needs besides the weights; a file lacking any is not our checkpoint
REQUIRED = ("model", "optimizer", "scaler", "step", "best_accuracy", "bad_steps", "config", "rng")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # no space, over quota, over the file size limit



@contextlib.contextmanager
def disk_full_is_an_error(folder: Path, cleanup: Callable[[], None] = lambda: None):
    """A full disk while writing into `folder` becomes one CheckpointError line naming it, after
    `cleanup` (removing a temp file) ran: a half-written temp file would only fill the disk further."""
    try:
        yield
    except Exception as e:
        cleanup()
        cause = e  # torch.save reports ENOSPC as a RuntimeError raised while handling the OSError
        while cause is not None and not (isinstance(cause, OSError) and cause.errno in DISK_FULL):
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        raise CheckpointError(f"no space left for the run in {folder} ({os.strerror(cause.errno)}); what was "
                              "written before is intact: free space there, then rerun with --resume auto") from None


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync, and rename it over `path`: every file a run
    writes goes through here (save_pretrained's folder aside), so a kill or a full disk leaves the old
    file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    with disk_full_is_an_error(path.parent, cleanup=lambda: _remove(tmp)):
        try:
            with open(tmp, "wb") as f:
                write(f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:  # a second Ctrl-C mid-write, too: no half-written temp file left behind
            _remove(tmp)
            raise
        _fsync_dir(path.parent)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


class AppendFile:
    """metrics.jsonl: each row goes out in os.write calls on an O_APPEND descriptor, so there is no buffer
    to flush (and fail to flush) at close; a kill or a full disk leaves at most one torn last line, which
    truncate_metrics drops on resume."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, text: str) -> None:
        data = text.encode()
        with disk_full_is_an_error(self.path.parent):
            while data:
                data = data[os.write(self.fd, data):]

    def close(self) -> None:
        os.close(self.fd)


def read_rows(path: Path) -> list[dict]:
    """The rows of a JSON-lines file a run appends to (metrics.jsonl, monitor.jsonl), [] if there is none yet; a
    last line cut by a kill mid-write is skipped: the rest is still good."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else ():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(output_dir: Path, state: dict, keep_last: int) -> Path:
    """Write `state` as step_NNNNNNN.pt, then prune all but the last `keep_last` (at least 1, for resume) and
    the best one (`state["best_step"]`). Call on rank 0 only."""
    path = checkpoint_path(output_dir, state["step"])
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))
    saved = checkpoint_paths(path.parent)  # newest first, the one just written included
    keep = saved[:max(1, keep_last)] + [checkpoint_path(output_dir, state["best_step"])]  # resume needs 1
    for old in saved:
        if old not in keep:
            old.unlink()
    return path


def remove_checkpoints(output_dir: Path) -> None:
    """Delete a finished run's checkpoints folder (keep_last 0); the model and results stay."""
    remove(output_dir / CHECKPOINT_DIR)


def remove(path: Path) -> None:
    """Delete one of a run's own files or folders. Never follows a link (a symlink is unlinked, what it points to
    stays, as `rm -r` does), and never deletes a folder that holds another run (its RUN_MARKER, at any depth)."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        inner = run_inside(path)
        if inner is not None:
            raise CheckpointError(f"{path} holds another run ({inner}); nothing in it was deleted: move that run "
                                  "out, then run again")
        shutil.rmtree(path)


def run_inside(folder: Path) -> Path | None:
    """A run folder (one holding RUN_MARKER) at or below `folder`, links not followed; None if there is none."""
    return next((Path(root) for root, _, files in os.walk(folder) if RUN_MARKER in files), None)


def checkpoint_path(output_dir: Path, step: int) -> Path:
    return output_dir / CHECKPOINT_DIR / f"step_{step:07d}.pt"


def load_checkpoint(path: Path, mmap: bool = False) -> dict:
    """Load one checkpoint file onto the CPU, or raise CheckpointError naming it. mmap=True maps the
    tensors instead of reading them: the bookkeeping entries cost no more than their own size."""
    try:
        # weights_only=False: the file holds RNG states and NumPy objects, and we wrote it ourselves
        state = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check --resume") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                              "pass another checkpoint, or --resume auto to use the newest valid one") from None
    missing = [k for k in REQUIRED if k not in state] if isinstance(state, dict) else ["everything"]
    if missing:
        raise CheckpointError(f"checkpoint {path} is not a sentiment checkpoint (it lacks {', '.join(missing)}); "
                              "pass another --resume")
    return state


@dataclasses.dataclass(frozen=True)
class Resume:
    """A checkpoint chosen to resume from, as read without its tensors: what deciding whether it may be
    used needs. The tensors are read once the model and optimizer exist (restore_state)."""
    path: Path
    step: int
    config: dict
    run_id: str | None  # None: written before runs had ids
    fingerprint: dict | None  # None: written before checkpoints recorded one
    command: str = "train"  # the command that wrote it (train or pretrain); train's before they recorded one

    @classmethod
    def read(cls, path: Path) -> "Resume":
        state = load_checkpoint(path, mmap=True)
        return cls(path, state["step"], state["config"], state.get("run_id"), state.get("fingerprint"),
                   state.get("command", "train"))


def find_resume(resume: str, output_dir: Path, warn: Callable[[str], None] = print,
                fresh_if_unreadable: bool = False) -> Resume | None:
    """The checkpoint to resume from: `auto` = the newest checkpoint in output_dir that loads (a corrupt
    newer one is reported with `warn`, e.g. rank 0's print, and skipped), or an explicit path; None if
    `auto` finds none. Checkpoints that exist but none of which loads are a CheckpointError: what cannot be
    read is never a reason to start again over them (unless fresh_if_unreadable, i.e. --overwrite true)."""
    if resume != "auto":
        if Path(resume).is_dir():
            raise CheckpointError(f"--resume {resume} is a folder; pass a checkpoint file in it (e.g. "
                                  f"{CHECKPOINT_DIR}/step_NNNNNNN.pt), or --resume auto with --output_dir set to the run")
        return Resume.read(Path(resume))
    paths = checkpoint_paths(output_dir / CHECKPOINT_DIR)
    for i, path in enumerate(paths):
        try:
            return Resume.read(path)
        except CheckpointError as e:
            warn(f"warning: {e}" + ("; trying an older checkpoint" if i + 1 < len(paths) else ""))
    if paths and not fresh_if_unreadable:
        names = ", ".join(p.name for p in paths[:3]) + (", ..." if len(paths) > 3 else "")
        raise CheckpointError(f"--resume auto: none of the {len(paths)} checkpoint(s) in {output_dir / CHECKPOINT_DIR} "
                              f"loads ({names}); nothing was changed: restore them (from a backup, a remounted disk, "
                              "or the sentiment version that wrote them), or pass --overwrite true to delete this "
                              "run and start again")
    return None


@dataclasses.dataclass
class Progress:
    """What a training loop carries from step to step besides the tensors, and a checkpoint saves."""
    step: int = 0  # optimizer steps done
    best_accuracy: float = -1.0  # best validation accuracy so far
    best_step: int = 0  # the step of the checkpoint holding it; 0 = none yet
    bad_steps: int = 0  # consecutive non-finite steps
    evals_since_best: int = 0  # evaluations in a row without a better validation accuracy (early stopping)

    def step_done(self, bad: bool) -> None:
        """One more optimizer step; `bad` (non-finite) steps in a row are counted, a good one resets them."""
        self.step += 1
        self.bad_steps = self.bad_steps + 1 if bad else 0

    def new_best(self, accuracy: float) -> bool:
        """Record a validation accuracy at the current step; True if it is the best so far."""
        if accuracy <= self.best_accuracy:
            self.evals_since_best += 1
            return False
        self.best_accuracy, self.best_step, self.evals_since_best = accuracy, self.step, 0
        return True

    def out_of_patience(self, patience: int) -> bool:
        """Early stopping: `patience` evaluations in a row brought no better validation accuracy (0 = never)."""
        return 0 < patience <= self.evals_since_best


def build_state(model, optimizer, scaler, progress: Progress, run: dict, engine) -> dict:
    """Everything a resumed run needs to go on exactly as an uninterrupted one: weights, optimizer and
    scaler state, the progress, `run` (config, run_id, fingerprint), and every rank's RNG states
    (gathered: a collective, so every rank calls this)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
            **dataclasses.asdict(progress), **run, "rng": engine.gather_rng_states()}


def restore_state(state: dict, model, optimizer, scaler, engine) -> Progress:
    """The inverse of build_state: load the tensors into the live objects, this rank's RNG states into the
    process, and return the progress to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    engine.restore_rng_states(state["rng"])
    return Progress(state["step"], state["best_accuracy"], state.get("best_step", 0), state["bad_steps"],
                    state.get("evals_since_best", 0))


def fingerprint(tokenizer, train, val, model_config=None) -> dict[str, str]:
    """Short sha256 digests of what a run learns from and selects on: the token ids and labels actually
    used (after subsampling, the validation split and truncation), the tokenizer's vocabulary and special
    tokens, and the model's architecture (its config, less where it was read from). A resume compares them: the
    same flags over changed files would train on other data; the same files elsewhere are the same run."""
    def digest(*parts) -> str:
        h = hashlib.sha256()
        for part in parts:
            h.update(np.ascontiguousarray(part).tobytes() if isinstance(part, np.ndarray) else part.encode())
        return h.hexdigest()[:16]

    vocab = json.dumps([type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()),
                        tokenizer.all_special_tokens, getattr(tokenizer, "do_lower_case", None)])
    found = {"training data": digest(train.tokens, train.offsets, train.labels),
             "validation data": digest(val.tokens, val.offsets, val.labels) if val is not None else "",
             "tokenizer": digest(vocab)}
    if model_config is not None:  # "_name_or_path" and the library's version say nothing of the weights' shapes
        arch = {k: v for k, v in model_config.to_dict().items()
                if not k.startswith("_") and k != "transformers_version"}
        found["model"] = digest(json.dumps(arch, sort_keys=True, default=str))
    return found


def check_fingerprint(resume: Resume, now: dict[str, str], say: Callable[[str], None]) -> None:
    path, saved = resume.path, resume.fingerprint
    if saved is None:
        say(f"warning: checkpoint {path} records no data fingerprint (an older version wrote it): "
            "the data it was trained on cannot be checked")
        return
    changed = [k for k in now if k in saved and saved[k] != now[k]]  # "model": since checkpoints recorded it
    if changed:
        raise CheckpointError(f"cannot resume from {path}: the {' and the '.join(changed)} "
                              f"{'differs' if len(changed) == 1 else 'differ'} from what its run used (a data file, "
                              "the tokenizer or the model changed since); restore them, or start a new run in another "
                              "--output_dir")


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics.jsonl rows after `step`, so a resumed run's file matches an uninterrupted one."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines(keepends=True):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by the kill
            continue
        if row.get("step", 0) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def save_model(model: torch.nn.Module, tokenizer, folder: Path, files: dict[str, str] | None = None) -> None:
    """save_pretrained model + tokenizer, and `files` (name: text, e.g. the model card), into a temp folder, then
    rename: `folder` is whole or absent."""
    tmp, old = folder.with_name(f".{folder.name}.tmp"), folder.with_name(f".{folder.name}.old")
    for leftover in (tmp, old):  # from a run killed in here: only ever our own temp folders
        remove(leftover)
    with disk_full_is_an_error(folder.parent, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)):
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
    if os.path.lexists(folder):  # a link is renamed as the link, and then unlinked: its target is never touched
        folder.rename(old)
    tmp.rename(folder)
    remove(old)
