"""`sentiment evaluate` and `sentiment predict`: a trained model on the configured device and precision.

Both take a model saved by `sentiment train` (RUN/model, or the run folder RUN itself) and read the
max_length and truncation it was trained with from the `sentiment_config.json` saved beside it.
Results go to stdout or a file; what the run says about itself goes to the `sentiment` logger.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import os
import sys
import time
from pathlib import Path

from sentiment import rundir
from sentiment.checkpoint import TRAINING_CONFIG, atomic_write, write_json
from sentiment.config import Config
from sentiment.data import collator, read_file, read_split, take, tokenize
from sentiment.engine import Engine, setup_engine
from sentiment.errors import ConfigError, DataError, ModelError
from sentiment.evaluate import evaluate, predict_probs
from sentiment.labels import model_names
from sentiment.model import load_checked, load_model, packed_start, use_family
from sentiment.rows import is_blank
from sentiment.runlog import LOG, console, quiet_libraries

RECORDED = ("max_length", "truncation")  # how the model saw reviews in training: inference must see them alike


def model_folder(name: str) -> str:
    """A run folder stands for its model/ (`--model_name_or_path runs/x`); anything else is taken as given."""
    path = Path(name)
    if not (path / rundir.MARKER).is_file():
        return name
    if rundir.inspect(path).command == "pretrain":
        raise ModelError(f"{name} is a `sentiment pretrain` run: its masked-LM model has no classification head; "
                         f"fine-tune it first with sentiment train --model_name_or_path {path / 'model'}")
    if not (path / "model").is_dir():
        raise ModelError(f"{name} is a run that has saved no model yet; finish it with `sentiment train ... "
                         "--resume auto`, or pass another --model_name_or_path")
    return str(path / "model")


def with_recorded_settings(cfg: Config, model_dir: str) -> Config:
    """cfg with the max_length and truncation recorded with the model, for every field left at its default."""
    path = Path(model_dir) / TRAINING_CONFIG
    if not path.is_file():
        return cfg
    recorded = json.loads(path.read_text())
    defaults = Config()
    changes = {k: recorded[k] for k in RECORDED
               if k in recorded and getattr(cfg, k) == getattr(defaults, k) != recorded[k]}
    if changes:
        LOG.info("settings: " + " ".join(f"{k}={v}" for k, v in changes.items()) + f" (recorded in {path})")
    return dataclasses.replace(cfg, model_name_or_path=model_dir, **changes)


def load_for_inference(cfg: Config, engine: Engine):
    """(cfg, model, tokenizer, collate, class names) for the trained model at cfg.model_name_or_path, on the
    engine's device; the names are the model's own (id2label)."""
    name = model_folder(cfg.model_name_or_path)
    cfg = with_recorded_settings(cfg, name)
    tokenizer, config = load_checked(name, cfg.max_length)
    engine.print(use_family(config, cfg.attn_implementation, engine.flash_attention_unusable, padding=cfg.padding,
                            varlen_unusable=engine.varlen_unusable))
    packed = packed_start(config)  # padding-free batches: the position of each review's first token, else None
    model = engine.wrap(load_model(name, config=config, trained_head=True), compile=cfg.compile, inference=True,
                        packed=packed is not None)
    return cfg, model, tokenizer, collator(cfg, tokenizer.pad_token_id, first_position=packed), model_names(config)


PREDICTION_FORMATS = (".jsonl", ".csv", ".tsv", ".parquet")  # predict --output, by suffix; - = JSON lines on stdout
METRICS_FORMATS = (".json",)  # evaluate --output


def check_output(output: str, formats: tuple[str, ...], cfg: Config) -> None:
    """Before any work: --output names a file we can write in a format we write. Its folder must exist (it is not
    created: a typo there would scatter results), it is no folder, and it is replaced only with --overwrite true."""
    if not output or output == "-":
        return
    path = Path(output)
    if path.is_dir():
        raise ConfigError(f"--output {output} is a folder; pass a file path, e.g. {path / ('out' + formats[0])}")
    if path.suffix.lower() not in formats:
        raise ConfigError(f"--output {output}: {repr(path.suffix) if path.suffix else 'no'} suffix; the format is "
                          f"read from it: name the file with one of {', '.join(formats)} (or - for stdout)")
    if not path.parent.is_dir():
        raise ConfigError(f"--output {output}: the folder {path.parent} does not exist; create it first (mkdir -p "
                          f"{path.parent}) or pass another --output")
    if not os.access(path.parent, os.W_OK):
        raise ConfigError(f"--output {output}: the folder {path.parent} is not writable; pass another --output")
    outer = rundir.enclosing_run(path)
    if outer:
        raise ConfigError(f"--output {output} lies inside {outer[1]}/ of the run in {outer[0]}, which a run there "
                          "replaces or deletes; write it outside the run's own files (e.g. beside them)")
    if os.path.lexists(path) and not cfg.overwrite:
        raise ConfigError(f"{output} exists; pass another --output, or --overwrite true to replace it")


@contextlib.contextmanager
def inference_engine(cfg: Config):
    """The engine for evaluate/predict: messages on stderr unless logging is configured, closed however it ends."""
    console("stderr", replace=False)
    engine = setup_engine(cfg.device, cfg.precision, cfg.seed, cfg.keep_freed_memory)
    quiet_libraries(engine.is_main)
    try:
        yield engine
    finally:
        engine.close()


def evaluate_on(cfg: Config, engine: Engine) -> dict:
    """The metrics of the trained model at cfg.model_name_or_path on the configured test data."""
    cfg, model, tokenizer, collate, names = load_for_inference(cfg, engine)
    test = tokenize(take(read_split(cfg, "test", names, "the model's labels"), cfg.n_test, cfg.seed, "n_test"),
                    tokenizer, cfg.max_length, cfg.truncation)
    start = time.perf_counter()
    metrics, _ = evaluate(model, test, engine, cfg.eval_batch_size, collate, desc="test", names=names)
    metrics["reviews_per_second"] = len(test) / (time.perf_counter() - start)
    return metrics


def predict_on(cfg: Config, engine: Engine, texts: list[str]) -> list[dict]:
    """{"label": the most probable class's name, "prob_NAME": each class's probability} for each text, in order
    (a neg/pos model: label, prob_neg, prob_pos)."""
    if not texts:
        raise DataError("predict got no texts; pass review texts, or --input FILE with a `text` column")
    empty = next((i for i, t in enumerate(texts) if is_blank(t)), None)
    if empty is not None:
        raise DataError(f"text {empty + 1} of {len(texts)} is empty; remove it or give it a review")
    import datasets  # here, not at the top: the CLI decides hub-offline before datasets is imported

    cfg, model, tokenizer, collate, names = load_for_inference(cfg, engine)
    split = tokenize(datasets.Dataset.from_dict({"text": texts, "label": [0] * len(texts)}), tokenizer,
                     cfg.max_length, cfg.truncation)
    probs, _ = predict_probs(model, split, engine, cfg.eval_batch_size, collate, desc="predict")
    return [{"label": names[int(p.argmax())], **{f"prob_{name}": float(q) for name, q in zip(names, p)}}
            for p in probs]


def evaluate_model(cfg: Config) -> dict:
    """The Python API of `sentiment evaluate`: the metrics dict."""
    with inference_engine(cfg) as engine:
        return evaluate_on(cfg, engine)


def predict(cfg: Config, texts: list[str]) -> list[dict]:
    """The Python API of `sentiment predict`: {"label", "prob_NAME" per class} for each text, in order."""
    with inference_engine(cfg) as engine:
        return predict_on(cfg, engine, texts)


def evaluate_command(cfg: Config, output: str = "") -> dict:
    """`sentiment evaluate`: the metrics as JSON on stdout, and in `output` (a JSON file) if given (rank 0)."""
    check_output(output, METRICS_FORMATS, cfg)
    with inference_engine(cfg) as engine:
        metrics = evaluate_on(cfg, engine)
        if engine.is_main:
            sys.stdout.write(json.dumps(metrics, indent=2) + "\n")
            if output and output != "-":  # - is stdout, written just above
                write_json(Path(output), metrics)
                LOG.info(f"metrics written to {output}")
    return metrics


def read_texts(source: str, column: str = "text") -> list[str]:
    """Review texts from `-` (stdin, one per line), a .txt file (one per line), or a parquet/CSV/JSONL file's
    `column` (--text_column)."""
    if source == "-" or source.endswith(".txt"):
        try:
            lines = (sys.stdin.read() if source == "-" else Path(source).read_text()).splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"cannot read {source} ({e}); pass a UTF-8 text file, one review per line") from None
        return [line for line in lines if not is_blank(line)]
    return column_texts(read_file(source), source, column)


def column_texts(ds, source: str, column: str) -> list[str]:
    """The texts of a dataset's `column` (--text_column), a missing one as "" (then refused as empty)."""
    if column not in ds.column_names:
        raise DataError(f"{source} has no column {column!r}; its columns are {', '.join(ds.column_names)}: name the "
                        "text column with --text_column")
    return ["" if t is None else str(t) for t in ds[column]]


def write_predictions(rows: list[dict], output: str) -> None:
    """The rows in the format --output's suffix names (check_output let only PREDICTION_FORMATS through), one
    per review in input order; `-`: JSON lines on stdout. A file is replaced whole or not at all (atomic_write)."""
    suffix = Path(output).suffix.lower()
    if output == "-" or suffix == ".jsonl":
        text = "".join(json.dumps(row) + "\n" for row in rows)
        if output == "-":
            sys.stdout.write(text)
        else:
            atomic_write(Path(output), lambda f: f.write(text.encode()))
    elif suffix in (".csv", ".tsv"):
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(rows[0]), lineterminator="\n",
                                delimiter="," if suffix == ".csv" else "\t")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write(Path(output), lambda f: f.write(buffer.getvalue().encode()))
    else:  # .parquet, through pyarrow (a dependency of datasets)
        import pyarrow as pa
        import pyarrow.parquet as pq

        atomic_write(Path(output), lambda f: pq.write_table(pa.Table.from_pylist(rows), f))


def predict_command(cfg: Config, texts: list[str], input: str = "", output: str = "") -> list[dict]:
    """`sentiment predict`: texts from the arguments or --input; a TSV line per review on stdout (label,
    probability of that label, the text's start), or --output FILE (.jsonl, .csv, .tsv, .parquet; - = JSON lines
    on stdout); rank 0 writes."""
    if bool(texts) == bool(input):
        raise ConfigError("predict takes review texts as arguments or --input FILE (- for stdin), not both or neither")
    check_output(output, PREDICTION_FORMATS, cfg)
    texts = texts or read_texts(input, cfg.text_column)
    with inference_engine(cfg) as engine:
        rows = predict_on(cfg, engine, texts)
        if engine.is_main and output:
            write_predictions(rows, output)
            if output != "-":
                LOG.info(f"{len(rows)} predictions written to {output}")
        elif engine.is_main:
            for row, text in zip(rows, texts):
                sys.stdout.write(f"{row['label']}\t{row['prob_' + row['label']]:.4f}\t{text[:80]}\n")
    return rows
