"""What the per-layer monitor (`--monitor_every`) costs on a model, against the AdamW step it watches.

    python scripts/monitor_cost.py --model $MINILM --repeats 10

loads the model, gives every parameter a random gradient, then times `repeats` AdamW steps alone and `repeats`
inside `monitor.update` (the monitor's own time: per-layer gradient and weight norms, one copy of the weights, the
in-place difference and its norms, one host sync), and prints the median and the minimum of each in ms. The
minimum is the figure for an idle machine; on a shared one the median says what the neighbours left.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from sentiment import malloc
from sentiment.model import load_model
from sentiment.monitor import Monitor


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a model folder (or hub name) for load_model")
    parser.add_argument("--repeats", type=int, default=10, help="timed steps of each kind (default 10)")
    args = parser.parse_args(argv)
    malloc.configure(True)  # as a CPU run has it (--keep_freed_memory): the weights' copy reuses freed memory
    model = load_model(args.model)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5, fused=True)
    optimizer.step()  # AdamW's state is allocated at its first step: not timed
    alone = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        optimizer.step()
        alone.append((time.perf_counter() - start) * 1e3)
    with tempfile.TemporaryDirectory() as folder:
        monitor = Monitor(1, model, Path(folder), False, say=lambda line: None)
        for step in range(1, args.repeats + 1):
            with monitor.update(step):
                optimizer.step()
        monitor.close()
    params = sum(p.numel() for p in model.parameters())
    print(f"{args.model}: {params / 1e6:.1f}M parameters in {len(monitor.groups)} groups, "
          f"{torch.get_num_threads()} threads")
    for name, times in (("AdamW step", alone), ("monitor", monitor.costs)):
        print(f"{name:>10}: median {statistics.median(times):.1f} ms, min {min(times):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
