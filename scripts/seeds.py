"""One training run under several seeds: the spread a single accuracy figure hides.

    python scripts/seeds.py --seeds 1,2,3 --output_dir runs/seeds -- --preset cpu_minilm --data_dir runs/imdb_split

runs `sentiment train` once per seed, one after another, with the flags after `--` plus `--seed N --output_dir
OUTPUT_DIR/seed_N`; then prints the mean ± sample standard deviation (n - 1) of each test metric and of the best
validation accuracy over the seeds, and writes them to OUTPUT_DIR/seeds.json (rewritten after every seed). A failed
seed stops the script with its error line; the seeds done so far stay as they are. To pick up where it stopped, run
it again with `--resume auto` among the train flags: a finished seed returns its results, an interrupted one goes on
from its checkpoint, and one whose other flags differ is refused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as scripts/seeds.py

from sentiment.checkpoint import write_json  # noqa: E402

METRICS = ("accuracy", "f1", "macro_f1", "precision", "recall", "loss", "best_val_accuracy")  # as named in results.json
OWN_FLAGS = ("--seed", "--output_dir")  # this script sets them, per seed


def aggregate(results: dict[int, dict]) -> dict:
    """{seed: results.json} -> {"seeds": [...], "metrics": {name: {"mean", "std", "values"}}}: std is the sample
    standard deviation (n - 1; None for one seed). A metric missing or null in any run (best_val_accuracy
    without a validation split) is left out."""
    seeds = sorted(results)
    metrics = {}
    for name in METRICS:
        values = [results[s].get(name) for s in seeds]
        if seeds and all(isinstance(v, (int, float)) for v in values):
            metrics[name] = {"mean": statistics.fmean(values),
                             "std": statistics.stdev(values) if len(values) > 1 else None, "values": values}
    return {"seeds": seeds, "metrics": metrics}


def table(summary: dict) -> str:
    """The summary as text: one row per metric, mean ± std, then each seed's value."""
    seeds = summary["seeds"]
    lines = [f"{'metric':<18} {'mean':>8}   {'std':<8}" + "".join(f"{f'seed {s}':>10}" for s in seeds)]
    for name, m in summary["metrics"].items():
        std = "-" if m["std"] is None else f"{m['std']:.4f}"
        lines.append(f"{name:<18} {m['mean']:>8.4f} ± {std:<8}" + "".join(f"{v:>10.4f}" for v in m["values"]))
    return "\n".join(lines)


def run_seed(seed: int, folder: Path, flags: list[str]) -> dict:
    """results.json of `sentiment train FLAGS --seed SEED --output_dir FOLDER`. Its output streams through; on
    failure, SystemExit with its last error line."""
    command = [sys.executable, "-m", "sentiment", "train", *flags, "--seed", str(seed), "--output_dir", str(folder)]
    print(f"seeds: seed {seed}: {' '.join(command[1:])}", flush=True)
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)  # stdout goes straight through
    last = ""
    for line in process.stderr:  # echo stderr as it comes, keeping its last non-empty line
        sys.stderr.write(line)
        last = line.strip() or last
    if process.wait() != 0:
        raise SystemExit(f"seeds: seed {seed} failed (exit code {process.returncode}): {last or 'no error line'}")
    return json.loads((folder / "results.json").read_text())


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ours, flags = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                usage="seeds.py --seeds 1,2,3 [--output_dir DIR] -- [sentiment train flags]")
    p.add_argument("--seeds", required=True, help="comma-separated seeds, e.g. 1,2,3")
    p.add_argument("--output_dir", default="runs/seeds", help="one folder seed_N per seed, and seeds.json")
    args = p.parse_args(ours)
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        p.error(f"--seeds expects comma-separated integers, got {args.seeds!r}")
    if len(set(seeds)) != len(seeds):
        p.error(f"--seeds lists a seed twice: {args.seeds}")
    for flag in OWN_FLAGS:
        if any(f == flag or f.startswith(flag + "=") for f in flags):
            p.error(f"{flag} is set per seed by this script; give --seeds and --output_dir before the --")
    out, results = Path(args.output_dir), {}
    for seed in seeds:
        results[seed] = run_seed(seed, out / f"seed_{seed}", flags)
        summary = aggregate(results)
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "seeds.json", summary)
    print(table(summary))
    print(f"seeds: summary written to {out / 'seeds.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
