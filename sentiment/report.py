"""A one-page report of a run, from the files it wrote (metrics.jsonl, results.json, config.json), with the
figures of figures.py.

`write_report(run_dir, misclassified)` writes RUN/report.md. train.py calls write_report at the end of
every run; `redraw(run_dir)` (`sentiment plot RUN`) redraws the figures of any run, finished or not, and
the report.md of a finished one.
"""

from __future__ import annotations

import html
import importlib.util
import json
import re
from pathlib import Path

import numpy as np

from sentiment import rundir
from sentiment.checkpoint import atomic_write
from sentiment.errors import ConfigError
from sentiment.evaluate import f1_key
from sentiment.figures import FIGURES, PLOTS_DIR, best_eval, plot_run, read_run
from sentiment.heatmaps import MONITOR_FIGURES, monitor_lines
from sentiment.labels import recorded_names
from sentiment.profiler import profile_lines

TEXT_CHARS = 300  # characters of a misclassified review shown in report.md
MISCLASSIFIED = "## Misclassified test reviews"


# ----------------------------------------------------------------------------- report.md


def misclassified(texts: list[str], labels: np.ndarray, probs: np.ndarray, names: tuple[str, ...],
                  k: int = 5) -> list[dict]:
    """The k most confidently wrong predictions: {text (first TEXT_CHARS chars), label and predicted (class
    names), p (the predicted class's probability)}. probs: (n, N), the classes named `names`."""
    labels, probs = np.asarray(labels), np.asarray(probs)
    predicted = probs.argmax(axis=1)
    p = probs[np.arange(len(probs)), predicted]
    wrong = np.flatnonzero(predicted != labels)
    worst = wrong[np.argsort(-p[wrong], kind="stable")][:k]
    return [{"text": _shorten(texts[i]), "label": names[labels[i]], "predicted": names[predicted[i]],
             "p": float(p[i])} for i in worst]


def _shorten(text: str) -> str:
    text = " ".join(text.replace("<br />", " ").split())
    return text if len(text) <= TEXT_CHARS else text[:TEXT_CHARS].rsplit(" ", 1)[0] + " …"


def write_report(run_dir: str | Path, misclassified: list[dict] | None, results: dict | None = None) -> Path:
    """RUN/report.md: final metrics (`results`, else RUN/results.json), engine decisions, figures (drawn now
    when matplotlib is installed), the given misclassified reviews (None: not known), and the config."""
    has_mpl = importlib.util.find_spec("matplotlib") is not None
    train_rows = read_run(run_dir)[0]  # none in a new folder that continued a run's last checkpoint: no figure
    figures = (plot_run(run_dir, results) if train_rows else []) if has_mpl else None
    return _write_report(Path(run_dir), misclassified, results, figures)


def redraw(run_dir: str | Path) -> list[Path]:
    """`sentiment plot RUN`: the figures of any run and a finished run's report.md; returns the paths written.
    The misclassified reviews are read back from report.md: their test predictions existed only at the end."""
    run = Path(run_dir)
    folder = rundir.inspect(run)
    if folder.state not in ("new", "started", "finished"):
        raise ConfigError(f"{run} is not a run folder (no readable {rundir.MARKER} run marker); sentiment plot writes "
                          "only into folders a sentiment run wrote: pass a run's output_dir")
    rundir.refuse_links(folder)  # plots/ through a link would write into whatever it points to
    figures = plot_run(run)
    if not (run / "results.json").is_file():
        return figures  # in progress: train.py writes report.md when the run finishes
    return [*figures, _write_report(run, read_misclassified(run / "report.md"), None, figures)]


def read_misclassified(report_md: Path) -> list[dict] | None:
    """A report.md's misclassified reviews as write_report had them (P to 3 decimals); None if missing."""
    md = report_md.read_text() if report_md.is_file() else ""
    section = md.partition(MISCLASSIFIED)[2].split("\n## ")[0]
    items = re.findall(r"^\d+\. true \*\*(.+?)\*\*, predicted \*\*(.+?)\*\* \(P = ([\d.]+)\)\n\n   > (.*)$",
                       section, flags=re.M)
    if not items and "None: every test review" not in section:
        return None
    return [{"text": _unescape(text), "label": _unescape(label), "predicted": _unescape(predicted), "p": float(p)}
            for label, predicted, p, text in items]


def _escape(text: str) -> str:
    return html.escape(text).replace("|", "\\|")  # a review or a class name cannot inject HTML or break a table


def _unescape(text: str) -> str:
    return html.unescape(text.replace("\\|", "|"))


def _write_report(run: Path, misclassified: list[dict] | None, results: dict | None,
                  figures: list[Path] | None) -> Path:
    train_rows, eval_rows, on_disk, config = read_run(run)
    results = results or on_disk or {}
    best = best_eval(eval_rows) if results.get("best_val_accuracy") is not None else None
    model = f"the selected model (best val accuracy, step {best['step']})" if best else "the final model"
    lines = [f"# Run report: `{run}`", "", *_metrics_lines(results, eval_rows, model, best), "## Engine decisions", "",
             *([f"- {d}" for d in results.get("engine", [])] or ["- (no results.json yet)"])]
    env = results.get("environment", {})
    lines += ["- environment: " + ", ".join(f"{k} {v}" for k, v in env.items())] if env else []
    lines += ["", "## Figures", ""]
    if figures is None:
        lines += ["matplotlib is not installed, so no figures were drawn. `pip install matplotlib`, then "
                  f"`sentiment plot {run}` draws them into `{run / PLOTS_DIR}` and rewrites this report.", ""]
    for path in figures or []:
        lines += [f"![{({**FIGURES, **MONITOR_FIGURES}).get(path.name, path.stem)}]({PLOTS_DIR}/{path.name})", ""]
    if config.get("report_to") == "tensorboard":
        lines += [f"The same scalars are in TensorBoard: `tensorboard --logdir {run / 'tensorboard'}`.", ""]
    lines += [*monitor_lines(run, train_rows), *profile_lines(run)]  # with --monitor_every, --profile_steps
    lines += [MISCLASSIFIED, "", *_misclassified_lines(misclassified, model)]
    lines += ["## Config", "", "```json", json.dumps(config, indent=2), "```", ""]
    path = run / "report.md"
    atomic_write(path, lambda f: f.write("\n".join(lines).encode()))
    return path


def _metrics_lines(results: dict, eval_rows: list[dict], model: str, best: dict | None) -> list[str]:
    """The test metrics of the model train.py saved, the best val accuracy, every evaluation, the run's totals."""
    lines, test = ["## Final metrics", ""], results.get("test", {})
    if test:
        lines += [f"On {test.get('n', '?')} test reviews with {model}:", "",
                  *metrics_table(test, recorded_names({**test, **results})), ""]
    if results.get("best_val_accuracy") is not None:
        lines.append(f"- best validation accuracy: {results['best_val_accuracy']:.4f}")
    for row in eval_rows:
        f1 = f1_key(row)
        lines.append(f"- epoch {row['epoch']} (step {row['step']}), {row['split']}: accuracy {row['accuracy']:.4f}, "
                     f"{'F1' if f1 == 'f1' else 'macro-F1'} {row[f1]:.4f}, loss {row['loss']:.4f}"
                     + (" (selected)" if row is best else ""))
    if results:
        speed = results["samples_per_second"]  # None when a resumed run had no steps left
        lines.append(f"- {results['steps']} optimizer steps, "
                     + (f"{speed:.1f} training samples/s, " if speed is not None else "")
                     + f"{results['runtime_s']:.0f} s in all, peak memory {results['peak_mem_mb']:.0f} MB")
    return lines + [""]


def _misclassified_lines(misclassified: list[dict] | None, model: str) -> list[str]:
    if misclassified is None:
        return ["Not known: they are picked at the end of training, and this report was redrawn without them.", ""]
    if not misclassified:
        return ["None: every test review was classified correctly.", ""]
    lines = [f"The most confidently wrong test predictions of {model}, first {TEXT_CHARS} characters each:", ""]
    for i, ex in enumerate(misclassified, 1):
        lines += [f"{i}. true **{_escape(ex['label'])}**, predicted **{_escape(ex['predicted'])}** (P = {ex['p']:.3f})",
                  "", f"   > {_escape(ex['text'])}", ""]
    return lines


def metrics_table(test: dict, names: tuple[str, ...]) -> list[str]:
    """Markdown tables of test metrics: accuracy, macro-F1 (a binary task's F1, precision and recall of its class 1
    beside it) and loss; then each class's precision, recall, F1 and support, where an imbalance shows."""
    keys = ["accuracy", "macro_f1", *(["f1", "precision", "recall"] if "f1" in test else []), "loss"]
    heads = {"macro_f1": "macro-F1", "f1": f"F1 ({_escape(names[1])})" if len(names) > 1 else "F1"}
    lines = ["| " + " | ".join(heads.get(k, k) for k in keys) + " |", "|" + "---|" * len(keys),
             "| " + " | ".join(f"{test[k]:.4f}" if k in test else "-" for k in keys) + " |"]
    if test.get("per_class"):
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---|---|---|---|",
                  *(f"| {_escape(name)} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | {m['support']} |"
                    for name, m in test["per_class"].items())]
    return lines
