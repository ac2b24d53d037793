"""A run's figures, from the files it wrote (metrics.jsonl, results.json, config.json).

`plot_run(run_dir)` draws PNGs into RUN/plots/ (matplotlib is an optional extra: pip install matplotlib);
report.py embeds them in report.md.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from sentiment.checkpoint import read_rows
from sentiment.errors import ConfigError
from sentiment.heatmaps import plot_monitor
from sentiment.labels import recorded_names

if TYPE_CHECKING:  # matplotlib is optional: imported when a figure is drawn
    from matplotlib.figure import Figure

PLOTS_DIR = "plots"
FIGURES = {  # file name: what it shows, in the order report.md embeds them
    "loss.png": "training loss per optimizer step, evaluation loss, epoch ends",
    "accuracy.png": "evaluation accuracy and F1 (macro-F1 beyond two classes), and the selected model's step",
    "lr.png": "learning rate schedule",
    "grad_norm.png": "gradient norm before clipping (and the fp16 loss scale)",
    "throughput.png": "samples/s and real tokens/s, and where each step's time goes",
    "confusion_matrix.png": "test confusion matrix",
}


def read_run(run_dir: str | Path) -> tuple[list[dict], list[dict], dict | None, dict]:
    """(train rows, eval rows, results or None while running, config) of a run folder."""
    run = Path(run_dir)
    metrics = run / "metrics.jsonl"
    if not metrics.is_file():
        raise ConfigError(f"{run} has no metrics.jsonl; pass the output_dir of a `sentiment train` run")
    rows = read_rows(metrics)
    results = json.loads((run / "results.json").read_text()) if (run / "results.json").is_file() else None
    config = json.loads((run / "config.json").read_text()) if (run / "config.json").is_file() else {}
    return [r for r in rows if "split" not in r], [r for r in rows if "split" in r], results, config


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
    last = max([int(steps[-1])] + [r["step"] for r in eval_rows])  # every step figure spans 0..last
    has_cm = bool(results and results.get("confusion_matrix"))
    figures = {  # in FIGURES order; None where the run has no data for it yet
        "loss.png": _loss_figure(steps, train_rows, eval_rows, last),
        "accuracy.png": _accuracy_figure(eval_rows, results, last) if eval_rows else None,
        "lr.png": _lr_figure(steps, train_rows, last),
        "grad_norm.png": _grad_norm_figure(steps, train_rows, config.get("max_grad_norm", 0), last),
        "throughput.png": _throughput_figure(steps, train_rows, last),
        "confusion_matrix.png": _confusion_figure(results) if has_cm else None,
    }
    written = []
    for name, fig in figures.items():
        if fig is not None:
            fig.tight_layout()
            fig.savefig(out / name, dpi=110)
            written.append(out / name)
    return written + plot_monitor(Path(run_dir), out)  # with --monitor_every: layer x step heatmaps


def best_eval(eval_rows: list[dict]) -> dict | None:
    """The evaluation whose weights train.py saved and tested: the first with the highest val accuracy (a tie
    later is no better, as in checkpoint.Progress.new_best). None without a validation split: the final model."""
    val = [r for r in eval_rows if r["split"] == "val"]
    return max(val, key=lambda r: r["accuracy"]) if val else None  # max keeps the first of equals


def epoch_ends(train_rows: list[dict]) -> list[int]:
    """The last step of every epoch that another epoch follows, from the rows' `epoch` field."""
    return [a["step"] for a, b in itertools.pairwise(train_rows) if b["epoch"] != a["epoch"]]


def _figure(width: float, height: float) -> Figure:
    """A Figure of this size in inches: the object-oriented API renders with Agg, no pyplot state or backend."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height))


def _step_axis(ax, last: int) -> None:
    """x = optimizer steps, in whole numbers from 0 to a little past the last step (matplotlib's own axis for a
    lone point, a 1-epoch run's one evaluation, is fractional and ends at it); a grid; a dot for a lone point."""
    from matplotlib.ticker import MaxNLocator

    ax.set_xlim(0, last + max(1, round(0.03 * last)))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("optimizer step")
    ax.grid(alpha=0.3, which="both")
    for line in ax.get_lines():
        if len(line.get_xdata()) == 1:
            line.set_marker("o")  # a line through one point draws nothing


def _loss_figure(steps: np.ndarray, train_rows: list[dict], eval_rows: list[dict], last: int) -> Figure:
    """Training loss per step and its moving average (raw per-step loss is noisy at small batches), the
    evaluation loss, and a dotted line at each epoch's end."""
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
                label=f"{eval_rows[0]['split']} (evaluations)")
    for i, step in enumerate(epoch_ends(train_rows)):
        ax.axvline(step, color="gray", ls=":", lw=1, label="epoch end" if i == 0 else None)
    ax.set(ylabel="cross-entropy loss", title="Loss")
    _step_axis(ax, last)
    ax.legend()
    return fig


def _accuracy_figure(eval_rows: list[dict], results: dict | None, last: int) -> Figure:
    """Accuracy and F1 at each evaluation, the selected (best val) model's step, the test accuracy once known."""
    eval_name, best = eval_rows[0]["split"], best_eval(eval_rows)
    fig = _figure(7, 4)
    ax = fig.add_subplot()
    es = [r["step"] for r in eval_rows]
    ax.plot(es, [r["accuracy"] for r in eval_rows], "o-", label=f"{eval_name} accuracy")
    names, f1 = recorded_names(results or eval_rows[-1]), "f1" if "f1" in eval_rows[-1] else "macro_f1"
    ax.plot(es, [r[f1] for r in eval_rows], "s--",
            label=f"{eval_name} F1 ({names[1]})" if f1 == "f1" else f"{eval_name} macro-F1")
    if best:
        ax.axvline(best["step"], color="tab:green", lw=1.5, alpha=0.6, label=f"selected model (step {best['step']})")
    if results:
        ax.axhline(results["accuracy"], color="gray", ls=":", label=f"test accuracy {results['accuracy']:.3f}")
    for r in eval_rows:
        ax.annotate(f"{r['accuracy']:.3f}", (r["step"], r["accuracy"]), textcoords="offset points",
                    xytext=(0, 6), ha="center", fontsize=8)
    ax.set(ylabel="score", title="Evaluations", ylim=(min(0.4, *(r["accuracy"] for r in eval_rows)) - 0.05, 1.02))
    _step_axis(ax, last)
    ax.legend(loc="best")
    return fig


def _lr_figure(steps: np.ndarray, train_rows: list[dict], last: int) -> Figure:
    fig = _figure(7, 3.5)
    ax = fig.add_subplot()
    ax.plot(steps, [r["lr"] for r in train_rows], color="tab:green")
    ax.set(ylabel="learning rate", title="Learning rate (linear warmup, linear decay)")
    _step_axis(ax, last)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    return fig


def _grad_norm_figure(steps: np.ndarray, train_rows: list[dict], max_norm: float, last: int) -> Figure:
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
    finite = norm[np.isfinite(norm)]
    if len(finite) and finite.min() > 0 and finite.max() / finite.min() > 10:
        # log only where the norms span over a decade (spikes), labelled at 1, 2, 5 x 10^k as plain numbers:
        # matplotlib labels only powers of ten, one or two on a short range. Within a decade linear reads best.
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1, 2, 5) if finite.max() / finite.min() < 1e3 else (1,)))
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set(ylabel="norm", title=f"Gradient norm ({clipped.sum()} of {len(norm)} steps clipped)")
    _step_axis(ax, last)
    ax.legend()
    if has_scale:
        ax2 = fig.add_subplot(212)
        ax2.plot([r["step"] for r in train_rows if "scale" in r], [r["scale"] for r in train_rows if "scale" in r],
                 color="tab:brown")
        ax2.set_yscale("log", base=2)  # GradScaler's scale is a power of two: each tick is one halving
        ax2.set(ylabel="scale", title="fp16 GradScaler loss scale")
        _step_axis(ax2, last)
    return fig


def _throughput_figure(steps: np.ndarray, train_rows: list[dict], last: int) -> Figure:
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
    _step_axis(ax, last)
    ax = fig.add_subplot(212)
    parts = [("data_ms", "data wait"), ("fwd_bwd_ms", "forward + backward"), ("opt_ms", "optimizer")]
    ax.stackplot(steps, *[[r[k] for r in train_rows] for k, _ in parts], labels=[n for _, n in parts], alpha=0.8)
    ax.set(ylabel="ms per step", title="Time per step")
    _step_axis(ax, last)
    ax.legend(loc="upper right", fontsize=8)
    return fig


def _confusion_figure(results: dict) -> Figure:
    """The test confusion matrix (N x N: row = true class, column = predicted), each cell with its count and its
    share of the true class; each class's support beside its name, so an imbalance shows."""
    cm = np.array(results["confusion_matrix"])  # binary: [[tn, fp], [fn, tp]]
    n, names = len(cm), recorded_names(results)
    fig = _figure(max(4.2, 1.6 + 0.9 * n), max(3.8, 1.2 + 0.8 * n))  # ~0.9 in a cell: its two lines stay legible
    ax = fig.add_subplot()
    ax.imshow(cm, cmap="Blues")
    row_share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    for i in range(n):
        for j in range(n):
            ax.text(j, i, f"{cm[i, j]}\n({row_share[i, j]:.0%})", ha="center", va="center", fontsize=9 if n > 4 else 10,
                    color="white" if cm[i, j] > cm.max() / 2 else "black")
    ax.set(xticks=range(n), yticks=range(n), xticklabels=names, xlabel="predicted", ylabel="true (support)",
           yticklabels=[f"{name} ({total})" for name, total in zip(names, cm.sum(axis=1))],
           title=f"Test confusion matrix (accuracy {results['accuracy']:.3f})")
    if n > 2:
        ax.tick_params(axis="x", labelrotation=30)
    return fig
