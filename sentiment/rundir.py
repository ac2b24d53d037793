"""The run folder: whose it is, who is writing it, and whether its run is finished.

A folder is ours only if it holds our marker, `.sentiment-run.json` (with the run's id), written
before any other file of the run. We never delete or overwrite anything in a folder without it,
whatever the flags. One process writes a run folder at a time: it holds an advisory lock
(`flock`) on `.sentiment-run.lock`, which the kernel releases when the process dies, so a lock
left by a killed run is simply taken over. A run is finished once `results.json` exists: it is
the last file a run writes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path

from sentiment import checkpoint as ckpt
from sentiment.checkpoint import write_json
from sentiment.config import Config, refuse_conflicts
from sentiment.errors import CheckpointError, ConfigError

MARKER = ckpt.RUN_MARKER  # .sentiment-run.json
LOCK = ".sentiment-run.lock"
OURS = (MARKER, LOCK)  # with their temp files (".<name>.tmp"): what an empty folder may already hold
MONITOR_FILE = "monitor.jsonl"  # --monitor_every's rows
PROFILE_DIR = "profile"  # --profile_steps' trace and summary
MEMORY_SNAPSHOT = "memory_snapshot.pickle"  # CUDA: the allocator's state, for pytorch.org/memory_viz
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "report.md", ckpt.CHECKPOINT_DIR, "model",
             "tensorboard", "plots", MONITOR_FILE, PROFILE_DIR,
             MEMORY_SNAPSHOT)  # what a run writes; --overwrite removes exactly these, in our folders only


@dataclass(frozen=True)
class RunFolder:
    path: Path
    state: str  # absent | empty | foreign (not ours) | damaged (a marker we cannot read) | new (ours, nothing
    #             written yet) | started | finished
    run_id: str = ""  # from the marker; "" unless ours
    command: str = "train"  # from the marker: the command whose run it holds (train or pretrain)
    others: tuple[str, ...] = ()  # foreign: a few of the names in it, for the error message


def _is_ours(name: str) -> bool:
    return any(name in (n, f".{n}.tmp") for n in OURS)


def inspect(path: Path) -> RunFolder:
    """What `path` is, read-only."""
    if not path.exists():
        return RunFolder(path, "absent")
    if not path.is_dir():
        raise CheckpointError(f"output_dir {path} is a file, not a folder; pass another --output_dir")
    names = sorted(p.name for p in path.iterdir())
    try:
        marker = json.loads((path / MARKER).read_text())
        run_id, command = marker["run_id"], marker.get("command", "train")  # markers of before: train's
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        others = tuple(n for n in names if not _is_ours(n))
        if os.path.lexists(path / MARKER) and others:  # we wrote a marker here, which no longer reads
            return RunFolder(path, "damaged", others=others[:5])
        return RunFolder(path, "foreign", others=others[:5]) if others else RunFolder(path, "empty")
    if (path / "results.json").is_file():
        return RunFolder(path, "finished", run_id, command)
    return RunFolder(path, "started" if any(n in RUN_FILES for n in names) else "new", run_id, command)


def refuse_foreign(folder: RunFolder) -> None:
    if folder.state == "foreign":
        raise ConfigError(
            f"output_dir {folder.path} already holds files that sentiment did not write ({', '.join(folder.others)}"
            f"{', ...' if len(folder.others) == 5 else ''}) and no {MARKER} run marker; nothing there is "
            "touched: pass a new or empty --output_dir")
    if folder.state == "damaged":
        newest = ckpt.checkpoint_paths(folder.path / ckpt.CHECKPOINT_DIR)
        hint = (f"to continue its run, start a new folder from its newest checkpoint: --resume {newest[0]} "
                "--output_dir NEW_FOLDER" if newest else "it has no checkpoint to continue: pass a new --output_dir")
        raise ConfigError(f"output_dir {folder.path} has a damaged run marker {MARKER} (empty or not JSON), so "
                          f"whose files these are cannot be told; nothing there is touched: {hint}")


def is_run_file(name: str) -> bool:
    """A name a run writes in its folder (RUN_FILES), or the temp name of one (.model.tmp, .config.json.tmp)."""
    return name in RUN_FILES or (name.startswith(".") and name[1:].rpartition(".")[0] in RUN_FILES)


def enclosing_run(path: Path) -> tuple[Path, str] | None:
    """(a marked run folder above `path`, its run file that holds `path`), where `path` lies inside one of a run's
    own files (its model/, plots/, ...: replaced or deleted by that run, or by the next one there); else None."""
    resolved = path.resolve()
    for parent in resolved.parents:
        name = resolved.relative_to(parent).parts[0]
        if os.path.lexists(parent / MARKER) and is_run_file(name):
            return parent, name
    return None


def refuse_nesting(out: Path) -> None:
    """Run folders never nest: output_dir may not lie inside the run files (model/, plots/, checkpoints/, ...) of a
    marked run above it, which that run replaces or deletes; nor may another run lie inside output_dir's own run
    files, which this run would (git likewise refuses a repository inside another's .git)."""
    outer = enclosing_run(out)
    if outer:
        raise ConfigError(f"output_dir {out} lies inside {outer[1]}/ of the run in {outer[0]}, which that run replaces "
                          f"or deletes; pass an --output_dir outside its run files (e.g. beside {outer[0]})")
    for entry in (sorted(out.iterdir()) if out.is_dir() else ()):
        if is_run_file(entry.name) and entry.is_dir() and not entry.is_symlink():
            inner = ckpt.run_inside(entry)
            if inner:
                raise ConfigError(f"output_dir {out} holds another run inside its run files ({inner}), which this "
                                  "run would delete or replace; move that run out first, or pass another --output_dir")


def refuse_links(folder: RunFolder) -> None:
    """A run writes and replaces its own files, never through a link (a save over model/ would otherwise fill, or
    delete, whatever the link points to): a symlinked run file is refused before any work."""
    link = next((folder.path / n for n in RUN_FILES if (folder.path / n).is_symlink()), None)
    if link:
        raise ConfigError(f"{link} is a symbolic link (to {os.readlink(link)}); a run writes its files itself and "
                          "never through a link: put what it points to in its place (rm the link, then mv), or pass "
                          "--overwrite true to start again (that removes the link, never its target)")


def _inside(child: Path, parent: Path) -> bool:
    child, parent = child.resolve(), parent.resolve()
    return child == parent or parent in child.parents


def refuse_overlaps(cfg: Config) -> None:
    """output_dir must not be, or lie inside, the model folder or a data folder (a run would write its
    config.json and model/ over theirs), and no input may lie inside the run files of output_dir."""
    out = Path(cfg.output_dir)
    inputs = {"--model_name_or_path": cfg.model_name_or_path, "--data_dir": cfg.data_dir}
    for flag, value in inputs.items():
        if value and Path(value).is_dir() and _inside(out, Path(value)):
            raise ConfigError(f"output_dir {out} is inside the {flag} folder {value}; a run there would write "
                              "over its files: pass an --output_dir outside it")
    for flag, value in {**inputs, "--train_file": cfg.train_file, "--test_file": cfg.test_file}.items():
        if value and any(_inside(Path(value), out / name) for name in RUN_FILES):
            raise ConfigError(f"{flag} {value} lies inside the run files of output_dir {out}, which this run "
                              "replaces: copy it elsewhere or pass another --output_dir")
        if flag.endswith("_file") and value and Path(value).parent.resolve() == out.resolve():
            raise ConfigError(f"output_dir {out} is the folder of {flag} {value}; pass an --output_dir of its own")


def check_same_run(resume: ckpt.Resume, folder: RunFolder) -> None:
    """An explicit checkpoint may continue the run of the folder it is resumed into, not another one."""
    if folder.state in ("started", "finished") and resume.run_id != folder.run_id:
        raise ConfigError(f"checkpoint {resume.path} belongs to another run than the one in output_dir {folder.path}; "
                          "nothing was changed: pass a new --output_dir to continue that checkpoint there")


def new_run_id() -> str:
    return uuid.uuid4().hex[:12]


def mark(path: Path, run_id: str, command: str) -> None:
    """The first file of a run: from here on the folder is ours."""
    write_json(path / MARKER, {"run_id": run_id, "program": "sentiment", "command": command})


def start_writing(folder: RunFolder, run_id: str, resumed_at: int | None, config: dict, say,
                  command: str = "train") -> None:
    """A run's first writes (rank 0): continuing, cut metrics.jsonl back to the checkpoint's step; replacing
    a run, delete its files; then the marker (from here on the folder is ours) and config.json."""
    if resumed_at is not None:
        for rows in ("metrics.jsonl", MONITOR_FILE):
            ckpt.truncate_metrics(folder.path / rows, resumed_at)
    elif folder.state in ("started", "finished"):
        say(f"overwrite: deleting the run in {folder.path} and starting again")
        clear_run(folder.path)
    if run_id != folder.run_id:
        mark(folder.path, run_id, command)
    write_json(folder.path / "config.json", config)


def clear_run(path: Path) -> None:
    """Remove a previous run's files from a folder we marked (never anything else in it; a link is unlinked,
    never followed)."""
    for name in RUN_FILES:
        ckpt.remove(path / name)


class RunLock:
    """`with RunLock(folder):` holds the folder's advisory lock; a second writer fails at once naming the
    holder's PID. Creates the folder if needed, and removes it again on exit if it is still empty then
    (a run refused before writing anything leaves nothing behind)."""

    def __init__(self, path: Path, say=print) -> None:
        self.path, self.say = path, say
        self.fd: int | None = None
        self.created = False

    def __enter__(self) -> "RunLock":
        try:
            self.created = not self.path.exists()
            self.path.mkdir(parents=True, exist_ok=True)
            self._acquire()
        except OSError as e:
            raise CheckpointError(f"output_dir {self.path} is not writable ({e.strerror or e}); "
                                  "pass another --output_dir") from None
        return self

    def _acquire(self) -> None:
        lock = self.path / LOCK
        while True:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 256, 0).decode(errors="replace").strip() or "unknown"
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES):
                    raise ConfigError(f"output_dir {self.path} is in use by another run (PID "
                                      f"{holder.replace('@', ' on host ')}); wait for it to finish, stop it, or pass "
                                      "another --output_dir") from None
                raise
            try:
                same = os.fstat(fd).st_ino == os.stat(lock).st_ino
            except FileNotFoundError:  # the holder removed it between our open and our lock: try again
                same = False
            if same:
                break
            os.close(fd)
        previous = os.pread(fd, 256, 0).decode(errors="replace").strip()
        if previous:  # a clean exit removes the file: this holder was killed, here or on another machine
            self.say(f"run folder: taking over the lock left by {left_by(previous)}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}@{socket.gethostname()}".encode(), 0)
        self.fd = fd

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            os.unlink(self.path / LOCK)  # while still holding it: see the inode check in _acquire
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created:
            try:
                self.path.rmdir()  # only if empty: this run wrote nothing
            except OSError:
                pass


def left_by(holder: str) -> str:
    """Who left a lock file ("PID@host", or "PID" from versions before hosts were recorded), and what can be
    known of it from here: flock tells only of this machine's processes (and of a file system's own locks)."""
    pid, _, host = holder.partition("@")
    if host == socket.gethostname():
        return f"PID {pid} of this machine, which no longer holds it (killed, or ended without cleaning up)"
    if not host:
        return (f"PID {pid} (its machine was not recorded); no process holds the lock now as far as this file system "
                "tells")
    return (f"PID {pid} on host {host}, which this machine cannot see; no process holds the lock now as far as this "
            f"file system tells (one shared between machines may not pass locks on: make sure that run has stopped)")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is missing or unreadable ({type(e).__name__}); the run in {path.parent} "
                              "is left as it is: pass another --output_dir") from None


# Paths a resume may change when the checkpoint's fingerprint (checkpoint.fingerprint) proves what they hold is the
# same: a data or model folder moved (a cluster's scratch path renamed) is still the same run.
MOVABLE = {"data_dir": "training data", "train_file": "training data", "dataset": "training data",
           "model_name_or_path": "model"}


def moved_is_fine(resume: ckpt.Resume) -> frozenset[str]:
    """The fields of MOVABLE that `resume`'s fingerprint checks by content (none in checkpoints before it did)."""
    return frozenset(field for field, key in MOVABLE.items() if key in (resume.fingerprint or {}))


def plan_start(cfg: Config, folder: RunFolder, say, command: str = "train") -> tuple[ckpt.Resume | None, dict | None]:
    """(checkpoint to resume from or None, results of a finished run to return as they are or None),
    or a ConfigError saying why this run may not start in `folder`."""
    if folder.state in ("started", "finished") and folder.command != command and not cfg.overwrite:
        raise ConfigError(f"output_dir {folder.path} holds a `sentiment {folder.command}` run, not a {command} run; "
                          "nothing was changed: pass another --output_dir")
    if folder.state == "finished" and not cfg.overwrite:
        if not cfg.resume:
            raise ConfigError(f"output_dir {folder.path} holds a finished run; --resume auto returns its results, "
                              "pass another --output_dir for a new run (--overwrite true would delete it)")
        if cfg.resume != "auto":
            check_same_run(ckpt.find_resume(cfg.resume, folder.path, say), folder)
        refuse_conflicts(read_json(folder.path / "config.json"), cfg, f"the finished run in {folder.path}")
        say(f"resume: the run in {folder.path} is finished; its results stay in {folder.path / 'results.json'}")
        return None, read_json(folder.path / "results.json")
    resume = (ckpt.find_resume(cfg.resume, folder.path, say, fresh_if_unreadable=cfg.overwrite)
              if cfg.resume and folder.state != "finished" else None)
    if resume and resume.command != command:
        raise ConfigError(f"checkpoint {resume.path} was written by `sentiment {resume.command}`, not `sentiment "
                          f"{command}`; pass a {command} run's checkpoint, or none for a new run")
    if resume:
        check_same_run(resume, folder)
        refuse_conflicts(resume.config, cfg, f"from {resume.path}", moved_is_fine(resume))
    elif cfg.resume == "auto":  # what a requeued job passes every time: continue if there is anything to continue
        say(f"resume auto: no checkpoint in {folder.path}, starting a fresh run")
    elif folder.state == "started" and not cfg.overwrite:
        raise ConfigError(f"output_dir {folder.path} holds an unfinished run; pass --resume auto to continue it, or "
                          "another --output_dir (--overwrite true would delete it and start again)")
    if not (cfg.overwrite and folder.state in ("started", "finished")):  # else: clear_run unlinks them
        refuse_links(folder)
    return resume, None
