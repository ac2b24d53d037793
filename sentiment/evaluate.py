"""The evaluation loop and its metrics (scikit-learn) for any number of classes, exact under DDP.

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
from sentiment.packing import model_inputs


def compute_metrics(labels: np.ndarray, probs: np.ndarray, nll: np.ndarray, names: tuple[str, ...] = ()) -> dict:
    """From per-example probabilities (n, N classes) and losses (n,): mean cross-entropy, accuracy, macro-F1 (the
    unweighted mean over classes: a rare class counts as much as a common one), per class (named `names`, else
    0..N-1) precision, recall, F1 and support (its true count), and the N x N confusion matrix (row = true class,
    column = predicted; binary: [[tn, fp], [fn, tp]]). Binary tasks also keep precision/recall/F1 of class 1,
    the positive class."""
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    classes = list(range(probs.shape[1]))
    names = names or tuple(str(c) for c in classes)
    preds = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, preds, labels=classes, average=None, zero_division=0)
    out = {"loss": float(np.mean(nll)), "accuracy": float(accuracy_score(labels, preds))}
    if len(classes) == 2:
        out.update(precision=float(precision[1]), recall=float(recall[1]), f1=float(f1[1]))
    return {**out, "macro_f1": float(np.mean(f1)),
            "per_class": {name: {"precision": float(p), "recall": float(r), "f1": float(f), "support": int(s)}
                          for name, p, r, f, s in zip(names, precision, recall, f1, support)},
            "confusion_matrix": confusion_matrix(labels, preds, labels=classes).tolist(), "n": int(len(labels))}


def f1_key(metrics: dict) -> str:
    """The F1 a run reports in one figure: a binary task's positive-class `f1`, else `macro_f1`."""
    return "f1" if "f1" in metrics else "macro_f1"


@torch.no_grad()
def predict_probs(model: torch.nn.Module, split: TokenizedSplit, engine: Engine, batch_size: int,
                  collate: Collator, desc: str = "eval") -> tuple[np.ndarray, np.ndarray]:
    """(probs, nll): each class's probability (n, N) and the cross-entropy (n,) of every example of `split`,
    in its original order."""
    model = engine.local_model(model)  # ranks may run different numbers of batches: no DDP collectives
    was_training = model.training
    model.eval()
    dataset = ReviewDataset(split)
    mine = eval_batches(split.lengths, batch_size, engine.world_size, engine.rank)
    n_classes = engine.unwrap(model).config.num_labels
    indices, chunks = [], []  # chunks: (B, N + 1) rows of each class's probability, then the loss
    for keys in tqdm(mine, desc=desc, disable=(not engine.is_main) or None, leave=False):
        batch = engine.to_device(collate([dataset[k] for k in keys]))
        with engine.autocast():
            logits = model(**model_inputs(batch)).logits
        logits = logits.float()  # (B, N)
        nll = F.cross_entropy(logits, batch["labels"], reduction="none")  # (B,)
        chunks.append(torch.cat([F.softmax(logits, dim=-1), nll[:, None]], dim=1).cpu().double().numpy())
        indices.extend(i for i, _ in keys)
    model.train(was_training)
    rows = np.zeros((len(split), n_classes + 1))
    for idx, part in engine.all_gather_objects((indices, np.concatenate(chunks) if chunks else rows[:0])):
        rows[idx] = part
    return rows[:, :n_classes], rows[:, n_classes]


def evaluate(model: torch.nn.Module, split: TokenizedSplit, engine: Engine, batch_size: int,
             collate: Collator, desc: str = "eval", names: tuple[str, ...] = ()) -> tuple[dict, np.ndarray]:
    """(metrics, probs) of `model` on `split`, its classes named `names`."""
    probs, nll = predict_probs(model, split, engine, batch_size, collate, desc)
    return compute_metrics(split.labels, probs, nll, names), probs

