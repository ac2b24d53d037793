"""The classes of a task: which they are, in which order, and each row's label as a class id.

The label set comes from the training data, or from --label_names. Its order is the class ids 0..N-1,
decided once and carried with the data (the label column becomes a `datasets.ClassLabel` of the names),
into the run (results.json) and into the model (`id2label`, which `transformers.pipeline` prints):

- --label_names a,b,c: that order. Integer labels are indices into it, text labels must be one of it.
- else a `ClassLabel` column: its names, in its order (the stored integers are read through them).
- else text labels: the distinct texts, sorted (numerically if all are whole numbers).
- else integer labels 0..N-1: named by their number, except 0/1, which take the reader's binary names
  (IMDb's neg/pos: data.IMDB_LABELS); integers that do not start at 0 (star ratings 1..10, stars 1..5) are
  classes named by their numbers, sorted numerically, as whole-number texts are.
Integer labels are class indices, except where every class name is a whole number: then they are the names
(rating 10 is class "10", whatever its index).

A test label outside the set is refused: a model cannot predict a class it never saw.
"""

from __future__ import annotations

import re

import numpy as np

from sentiment.errors import DataError
from sentiment.rows import row_location

SHOWN_NAMES = 12  # an error line lists at most this many class names


def parse_names(text: str) -> tuple[str, ...]:
    """--label_names "neg, pos" -> ("neg", "pos"); "" -> () (from the data). ValueError says what is wrong."""
    if not text.strip():
        return ()
    names = tuple(name.strip() for name in text.split(","))
    if any(not name for name in names):
        raise ValueError("has an empty name (two commas in a row, or one at an end)")
    doubled = sorted({name for name in names if names.count(name) > 1})
    if doubled:
        raise ValueError(f"names {', '.join(doubled)} twice")
    if len(names) < 2:
        raise ValueError("names one class; a classifier needs at least 2")
    return names


def shown(names: tuple[str, ...]) -> str:
    """The names for an error line: all of them, or the first SHOWN_NAMES and how many more."""
    more = f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
    return ", ".join(names[:SHOWN_NAMES]) + more


# ----------------------------------------------------------------------------- a value as a class


def as_class(value, class_names: list[str] | None = None) -> str | int | None:
    """A label value as a class: a name (a text, or a ClassLabel index read through `class_names`), an index
    (an integer >= 0, an exact float such as a pandas export's 1.0, a boolean), or None: not a class (0.5, nan,
    -1 = unlabeled in hub datasets, an empty text, a list...)."""
    if class_names is not None:
        index = as_class(value)
        return class_names[index] if isinstance(index, int) and index < len(class_names) else None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, (bool, np.bool_)):
        return int(value)  # False = 0, True = 1
    if isinstance(value, (float, np.floating)):
        return int(value) if float(value).is_integer() and value >= 0 else None
    if isinstance(value, (int, np.integer)):
        return int(value) if value >= 0 else None
    return None


def _order(texts: set[str]) -> tuple[str, ...]:
    """Text classes sorted: numerically when every one is a whole number ("2" before "10"), else as text."""
    if all(re.fullmatch(r"-?[0-9]+", t) for t in texts):
        return tuple(sorted(texts, key=int))
    return tuple(sorted(texts))


def names_from_data(values: list, class_names: list[str] | None, source: str,
                    binary_names: tuple[str, str]) -> tuple[str, ...]:
    """The label set a training split implies when --label_names is not given (see the module's rules).
    Values that are no class are skipped here: `encode` names their row."""
    if class_names is not None:
        return tuple(class_names)
    classes = {as_class(v) for v in values} - {None}
    texts, numbers = {c for c in classes if isinstance(c, str)}, {c for c in classes if isinstance(c, int)}
    if texts and numbers:
        raise DataError(f"{source}: the labels mix names ({', '.join(map(repr, sorted(texts)[:3]))}) and numbers "
                        f"({', '.join(map(str, sorted(numbers)[:3]))}); use one kind, or give --label_names "
                        "(numbers are then indices into it)")
    if texts:
        return _order(texts)
    if numbers and min(numbers) > 0 and max(numbers) > 1:  # 1..10 stars: no class 0, so names, not indices
        return _order({str(n) for n in numbers})
    n = max(2, max(numbers, default=1) + 1)
    return binary_names if n == 2 else tuple(str(i) for i in range(n))


def encode(values: list, class_names: list[str] | None, names: tuple[str, ...], source: str,
           whose: str) -> list[int]:
    """Each value's class id in `names` (`whose` says where they come from, for the error); DataError at the
    first value that is none of them, naming its row."""
    index = {name: i for i, name in enumerate(names)}
    numbered = all(re.fullmatch(r"[0-9]+", name) for name in names)  # then an integer label is a name, "10" for 10
    ids = []
    for row, value in enumerate(values):
        c = as_class(value, class_names)
        c = str(c) if numbered and isinstance(c, int) else c
        label = index.get(c) if isinstance(c, str) else c if isinstance(c, int) and c < len(names) else None
        if label is None:
            raise DataError(f"{row_location(source, row)}: {_why(value, c, class_names, names, whose)}")
        ids.append(label)
    return ids


def _why(value, c: str | int | None, class_names: list[str] | None, names: tuple[str, ...], whose: str) -> str:
    """Why `value` is no class of `names`, and the fix, for the error line."""
    stored = f" ({class_names[value]!r} in its ClassLabel)" if isinstance(c, str) and class_names else ""
    if c is None:
        return (f"label {value!r} is not a class (a name, or an index 0..{len(names) - 1}; -1 marks an unlabeled "
                "row, which cannot be trained on or scored); fix or drop the row")
    if isinstance(c, int):
        return (f"label {value!r} is not a class index of {whose} (0..{len(names) - 1}: {shown(names)}); fix the "
                "row" + (", or give every class a name in --label_names" if whose == "--label_names" else ""))
    fix = {"--label_names": "add it to --label_names or fix the row",
           "the model's labels": "the model was trained without it: drop these rows, or train on the class"}
    return (f"label {value!r}{stored} is not one of {whose} ({shown(names)}); "
            + fix.get(whose, "a model cannot predict a class it never saw: drop these rows, or add the class to "
                             "the training data"))


# ----------------------------------------------------------------------------- counts and splits


def class_counts(labels: np.ndarray, names: tuple[str, ...]) -> str:
    """`neg: 12, pos: 8`: how many reviews of each class."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    return ", ".join(f"{name}: {count}" for name, count in zip(names, counts))


def check_every_class(labels: np.ndarray, names: tuple[str, ...]) -> None:
    """Refuse training data that lacks a class: with one class a classifier only learns to answer it, and a class
    with no training review is one the model can never predict (its metrics would be meaningless)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(names))
    if (counts > 0).sum() < 2:
        raise DataError(f"training data has only one class ({class_counts(labels, names)}); "
                        "check the label column or raise --n_train")
    absent = [name for name, count in zip(names, counts) if count == 0]
    if absent:
        raise DataError(f"training data has no review of class {', '.join(absent)} ({class_counts(labels, names)}); "
                        "raise --n_train, or check the label column and --label_names")


def as_ids(ds, source: str, names: tuple[str, ...] | None, whose: str, binary_names: tuple[str, str]):
    """`ds` (text, label as read) with each label the id of its class in `names` (None: the split's own label
    set), the label column a ClassLabel of the names: they travel with the data."""
    import datasets

    feature, values = ds.features["label"], list(ds["label"])
    class_names = feature.names if isinstance(feature, datasets.ClassLabel) else None
    names = names or names_from_data(values, class_names, source, binary_names)
    ids = encode(values, class_names, names, source, whose)
    return ds.select_columns(["text"]).add_column("label", ids, feature=datasets.ClassLabel(names=list(names)))


def stratified_split(ids: np.ndarray, fraction: float, seed: int,
                     names: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray]:
    """(train_idx, val_idx): a seeded split that keeps the share of each class (ids, named `names`) in both."""
    from sklearn.model_selection import train_test_split

    n_val, counts = int(round(fraction * len(ids))), np.bincount(ids)
    names = names or tuple(str(i) for i in range(len(counts)))
    if min(n_val, len(ids) - n_val) < max(2, (counts > 0).sum()):  # sklearn: each part holds every class
        raise DataError(f"val_fraction={fraction} of {len(ids)} reviews leaves too few for a split that holds "
                        f"each of the {(counts > 0).sum()} classes; raise n_train or val_fraction")
    if counts[counts > 0].min() < 2:  # sklearn's stratify needs 2 per class, else a traceback
        raise DataError(f"val_fraction={fraction}: a stratified split needs at least 2 reviews of each class, "
                        f"got {class_counts(ids, names)}; raise --n_train or set --val_fraction 0")
    train_idx, val_idx = train_test_split(np.arange(len(ids)), test_size=n_val, stratify=ids, random_state=seed)
    return np.sort(train_idx), np.sort(val_idx)


def recorded_names(metrics: dict) -> tuple[str, ...]:
    """The class names a run recorded beside its metrics (results.json's label_names, an evaluation's per_class);
    0..N-1 for a run written before names were recorded."""
    if metrics.get("label_names"):
        return tuple(metrics["label_names"])
    if metrics.get("per_class"):
        return tuple(metrics["per_class"])
    return tuple(str(i) for i in range(len(metrics.get("confusion_matrix") or [0, 0])))


def model_names(config) -> tuple[str, ...]:
    """A classifier's class names in id order, from its config's id2label (what `sentiment train` saved)."""
    return tuple(str(config.id2label.get(i, i)) for i in range(config.num_labels))


def head_note(config, names: tuple[str, ...], name: str) -> str:
    """A header line when `name` is a classifier (saved with a sequence classification head, as `sentiment train`
    saves) of another number of classes than the data's: its encoder is kept and the head starts new, shaped for the
    data's classes (model.from_pretrained); "" otherwise."""
    classifier = any(a.endswith("ForSequenceClassification") for a in config.architectures or ())
    if not classifier or config.num_labels == len(names):
        return ""
    return (f"classifier: {name} was fine-tuned on {config.num_labels} classes ({shown(model_names(config))}) and the "
            f"data has {len(names)} ({shown(names)}): its encoder is kept, its head starts new for them")