"""What differs between encoder families, as one table keyed by `config.model_type` (model.py asks it; the loop
never does): the attention kernels its transformers classes run, how many tokens its positions take, where its
layers are (for layer-wise lr decay and our own gradient checkpointing), the pooler a masked LM drops, and
whether it takes padding-free batches (packing.py): where its classifier reads each review's first token, and the
position id that token has.

A family missing from the table is treated as BERT-shaped (absolute positions, `embeddings` and `encoder.layer`),
with the attention kernels its class declares; whatever does not fit is refused in one line before a run writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

ALL_KERNELS = ("flash_attention_2", "sdpa", "eager")  # best first; eager (plain PyTorch) runs everywhere
EAGER_ONLY = ("eager",)


def absolute(config) -> tuple[int | None, str]:
    """A learned table of max_position_embeddings rows, position i for token i (BERT, ELECTRA, ALBERT...)."""
    return config.max_position_embeddings, f"{config.max_position_embeddings} position embeddings"


def after_padding(config) -> tuple[int | None, str]:
    """RoBERTa's positions start after the padding index: ids pad+1 .. max_position_embeddings-1, so roberta-base's
    514 rows take 512 tokens; a longer input indexes past the table at step 1."""
    rows, pad = config.max_position_embeddings, config.pad_token_id
    return rows - pad - 1, f"{rows} position embeddings, numbered from padding index {pad} + 1"


def rotary(config) -> tuple[int | None, str]:
    """Rotary positions (ModernBERT): no table to overflow, but the model was trained up to max_position_embeddings
    (8,192 for ModernBERT-base) and rotary angles past it are untrained."""
    return config.max_position_embeddings, f"rotary positions, trained up to {config.max_position_embeddings}"


def deberta(config) -> tuple[int | None, str]:
    """DeBERTa-v2/v3: with position_biased_input (v2-style), an absolute table bounds the length. v3 has none: its
    relative positions go through log buckets (or are clamped to max_relative_positions), so any length indexes
    inside its tables; the cost is attention's memory, quadratic in the length, and lengths past the pre-training
    one (max_position_embeddings) are extrapolation, which the paper reports works for DeBERTa."""
    if getattr(config, "position_biased_input", True):
        return absolute(config)
    return None, (f"relative positions only (no absolute table): no limit, pre-trained at "
                  f"{config.max_position_embeddings}")


def from_zero(config) -> int:
    """Position ids 0, 1, ... (BERT and most families)."""
    return 0


def after_padding_index(config) -> int:
    """RoBERTa's position ids start after the padding index: pad + 1, pad + 2, ..."""
    return config.pad_token_id + 1


@dataclass(frozen=True)
class Family:
    name: str  # as people call it, for messages and the README
    attention: tuple[str, ...]  # kernels its classes run in this transformers (tests/test_families.py checks)
    positions: Callable  # config -> (the most tokens a review may have or None, why)
    embeddings: tuple[str, ...]  # under base_model: the lowest LLRD group (embeddings, tables every layer shares)
    layers: str  # under base_model: the ModuleList of encoder layers, bottom first
    pooler: tuple[str, ...] = ()  # base-model modules the classifier reads and a masked LM drops (pretrain keeps them)
    own_checkpointing: bool = False  # transformers cannot checkpoint it: we wrap each of `layers` ourselves
    packed_at: str = ""  # under base_model: the module whose output the head reads token 0 of; "" = padded only
    first_position: Callable = from_zero  # config -> the position id of a review's first token
    why_padded: str = "not in families.py's table"  # why packed_at is "": the header says it


FAMILIES: dict[str, Family] = {
    "bert": Family("BERT", ALL_KERNELS, absolute, ("embeddings",), "encoder.layer", ("pooler",), packed_at="encoder"),
    "roberta": Family("RoBERTa", ALL_KERNELS, after_padding, ("embeddings",), "encoder.layer", packed_at="encoder",
                      first_position=after_padding_index),
    "xlm-roberta": Family("XLM-RoBERTa", ALL_KERNELS, after_padding, ("embeddings",), "encoder.layer",
                          packed_at="encoder", first_position=after_padding_index),
    "camembert": Family("CamemBERT", ALL_KERNELS, after_padding, ("embeddings",), "encoder.layer",  # RoBERTa's
                        packed_at="encoder", first_position=after_padding_index),
    "deberta-v2": Family("DeBERTa-v2/v3", EAGER_ONLY, deberta,
                         ("embeddings", "encoder.rel_embeddings", "encoder.LayerNorm"), "encoder.layer",
                         why_padded="its relative-position attention is its own (eager) code, not a kernel we swap"),
    "electra": Family("ELECTRA", ALL_KERNELS, absolute, ("embeddings", "embeddings_project"), "encoder.layer",
                      packed_at="encoder"),
    "distilbert": Family("DistilBERT", ALL_KERNELS, absolute, ("embeddings",), "transformer.layer",
                         packed_at="transformer"),
    # ALBERT shares one layer's weights across all layers (a layer group, 1 by default): LLRD scales per group
    "albert": Family("ALBERT", ALL_KERNELS, absolute, ("embeddings", "encoder.embedding_hidden_mapping_in"),
                     "encoder.albert_layer_groups", ("pooler", "pooler_activation"), own_checkpointing=True,
                     packed_at="encoder"),
    "modernbert": Family("ModernBERT", ALL_KERNELS, rotary, ("embeddings",), "layers",
                         why_padded="its sliding-window layers and mean pooling need the padded layout (it unpads "
                                    "itself under flash_attention_2)"),
    "mpnet": Family("MPNet", EAGER_ONLY, after_padding, ("embeddings", "encoder.relative_attention_bias"),
                    "encoder.layer", own_checkpointing=True,
                    why_padded="its relative attention bias is its own (eager) code, not a kernel we swap"),
}


def classifier_class(config):
    """The AutoModelForSequenceClassification class of `config` (no weights): what its flags say it supports."""
    from transformers import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]


def family_of(config) -> Family:
    """The table's row for config.model_type; an unlisted type is read as BERT-shaped, with its class's kernels."""
    if config.model_type in FAMILIES:
        return FAMILIES[config.model_type]
    try:
        cls = classifier_class(config)
    except KeyError:  # no sequence classifier in this family: from_pretrained will say so, in its own words
        return Family(config.model_type, EAGER_ONLY, absolute, ("embeddings",), "encoder.layer")
    kernels = tuple(k for k, ok in (("flash_attention_2", cls._supports_flash_attn), ("sdpa", cls._supports_sdpa),
                                    ("eager", True)) if ok)
    return Family(config.model_type, kernels, absolute, ("embeddings",), "encoder.layer", ("pooler",))


def submodule(root, path: str):
    """root.a.b for path "a.b", or None where a part is missing."""
    for part in path.split("."):
        root = getattr(root, part, None)
    return root
