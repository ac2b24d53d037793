"""Labeled reviews from the hub or local files, to tokenized splits, to batches.

Reading (hub, parquet/CSV/JSONL, an aclImdb folder), checking, the labels as class ids (labels.py),
subsampling as the tutorial does, a stratified validation split, truncation strategies, cached
tokenization with `datasets.map`, length-grouped global batches, and the collate function (padding-free: packing.py).
No device moves and no dtype choices here: that is engine.py's job.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch

from sentiment import labels
from sentiment.config import Config
from sentiment.errors import DataError
from sentiment.memory import PhasePeaks
from sentiment.packing import PackedCollator
from sentiment.rows import check_split, first_bad_json_line, is_blank  # check_split: also imported from here (split_data.py)

FILE_READERS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "json", ".json": "json"}
HEAD_TOKENS = 128  # head_tail keeps this many leading tokens (Sun et al. 2019, "How to Fine-Tune BERT")
MEGA_BATCH = 50  # length grouping sorts within windows of 50 global batches: random, yet little padding
IMDB_LABELS = ("neg", "pos")  # IMDb's classes 0 and 1: aclImdb's folder names, and the names 0/1 labels get


# ----------------------------------------------------------------------------- reading


def read_file(path: str):
    """One local parquet/CSV/JSONL file as a `datasets.Dataset` (cached by `datasets`)."""
    import datasets

    p = Path(path)
    if p.is_dir():
        raise DataError(f"data file {path} is a folder; pass a .parquet, .csv or .jsonl file in it (a folder of "
                        "train and test files goes to --data_dir)")
    if not p.is_file():
        raise DataError(f"data file {path} does not exist; check the path")
    reader = FILE_READERS.get(p.suffix.lower())
    if reader is None:
        raise DataError(f"data file {path}: unknown format {p.suffix!r}; use .parquet, .csv or .jsonl")
    verbosity = datasets.logging.get_verbosity()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its "Failed to read" log would double our one error line
    try:
        return datasets.load_dataset(reader, data_files=str(p.resolve()), split="train")
    except Exception as e:  # noqa: BLE001 - pyarrow/datasets raise many types for a bad file
        chain = [e]  # datasets wraps the reader's error in DatasetGenerationError: the cause says what is wrong
        while len(chain) < 8 and (chain[-1].__cause__ or chain[-1].__context__) is not None:
            chain.append(chain[-1].__cause__ or chain[-1].__context__)
        root = chain[-1]
        not_utf8 = any(isinstance(c, UnicodeDecodeError) or "utf8" in str(c).lower().replace("-", "") for c in chain)
        bad = first_bad_json_line(str(p)) if reader == "json" and not not_utf8 else None
        if bad:  # pyarrow names a byte offset ("Trailing data at position 34"); an editor wants the line
            raise DataError(f"{path} line {bad[0]}: not valid JSON ({bad[1]}); fix that line") from None
        cause = "not UTF-8 text" if not_utf8 else (
            f"{type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}")
        raise DataError(f"data file {path} could not be read as {reader} ({cause}); "
                        "fix or re-export the file") from None
    finally:
        datasets.logging.set_verbosity(verbosity)


def read_acl_imdb(folder: Path, split: str, names: tuple[str, ...] = IMDB_LABELS):
    """The original aclImdb layout: SPLIT/pos/*.txt and SPLIT/neg/*.txt, one review per file (pretrain also
    reads train/unsup/*.txt, labeled -1)."""
    import datasets

    texts, labels = [], []
    for name in names:
        label = IMDB_LABELS.index(name) if name in IMDB_LABELS else -1
        for f in sorted((folder / split / name).glob("*.txt")):
            try:
                texts.append(f.read_text(encoding="utf-8"))
            except UnicodeDecodeError:
                raise DataError(f"{f} is not UTF-8 text; re-encode it") from None
            if is_blank(texts[-1]):
                raise DataError(f"{f} is empty; fill it in or move it out of the folder")
            labels.append(label)
    if not texts:
        raise DataError(f"{folder / split} has no pos/*.txt or neg/*.txt reviews; check --data_dir")
    return datasets.Dataset.from_dict({"text": texts, "label": labels})


def data_dir_source(data_dir: str, split: str) -> str:
    """The one file holding `split` in data_dir, or data_dir/SPLIT for the aclImdb layout. Two
    candidates (train.csv and train.parquet, or one beside train/pos) are refused: which one a silent
    pick trains on is a guess."""
    folder = Path(data_dir)
    if not folder.is_dir():
        raise DataError(f"data_dir {data_dir} is not a folder; check the path")
    acl_imdb = [folder / split] if (folder / split / "pos").is_dir() else []
    found = acl_imdb + [p for p in (folder / f"{split}{suffix}" for suffix in FILE_READERS) if p.is_file()]
    names = [f"{split}/pos/ (aclImdb)" if p in acl_imdb else p.name for p in found]
    if len(found) > 1:
        listed = f"both {names[0]} and {names[1]}" if len(names) == 2 else f"{', '.join(names[:-1])} and {names[-1]}"
        raise DataError(f"data_dir {data_dir} holds {listed} for the {split} split; keep one (move the "
                        f"{'other' if len(names) == 2 else 'others'} away)")
    if not found:
        raise DataError(f"data_dir {data_dir} has neither {split}/pos/*.txt (aclImdb) nor "
                        f"{split}.parquet/.csv/.jsonl; put the {split} split there")
    return str(found[0])


def read_hub(dataset_id: str, split: str):
    import datasets

    try:
        return datasets.load_dataset(dataset_id, split=split)
    except Exception as e:  # noqa: BLE001 - network, auth, missing-repo and unknown-split errors all land here
        reason = str(e).splitlines()[0] if str(e) else ""  # the library's: "Unknown split "x". Should be one of [...]"
        fix = ("name its splits with --train_split and --test_split" if "split" in reason.lower()
               else "offline, pass --train_file/--test_file or --data_dir")
        raise DataError(f"could not load {dataset_id!r} split {split!r} from the Hugging Face hub "
                        f"({type(e).__name__}{': ' + reason if reason else ''}); {fix}") from None


def read_split(cfg: Config, split: str, names: tuple[str, ...] | None = None,
               whose: str = "the training data's labels"):
    """The `train` or `test` split from whichever source the config names, as `text` and `label`: each label the
    id of its class in `names` (from `whose`, for errors), in a ClassLabel of them. names=None: --label_names,
    else the split's own label set (labels.py's rules)."""
    source = cfg.train_file if split == "train" else cfg.test_file  # the file read, for line numbers in errors
    if source:
        ds = read_file(source)
    elif cfg.data_dir:
        source = data_dir_source(cfg.data_dir, split)
        ds = read_file(source) if Path(source).is_file() else read_acl_imdb(Path(cfg.data_dir), split)
    elif cfg.train_file or cfg.test_file:
        raise DataError(f"no {split} data: --{'test' if split == 'test' else 'train'}_file is missing "
                        "(../shared-style folders have only train: carve a test file with scripts/split_data.py)")
    else:
        source = cfg.dataset_id
        ds = read_hub(source, cfg.train_split if split == "train" else cfg.test_split)
    ds = check_split(ds, source, cfg.text_column, cfg.label_column)
    given = labels.parse_names(cfg.label_names)
    return labels.as_ids(ds, source, names or given or None, "--label_names" if given and not names else whose,
                         IMDB_LABELS)


# ----------------------------------------------------------------------------- subsets


def take(ds, n: int, seed: int, what: str):
    """The tutorial's subset: `ds.shuffle(seed).select(range(n))`, so the same reviews; n=0 = all."""
    if n == 0:
        return ds
    if n > len(ds):
        raise DataError(f"--{what} {n} is larger than the {len(ds)} reviews available; "
                        f"use --{what} {len(ds)} or 0 for all")
    return ds.shuffle(seed=seed).select(range(n))


# ----------------------------------------------------------------------------- tokens


def truncate_ids(ids: list[int], max_length: int, strategy: str, cls_id: int, sep_id: int) -> list[int]:
    """[CLS] + the kept tokens + [SEP], at most max_length long.

    head keeps the start, tail the end, head_tail the first 128 and the last max_length-130
    tokens (the best of the strategies in Sun et al. 2019 for long IMDb reviews)."""
    budget = max_length - 2
    if len(ids) > budget:
        if strategy == "head":
            ids = ids[:budget]
        elif strategy == "tail":
            ids = ids[len(ids) - budget:]
        elif strategy == "head_tail":
            ids = ids[:HEAD_TOKENS] + ids[len(ids) - (budget - HEAD_TOKENS):]
        else:
            raise ValueError(f"unknown truncation {strategy!r}")
    return [cls_id, *ids, sep_id]


def _tokenize_batch(batch: dict, tokenizer, max_length: int, strategy: str) -> dict:
    # tokenize the whole review, then truncate ourselves: the fast tokenizer cannot keep head and tail
    encoded = tokenizer(batch["text"], add_special_tokens=False, truncation=False, verbose=False)
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    return {"input_ids": [truncate_ids(ids, max_length, strategy, cls_id, sep_id)
                          for ids in encoded["input_ids"]]}


@dataclass(frozen=True)
class TokenizedSplit:
    """A split as flat token ids: review i is tokens[offsets[i]:offsets[i+1]] (no Python lists)."""

    tokens: np.ndarray  # (total_tokens,) int32
    offsets: np.ndarray  # (n + 1,) int64
    labels: np.ndarray  # (n,) int64
    texts: list[str]

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def ids(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]


def tokenize(ds, tokenizer, max_length: int, truncation: str) -> TokenizedSplit:
    """Tokenize once with cached, batched `datasets.map` (a rerun reads the cache), then pull the
    ragged ids out of Arrow as one flat array plus offsets (zero-copy, ~0.1 s for 25k reviews)."""
    fn = functools.partial(_tokenize_batch, tokenizer=tokenizer, max_length=max_length, strategy=truncation)
    out = ds.map(fn, batched=True, batch_size=1000, desc="tokenize")
    column = out.data.column("input_ids").combine_chunks()
    offsets = column.offsets.to_numpy().astype(np.int64)
    tokens = column.values.to_numpy().astype(np.int32)
    return TokenizedSplit(tokens=tokens[offsets[0]:offsets[-1]], offsets=offsets - offsets[0],
                          labels=np.asarray(ds["label"], dtype=np.int64), texts=list(ds["text"]))


@dataclass(frozen=True)
class Splits:
    train: TokenizedSplit
    val: TokenizedSplit | None  # None when val_fraction == 0
    test: TokenizedSplit
    names: tuple[str, ...]  # the class of label id i is names[i]


def load_splits(cfg: Config, tokenizer, phases: PhasePeaks | None = None) -> Splits:
    """Read and check train, then test against train's classes; subsample, split off validation and tokenize;
    `phases` (train's memory per phase) is told when tokenizing starts."""
    train, val = take(read_split(cfg, "train"), cfg.n_train, cfg.seed, "n_train"), None
    names = tuple(train.features["label"].names)  # the classes: --label_names, else all the training data's
    whose = "--label_names" if cfg.label_names else "the training data's labels"
    test = take(read_split(cfg, "test", names, whose), cfg.n_test, cfg.seed, "n_test")
    labels.check_every_class(np.asarray(train["label"]), names)
    if cfg.val_fraction > 0:
        train_idx, val_idx = labels.stratified_split(np.asarray(train["label"]), cfg.val_fraction, cfg.seed, names)
        train, val = train.select(train_idx), train.select(val_idx)
        labels.check_every_class(np.asarray(train["label"]), names)
    if phases:
        phases.next("tokenize")
    tok = functools.partial(tokenize, tokenizer=tokenizer, max_length=cfg.max_length, truncation=cfg.truncation)
    return Splits(tok(train), tok(val) if val is not None else None, tok(test), names)


# ----------------------------------------------------------------------------- batches


def global_batches(lengths: np.ndarray, global_batch: int, seed: int, epoch: int,
                   shuffle: bool = True, group_by_length: bool = True) -> list[np.ndarray]:
    """One epoch's global batches of example indices, the same on every rank.

    With length grouping: shuffle, cut into windows of MEGA_BATCH global batches, sort each window
    by length, cut into batches, shuffle the batches. Reviews in a batch have similar lengths (little
    padding) while the epoch stays random. Seeded by (seed, epoch): each epoch differs, any rank or
    resumed run recomputes the same order. The last batch may be short."""
    rng = np.random.default_rng([seed, epoch])
    order = rng.permutation(len(lengths)) if shuffle else np.arange(len(lengths))
    if group_by_length:
        window = MEGA_BATCH * global_batch
        order = np.concatenate([w[np.argsort(-lengths[w], kind="stable")]
                                for w in np.split(order, range(window, len(order), window))])
    batches = np.split(order, range(global_batch, len(order), global_batch))
    if group_by_length and shuffle:
        # keep the short last batch last, so only the final step of an epoch has fewer samples
        head = [batches[i] for i in rng.permutation(len(batches) - 1)]
        batches = head + batches[-1:]
    return batches


def micro_batches(batch: np.ndarray, world_size: int, accum: int, rank: int) -> list[list[tuple[int, float]]]:
    """This rank's `accum` micro-batches of one global batch, as (index, weight) pairs.

    Slot k = micro_step * world_size + rank takes the k-th contiguous chunk (similar lengths when the
    batch is length-sorted). weight = 1/len(batch), so summing weight x loss over every micro-batch of
    every rank gives the exact mean over the global batch however it is split. A slot left empty by a
    short last batch gets one weight-0 stand-in, so every rank still runs the same forward/backward
    count and DDP's all-reduce never waits on a rank with nothing to do."""
    chunks = np.array_split(batch, world_size * accum)
    weight = 1.0 / len(batch)
    out = []
    for micro_step in range(accum):
        chunk = chunks[micro_step * world_size + rank]
        if len(chunk):
            out.append([(int(i), weight) for i in chunk])
        else:
            out.append([(int(batch[0]), 0.0)])
    return out


def pad_multiple(cfg: Config) -> int:
    """Pad lengths to a multiple of 8 (tensor-core tiles); of 64 under torch.compile, so at most
    eight distinct shapes up to 512 get compiled."""
    return 64 if cfg.compile else 8


class ReviewDataset(torch.utils.data.Dataset):
    """Indexed by (example index, loss weight) keys, as produced by `micro_batches`."""

    def __init__(self, split: TokenizedSplit):
        self.split = split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, float]) -> tuple[np.ndarray, int, float]:
        i, weight = key
        return self.split.ids(i), int(self.split.labels[i]), weight


@dataclass(frozen=True)
class Collator:
    """Pads a list of (ids, label, weight) to one batch of tensors (pad id 0 = BERT's [PAD])."""

    pad_id: int = 0
    multiple: int = 8  # round the padded length up to this
    max_length: int = 512
    pad_to_max: bool = False  # padding=max_length: every batch is max_length wide, as in the tutorial
    packed: ClassVar[type] = PackedCollator  # its padding-free sibling (padding none)

    def __call__(self, items: list[tuple[np.ndarray, int, float]]) -> dict[str, torch.Tensor]:
        longest = max(len(ids) for ids, _, _ in items)
        width = self.max_length if self.pad_to_max else min(
            -(-longest // self.multiple) * self.multiple, max(longest, self.max_length))
        input_ids = np.full((len(items), width), self.pad_id, dtype=np.int64)
        attention_mask = np.zeros((len(items), width), dtype=np.int64)
        for row, (ids, _, _) in enumerate(items):
            input_ids[row, :len(ids)] = ids
            attention_mask[row, :len(ids)] = 1
        return {"input_ids": torch.from_numpy(input_ids),
                "attention_mask": torch.from_numpy(attention_mask),
                "labels": torch.tensor([label for _, label, _ in items], dtype=torch.long),
                "weights": torch.tensor([w for _, _, w in items], dtype=torch.float32)}


def collator(cfg: Config, pad_id: int, kind: type[Collator] = Collator, first_position: int | None = None):
    """The run's collator (`kind`: Collator, or pretrain's MLMCollator) with its padding settings; its packed
    sibling where the model takes padding-free batches (first_position: model.packed_start, None if it does not)."""
    if first_position is not None:
        return kind.packed(first_position)
    return kind(pad_id=pad_id, multiple=pad_multiple(cfg), max_length=cfg.max_length,
                pad_to_max=cfg.padding == "max_length")


def eval_batches(lengths: np.ndarray, batch_size: int, world_size: int, rank: int) -> list[list[tuple[int, float]]]:
    """This rank's evaluation batches: examples sorted by length (least padding), batch b going to
    rank b % world_size, so each example is evaluated exactly once across ranks."""
    order = np.argsort(-lengths, kind="stable")
    batches = np.split(order, range(batch_size, len(order), batch_size))
    return [[(int(i), 1.0) for i in b] for b in batches[rank::world_size]]
