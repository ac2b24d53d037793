"""Draw a run's figures into OUTPUT_DIR/plots/: loss, eval accuracy, lr schedule, gradient norm,
throughput and the test confusion matrix, from its metrics.jsonl and results.json.

    python scripts/plot_run.py runs/latest        # the same as `sentiment plot runs/latest`

Works on a run still in progress (figures whose data does not exist yet are skipped). Needs
matplotlib (pip install matplotlib).
"""

from __future__ import annotations

import argparse
import sys

from sentiment.errors import SentimentError
from sentiment.report import plot_run


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", help="a run's output_dir (holds metrics.jsonl)")
    args = parser.parse_args(argv)
    try:
        for path in plot_run(args.output_dir):
            print(path)
    except SentimentError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
