"""The key figures of each step of scripts/gpu_check.py, read from its run folders and logs, and the summary it
writes into its output folder: summary.md (step, status, wall seconds, key figures) and summary.json.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path


def read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def json_in(text: str, first: str = "{") -> dict:
    """The last JSON object printed whole on a line of its own (one line, or indented from `{` to `}`)."""
    lines = text.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if lines[i].startswith(first):
            end = next((j for j in range(i, len(lines)) if lines[j] == "}"), i) if lines[i] == "{" else i
            try:
                return json.loads("\n".join(lines[i:end + 1]))
            except json.JSONDecodeError:
                continue
    return {}


def pytest_line(log: str) -> str:
    return next((line.strip("= ") for line in reversed(log.splitlines())
                 if any(w in line for w in (" passed", " skipped", " failed", " error"))), "")


def run_figures(results: dict) -> dict:
    """A fine-tune's results.json: test accuracy and loss, best validation accuracy, speed, memory."""
    return {k: results.get(k) for k in ("accuracy", "loss", "best_val_accuracy", "samples_per_second",
                                        "train_seconds", "peak_mem_mb", "steps") if results.get(k) is not None}


def median_mfu(run: Path) -> float | None:
    path = run / "metrics.jsonl"
    rows = path.read_text().splitlines() if path.is_file() else []
    mfu = [json.loads(row)["mfu"] for row in rows if '"mfu"' in row]
    return statistics.median(mfu) if mfu else None


def bench_figures(ctx) -> dict:
    """bench_gpu.py's bench.json: the matmul rate, each training row's wall and steady tokens/s, each inference
    row's reviews/s, each accuracy row's test accuracy; a row that did not finish, its status."""
    report = read_json(ctx.work / "bench" / "bench.json")
    out = {"matmul TFLOP/s": report.get("matmul", {}).get("tflops")}
    shown = {"inference": ("reviews_per_second",), "accuracy": ("accuracy",)}
    for row in report.get("rows", []):
        key = f"{row['part']} {row['name']}"
        if row["status"] != "ok":
            out[key] = row["status"]
        for figure in shown.get(row["part"], ("wall_s", "tokens_per_s")):
            out[f"{key} {figure}"] = row.get(figure)
    return out


def mean_std(m: dict) -> str:
    """seeds.py's {"mean", "std", "values"} as `0.7783 ± 0.0225 (0.769 / 0.762 / 0.804)` (std: - for one seed)."""
    std = "-" if m["std"] is None else f"{m['std']:.4f}"
    return f"{m['mean']:.4f} ± {std} ({' / '.join(f'{v:.3f}' for v in m['values'])})"


def gain(base: dict, pretrained: dict) -> dict:
    """Pre-trained minus MiniLM in mean test accuracy; it "appears" when above zero by more than either arm's
    spread over seeds (with 1,000 test reviews one standard error is ~1.3 points besides)."""
    diff = pretrained["mean"] - base["mean"]
    spread = max(base["std"] or 0.0, pretrained["std"] or 0.0)
    return {"gain": f"{diff * 100:+.1f} points", "gain appears": "yes" if diff > spread else "no"}


def few_shot_figures(ctx) -> dict:
    arms = {arm: read_json(ctx.work / f"few_{arm}" / "seeds.json").get("metrics", {}).get("accuracy")
            for arm in ("minilm", "pretrained")}
    out = {f"{arm} accuracy": mean_std(m) for arm, m in arms.items() if m}
    return {**out, **(gain(arms["minilm"], arms["pretrained"]) if all(arms.values()) else {})}


def figures(ctx, name: str, log: str) -> dict:
    """The key figures of one step, from its output files (or its log where it writes none)."""
    work = ctx.work
    if name == "install":
        return json_in(log)
    if name == "test-gpu":
        return {"pytest": pytest_line(log)}
    if name == "doctor":
        report = json_in(log)
        return {"ok": report.get("ok"), "device": report.get("device"), "precision": report.get("precision"),
                "gpus": [d.get("name") for d in report.get("cuda_devices", [])], "seconds": report.get("seconds")}
    if name == "bench":
        return bench_figures(ctx)
    if name == "split":
        return {"files": [line.split(":")[1].strip() for line in log.splitlines() if ".parquet: " in line]}
    if name == "full":
        return {**run_figures(read_json(work / "full" / "results.json")), "median mfu": median_mfu(work / "full")}
    if name == "probe":
        return {"samples_per_second": read_json(work / "probe" / "results.json").get("samples_per_second")}
    if name == "pretrain":
        results = read_json(work / "pretrain" / "results.json")
        texts = results.get("n_texts", {}).get("train")
        epochs = results["steps"] * results["batch"]["global"] / texts if texts else None  # passes over the texts
        return {**ctx.planned, "epochs": epochs, **{k: results.get(k) for k in (
            "mlm_loss", "mlm_accuracy", "perplexity", "samples_per_second", "train_seconds")}}
    return few_shot_figures(ctx)


def cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def write_summary(ctx, records: list[dict]) -> None:
    head = [f"# GPU check ({'dry run, tiny model on the CPU' if ctx.dry else 'MiniLM'}), {time.strftime('%F %T %Z')}",
            "", f"command: `{ctx.command}`", f"machine: {ctx.machine}", f"model: {ctx.model}"
            + (f" (unpacked from {ctx.packed}: weights rounded to fp16 to travel, back in fp32)" if ctx.packed else ""),
            ""]
    rows = [f"| {r['item']} {r['step']} | {r['status']} | {r['seconds']:.1f} | "
            + "; ".join(f"{k} {cell(v)}" for k, v in r["figures"].items()).replace("|", "/") + " |" for r in records]
    text = "\n".join(head + ["| step | status | wall s | key figures |", "|---|---|---|---|", *rows]) + "\n"
    (ctx.out / "summary.md").write_text(text)
    (ctx.out / "summary.json").write_text(json.dumps({"machine": ctx.machine, "dry_run": ctx.dry, "model": ctx.model,
                                                      "steps": records}, indent=1, default=str) + "\n")
