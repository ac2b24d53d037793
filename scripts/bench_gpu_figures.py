"""The inputs and figures of scripts/bench_gpu.py: the model its training parts train (bert-base's architecture) and
the held-out files of its accuracy part; the model facts and the matmul rate that MFU rests on; each contender's
step rows read into one shape, the steady-state speed and MFU computed from them the same way for ours and the
Trainer; and the summary (bench.md, bench.json) it writes.

A step row here is {samples, tokens (real), padded (tokens processed, padding included), seconds}: ours come from
the run's metrics.jsonl, the Trainer's from trainer_tutorial.py --step_log.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
import time
from pathlib import Path

WARMUP = 0.1  # share of the first steps left out of the steady state (allocator and kernel warm-up, first compile)
OUTLIER = 3.0  # a step slower than this many times the median time per processed token is left out (compiles,
#                a checkpoint or evaluation inside a step); how many were left out is reported
STANDARD_ERRORS = 2.0  # accuracy rows agree when within this many binomial standard errors of the padded path's


def write_arch(dst: Path, tokenizer_dir: str) -> None:
    """bert-base-uncased's architecture (BertConfig() defaults: 12 layers, hidden 768, vocabulary 30,522), random
    init (seed 0), with MiniLM's tokenizer (bert-base-uncased's uncased WordPiece vocabulary): ~440 MB, once."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertModel

    if (dst / "config.json").is_file() and (dst / "model.safetensors").is_file():
        return
    torch.manual_seed(0)
    BertModel(BertConfig()).save_pretrained(dst)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(dst)


def write_heldout(train_file: str, dst: Path, n_train: int, n_test: int) -> tuple[str, str]:
    """Two disjoint parquet files drawn from train_file with seed 0: the accuracy part's train and test reviews."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(train_file)
    if table.num_rows < n_train + n_test:
        sys.exit(f"error: {train_file} has {table.num_rows} reviews; the accuracy part needs {n_train + n_test}")
    order = np.random.default_rng(0).permutation(table.num_rows)
    dst.mkdir(parents=True, exist_ok=True)
    pq.write_table(table.take(order[:n_train]), dst / "train.parquet")
    pq.write_table(table.take(order[n_train:n_train + n_test]), dst / "test.parquet")
    return str(dst / "train.parquet"), str(dst / "test.parquet")


def model_flops(facts: dict, tokens: int, samples: int) -> float:
    """Training FLOPs of one step's real tokens: tokens x (6 N + 12 L H s), N the non-embedding parameters, L the
    layers, H the hidden size, s = tokens / samples the step's mean review length (runlog.flops_per_token: the
    weight matmuls forward and backward, and attention's scores and values over each review alone)."""
    from sentiment.runlog import flops_per_token  # here: the bench imports `sentiment` once its wheels are in

    per_token = flops_per_token(facts["layers"], facts["hidden"], tokens / max(samples, 1),
                                facts["non_embedding_params"])
    return per_token * tokens


def model_facts(model_dir: str) -> dict:
    """Layers, hidden size and (non-embedding) parameters of the sequence classifier built on `model_dir`,
    counted on the meta device (no memory, no weights read)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification

    from sentiment.model import count_params

    config = AutoConfig.from_pretrained(model_dir, num_labels=2)
    with torch.device("meta"):
        model = AutoModelForSequenceClassification.from_config(config)
    total, non_embedding = count_params(model)
    return {"layers": config.num_hidden_layers, "hidden": config.hidden_size, "params": total,
            "non_embedding_params": non_embedding}


def matmul_rate(n: int) -> dict:
    """The best of 5 timings of n x n x n bf16 matmuls (2 n^3 FLOPs each) on the GPU, after a warm-up that lets
    the clocks ramp: the rate this card's matrix units reach, MFU's denominator. Without a GPU: 512^3 on the CPU,
    so that --quick exercises it in a moment."""
    import torch

    cuda = torch.cuda.is_available()
    n = n if cuda else min(n, 512)
    device, inner = ("cuda", 20) if cuda else ("cpu", 2)
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    warm = time.perf_counter() + (0.5 if cuda else 0.0)  # half a second of matmuls: the clocks at their peak
    while True:
        for _ in range(inner):
            a @ b
        sync()
        if time.perf_counter() >= warm:
            break
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(inner):
            a @ b
        sync()
        best = min(best, (time.perf_counter() - start) / inner)
    del a, b
    if cuda:
        torch.cuda.empty_cache()
    flops = 2 * n**3 / best
    return {"flops": flops, "tflops": flops / 1e12, "n": n, "dtype": "bf16", "repeats": 5,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


def every(n: int) -> str:
    return "all" if n == 0 else str(n)  # n 0 = every review of the file


def titles(ctx) -> dict:
    t, f, i, a = (ctx.sizes[p] for p in ("tutorial", "full", "inference", "accuracy"))
    return {"tutorial": f"Tutorial recipe: {every(t['n_train'])} reviews x {t['epochs']} epochs, batch {t['batch']}, "
                        f"{t['max_length']} tokens, {t['n_test']} test reviews after each epoch",
            "full": f"Full-data epoch: {every(f['n_train'])} reviews, batch {f['batch']}, head+tail at "
                    f"{f['max_length']}",
            "inference": every(i["n_test"]),
            "accuracy": f"Our paths, equal accuracy: {Path(ctx.minilm).name} fine-tuned on {a['n_train']} reviews, "
                        f"tested on {a['n_test']} others, {a['max_length']} tokens, {a['epochs']} epoch, side by side"}


def read_jsonl(path: Path) -> list[dict]:
    """The whole JSON lines of a file; a line cut by a kill is skipped."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def ours_rows(run_dir: Path) -> tuple[list[dict], int | None]:
    """(step rows, total steps the run planned) from our metrics.jsonl; the total from the last row's ETA, which
    the run extrapolates as elapsed / steps x steps left."""
    rows = [r for r in read_jsonl(run_dir / "metrics.jsonl") if "split" not in r and "step_ms" in r]
    out = [{"samples": r["samples"], "tokens": r["tokens"], "padded": r["tokens"] / max(1e-9, 1 - r["padded_fraction"]),
            "seconds": r["step_ms"] / 1e3, "peak_mem_mb": r.get("peak_mem_mb")} for r in rows]
    last = rows[-1] if rows else {}
    total = round(last["step"] + last["eta_s"] * last["step"] / last["elapsed_s"]) if last.get("elapsed_s") else None
    return out, total


def trainer_rows(run_dir: Path) -> tuple[list[dict], int | None]:
    rows = read_jsonl(run_dir / "steps.jsonl")
    out = [{"samples": r["samples"], "tokens": r["tokens"], "padded": r["padded_tokens"], "seconds": r["step_ms"] / 1e3,
            "peak_mem_mb": r.get("peak_mem_mb")} for r in rows]
    return out, (rows[-1]["max_steps"] if rows else None)


def steady(rows: list[dict], facts: dict, matmul_flops: float) -> dict:
    """Real tokens/s, model TFLOP/s and MFU over the steady steps: after the first WARMUP share, without the
    OUTLIER steps. Empty when no step qualifies."""
    rows = [r for r in rows if r["seconds"] > 0 and r["padded"] > 0 and r["samples"] > 0]
    window = rows[max(1, int(len(rows) * WARMUP)):] if len(rows) > 1 else rows
    if not window:
        return {}
    limit = OUTLIER * statistics.median(r["seconds"] / r["padded"] for r in window)
    kept = [r for r in window if r["seconds"] / r["padded"] <= limit]
    seconds = sum(r["seconds"] for r in kept)
    flops = sum(model_flops(facts, r["tokens"], r["samples"]) for r in kept)
    return {"tokens_per_s": sum(r["tokens"] for r in kept) / seconds, "model_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / matmul_flops, "step_s": seconds / len(kept), "steady_steps": len(kept),
            "left_out": len(window) - len(kept),
            "padded_fraction": 1 - sum(r["tokens"] for r in rows) / sum(r["padded"] for r in rows)}


def training_figures(kind: str, run_dir: Path, log: Path, facts: dict, matmul_flops: float) -> dict:
    """One training row's figures from its files: steady speed, MFU, padding, peak memory, accuracy, the
    attention kernel and precision it ran with, and the steps done of those planned."""
    rows, total = (ours_rows if kind == "ours" else trainer_rows)(run_dir)
    results = read_json(run_dir / "results.json")
    peaks = [r["peak_mem_mb"] for r in rows if r.get("peak_mem_mb") is not None]
    text = log.read_text(errors="replace") if log.is_file() else ""
    if kind == "ours":  # what the engine and the family table chose, as the run's header says
        attention, precision = (re.search(pattern, text) for pattern in (r"\| attention=(\S+)",
                                                                          r"engine: precision=(\w+)"))
        attention, precision = attention and attention.group(1), precision and precision.group(1)
    else:
        attention, precision = results.get("attn_implementation"), results.get("precision")
    return {**steady(rows, facts, matmul_flops), "steps": len(rows), "total_steps": total,
            "peak_mem_mb": results.get("peak_mem_mb", max(peaks, default=None)), "accuracy": results.get("accuracy"),
            "loss": results.get("loss"), "attention": attention, "precision": precision}


def projected_wall(record: dict) -> float | None:
    """A stopped run's whole-process time had it finished: its wall so far plus its steps left at the steady step
    time (its last evaluation and save not counted: a lower bound)."""
    if record["status"] == "ok" or not record.get("step_s") or not record.get("total_steps"):
        return None
    return record["wall_s"] + max(0, record["total_steps"] - record["steps"]) * record["step_s"]


def fmt(value, spec: str = ".1f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def training_table(part: str, title: str, records: list[dict]) -> list[str]:
    rows = [r for r in records if r["part"] == part]
    best = next((r["wall_s"] for r in rows if r["name"] == "trainer_best" and r["status"] == "ok"), None)
    lines = ["", f"### {title}", "", "| contender | status | wall s | wall vs trainer_best | steady real tok/s | "
             "model TFLOP/s | MFU | padded | peak GPU MB | attention | precision | steps | accuracy |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        wall = fmt(r["wall_s"]) + (f" (projected >= {r['projected_wall_s']:.0f})" if r.get("projected_wall_s") else "")
        ratio = f"{best / r['wall_s']:.2f}x" if best and r["status"] == "ok" else "-"
        lines.append(f"| {r['name']} | {r['status']} | {wall} | {ratio} | {fmt(r.get('tokens_per_s'), '.0f')} | "
                     f"{fmt(r.get('model_tflops'), '.3g')} | {fmt(r.get('mfu'), '.1%')} | "
                     f"{fmt(r.get('padded_fraction'), '.1%')} | {fmt(r.get('peak_mem_mb'), '.0f')} | "
                     f"{r.get('attention') or '-'} | {r.get('precision') or '-'} "
                     f"| {r.get('steps', 0)}/{r.get('total_steps') or '?'} | {fmt(r.get('accuracy'), '.4f')} |")
    return lines


def inference_table(records: list[dict], reviews: str) -> list[str]:
    lines = ["", f"### Inference: scoring {reviews} reviews at 512 tokens (the model ours saved in the tutorial part)",
             "", "| scorer | status | wall s | reviews/s (scoring loop) | accuracy |", "|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {fmt(r['wall_s'])} | {fmt(r.get('reviews_per_second'))} | "
              f"{fmt(r.get('accuracy'), '.4f')} |" for r in records if r["part"] == "inference"]
    return lines


def agreement(records: list[dict]) -> None:
    """Each accuracy row's difference from the padded path's, and whether it is within STANDARD_ERRORS binomial
    standard errors of it (set in place)."""
    rows = [r for r in records if r["part"] == "accuracy"]
    base = next((r for r in rows if r["name"] == "ours" and r.get("accuracy") is not None), None)
    for r in rows:
        if base is None or r.get("accuracy") is None or not r.get("n_test"):
            continue
        se = (base["accuracy"] * (1 - base["accuracy"]) / r["n_test"]) ** 0.5
        r["delta"] = r["accuracy"] - base["accuracy"]
        r["equal"] = abs(r["delta"]) <= STANDARD_ERRORS * max(se, 1 / r["n_test"])


def accuracy_table(records: list[dict], title: str) -> list[str]:
    agreement(records)
    lines = ["", f"### {title}", "", "| path | status | wall s | test accuracy | test loss | vs padded | "
             f"within {STANDARD_ERRORS:g} SE |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['name']} | {r['status']} | {fmt(r['wall_s'])} | {fmt(r.get('accuracy'), '.4f')} | "
              f"{fmt(r.get('loss'), '.4f')} | {fmt(r.get('delta'), '+.4f')} | "
              f"{'-' if r.get('equal') is None else ('yes' if r['equal'] else 'NO')} |"
              for r in records if r["part"] == "accuracy"]
    return lines


def write_summary(ctx, records: list[dict]) -> str:
    """bench.md and bench.json in ctx.out, rewritten after every job (a stopped bench keeps what it measured)."""
    m = ctx.matmul
    head = [f"# GPU benchmark{' (--quick: tiny model on the CPU)' if ctx.quick else ''}, {time.strftime('%F %T %Z')}",
            "", f"command: `{ctx.command}`", f"machine: {ctx.machine}",
            f"matmul: {m['tflops']:.3g} TFLOP/s measured here ({m['n']}^3 {m['dtype']} on {m['device']}, best of "
            f"{m['repeats']}): the MFU denominator", f"model (training parts): {ctx.arch} ({ctx.facts_note})",
            "MFU: model FLOP/s of the real tokens / the measured matmul rate; FLOPs per real token 6 N + 12 L H s "
            "(N non-embedding parameters, L layers, H hidden, s the step's mean review length); padding is waste",
            f"budget: {ctx.budget:.0f} s; each job stopped at its box; steady: steps after the first {WARMUP:.0%}, "
            f"those over {OUTLIER:g}x the median time per processed token left out"]
    lines = head + training_table("tutorial", ctx.titles["tutorial"], records) + \
        training_table("full", ctx.titles["full"], records) + inference_table(records, ctx.titles["inference"]) + \
        accuracy_table(records, ctx.titles["accuracy"])
    text = "\n".join(lines) + "\n"
    (ctx.out / "bench.md").write_text(text)
    (ctx.out / "bench.json").write_text(json.dumps({"machine": ctx.machine, "command": ctx.command, "matmul": m,
                                                    "facts": ctx.facts, "quick": ctx.quick, "budget_s": ctx.budget,
                                                    "rows": records}, indent=1, default=str) + "\n")
    return text
