"""Tiny random models of every encoder family the tool supports, with a tokenizer of their kind, built offline in
about a second each: the family matrix (test_families.py) trains, resumes, pre-trains and predicts with them.

BERT-style families (BERT, ELECTRA, DistilBERT, ModernBERT) get tiny.py's WordPiece tokenizer; RoBERTa-style
ones (RoBERTa, XLM-R, MPNet) a byte-level BPE with <s> </s> <pad> <mask> and [PAD] at id 1 (their positions
start after it); ALBERT and DeBERTa-v2 a SentencePiece-style unigram (Metaspace) with [CLS] [SEP] <pad> [MASK].
"""

from __future__ import annotations

from pathlib import Path

from sentiment.tiny import FILLER, NEGATIVE, POSITIVE, make_tokenizer

HIDDEN, LAYERS, HEADS, POSITIONS = 32, 2, 2, 128  # POSITIONS: the tokens a review may have in every family
WORDS = POSITIVE + NEGATIVE + FILLER
ROBERTA_SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # RoBERTa's ids: <s> 0, <pad> 1, </s> 2
SPM_SPECIAL = ["<pad>", "<unk>", "[CLS]", "[SEP]", "[MASK]"]  # ALBERT's ids


def bpe_tokenizer():
    """A byte-level BPE (RoBERTa's kind) whose vocabulary holds every word of tiny.py's reviews whole."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([" ".join(WORDS)] * 4 + [w.capitalize() for w in WORDS],
                            trainers.BpeTrainer(vocab_size=400, special_tokens=ROBERTA_SPECIAL, show_progress=False,
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
                                                       special_tokens=[("<s>", 0), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", cls_token="<s>",
                                   sep_token="</s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")


def unigram_tokenizer():
    """A SentencePiece-style unigram (ALBERT's, DeBERTa-v3's kind: ▁ marks a word's start) over the same words."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    letters = sorted(set("".join(WORDS)) | {"▁", "."})
    pieces = [(t, 0.0) for t in SPM_SPECIAL] + [(f"▁{w}", -1.0) for w in WORDS] + [(c, -5.0) for c in letters]
    tok = Tokenizer(models.Unigram(pieces, unk_id=1, byte_fallback=False))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, cls_token="[CLS]", sep_token="[SEP]", pad_token="<pad>",
                                   unk_token="<unk>", mask_token="[MASK]")


def tiny_model_config(family: str, vocab_size: int, pad_id: int, dropout: float = 0.1):
    """A 2-layer, 32-wide config of `family` (a config.model_type) taking POSITIONS tokens."""
    from transformers import (AlbertConfig, BertConfig, CamembertConfig, DebertaV2Config, DistilBertConfig,
                              ElectraConfig, ModernBertConfig, MPNetConfig, RobertaConfig, XLMRobertaConfig)

    bert_like = dict(vocab_size=vocab_size, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                     intermediate_size=2 * HIDDEN, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     max_position_embeddings=POSITIONS, pad_token_id=pad_id)
    offset = dict(bert_like, max_position_embeddings=POSITIONS + pad_id + 1, bos_token_id=0, eos_token_id=2)
    configs = {
        "bert": lambda: BertConfig(**bert_like),
        "roberta": lambda: RobertaConfig(**offset),
        "xlm-roberta": lambda: XLMRobertaConfig(**offset),
        "camembert": lambda: CamembertConfig(**offset),
        "mpnet": lambda: MPNetConfig(**offset),
        "electra": lambda: ElectraConfig(**bert_like, embedding_size=16),
        "albert": lambda: AlbertConfig(**bert_like, embedding_size=16, hidden_act="gelu_new"),
        # DeBERTa-v3's shape: relative attention in log buckets, no absolute positions
        "deberta-v2": lambda: DebertaV2Config(**bert_like, relative_attention=True, position_biased_input=False,
                                              pos_att_type=["p2c", "c2p"], position_buckets=32,
                                              max_relative_positions=-1, norm_rel_ebd="layer_norm",
                                              share_att_key=True),
        "distilbert": lambda: DistilBertConfig(vocab_size=vocab_size, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS,
                                               hidden_dim=2 * HIDDEN, dropout=dropout, attention_dropout=dropout,
                                               max_position_embeddings=POSITIONS, pad_token_id=pad_id),
        "modernbert": lambda: ModernBertConfig(vocab_size=vocab_size, bos_token_id=2, eos_token_id=3,
                                               hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                                               num_attention_heads=HEADS, intermediate_size=2 * HIDDEN,
                                               max_position_embeddings=POSITIONS, pad_token_id=pad_id,
                                               cls_token_id=2, sep_token_id=3, global_attn_every_n_layers=2,
                                               local_attention=16, embedding_dropout=dropout,
                                               attention_dropout=dropout, mlp_dropout=dropout),
    }
    return configs[family]()


TOKENIZERS = {"roberta": bpe_tokenizer, "xlm-roberta": bpe_tokenizer, "camembert": bpe_tokenizer, "mpnet": bpe_tokenizer,
              "albert": unigram_tokenizer, "deberta-v2": unigram_tokenizer}


def write_family(family: str, folder: Path, seed: int = 0) -> Path:
    """folder/model: a tiny random masked-LM-less `family` encoder with its tokenizer, saved as a hub model is."""
    import torch
    from transformers import AutoModel

    tokenizer = TOKENIZERS.get(family, make_tokenizer)()
    config = tiny_model_config(family, len(tokenizer), tokenizer.pad_token_id)
    torch.manual_seed(seed)
    model_dir = folder / "model"
    AutoModel.from_config(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir
