"""A tiny random BERT, its word-level tokenizer, and synthetic reviews: offline, in seconds.

For the unit tests and `make smoke` (`python -m sentiment.tiny DIR` writes DIR/model and
DIR/data). Reviews mix neutral filler with sentiment words; the label is the majority side,
so a 2-layer model can learn it in a few dozen steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
POSITIVE = ["great", "good", "excellent", "loved", "wonderful", "brilliant", "moving", "superb"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "hated", "dull", "weak", "worst"]
FILLER = ["the", "movie", "film", "plot", "acting", "was", "and", "a", "it", "story", "cast", "i",
          "this", "of", "to", "director", "scenes", "ending", "music", "with"]
VOCAB = SPECIAL + POSITIVE + NEGATIVE + FILLER


def make_tokenizer():
    """A WordPiece tokenizer over VOCAB (every word whole): `great` is id 5, [PAD] is 0."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, do_lower_case=True)


def make_model(seed: int = 0, hidden: int = 32, layers: int = 2, max_positions: int = 128):
    """A randomly initialised BertForSequenceClassification with 2 labels (neg/pos)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=hidden, num_hidden_layers=layers,
                        num_attention_heads=2, intermediate_size=2 * hidden,
                        max_position_embeddings=max_positions, num_labels=2,
                        id2label={0: "neg", 1: "pos"}, label2id={"neg": 0, "pos": 1})
    return BertForSequenceClassification(config)


def make_reviews(n: int, seed: int = 0, min_words: int = 4, max_words: int = 60) -> list[dict]:
    """n synthetic reviews {text, label}, balanced labels, lengths spread from min to max words."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        length = int(rng.integers(min_words, max_words + 1))
        words = list(rng.choice(FILLER, size=length))
        n_sentiment = max(1, length // 6)
        major, minor = (POSITIVE, NEGATIVE) if label else (NEGATIVE, POSITIVE)
        picks = list(rng.choice(major, size=n_sentiment)) + list(rng.choice(minor, size=n_sentiment // 3))
        for word in picks:
            words.insert(int(rng.integers(0, len(words) + 1)), word)
        rows.append({"text": " ".join(words).capitalize() + ".", "label": label})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def write_tiny(folder: str | Path, n_train: int = 96, n_test: int = 48, seed: int = 0) -> tuple[Path, Path]:
    """(model_dir, data_dir): a saved tiny model + tokenizer, and data_dir/train.jsonl, test.jsonl."""
    folder = Path(folder)
    model_dir, data_dir = folder / "model", folder / "data"
    make_model(seed).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    write_jsonl(data_dir / "train.jsonl", make_reviews(n_train, seed))
    write_jsonl(data_dir / "test.jsonl", make_reviews(n_test, seed + 1))
    return model_dir, data_dir


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m sentiment.tiny OUTPUT_FOLDER")
    for p in write_tiny(sys.argv[1]):
        print(p)
