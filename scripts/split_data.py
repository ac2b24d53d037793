"""Carve a stratified, seeded held-out test file from a labeled file, for any number of classes.

../shared/imdb has the official train split only (the official test split is withheld on
purpose), so reported figures use a test file carved from it:

    python scripts/split_data.py --input ../shared/imdb/train.parquet --output_dir runs/imdb_split

writes OUTPUT_DIR/train.parquet and OUTPUT_DIR/test.parquet, usable as --data_dir or as
--train_file/--test_file: columns `text` and `label`, the labels as they were (names, integers or a
ClassLabel). Every class keeps its share in both parts. The same seed always gives the same split.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from sentiment.checkpoint import atomic_write
from sentiment.data import IMDB_LABELS, check_split, read_file
from sentiment.errors import DataError
from sentiment.labels import as_ids, class_counts, stratified_split


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input", required=True, help="labeled parquet/CSV/JSONL file")
    parser.add_argument("--text_column", default="text", help="its text column (default text)")
    parser.add_argument("--label_column", default="label", help="its label column (default label)")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--test_fraction", type=float, default=0.2, help="share held out as test (default 0.2)")
    parser.add_argument("--seed", type=int, default=0, help="split seed (default 0; training uses its own)")
    args = parser.parse_args(argv)
    if not 0 < args.test_fraction < 1:
        print(f"error: --test_fraction {args.test_fraction} must be in (0, 1)", file=sys.stderr)
        return 2
    try:
        ds = check_split(read_file(args.input), args.input, args.text_column, args.label_column)
        ids = as_ids(ds, args.input, None, "the file's labels", IMDB_LABELS)  # the classes, to stratify on
        names = tuple(ids.features["label"].names)
        labels = np.asarray(ids["label"])
        train_idx, test_idx = stratified_split(labels, args.test_fraction, args.seed, names)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, idx in (("train", train_idx), ("test", test_idx)):
        part = ds.select(idx)
        atomic_write(out / f"{name}.parquet", lambda f, part=part: part.to_parquet(f))
        print(f"{out / name}.parquet: {len(part)} reviews ({class_counts(labels[idx], names)})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
