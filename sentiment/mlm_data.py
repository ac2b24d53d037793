"""Unlabeled text for masked-LM pre-training: reading it, a held-out slice, and the masking.

Texts come from the same sources as `train` (a parquet/CSV/JSONL file with a `text` column or a .txt file
with one text per line, a data_dir, a hub dataset); labels, if any, are ignored (-1 included). Masking is
BERT's: per text, round(mlm_probability x its non-special tokens) positions (at least 1) are predicted;
of those 80% become [MASK], 10% a random token, 10% stay. Each text's mask is drawn from its own NumPy
generator seeded by (seed, epoch, text index): new masks every epoch (dynamic masking, as RoBERTa), the
same wherever and however a global batch is split (micro-batches, ranks) and on a resumed run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from sentiment.config import Config
from sentiment.data import FILE_READERS, Collator, TokenizedSplit, data_dir_source, read_acl_imdb, read_hub, tokenize
from sentiment.errors import DataError
from sentiment.packing import PackedCollator, pack
from sentiment.rows import is_blank, row_location

HUB_SPLITS = {"stanfordnlp/imdb": ["train", "unsupervised"]}  # the hub splits to read per dataset; --train_split else
ACL_UNLABELED = ("neg", "pos", "unsup")  # aclImdb's train/ subfolders of texts
EVAL_EPOCH = 2**32  # the masking key of evaluations: the same masks at every evaluation, comparable losses
IGNORE = -100  # the label of a position not predicted (cross_entropy's ignore_index)


# ----------------------------------------------------------------------------- reading


def read_unlabeled(cfg: Config) -> tuple[list[str], str]:
    """(texts, source): --train_file's texts; or --data_dir's train and unsupervised files (aclImdb: train/pos,
    neg and unsup), never its test split; or --dataset's train and unsupervised splits (IMDb's 75,000 texts)."""
    from sentiment.commands import column_texts, read_texts  # a file's --text_column, or .txt one per line

    if cfg.train_file:
        if cfg.train_file.endswith(".txt") and not Path(cfg.train_file).is_file():
            raise DataError(f"data file {cfg.train_file} does not exist; check the path")
        sources, texts = [cfg.train_file], read_texts(cfg.train_file, cfg.text_column)
    elif cfg.data_dir:
        sources, texts = [], []
        for split in ("train", "unsupervised") if unsupervised_in(Path(cfg.data_dir)) else ("train",):
            source = data_dir_source(cfg.data_dir, split)
            sources.append(source)
            texts += (read_texts(source, cfg.text_column) if Path(source).is_file()
                      else read_acl_imdb(Path(cfg.data_dir), "train", ACL_UNLABELED)["text"])
    else:
        splits = HUB_SPLITS.get(cfg.dataset_id, [cfg.train_split])
        sources = [f"{cfg.dataset_id} ({', '.join(splits)})"]
        texts = [t for split in splits for t in column_texts(read_hub(cfg.dataset_id, split), cfg.dataset_id,
                                                             cfg.text_column)]
    source = " + ".join(sources)
    if not texts:
        raise DataError(f"{source} holds no texts; pass a file with at least one non-empty text")
    for row, text in enumerate(texts):
        if is_blank(text):
            raise DataError(f"{row_location(sources[0], row) if len(sources) == 1 else f'{source}: text {row}'}: "
                            "empty or missing text; fill in its text or drop the row")
    return texts, source


def unsupervised_in(folder: Path) -> bool:
    """Whether a data_dir holds an unsupervised.* file (a ../shared-style folder)."""
    return any((folder / f"unsupervised{suffix}").is_file() for suffix in FILE_READERS)


def split_texts(texts: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """(train, held out): a seeded random `fraction` of the texts held out (none if 0)."""
    n_val = int(round(fraction * len(texts)))
    if fraction > 0 and (n_val < 1 or len(texts) - n_val < 1):
        raise DataError(f"mlm_val_fraction={fraction} of {len(texts)} texts leaves none to hold out or to train on; "
                        "raise it, or set --mlm_val_fraction 0")
    order = np.random.default_rng(seed).permutation(len(texts))
    held = set(order[:n_val].tolist())
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]


def tokenize_texts(texts: list[str], tokenizer, cfg: Config) -> TokenizedSplit:
    """data.tokenize's flat arrays (cached datasets.map), with every label -1."""
    import datasets

    ds = datasets.Dataset.from_dict({"text": texts, "label": [-1] * len(texts)})
    return tokenize(ds, tokenizer, cfg.max_length, cfg.truncation)


# ----------------------------------------------------------------------------- masking

WORD_MARKS = ("##", "▁", "Ġ")  # WordPiece marks a word's later pieces; SentencePiece and byte-level BPE its first


def continuation_pieces(tokens: list[str]) -> np.ndarray:
    """(vocab,) bool: which tokens continue the word before them. The vocabulary's own mark decides, the one most of
    its tokens carry: WordPiece's `##ing` (BERT, ELECTRA), or a word's first piece marked, SentencePiece's `▁the`
    (ALBERT, DeBERTa-v3, XLM-R) or byte-level BPE's `Ġthe` (RoBERTa, ModernBERT), every unmarked piece going with
    the one before. No mark at all: every token is a word."""
    counts = {mark: sum(t.startswith(mark) for t in tokens) for mark in WORD_MARKS}
    mark = max(WORD_MARKS, key=counts.get)
    if not counts[mark]:
        return np.zeros(len(tokens), dtype=bool)
    return np.array([t.startswith(mark) == (mark == "##") for t in tokens])


@dataclass(frozen=True)
class Masker:
    """BERT's masking of one text. Arrays are indexed by token id: `special` ([CLS], [SEP], [PAD], ...: never
    predicted), `continuation` (pieces inside a word, see continuation_pieces: with whole_word, they go with the
    token before)."""
    special: np.ndarray  # (vocab,) bool
    continuation: np.ndarray  # (vocab,) bool
    mask_id: int
    probability: float = 0.15
    whole_word: bool = False
    seed: int = 0

    @classmethod
    def for_tokenizer(cls, tokenizer, cfg: Config) -> "Masker":
        n = len(tokenizer)
        special = np.zeros(n, dtype=bool)
        special[tokenizer.all_special_ids] = True
        continuation = continuation_pieces(tokenizer.convert_ids_to_tokens(list(range(n))))
        return cls(special, continuation, tokenizer.mask_token_id, cfg.mlm_probability, cfg.whole_word_masking,
                   cfg.seed)

    def __call__(self, ids: np.ndarray, epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        """(input ids, labels): labels hold the original id where a token is predicted, IGNORE elsewhere."""
        rng = np.random.default_rng([self.seed, epoch, index])
        ids = ids.astype(np.int64)
        candidates = np.flatnonzero(~self.special[ids])
        labels = np.full(len(ids), IGNORE, dtype=np.int64)
        if not len(candidates):
            return ids, labels
        budget = max(1, int(round(self.probability * len(candidates))))
        if self.whole_word:  # a word = a candidate that is no ## piece, with the ## pieces after it
            words = np.split(candidates, np.flatnonzero(~self.continuation[ids[candidates]][1:]) + 1)
            chosen: list[int] = []
            for w in rng.permutation(len(words)):  # whole words in random order, skipping one that overshoots
                if len(chosen) + len(words[w]) <= budget:
                    chosen.extend(words[w].tolist())
            picked = np.sort(np.array(chosen, dtype=np.int64))
        else:
            picked = np.sort(rng.choice(candidates, size=budget, replace=False))
        labels[picked] = ids[picked]
        action = rng.random(len(picked))  # < 0.8: [MASK]; 0.8-0.9: a random non-special token; else kept
        out = ids.copy()
        out[picked[action < 0.8]] = self.mask_id
        swap = picked[(action >= 0.8) & (action < 0.9)]
        out[swap] = rng.choice(np.flatnonzero(~self.special), size=len(swap))
        return out, labels


class MaskedTexts(torch.utils.data.Dataset):
    """One epoch's masked texts, indexed by (text index, loss weight) keys as `micro_batches` makes them. A text's
    weight is shared out evenly over its predicted tokens: each text counts as much as a review does in
    fine-tuning (the loss is the mean over texts of each one's mean over its masked tokens), and every weight is
    known per text, so the loss of a global batch is the same however micro-batches and ranks split it, with no
    count to agree on first."""

    def __init__(self, split: TokenizedSplit, masker: Masker, epoch: int) -> None:
        self.split, self.masker, self.epoch = split, masker, epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, float]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        i, weight = key
        ids, labels = self.masker(self.split.ids(i), self.epoch, i)
        predicted = labels != IGNORE
        return ids, labels, np.where(predicted, weight / max(1, predicted.sum()), 0.0).astype(np.float32)


@dataclass(frozen=True)
class PackedMLMCollator(PackedCollator):
    """A masked LM's packed batch (padding none): packing.pack's inputs, and labels and weights per token (T,)."""

    def __call__(self, items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict:
        return {**pack([ids for ids, _, _ in items], self.first_position),
                "labels": torch.from_numpy(np.concatenate([labels for _, labels, _ in items]).astype(np.int64)),
                "weights": torch.from_numpy(np.concatenate([weights for _, _, weights in items]).astype(np.float32))}


@dataclass(frozen=True)
class MLMCollator(Collator):
    """data.Collator's padding of the input ids, with `labels` and `weights` (B, T) tensors: a token's target and
    loss weight (IGNORE and 0 where it is not predicted, padding included)."""

    packed: ClassVar[type] = PackedMLMCollator

    def __call__(self, items: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> dict[str, torch.Tensor]:
        batch = super().__call__([(ids, 0, 0.0) for ids, _, _ in items])
        labels = torch.full_like(batch["input_ids"], IGNORE)
        weights = torch.zeros(labels.shape, dtype=torch.float32)
        for row, (_, text_labels, text_weights) in enumerate(items):
            labels[row, :len(text_labels)] = torch.from_numpy(text_labels)
            weights[row, :len(text_weights)] = torch.from_numpy(text_weights)
        batch["labels"], batch["weights"] = labels, weights
        return batch
