"""The Hugging Face Trainer tutorial ("Fine-tune a pretrained model"), as a script: the baseline
that `sentiment` replaces, for accuracy comparisons (issue 2) and speed benchmarks (issue 3).

With no flags this is the tutorial, on IMDb instead of Yelp, as issue 2 describes it:

    tokenizer(examples["text"], padding="max_length", truncation=True)   # every review 512 tokens
    train = tokenized["train"].shuffle(seed=42).select(range(1000))
    test = tokenized["test"].shuffle(seed=42).select(range(500))
    model = AutoModelForSequenceClassification.from_pretrained("bert-base-uncased", num_labels=2)
    TrainingArguments(output_dir=..., eval_strategy="epoch")                # every other value a default
    Trainer(model, args, train_dataset=train, eval_dataset=test, compute_metrics=accuracy).train()

The Trainer defaults it relies on: batch 8 (train and eval), 3 epochs, AdamW (fused on torch >= 2.8)
with lr 5e-5, betas (0.9, 0.999), eps 1e-8, no weight decay, linear decay to 0 without warmup,
gradient clipping at 1.0, seed 42, no checkpoint before step 500, fp32. Accuracy is computed with
numpy (the tutorial's `evaluate.load("accuracy")` needs the hub; the number is the same).
Departures, each a flag: `--tokenize_all` tokenizes the whole splits before selecting, as the
tutorial literally does (the selected reviews are the same either way; by default only the
selected reviews are tokenized, which is faster for the Trainer); local files instead of the hub.

The Trainer "at its best" (issue 3): `--padding dynamic --group_by_length` (DataCollatorWithPadding,
padded to a multiple of 8, and train_sampling_strategy="group_by_length"); on a GPU (scripts/bench_gpu.py) also
`--precision bf16 --optim adamw_torch_fused --attn_implementation sdpa`, and `--torch_compile` where it pays.
`--truncation head_tail` keeps the first 128 and the last max_length-130 tokens, as `sentiment` does, for
the full-data recipe; `--step_log FILE` writes one JSON line per optimizer step (samples, real
and padded tokens, milliseconds, peak memory), flushed as it goes, so a run stopped early still leaves its speed.

    python scripts/trainer_tutorial.py --model M --data_dir runs/imdb_split --n_train 1000 --epochs 1
    python scripts/trainer_tutorial.py --predict DIR --data_dir runs/imdb_split --n_test 2000   # inference only

Prints one JSON object (also written to --results_json): test accuracy and loss, the Trainer's own
train_samples_per_second (its train_runtime includes the evaluations), and figures measured the
way `sentiment` measures its own (summed optimizer-step time, real and padded tokens seen in training).
"""

from __future__ import annotations

import argparse
import collections
import json
import resource
import sys
import time
from pathlib import Path

STARTED = time.perf_counter()

import numpy as np  # noqa: E402
import torch  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert-base-uncased", help="hub name or local folder (default bert-base-uncased)")
    p.add_argument("--dataset", default="stanfordnlp/imdb", help="hub dataset (the tutorial's bare 'imdb' is mapped)")
    p.add_argument("--train_file", default="", help="local parquet/CSV/JSONL with text and label")
    p.add_argument("--test_file", default="", help="local file for the test split")
    p.add_argument("--data_dir", default="", help="folder holding train.* and test.* (parquet, csv or jsonl)")
    p.add_argument("--n_train", type=int, default=1000, help="reviews from train, shuffle(seed=42).select; 0 = all")
    p.add_argument("--n_test", type=int, default=500, help="reviews from test, likewise; 0 = all")
    p.add_argument("--max_length", type=int, default=512, help="truncate (and pad, with --padding max_length) to this")
    p.add_argument("--padding", choices=("max_length", "dynamic"), default="max_length",
                   help="max_length: the tutorial's; dynamic: DataCollatorWithPadding per batch")
    p.add_argument("--pad_to_multiple_of", type=int, default=8, help="with --padding dynamic (as sentiment does)")
    p.add_argument("--group_by_length", action="store_true",
                   help='train_sampling_strategy="group_by_length" (LengthGroupedSampler)')
    p.add_argument("--truncation", choices=("head", "head_tail"), default="head",
                   help="head: the tokenizer's truncation=True; head_tail: first 128 + last max_length-130 tokens")
    p.add_argument("--optim", default="", help='TrainingArguments.optim, e.g. adamw_torch_fused ("": its default)')
    p.add_argument("--attn_implementation", default="", help='e.g. sdpa or eager ("": the model class default)')
    p.add_argument("--torch_compile", action="store_true", help="TrainingArguments(torch_compile=True)")
    p.add_argument("--step_log", default="", help="write a JSON line per optimizer step to this file")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="fp32 is the tutorial's; bf16/fp16 set TrainingArguments(bf16/fp16=True)")
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--batch_size", type=int, default=8, help="per_device_train_batch_size")
    p.add_argument("--eval_batch_size", type=int, default=8, help="per_device_eval_batch_size")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=42, help="subset selection and TrainingArguments.seed")
    p.add_argument("--tokenize_all", action="store_true",
                   help="tokenize the whole splits, then select (the tutorial's literal order; slower)")
    p.add_argument("--output_dir", default="runs/trainer_tutorial", help="TrainingArguments.output_dir")
    p.add_argument("--results_json", default="", help="also write the results here")
    p.add_argument("--predict", default="", metavar="MODEL_DIR",
                   help="inference only: Trainer.predict of this saved classifier on n_test test reviews")
    return p.parse_args(argv)


def load_raw(args, needed: tuple[str, ...] = ("train", "test")):
    """{split: Dataset} with text and label columns for the `needed` splits, from the hub or local files."""
    import datasets

    files = {}
    if args.train_file or args.test_file:
        files = {k: v for k, v in (("train", args.train_file), ("test", args.test_file)) if v}
    elif args.data_dir:
        for split in ("train", "test"):
            found = [Path(args.data_dir) / f"{split}{s}" for s in (".parquet", ".csv", ".jsonl")]
            found = [f for f in found if f.is_file()]
            if found:
                files[split] = str(found[0].resolve())
    if files:
        suffix = Path(next(iter(files.values()))).suffix.lstrip(".")
        loaded = datasets.load_dataset({"jsonl": "json"}.get(suffix, suffix), data_files=files)
    else:
        loaded = datasets.load_dataset({"imdb": "stanfordnlp/imdb"}.get(args.dataset, args.dataset))
    missing = [s for s in needed if s not in loaded]
    if missing:
        sys.exit(f"error: no {' or '.join(missing)} split: pass --train_file/--test_file or a --data_dir holding it")
    return {s: loaded[s] for s in needed}  # IMDb's 50k "unsupervised" reviews are never used


def take(ds, n: int, seed: int):
    return ds if n == 0 else ds.shuffle(seed=seed).select(range(n))


class CountingCollator:
    """Wraps a collator; while `active` (training epochs), counts real and padded tokens of the batches and
    queues each batch's (samples, real tokens, padded tokens) for the step that will use it."""

    def __init__(self, inner):
        self.inner = inner
        self.active = False
        self.real_tokens = 0
        self.padded_tokens = 0
        self.pending = collections.deque()

    def __call__(self, features):
        batch = self.inner(features)
        if self.active:
            mask = batch["attention_mask"]
            counts = (len(mask), int(mask.sum()), mask.numel())
            self.real_tokens += counts[1]
            self.padded_tokens += counts[2]
            self.pending.append(counts)
        return batch

    def take(self, n: int) -> tuple[int, int, int]:
        """The summed counts of the `n` oldest queued batches (one optimizer step's micro-batches)."""
        taken = [self.pending.popleft() for _ in range(min(n, len(self.pending)))]
        return tuple(sum(c[i] for c in taken) for i in range(3))


def make_timer_callback(counter: CountingCollator, step_log: str = ""):
    """A TrainerCallback summing the wall time of optimizer steps (batch fetch included, evaluation
    excluded), the way sentiment's `samples_per_second` does, and switching token counting on in epochs.
    With `step_log`, each step's row goes to that file, with the counts of the batches the step used (taken from
    the collator's queue: accelerate's loader collates one batch ahead). No CUDA sync is added: a step's time is
    the host's, which the queue of launched kernels keeps within a step or so of the device's."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.train_seconds = 0.0
            self.eval_seconds = 0.0
            self.mark = 0.0
            if step_log:
                Path(step_log).parent.mkdir(parents=True, exist_ok=True)
            self.file = open(step_log, "w") if step_log else None

        def on_epoch_begin(self, args, state, control, **kwargs):
            counter.active = True
            self.mark = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            self.train_seconds += now - self.mark
            samples, real, padded = counter.take(args.gradient_accumulation_steps)
            if self.file:
                self.file.write(json.dumps({"step": state.global_step, "max_steps": state.max_steps,
                                            "samples": samples, "tokens": real, "padded_tokens": padded,
                                            "step_ms": (now - self.mark) * 1e3, "peak_mem_mb": peak_memory_mb()})
                                + "\n")
                self.file.flush()
            self.mark = now

        def on_epoch_end(self, args, state, control, **kwargs):
            counter.active = False

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            self.eval_seconds += (metrics or {}).get("eval_runtime", 0.0)

    return StepTimer()


def tokenize_splits(args, tokenizer, raw: dict) -> dict:
    """{split: tokenized Dataset} of n_train/n_test reviews drawn with the seed, padded as --padding says."""
    padding = "max_length" if args.padding == "max_length" else False

    def tokenize_function(examples):
        if args.truncation == "head":
            return tokenizer(examples["text"], padding=padding, truncation=True, max_length=args.max_length)
        from sentiment.data import truncate_ids  # the very tokens `sentiment` trains on: first 128 + last, [CLS] [SEP]

        ids = [truncate_ids(x, args.max_length, "head_tail", tokenizer.cls_token_id, tokenizer.sep_token_id) for x in
               tokenizer(examples["text"], add_special_tokens=False, verbose=False)["input_ids"]]
        return tokenizer.pad({"input_ids": ids}, padding=padding, max_length=args.max_length)

    sizes = {"train": args.n_train, "test": args.n_test}
    if args.tokenize_all:  # the tutorial: dataset.map(tokenize_function, batched=True), then select
        return {k: take(v.map(tokenize_function, batched=True), sizes[k], args.seed) for k, v in raw.items()}
    return {k: take(v, sizes[k], args.seed).map(tokenize_function, batched=True) for k, v in raw.items()}


def accuracy(eval_pred) -> dict:
    logits, labels = eval_pred
    return {"accuracy": float(np.mean(np.argmax(logits, axis=-1) == labels))}


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    model_name = args.predict or args.model
    tokenizer = AutoTokenizer.from_pretrained(model_name)
    tokenized = tokenize_splits(args, tokenizer, load_raw(args, ("test",) if args.predict else ("train", "test")))

    attention = {"attn_implementation": args.attn_implementation} if args.attn_implementation else {}
    model = AutoModelForSequenceClassification.from_pretrained(model_name, num_labels=2, **attention)
    counter = CountingCollator(default_data_collator if args.padding == "max_length" else
                               DataCollatorWithPadding(tokenizer, pad_to_multiple_of=args.pad_to_multiple_of or None))
    timer = make_timer_callback(counter, args.step_log)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        eval_strategy="epoch",  # the tutorial's one setting; the rest below only restate its values or flags
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.eval_batch_size,
        learning_rate=args.lr,
        seed=args.seed,
        bf16=args.precision == "bf16",
        fp16=args.precision == "fp16",
        use_cpu=not torch.cuda.is_available(),  # transformers 5 refuses bf16 without a GPU unless told it is CPU
        train_sampling_strategy="group_by_length" if args.group_by_length else "random",
        report_to="none",
        torch_compile=args.torch_compile,
        **({"optim": args.optim} if args.optim else {}),
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=tokenized.get("train"),
                      eval_dataset=tokenized["test"], data_collator=counter, compute_metrics=accuracy,
                      callbacks=[timer])
    results = {"contender": "trainer", "model": model_name, "padding": args.padding,
               "group_by_length": args.group_by_length, "precision": args.precision, "truncation": args.truncation,
               "optim": getattr(training_args.optim, "value", training_args.optim),
               "attn_implementation": model.config._attn_implementation,
               "torch_compile": args.torch_compile,
               "threads": torch.get_num_threads(), "transformers": __import__("transformers").__version__}
    if args.predict:
        start = time.perf_counter()
        out = trainer.predict(tokenized["test"])
        seconds = time.perf_counter() - start
        results.update({"n_test": len(tokenized["test"]), "accuracy": out.metrics.get("test_accuracy"),
                        "loss": out.metrics.get("test_loss"), "predict_seconds": seconds,
                        "reviews_per_second": len(tokenized["test"]) / seconds})
    else:
        train_out = trainer.train()
        evals = [row for row in trainer.state.log_history if "eval_accuracy" in row]
        n_samples = len(tokenized["train"]) * args.epochs
        results.update({
            "n_train": len(tokenized["train"]), "n_test": len(tokenized["test"]), "epochs": args.epochs,
            "accuracy": evals[-1]["eval_accuracy"], "loss": evals[-1]["eval_loss"],
            "train_loss": train_out.training_loss,
            "trainer_train_samples_per_second": train_out.metrics["train_samples_per_second"],
            "trainer_train_runtime": train_out.metrics["train_runtime"],
            "train_seconds": timer.train_seconds, "eval_seconds": timer.eval_seconds,
            "samples_per_second": n_samples / max(timer.train_seconds, 1e-9),
            "real_tokens": counter.real_tokens, "padded_tokens": counter.padded_tokens,
            "tokens_per_second": counter.real_tokens / max(timer.train_seconds, 1e-9),
            "padded_fraction": 1 - counter.real_tokens / max(counter.padded_tokens, 1),
        })
    results["peak_mem_mb"] = peak_memory_mb()
    results["runtime_s"] = time.perf_counter() - STARTED
    line = json.dumps(results)
    if args.results_json:
        Path(args.results_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.results_json).write_text(line + "\n")
    print("RESULTS " + line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
