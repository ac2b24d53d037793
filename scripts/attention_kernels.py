"""Which reference attention for padding-free rows is fastest here (issue 22): the three ways to run attention over
a packed row without a varlen kernel, timed forward + backward, and checked to compute the same thing.

    per_review  packing.reference_attention: one SDPA call per review's slice (what `--padding none` runs off CUDA)
    repadded    scatter the row back into a (B, heads, longest, head_dim) batch, one SDPA with a key mask, gather
    block_mask  one SDPA over the whole row with a (T, T) block-diagonal mask: T^2 memory and work

    python scripts/attention_kernels.py                       # MiniLM's shape (12 heads x 32), three batch shapes
    python scripts/attention_kernels.py --heads 12 --head_dim 64 --repeats 5   # bert-base's

Review lengths are drawn like IMDb's (log-normal around 230 tokens, cut at max_length) in random order, as a
shuffled padding-free batch has them. Prints milliseconds per forward + backward (median of --repeats after one
warm-up) in fp32 and under bf16 autocast, and each variant's largest difference from per_review in fp32.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when run as a script

from sentiment.packing import reference_attention  # noqa: E402


def per_review(q, k, v, cu, lengths):
    return reference_attention(None, q, k, v, None, cu_seq_lens_q=cu)[0]


def repadded(q, k, v, cu, lengths):
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)  # each token's review
    column = torch.arange(int(cu[-1])) - cu[:-1].long().repeat_interleave(lengths)  # its position in the review
    longest, heads, dim = int(lengths.max()), q.shape[1], q.shape[3]

    def pad(x):  # (1, heads, T, dim) -> (B, heads, longest, dim), zeros after each review
        out = x.new_zeros(len(lengths), longest, heads, dim)
        out[segment, column] = x[0].transpose(0, 1)
        return out.transpose(1, 2)

    keep = (torch.arange(longest)[None, :] < lengths[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=keep)
    return out.transpose(1, 2)[segment, column][None]


def block_mask(q, k, v, cu, lengths):
    segment = torch.repeat_interleave(torch.arange(len(lengths)), lengths)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=segment[:, None] == segment[None, :])
    return out.transpose(1, 2)


VARIANTS = {"per_review": per_review, "repadded": repadded, "block_mask": block_mask}


def time_variant(fn, inputs, dtype, repeats: int) -> tuple[float, torch.Tensor]:
    """(median ms of forward + backward, the fp32 output)."""
    times = []
    for i in range(repeats + 1):
        q, k, v = (x.detach().clone().requires_grad_() for x in inputs[:3])
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = fn(q, k, v, *inputs[3:])
        out.float().sum().backward()
        if i:  # the first is the warm-up
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), out.detach().float()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head_dim", type=int, default=32)
    p.add_argument("--shapes", default="256x16,512x8,128x32", help="max_length x reviews per micro-batch, ...")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    print(f"torch {torch.__version__} | {torch.get_num_threads()} threads | heads {args.heads} x {args.head_dim}")
    print("| max_length x reviews | tokens | variant | fp32 ms | bf16 ms | max diff vs per_review (fp32) |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        max_length, n = (int(x) for x in shape.split("x"))
        rng = np.random.default_rng(max_length * 1000 + n)
        lengths = torch.from_numpy(np.clip(rng.lognormal(np.log(230), 0.6, n).astype(np.int64), 8, max_length))
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
        q, k, v = (torch.randn(1, args.heads, int(lengths.sum()), args.head_dim) for _ in range(3))
        reference = None
        for name, fn in VARIANTS.items():
            fp32, out = time_variant(fn, (q, k, v, cu, lengths), "fp32", args.repeats)
            bf16, _ = time_variant(fn, (q, k, v, cu, lengths), "bf16", args.repeats)
            reference = out if reference is None else reference
            print(f"| {shape} | {int(cu[-1])} | {name} | {fp32:.1f} | {bf16:.1f} | "
                  f"{(out - reference).abs().max().item():.1e} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
