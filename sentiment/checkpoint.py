"""Checkpoints that survive a kill at any instant, and the run folder's files.

A checkpoint is one `torch.save` file, written to a temp file, fsynced, then `os.replace`d into
place: a reader sees the old file or the new one, never half of one. `manifest.json` (written the
same way) says which is the latest and which the best; `keep_last` bounds the disk used.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch

from sentiment.config import SentimentError

CHECKPOINT_DIR = "checkpoints"
NAME = re.compile(r"^step_(\d+)\.pt$")
RUN_FILES = ("config.json", "metrics.jsonl", "results.json", "report.md", CHECKPOINT_DIR, "model",
             "tensorboard", "plots")  # what a run writes; --overwrite removes exactly these


class CheckpointError(SentimentError):
    """A checkpoint that cannot be used: the message says which file and what to do."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, write) -> None:
    """Call write(file) on a temp file beside `path`, fsync, and rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def write_json(path: Path, obj: object) -> None:
    atomic_write(path, lambda f: f.write((json.dumps(obj, indent=2) + "\n").encode()))


def checkpoint_paths(folder: Path) -> list[Path]:
    """Checkpoints in `folder`, newest (highest step) first."""
    found = [(int(m.group(1)), p) for p in folder.glob("step_*.pt") if (m := NAME.match(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_checkpoint(output_dir: Path, state: dict, step: int, is_best: bool, keep_last: int) -> Path:
    """Write `state` as step_NNNNNNN.pt, update the manifest, and prune all but the last `keep_last`
    and the best. Call on rank 0 only."""
    folder = output_dir / CHECKPOINT_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.pt"
    atomic_write(path, lambda f: torch.save(state, f))
    manifest = read_manifest(folder)
    best = path.name if is_best else manifest.get("best")
    keep = [p.name for p in checkpoint_paths(folder)][:keep_last]
    write_json(folder / "manifest.json", {"latest": path.name, "best": best, "kept": keep})
    for old in checkpoint_paths(folder):
        if old.name not in keep and old.name != best:
            old.unlink()
    return path


def read_manifest(folder: Path) -> dict:
    try:
        return json.loads((folder / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def load_checkpoint(path: Path) -> dict:
    """Load one checkpoint file onto the CPU, or raise CheckpointError naming it."""
    try:
        # weights_only=False: the file holds RNG states and NumPy objects, and we wrote it ourselves
        state = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist; check --resume") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, bad pickle, ...
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(e).__name__}); "
                              "delete it, or pass --resume auto to use the newest valid one") from None
    if not isinstance(state, dict) or "step" not in state or "model" not in state:
        raise CheckpointError(f"checkpoint {path} is not a sentiment checkpoint; pass another --resume")
    return state


def find_resume(resume: str, output_dir: Path, warn: Callable[[str], None] = print) -> tuple[Path, dict] | None:
    """(path, state) to resume from: `auto` = the newest checkpoint in output_dir that loads
    (a corrupt newer one is reported with `warn`, e.g. rank 0's print, and skipped), or an explicit
    path; None if `auto` finds none."""
    if resume != "auto":
        return Path(resume), load_checkpoint(Path(resume))
    for path in checkpoint_paths(output_dir / CHECKPOINT_DIR):
        try:
            return path, load_checkpoint(path)
        except CheckpointError as e:
            warn(f"warning: {e}; trying an older checkpoint")
    return None


def best_checkpoint(output_dir: Path) -> Path | None:
    name = read_manifest(output_dir / CHECKPOINT_DIR).get("best")
    return output_dir / CHECKPOINT_DIR / name if name else None


def has_run(output_dir: Path) -> bool:
    return any((output_dir / name).exists() for name in RUN_FILES)


def clear_run(output_dir: Path) -> None:
    """Remove a previous run's files (only what a run writes: never a user's other files)."""
    for name in RUN_FILES:
        p = output_dir / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def check_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CheckpointError(f"output_dir {output_dir} is not writable ({e.strerror}); "
                              "pass another --output_dir") from None


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
