"""Padding-free batches (`--padding none`): a micro-batch is its reviews' real tokens end to end, one row of T
tokens with the boundaries `cu_seq_lens` (0, len_0, len_0+len_1, ..., T), as MosaicBERT and ModernBERT unpad.

Every linear layer, LayerNorm and the MLM head then runs on exactly the real tokens, in any batch order: no
length grouping is needed to avoid waste. Three things make the packed row compute what the padded batch does:
  - positions restart at each review (RoBERTa's after its padding index: families.py's first_position);
  - attention never crosses a boundary: the kernels below read cu_seq_lens, which transformers passes from the
    model's forward(**kwargs) down to each layer's attention function;
  - a classifier reads each review's first token ([CLS]): a hook on the module under the head (families.py's
    packed_at) keeps row cu_seq_lens[i] of the packed output for review i, as the padded batch's row i, token 0.
Attention dropout is not applied: PyTorch's varlen kernel has none, and the CPU reference matches it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

VARLEN = "packed_varlen"  # torch.nn.attention.varlen.varlen_attn: FlashAttention-2, CUDA sm80+, bf16/fp16
REFERENCE = "packed_sdpa"  # one SDPA call per review: the same function on any device and dtype
KERNELS = (VARLEN, REFERENCE)
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q",
                "max_length_k")  # what a batch hands the model; labels and weights are the loss's


def pack(rows: list[np.ndarray], first_position: int) -> dict:
    """The model inputs of `rows` (token ids, one array per review) packed into one row: input_ids and
    position_ids (1, T), cu_seq_lens_q/_k (B + 1,) int32 (the kernels' type), max_length_q/_k (ints)."""
    lengths = np.array([len(r) for r in rows], dtype=np.int64)
    cu = torch.from_numpy(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    starts = np.repeat(cu[:-1].numpy().astype(np.int64), lengths)  # each token's review start
    positions = np.arange(int(lengths.sum()), dtype=np.int64) - starts + first_position
    longest = int(lengths.max())
    return {"input_ids": torch.from_numpy(np.concatenate(rows).astype(np.int64))[None],
            "position_ids": torch.from_numpy(positions)[None], "cu_seq_lens_q": cu, "cu_seq_lens_k": cu.clone(),
            "max_length_q": longest, "max_length_k": longest}


@dataclass(frozen=True)
class PackedCollator:
    """A list of (ids, label, weight) to one packed batch: pack()'s inputs, labels (B,) and weights (B,)."""

    first_position: int = 0  # the position id of each review's first token (families.py)

    def __call__(self, items: list[tuple[np.ndarray, int, float]]) -> dict:
        return {**pack([ids for ids, _, _ in items], self.first_position),
                "labels": torch.tensor([label for _, label, _ in items], dtype=torch.long),
                "weights": torch.tensor([w for _, _, w in items], dtype=torch.float32)}


def model_inputs(batch: dict) -> dict:
    """The entries of a batch (padded or packed) that the model's forward takes."""
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def is_packed(batch: dict) -> bool:
    return "cu_seq_lens_q" in batch


def boundaries(kwargs: dict, where: str) -> torch.Tensor:
    """The packed row's cu_seq_lens, or an error: a padded batch reached a model set up for packed ones, whose
    attention would then mix every review with the padding of all the others."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        raise RuntimeError(f"{where}: this model was set up for padding-free batches (cu_seq_lens_q) and got a "
                           "padded one; collate with the run's collator (data.collator) or load it with "
                           "--padding dynamic")
    return cu


def reference_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' attention function for packed rows on any device: query/key/value (1, heads, T, head_dim);
    SDPA over each review's slice alone. Returns (1, T, heads, head_dim) as transformers' SDPA does. One call per
    review was the fastest CPU variant measured (README, "Padding-free": against one SDPA over the reviews
    padded again, and a (T, T) block-diagonal mask, which costs T^2 and was 4-12x slower)."""
    cu = boundaries(kwargs, "reference_attention")
    sizes = (cu[1:] - cu[:-1]).tolist()  # split, not slices: its backward is one cat, not a zero-fill + add per review
    out = torch.cat([F.scaled_dot_product_attention(q, k, v, scale=scaling) for q, k, v in
                     zip(query.split(sizes, dim=2), key.split(sizes, dim=2), value.split(sizes, dim=2))], dim=2)
    return out.transpose(1, 2).contiguous(), None


def varlen_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The same on CUDA through torch.nn.attention.varlen.varlen_attn (FlashAttention-2: one kernel for the
    whole packed row, forward and backward)."""
    from torch.nn.attention.varlen import varlen_attn

    cu = boundaries(kwargs, "varlen_attention")
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # (T, heads, head_dim)
    out = varlen_attn(q, k, v, cu, kwargs["cu_seq_lens_k"], kwargs["max_length_q"], kwargs["max_length_k"],
                      scale=scaling)
    return out[None], None


def register() -> None:
    """Make both kernels known to transformers by name (config._attn_implementation); no mask function is
    registered, so transformers builds no (T, T) mask for them."""
    from transformers import AttentionInterface

    AttentionInterface.register(VARLEN, varlen_attention)
    AttentionInterface.register(REFERENCE, reference_attention)


def gather_first_tokens(module, args, kwargs, output):
    """Forward hook on the module under a classifier's head: of the packed (1, T, hidden) output keep each
    review's first token, as (B, 1, hidden), where the padded batch's head reads it (row i, position 0)."""
    cu = boundaries(kwargs, type(module).__name__)
    output.last_hidden_state = output.last_hidden_state[0, cu[:-1].long()].unsqueeze(1)
    return output


def install_gather(model: torch.nn.Module, path: str) -> None:
    """gather_first_tokens on base_model.`path` (families.py's packed_at) of a sequence classifier."""
    from sentiment.families import submodule

    submodule(model.base_model, path).register_forward_hook(gather_first_tokens, with_kwargs=True)
