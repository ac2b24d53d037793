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

