"""scripts/attention_kernels.py: the three ways to attend within each review of a packed row agree, and its table
prints (its timings are figures for the README, never asserted)."""

from __future__ import annotations

import torch

from conftest import load_script


def test_the_three_variants_compute_the_same_attention_as_separate_padded_reviews():
    script = load_script("attention_kernels")
    torch.manual_seed(0)
    lengths = torch.tensor([5, 2, 9])  # random order, one review of [CLS] [SEP] only
    cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).int()])
    q, k, v = (torch.randn(1, 2, int(lengths.sum()), 4) for _ in range(3))
    alone = torch.cat([torch.nn.functional.scaled_dot_product_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b])
                       for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=2).transpose(1, 2)
    for name, fn in script.VARIANTS.items():
        assert torch.allclose(fn(q, k, v, cu, lengths), alone, atol=1e-6), name


def test_the_table_has_a_row_per_variant_and_shape(capsys):
    assert load_script("attention_kernels").main(["--shapes", "32x3,16x2", "--repeats", "1", "--heads", "2",
                                                  "--head_dim", "8"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 32x3") or
            line.startswith("| 16x2")]
    assert [row.split(" | ")[2] for row in rows] == ["per_review", "repadded", "block_mask"] * 2
    assert all(float(row.split(" | ")[-1].rstrip(" |")) < 1e-5 for row in rows)
