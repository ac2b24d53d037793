"""The evaluation loop and its metrics (scikit-learn), exact under DDP.

Each rank evaluates a disjoint share of the examples (length-sorted batches, dealt round-robin);
the per-example results are gathered, so every example counts exactly once at any world size.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sentiment.data import Collator, ReviewDataset, TokenizedSplit, eval_batches
from sentiment.engine import Engine


def compute_metrics(labels: np.ndarray, probs: np.ndarray, nll: np.ndarray) -> dict:
    """Mean cross-entropy, accuracy, precision/recall/F1 of the positive class, and the confusion
    matrix [[tn, fp], [fn, tp]], from per-example probabilities (n, 2) and losses (n,)."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    preds = probs.argmax(axis=1)
    precision, recall, f1, _ = precision_recall_fscore_support(
        labels, preds, average="binary", pos_label=1, zero_division=0)
    return {"loss": float(np.mean(nll)),
            "accuracy": float(accuracy_score(labels, preds)),
            "precision": float(precision), "recall": float(recall), "f1": float(f1),
            "confusion_matrix": confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
            "n": int(len(labels))}


@torch.no_grad()
def predict_probs(model: torch.nn.Module, split: TokenizedSplit, engine: Engine, batch_size: int,
                  collate: Collator, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(probs, nll): P(neg), P(pos) (n, 2) and the cross-entropy (n,) of every example of `split`,
    in its original order."""
    model = engine.local_model(model)  # ranks may run different numbers of batches: no DDP collectives
    was_training = model.training
    model.eval()
    dataset = ReviewDataset(split)
    mine = eval_batches(split.lengths, batch_size, engine.world_size, engine.rank)
    indices, chunks = [], []  # chunks: (B, 3) rows of P(neg), P(pos), loss
    for keys in tqdm(mine, desc=desc, disable=(not engine.is_main) or None, leave=False):
        batch = engine.to_device(collate([dataset[k] for k in keys]))
        with engine.autocast():
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits.float()  # (B, 2)
        nll = F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        chunks.append(torch.cat([F.softmax(logits, dim=-1), nll[:, None]], dim=1).cpu().double().numpy())
        indices.extend(i for i, _ in keys)
    model.train(was_training)
    rows = np.zeros((len(split), 3))
    for idx, part in engine.all_gather_objects((indices, np.concatenate(chunks) if chunks else rows[:0])):
        rows[idx] = part
    return rows[:, :2], rows[:, 2]


def evaluate(model: torch.nn.Module, split: TokenizedSplit, engine: Engine, batch_size: int,
             collate: Collator, desc: str = "eval") -> tuple[dict, np.ndarray]:
    """(metrics, probs) of `model` on `split`."""
    probs, nll = predict_probs(model, split, engine, batch_size, collate, desc)
    return compute_metrics(split.labels, probs, nll), probs


def _load_for_inference(cfg):
    """(cfg, engine, model, tokenizer, collate) for a saved model, on the configured device/precision;
    the returned cfg has max_length capped at the model's positions (the default 512 > a small model's)."""
    import dataclasses

    from sentiment.data import collator
    from sentiment.engine import setup_engine
    from sentiment.model import check_tokenizer, load_model, load_tokenizer, max_positions

    engine = setup_engine(cfg.device, cfg.precision, cfg.seed)
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    model = load_model(cfg.model_name_or_path)
    check_tokenizer(tokenizer, model, cfg.model_name_or_path)
    if cfg.max_length > max_positions(model):  # longer inputs would crash in the position embeddings
        engine.print(f"max_length={cfg.max_length} exceeds the model's {max_positions(model)} positions: "
                     f"using {max_positions(model)}")
        cfg = dataclasses.replace(cfg, max_length=max_positions(model))
    model = engine.wrap(model, compile=cfg.compile, inference=True)
    return cfg, engine, model, tokenizer, collator(cfg, tokenizer.pad_token_id)


def evaluate_saved(cfg) -> dict:
    """`sentiment evaluate`: metrics of the model at cfg.model_name_or_path on the configured test data."""
    import json
    import time

    from sentiment.data import read_split, take, tokenize

    cfg, engine, model, tokenizer, collate = _load_for_inference(cfg)
    try:
        test = tokenize(take(read_split(cfg, "test"), cfg.n_test, cfg.seed, "n_test"), tokenizer,
                        cfg.max_length, cfg.truncation)
        start = time.perf_counter()
        metrics, _ = evaluate(model, test, engine, cfg.eval_batch_size, collate, desc="test")
        metrics["reviews_per_second"] = len(test) / (time.perf_counter() - start)
        engine.print(json.dumps(metrics, indent=2))
        return metrics
    finally:
        engine.close()


def predict_texts(cfg, texts: list[str]) -> list[tuple[str, float]]:
    """`sentiment predict`: (label, probability of that label) for each text, printed one per line."""
    import datasets

    from sentiment.config import ConfigError
    from sentiment.data import LABEL_NAMES, tokenize

    if any(not t.strip() for t in texts):
        raise ConfigError("predict got an empty text; pass non-empty review texts in quotes")
    cfg, engine, model, tokenizer, collate = _load_for_inference(cfg)
    try:
        split = tokenize(datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)}),
                         tokenizer, cfg.max_length, cfg.truncation)
        probs, _ = predict_probs(model, split, engine, cfg.eval_batch_size, collate, desc="predict")
        out = [(LABEL_NAMES[int(p.argmax())], float(p.max())) for p in probs]
        for (label, prob), text in zip(out, texts):
            engine.print(f"{label}\t{prob:.4f}\t{text[:80]}")
        return out
    finally:
        engine.close()
