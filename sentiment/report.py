"""Figures and a one-page report of a run, from the files it wrote (metrics.jsonl, results.json, config.json).

`plot_run(run_dir)` draws PNGs into RUN/plots/ (matplotlib is an optional extra: pip install matplotlib);
`write_report(run_dir, misclassified)` writes RUN/report.md. train.py calls write_report at the end of
every run; `sentiment plot RUN` (or scripts/plot_run.py) redraws the figures of any run, finished or not.
"""

from __future__ import annotations

import html
import importlib.util
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sentiment.checkpoint import atomic_write
from sentiment.data import LABEL_NAMES
from sentiment.errors import ConfigError

if TYPE_CHECKING:  # matplotlib is optional: imported when a figure is drawn
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"
FIGURES = {  # file name: what it shows, in the order report.md embeds them
    "loss.png": "training loss per optimizer step and evaluation loss per epoch",
    "accuracy.png": "evaluation accuracy and F1 per epoch",
    "lr.png": "learning rate schedule",
    "grad_norm.png": "gradient norm before clipping (and the fp16 loss scale)",
    "throughput.png": "samples/s and real tokens/s, and where each step's time goes",
    "confusion_matrix.png": "test confusion matrix",
}
TEXT_CHARS = 300  # characters of a misclassified review shown in report.md


def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict], dict | None, dict]:
    """(train rows, eval rows, results or None while running, config) of a run folder."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run} has no metrics.jsonl; pass the output_dir of a `sentiment train` run")
    rows = []
    for line in metrics.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill mid-write: the rest is still good
            continue
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r], results, config


# ----------------------------------------------------------------------------- figures


def plot_run(run_dir: str | Path, results: dict | None = None) -> list[Path]:
    """Draw the run's figures into RUN/plots/ (see FIGURES); returns the paths written. Figures whose
    data the run has not produced yet (no eval, no results.json) are skipped."""
    if importlib.util.find_spec("matplotlib") is None:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or pip install -e \".[extras]\")")
    train_rows, eval_rows, on_disk, config = read_run(run_dir)
    results = results or on_disk  # given while a run finishes: results.json is written after the report
    if not train_rows:
        raise ConfigError(f"{run_dir} has no training steps in metrics.jsonl yet; plot again once it has")
    out = Path(run_dir) / PLOTS_DIR
    out.mkdir(exist_ok=True)
    steps = np.array([r["step"] for r in train_rows])
    has_cm = bool(results and results.get("confusion_matrix"))
    figures = {  # in FIGURES order; None where the run has no data for it yet
        "loss.png": _loss_figure(steps, train_rows, eval_rows),
        "accuracy.png": _accuracy_figure(eval_rows, results) if eval_rows else None,
        "lr.png": _lr_figure(steps, train_rows),
        "grad_norm.png": _grad_norm_figure(steps, train_rows, config.get("max_grad_norm", 0)),
        "throughput.png": _throughput_figure(steps, train_rows),
        "confusion_matrix.png": _confusion_figure(results) if has_cm else None,
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            written.append(out / name)
    return written


def _figure(width: float, height: float) -> Figure:
    """A new matplotlib Figure of this size in inches."""
    # the object-oriented API renders with Agg and touches no global pyplot state or backend
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _loss_figure(steps: np.ndarray, train_rows: list[dict], eval_rows: list[dict]) -> Figure:
    """Training loss per step with a moving average over it (raw per-step loss is noisy at small batches),
    and the evaluation loss at the end of each epoch."""
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    loss = np.array([r["loss"] for r in train_rows], dtype=float)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35 if len(loss) >= 40 else 1.0, lw=1, label="train (per step)")
    window = max(1, len(loss) // 20)
    if window > 1:
        smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", lw=2, label=f"train ({window}-step mean)")
    if eval_rows:
        ax.plot([r["step"] for r in eval_rows], [r["loss"] for r in eval_rows], "o-", color="tab:orange",
                label=f"{eval_rows[0]['split']} (end of epoch)")
    ax.set(xlabel="optimizer step", ylabel="cross-entropy loss", title="Loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _accuracy_figure(eval_rows: list[dict], results: dict | None) -> Figure:
    """Evaluation accuracy and F1 after each epoch, and the final test accuracy once there is one."""
    eval_name = eval_rows[0]["split"]
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    es = [r["step"] for r in eval_rows]
    ax.plot(es, [r["accuracy"] for r in eval_rows], "o-", label=f"{eval_name} accuracy")
    ax.plot(es, [r["f1"] for r in eval_rows], "s--", label=f"{eval_name} F1 (pos)")
    if results:
        ax.axhline(results["accuracy"], color="gray", ls=":", label=f"test accuracy {results['accuracy']:.3f}")
    for r in eval_rows:
        ax.annotate(f"{r['accuracy']:.3f}", (r["step"], r["accuracy"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xlabel="optimizer step", ylabel="score", title="Evaluation after each epoch",
           ylim=(min(0.4, *(r["accuracy"] for r in eval_rows)) - 0.05, 1.02))
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    return fig


def _lr_figure(steps: np.ndarray, train_rows: list[dict]) -> Figure:
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, [r["lr"] for r in train_rows], color="tab:green")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning rate (linear warmup, linear decay)")
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.grid(alpha=0.3)
    return fig


def _grad_norm_figure(steps: np.ndarray, train_rows: list[dict], max_norm: float) -> Figure:
    """The norm per step, clipped steps marked; below it the fp16 loss scale when the run had one."""
    has_scale = any("scale" in r for r in train_rows)
    fig = _figure(7, 6 if has_scale else 4)
    ax = fig.add_subplot(211 if has_scale else 111)
    norm = np.array([r["grad_norm"] for r in train_rows], dtype=float)
    ax.plot(steps, norm, color="tab:purple", lw=1, label="gradient L2 norm (before clipping)")
    clipped = np.array([r.get("clipped", False) for r in train_rows])
    if clipped.any():
        ax.scatter(steps[clipped], norm[clipped], color="tab:red", s=12, zorder=3, label="clipped")
    if max_norm:
        ax.axhline(max_norm, color="tab:red", ls="--", lw=1, label=f"max_grad_norm {max_norm:g}")
    if np.all(norm[np.isfinite(norm)] > 0):
        ax.set_yscale("log")
    ax.set(xlabel="optimizer step", ylabel="norm",
           title=f"Gradient norm ({clipped.sum()} of {len(norm)} steps clipped)")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    if has_scale:
        ax2 = fig.add_subplot(212)
        ax2.plot([r["step"] for r in train_rows if "scale" in r], [r["scale"] for r in train_rows if "scale" in r],
                 color="tab:brown")
        ax2.set(xlabel="optimizer step", ylabel="scale", yscale="log", title="fp16 GradScaler loss scale")
        ax2.grid(alpha=0.3, which="both")
    return fig


def _throughput_figure(steps: np.ndarray, train_rows: list[dict]) -> Figure:
    """Samples/s and real tokens/s on twin axes; below it each step's milliseconds by phase."""
    fig = _figure(7, 6)
    ax = fig.add_subplot(211)
    ax.plot(steps, [r["samples_per_s"] for r in train_rows], color="tab:blue", lw=1)
    ax.set_ylabel("samples/s", color="tab:blue")
    ax_tok = ax.twinx()
    ax_tok.plot(steps, [r["tokens_per_s"] for r in train_rows], color="tab:orange", lw=1)
    ax_tok.set_ylabel("real tokens/s", color="tab:orange")
    padded = np.mean([r["padded_fraction"] for r in train_rows])
    ax.set(title=f"Throughput (mean padding {padded:.1%} of tokens)")
    ax.grid(alpha=0.3)
    ax = fig.add_subplot(212)
    parts = [("data_ms", "data wait"), ("fwd_bwd_ms", "forward + backward"), ("opt_ms", "optimizer")]
    ax.stackplot(steps, *[[r[k] for r in train_rows] for k, _ in parts], labels=[n for _, n in parts], alpha=0.8)
    ax.set(xlabel="optimizer step", ylabel="ms per step", title="Time per step")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _confusion_figure(results: dict) -> Figure:
    """The test confusion matrix, each cell with its count and its share of the true class."""
    cm = np.array(results["confusion_matrix"])  # [[tn, fp], [fn, tp]]
    fig = _figure(4.2, 3.8)
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(2):
        for j in range(2):
            ax.text(j, i, f"{cm[i, j]}\n({row_share[i, j]:.0%})", ha="center", va="center",
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=LABEL_NAMES, yticklabels=LABEL_NAMES,
           xlabel="predicted", ylabel="true", title=f"Test confusion matrix (accuracy {results['accuracy']:.3f})")
    return fig


# ----------------------------------------------------------------------------- report.md


def misclassified(texts: list[str], labels: np.ndarray, probs: np.ndarray, k: int = 5) -> list[dict]:
    """The k most confidently wrong predictions: {text (first TEXT_CHARS chars), label, p_pos}."""
    labels = np.asarray(labels)
    p_pos = np.asarray(probs)[:, 1]  # probs: (n, 2) of P(neg), P(pos)
    wrong = np.flatnonzero((p_pos >= 0.5).astype(int) != labels)
    worst = wrong[np.argsort(-np.abs(p_pos[wrong] - labels[wrong]), kind="stable")][:k]
    return [{"text": _shorten(texts[i]), "label": int(labels[i]), "p_pos": float(p_pos[i])} for i in worst]


def _shorten(text: str) -> str:
    text = " ".join(text.replace("<br />", " ").split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS].rsplit(" ", 1)[0] + " …"


def write_report(run_dir: str | Path, misclassified: list[dict], results: dict | None = None) -> Path:
    """RUN/report.md: final metrics (`results`, else RUN/results.json), engine decisions, figures (drawn now
    when matplotlib is installed), the given misclassified reviews, and the config. Returns its path."""
    run = Path(run_dir)
    _, eval_rows, on_disk, config = read_run(run)
    results = results or on_disk or {}
    lines = [f"# Run report: `{run}`", ""]

    lines += ["## Final metrics", ""]
    test = results.get("test", {})
    if test:
        lines += [f"On {test.get('n', '?')} test reviews"
                  + (" with the best model by validation accuracy" if results.get("best_val_accuracy") is not None
                     else " with the final model") + ":", "",
                  "| accuracy | F1 (pos) | precision | recall | loss |", "|---|---|---|---|---|",
                  f"| {test['accuracy']:.4f} | {test['f1']:.4f} | {test['precision']:.4f} | {test['recall']:.4f} "
                  f"| {test['loss']:.4f} |", ""]
    if results.get("best_val_accuracy") is not None:
        lines.append(f"- best validation accuracy: {results['best_val_accuracy']:.4f}")
    for row in eval_rows:
        lines.append(f"- epoch {row['epoch']} (step {row['step']}), {row['split']}: accuracy {row['accuracy']:.4f}, "
                     f"F1 {row['f1']:.4f}, loss {row['loss']:.4f}")
    if results:
        speed = results["samples_per_second"]  # None when a resumed run had no steps left
        lines.append(f"- {results['steps']} optimizer steps, "
                     + (f"{speed:.1f} training samples/s, " if speed is not None else "")
                     + f"{results['runtime_s']:.0f} s in all, peak memory {results['peak_mem_mb']:.0f} MB")
    lines.append("")

    lines += ["## Engine decisions", ""]
    lines += [f"- {d}" for d in results.get("engine", [])] or ["- (no results.json yet)"]
    env = results.get("environment", {})
    if env:
        lines.append("- environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    lines.append("")

    lines += ["## Figures", ""]
    if importlib.util.find_spec("matplotlib") is None:
        lines += ["matplotlib is not installed, so no figures were drawn. `pip install matplotlib`, then "
                  f"`sentiment plot {run}` writes them to `{run / PLOTS_DIR}` and a rerun of training embeds them "
                  "here.", ""]
    else:
        for path in plot_run(run, results):
            lines += [f"![{FIGURES.get(path.name, path.stem)}]({PLOTS_DIR}/{path.name})", ""]
    if config.get("report_to") == "tensorboard":
        lines += [f"The same scalars are in TensorBoard: `tensorboard --logdir {run / 'tensorboard'}`.", ""]

    lines += ["## Misclassified test reviews", ""]
    if misclassified:
        lines += [f"The final model's most confidently wrong test predictions (first {TEXT_CHARS} characters):", ""]
        for i, ex in enumerate(misclassified, 1):
            text = html.escape(ex["text"]).replace("|", "\\|")
            lines += [f"{i}. true **{LABEL_NAMES[ex['label']]}**, P(pos) = {ex['p_pos']:.3f}", "",
                      f"   > {text}", ""]
    else:
        lines += ["None: every test review was classified correctly.", ""]

    lines += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    path = run / "report.md"
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path
