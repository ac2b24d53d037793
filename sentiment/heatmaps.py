"""The per-layer monitor's figures and words, from RUN/monitor.jsonl (monitor.py writes it): layer x step heatmaps
of the update ratio |Δθ|/|θ| and of the gradient norm, for plots/ (figures.plot_run draws them with the rest), and
report.md's paragraph that reads them.

How to read a heatmap: a row per group of weights (embeddings at the bottom, the head at the top), a column per
monitored step, the colour the log10 of the figure. For the update ratio, white is 1e-3, the update:data ratio
Karpathy's makemore lectures (part 3) watch for; blue is smaller (a layer barely moving), red larger.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sentiment.checkpoint import read_rows
from sentiment.rundir import MONITOR_FILE

MONITOR_FIGURES = {  # file name: what it shows, for report.md
    "update_ratio.png": "per-layer update ratio |Δθ|/|θ| per monitored step (log10)",
    "layer_grad_norm.png": "per-layer gradient norm per monitored step (log10)",
}
# The band the report checks update ratios against: a decade either side of the ~1e-3 rule of thumb (Karpathy,
# makemore part 3). Under AdamW a weight moves by about lr per step when its gradient keeps its sign (m/√v ~ ±1),
# so |Δθ|/|θ| is about lr / rms(θ) at most: at fine-tuning rates (2e-5..1e-4) and BERT's weights (rms ~0.04), ~1e-3.
BAND = (1e-4, 1e-2)


def read_monitor(run: Path) -> list[dict]:
    """monitor.jsonl's rows; [] when the run was not monitored (a line cut by a kill is skipped)."""
    return read_rows(Path(run) / MONITOR_FILE)


def matrix(rows: list[dict], key: str) -> np.ndarray:
    """(layers, monitored steps) of one figure."""
    return np.array([r[key] for r in rows], dtype=float).T


def plot_monitor(run: Path, out: Path) -> list[Path]:
    """The heatmaps into `out` (RUN/plots); [] when the run has no monitor rows."""
    rows = read_monitor(run)
    if not rows:
        return []
    written = []
    for name, key, label, centre in (("update_ratio.png", "update_ratio", "log10 |Δθ|/|θ|", -3.0),
                                     ("layer_grad_norm.png", "grad_norm", "log10 gradient norm", None)):
        fig = heatmap(rows, key, label, centre)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        written.append(out / name)
    return written


def heatmap(rows: list[dict], key: str, label: str, centre: float | None):
    """Layers (bottom up) x monitored steps, coloured by log10 of `key`; around `centre` on a diverging map
    (two decades either side), else on viridis from the smallest to the largest value."""
    from matplotlib.figure import Figure

    layers, steps = rows[0]["layers"], [r["step"] for r in rows]
    values = np.log10(np.maximum(matrix(rows, key), 1e-12))  # a skipped fp16 step moved nothing: the floor
    half = (steps[1] - steps[0]) / 2 if len(steps) > 1 else 0.5
    fig = Figure(figsize=(7.5, 0.35 * len(layers) + 2))
    ax = fig.add_subplot()
    colours = dict(cmap="coolwarm", vmin=centre - 2, vmax=centre + 2) if centre is not None else dict(cmap="viridis")
    image = ax.imshow(values, aspect="auto", origin="lower", interpolation="nearest",
                      extent=(steps[0] - half, steps[-1] + half, -0.5, len(layers) - 0.5), **colours)
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="optimizer step", title=f"{label} per layer (monitored every {rows[0].get('every', '?')} steps)")
    fig.colorbar(image, ax=ax, label=label, pad=0.02)
    return fig


def layer_medians(rows: list[dict], key: str) -> dict[str, float]:
    """Each layer's median of `key` over the monitored steps."""
    return dict(zip(rows[0]["layers"], np.median(matrix(rows, key), axis=1).tolist()))


def per_weight_step(rows: list[dict], lrs: dict[int, float]) -> dict[str, float]:
    """Each layer's median of rms(Δθ) / lr: how much of the learning rate an average weight moved per step (AdamW's
    ceiling is ~1). Steps at lr 0 (the first warmup step) are left out."""
    usable = [r for r in rows if lrs.get(r["step"], 0) > 0]
    if not usable:
        return {}
    moved = [[u / np.sqrt(n) / lrs[r["step"]] for u, n in zip(r["update_norm"], r["numel"])] for r in usable]
    return dict(zip(rows[0]["layers"], np.median(np.array(moved), axis=0).tolist()))


def monitor_lines(run: Path, train_rows: list[dict]) -> list[str]:
    """report.md's section: which layers moved most and least, how many ratios fall in BAND, how much of lr a
    weight moved, and what watching cost. Nothing when the run was not monitored."""
    rows = read_monitor(run)
    if not rows:
        return []
    ratios, low, high = matrix(rows, "update_ratio"), *BAND
    median = sorted(layer_medians(rows, "update_ratio").items(), key=lambda kv: kv[1], reverse=True)
    inside, below = np.mean((ratios >= low) & (ratios <= high)), np.mean(ratios < low)
    lrs = {r["step"]: r["lr"] for r in train_rows}
    moved = per_weight_step(rows, lrs)
    costs = [r["monitor_ms"] for r in rows]
    lines = ["## Per-layer monitor", "",
             f"{len(rows)} monitored steps ({rows[0]['step']}-{rows[-1]['step']}), {len(median)} groups, in "
             f"`{MONITOR_FILE}` and the heatmaps above. Median update ratio |Δθ|/|θ| per step: "
             + ", ".join(f"{name} {value:.1e}" for name, value in median) + ".", "",
             f"- Moved most: **{median[0][0]}** ({median[0][1]:.1e} of its norm per step); least: "
             f"**{median[-1][0]}** ({median[-1][1]:.1e}), {median[0][1] / max(median[-1][1], 1e-30):.0f}x less.",
             f"- {inside:.0%} of the (layer, step) ratios fall inside {low:g}..{high:g}, a decade either side of the "
             "~1e-3 update:data ratio of Karpathy's makemore (part 3); "
             f"{below:.0%} below it, {1 - inside - below:.0%} above. Under AdamW a weight moves by about lr per step "
             "when its gradient keeps its sign (m/√v ≈ ±1), less when the sign flips (m averages toward 0), so "
             "the ratio is about lr / rms(θ) at most: a layer far below that at a normal lr gets noisy or few "
             "gradients (an embedding row moves only when its token occurs)."]
    usable = [r for r in rows if lrs.get(r["step"], 0) > 0]
    if len(usable) > 1:
        a, b = usable[0], usable[-1]
        lines.append(f"- From step {a['step']} to step {b['step']} the median ratio over the layers went from "
                     f"{np.median(a['update_ratio']):.1e} to {np.median(b['update_ratio']):.1e} as the learning rate "
                     f"went from {lrs[a['step']]:.1e} to {lrs[b['step']]:.1e}: AdamW's steps scale with it.")
    if moved:
        lines.append("- An average weight moved, per step, this share of the learning rate (median rms(Δθ)/lr; ~1 "
                     "when gradients keep their sign): "
                     + ", ".join(f"{name} {share:.2f}" for name, share in moved.items()) + ".")
    lines += [f"- Cost: {np.mean(costs):.1f} ms per monitored step (median {np.median(costs):.1f}; gradient and "
              "weight norms, one copy of the weights, one host sync); unmonitored steps cost nothing.", ""]
    return lines
