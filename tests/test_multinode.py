"""Multi-node DDP for real, on loopback (issue "Your GPU, whatever it is", item 5).

Two torchrun agents, one per "node", one CPU process each (gloo), meet at a c10d rendezvous on
127.0.0.1, exactly as scripts/slurm_ddp.sbatch launches one agent per SLURM node: the torchrun flags
are read out of the script itself, its variables filled in for two nodes on this machine, so the
script cannot drift from a launch that is known to work. Both agents get the same arguments (a SLURM
job passes the same "$@" to every node) and so the same --output_dir: the shared filesystem the script
asks for, here the same disk.

The run (fp32, dropout off, 2 nodes x micro-batch 8 = global batch 16) must match one process at
micro-batch 8 x accumulation 2, which takes the very same micro-batches (data.micro_batches deals
slot k = micro_step * world_size + rank): weights within 1e-5 and per-step losses within rtol 1e-5, the
tolerance of tests/test_ddp.py. 41 training reviews make each epoch's last global batch 9 reviews.

The c10d rendezvous assigns node ranks itself (torchrun ignores --node_rank unless the rendezvous is
static), so the test learns which agent became node 0 from its worker's RANK/GROUP_RANK, recorded by a
sitecustomize.py on the workers' PYTHONPATH: the workers run `-m sentiment train` unchanged. On ranks
other than 0 the same sitecustomize records every file write under the run's parent folder; there must
be none.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import AUDIT_HOOK, REPO, audited_folders, cli_args

from sentiment.config import Config
from sentiment.train import train

SLURM_SCRIPT = REPO / "scripts" / "slurm_ddp.sbatch"
TIMEOUT_S = 300  # both nodes together; the run itself takes well under a minute
NODES = 2


def settings(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=41, n_test=16,
                  eval_batch_size=16, max_length=64, epochs=2, micro_batch_size=8, lr=3e-3, dropout=0.0,
                  device="cpu", precision="fp32", output_dir=str(output_dir), log_every=0)
    return {**values, **overrides}


# ----------------------------------------------------------------------------- the SLURM script's launch

def slurm_torchrun_line() -> list[str]:
    """The words after `.../torchrun` on the script's srun line (backslash continuations joined, shell
    quotes removed, the trailing `&` dropped): flags, then `-m sentiment train ...`."""
    text = SLURM_SCRIPT.read_text().replace("\\\n", " ")
    [line] = [ln for ln in text.splitlines() if re.match(r"\s*srun\b", ln)]
    words = shlex.split(line, comments=True)
    [at] = [i for i, w in enumerate(words) if w.endswith("/torchrun")]
    words = words[at + 1:]
    return words[:-1] if words[-1] == "&" else words


def split_launch(words: list[str]) -> tuple[dict[str, str], list[str]]:
    """({--flag: value}, program words from `-m` on) of a torchrun command line."""
    at = words.index("-m")
    flags = {}
    for word in words[:at]:
        assert word.startswith("--") and "=" in word, f"torchrun flag {word!r} is not in --flag=value form"
        key, _, value = word.partition("=")
        assert key not in flags, f"torchrun flag {key} given twice"
        flags[key] = value
    return flags, words[at:]


def fill(word: str, values: dict[str, str]) -> str:
    """`word` with the script's $VARIABLES replaced by this test's values."""
    filled = re.sub(r"\$\{?(\w+)\}?", lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), word)
    assert "$" not in filled, (f"the SLURM script's launch word {word!r} uses a variable this test cannot fill "
                               f"(it knows {sorted(values)}): update the test together with the script")
    return filled


def loopback_launch(port: int, rdzv_id: str, train_args: list[str]) -> list[str]:
    """The SLURM script's torchrun arguments for 2 nodes x 1 CPU process on 127.0.0.1, with `train_args`
    in place of "$@"."""
    values = {"SLURM_JOB_NUM_NODES": str(NODES), "NPROC_PER_NODE": "1", "SLURM_JOB_ID": rdzv_id,
              "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    out = []
    for word in slurm_torchrun_line():
        out.extend(train_args if word == "$@" else [fill(word, values)])
    return out


def test_slurm_launch_line_is_the_one_this_test_runs():
    """The script's torchrun flags are exactly those the loopback run uses (c10d rendezvous, one agent per
    node, nproc_per_node, -m sentiment train --resume auto "$@"), and nothing else: a flag added to or
    removed from the script breaks this test until the multi-node run below is checked with it."""
    subprocess.run(["bash", "-n", str(SLURM_SCRIPT)], check=True)
    flags, program = split_launch(slurm_torchrun_line())
    assert flags == {"--nnodes": "$SLURM_JOB_NUM_NODES", "--nproc_per_node": "$NPROC_PER_NODE",
                     "--rdzv_id": "$SLURM_JOB_ID", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "$MASTER_ADDR:$MASTER_PORT"}
    assert program == ["-m", "sentiment", "train", "--resume", "auto", "$@"]
    # ... and the test's own launch is that line with the variables filled in
    flags, program = split_launch(loopback_launch(29999, "job7", ["--epochs", "1"]))
    assert flags == {"--nnodes": "2", "--nproc_per_node": "1", "--rdzv_id": "job7", "--rdzv_backend": "c10d",
                     "--rdzv_endpoint": "127.0.0.1:29999"}
    assert program == ["-m", "sentiment", "train", "--resume", "auto", "--epochs", "1"]


# ----------------------------------------------------------------------------- two nodes on loopback

# Imported at start-up by every Python process that has its folder on PYTHONPATH: the two torchrun agents
# (no RANK: it does nothing there) and their workers. A worker records its ranks; a worker of rank > 0 also
# records every write-like file operation under $AUDIT_WATCH (after one probe write, to prove the hook works).
SITECUSTOMIZE = r"""
import json, os
if "RANK" in os.environ and "AUDIT_LOGS" in os.environ:
    keys = ("RANK", "GROUP_RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
            "TORCHELASTIC_RUN_ID")
    with open(os.path.join(os.environ["AUDIT_LOGS"], f"env_rank{os.environ['RANK']}.json"), "w") as f:
        json.dump({k: os.environ.get(k) for k in keys}, f)
""" + AUDIT_HOOK


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop(proc: subprocess.Popen) -> None:
    """Kill an agent and its workers (its own process group), if still running."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()


def run_nodes(launch: list[str], logs: list[Path], env: dict, timeout: float) -> list[str]:
    """Start one torchrun agent per log file, wait for all of them; on a failure or a hang kill every agent
    (and its workers) and fail with every node's log. Returns the logs' text."""
    procs = []
    try:
        for log in logs:
            with open(log, "w") as f:  # the child keeps its own descriptor
                procs.append(subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch], cwd=REPO,
                                              env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True))
        deadline, failed = time.monotonic() + timeout, None
        while any(p.poll() is None for p in procs) and failed is None:
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
            elif any(p.poll() not in (None, 0) for p in procs):
                failed = "a node failed: " + ", ".join(f"node {i} exit {p.poll()}" for i, p in enumerate(procs))
            else:
                time.sleep(0.2)
        if failed is None and any(p.returncode != 0 for p in procs):
            failed = "exit codes " + ", ".join(str(p.returncode) for p in procs)
    finally:
        for p in procs:
            stop(p)
    texts = [log.read_text(errors="replace") for log in logs]
    if failed:
        pytest.fail(f"two-node torchrun {failed}\n" + "\n".join(
            f"===== node {i} ({log}) =====\n{text[-6000:]}" for i, (log, text) in enumerate(zip(logs, texts))))
    return texts


@pytest.fixture(scope="module")
def two_nodes(tiny_dirs, tmp_path_factory) -> dict:
    """The two-node run: its output folder, settings, each node's log, each worker's ranks and rank > 0's writes."""
    folder = tmp_path_factory.mktemp("multinode")
    watch, audit, hooks = audited_folders(folder, "hooks")
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    run = watch / "run"
    values = settings(*tiny_dirs, run)
    rdzv_id = f"pytest-{os.getpid()}"
    launch = loopback_launch(free_port(), rdzv_id, cli_args(values))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PYTHONUNBUFFERED": "1", "AUDIT_WATCH": str(watch), "AUDIT_LOGS": str(audit),
           "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])])}
    started = time.perf_counter()
    texts = run_nodes(launch, [folder / "node_a.log", folder / "node_b.log"], env, TIMEOUT_S)
    seconds = time.perf_counter() - started
    print(f"two-node run: {seconds:.1f} s wall")
    ranks = {int(json.loads(p.read_text())["RANK"]): json.loads(p.read_text()) for p in audit.glob("env_rank*.json")}
    return {"run": run, "values": values, "logs": texts, "ranks": ranks, "audit": audit, "watch": watch,
            "rdzv_id": rdzv_id, "seconds": seconds}


@pytest.fixture(scope="module")
def one_process(tiny_dirs, tmp_path_factory) -> Path:
    """The same global batch in this process: micro-batch 8 x accumulation 2, with the threads a worker gets
    (engine.setup_engine: all cores / LOCAL_WORLD_SIZE, here 1)."""
    run = tmp_path_factory.mktemp("one") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        train(Config(**settings(*tiny_dirs, run, grad_accum_steps=2)))
    finally:
        torch.set_num_threads(threads)
    return run


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r]


def node_of_rank(two_nodes: dict, rank: int) -> int:
    """Which agent (0: node_a.log, 1: node_b.log) ran global rank `rank`: the c10d rendezvous decides."""
    run_log = [i for i, text in enumerate(two_nodes["logs"]) if "engine: device=cpu" in text]
    assert len(run_log) == 1, "exactly one node's worker (rank 0) prints the run's lines"
    return run_log[0] if rank == 0 else 1 - run_log[0]


def test_two_nodes_form_one_job(two_nodes):
    ranks = two_nodes["ranks"]
    assert sorted(ranks) == [0, 1], f"workers seen: {ranks}"
    for rank, env in ranks.items():
        # one process per node: the node rank is the global rank, the local rank is 0 on both
        assert (env["GROUP_RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == \
            (str(rank), "0", "2", "1")
    assert ranks[0]["TORCHELASTIC_RUN_ID"] == ranks[1]["TORCHELASTIC_RUN_ID"] == two_nodes["rdzv_id"]
    main = two_nodes["logs"][node_of_rank(two_nodes, 0)]
    assert "engine: distributed=DDP world_size=2 backend=gloo (torchrun environment found)" in main
    assert "batch: global 16 = micro 8 x accum 1 x world 2 | 3 steps/epoch x 2 epochs = 6 steps" in main
    assert "resume auto: no checkpoint in" in main  # the script's --resume auto, on a fresh folder
    assert "test | accuracy" in main


def test_two_nodes_match_one_process_at_the_same_global_batch(two_nodes, one_process):
    runs = {"two nodes": two_nodes["run"], "one process": one_process}
    weights = {name: load_file(str(run / "model" / "model.safetensors")) for name, run in runs.items()}
    rows = {name: train_rows(run) for name, run in runs.items()}
    a, b = weights["one process"], weights["two nodes"]
    assert a.keys() == b.keys()
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    losses = {name: np.array([r["loss"] for r in r_]) for name, r_ in rows.items()}
    loss_diff = np.abs(losses["two nodes"] - losses["one process"])
    print(f"two nodes vs one process: max |weight difference| {diff:.2e}, per-step |loss difference| "
          f"{', '.join(f'{d:.1e}' for d in loss_diff)} (max {loss_diff.max():.2e}), "
          f"wall {two_nodes['seconds']:.1f} s")
    assert [r["step"] for r in rows["one process"]] == list(range(1, 7))
    assert [r["step"] for r in rows["two nodes"]] == [r["step"] for r in rows["one process"]]
    assert [r["samples"] for r in rows["two nodes"]] == [16, 16, 9] * 2  # the short last batch, stepped by both
    assert [r["lr"] for r in rows["two nodes"]] == [r["lr"] for r in rows["one process"]]
    assert diff <= 1e-5, f"two-node weights differ from one process by {diff:.2e}"
    np.testing.assert_allclose(losses["two nodes"], losses["one process"], rtol=1e-5, atol=1e-7,
                               err_msg="per-step losses, two nodes vs one process")
    np.testing.assert_allclose([r["grad_norm"] for r in rows["two nodes"]],
                               [r["grad_norm"] for r in rows["one process"]], rtol=1e-4, atol=1e-7,
                               err_msg="per-step gradient norms, two nodes vs one process")


def test_only_node_rank_zero_writes_the_run_folder(two_nodes):
    run, watch, audit = two_nodes["run"], two_nodes["watch"], two_nodes["audit"]
    lines = (audit / "writes_rank1.txt").read_text().splitlines()
    assert lines[:1] == [f"open {os.path.realpath(watch / 'probe_rank1')}"]  # the hook saw its probe
    assert lines[1:] == [], "the rank-1 node wrote under the run folder"
    other = two_nodes["logs"][node_of_rank(two_nodes, 1)]
    assert not re.search(r"^(engine|run|batch|test) ", other, re.M), f"the rank-1 node printed run lines:\n{other}"
    names = {p.name for p in run.rglob("*")}
    assert {"config.json", "metrics.jsonl", "results.json", "model.safetensors"} <= names
    assert [n for n in names if n.startswith(".")] == [".sentiment-run.json"]  # the marker; no temp or probe files
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_0000006.pt"]
    rng = torch.load(run / "checkpoints" / "step_0000006.pt", weights_only=False)["rng"]
    assert len(rng) == 2  # both nodes' RNG states, gathered by rank 0
