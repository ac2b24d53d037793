"""The `sentiment` command line: one parser per subcommand, built from Config and its comments.

Every Config field is a flag spelled exactly like the field. Its --help text is the field's comment
(config.field_docs()), so --help, the README table and the code cannot drift apart; this module
holds no copy of it. `python -m sentiment` is the same program.
"""

from __future__ import annotations

import argparse
import difflib
import json
import re
import sys
import textwrap
from dataclasses import fields

from sentiment.config import Config, field_docs
from sentiment.presets import PRESETS, build_config
from sentiment.errors import ConfigError, SentimentError
from sentiment.runlog import LOG, console

# The Config fields each command reads (train reads them all); a command lists no flag it ignores, and
# adding a field to a command is adding its name here.
EVALUATE_FIELDS = ("model_name_or_path", "attn_implementation", "dataset", "test_file", "data_dir", "text_column",
                   "label_column", "test_split", "n_test", "max_length", "truncation", "padding", "eval_batch_size",
                   "device", "precision", "compile", "seed", "keep_freed_memory", "overwrite")
PREDICT_FIELDS = ("model_name_or_path", "attn_implementation", "text_column", "max_length", "truncation", "padding",
                  "eval_batch_size", "device", "precision", "compile", "keep_freed_memory", "overwrite")
TRAIN_ONLY = ("test_file", "label_column", "label_names", "test_split", "n_train", "n_test", "val_fraction",
              "layer_lr_decay", "early_stopping_patience")
PRETRAIN_ONLY = ("mlm_probability", "whole_word_masking", "mlm_val_fraction")
COMMAND_FIELDS = {"train": tuple(f.name for f in fields(Config) if f.name not in PRETRAIN_ONLY),
                  "pretrain": tuple(f.name for f in fields(Config) if f.name not in TRAIN_ONLY),
                  "evaluate": EVALUATE_FIELDS,
                  "predict": PREDICT_FIELDS, "plot": (), "doctor": ("device", "precision")}
COMMANDS = tuple(COMMAND_FIELDS)
DEFAULTS = Config()
TRAIN_ONLY_OPTIONS = ("preset", "config")  # a run's config.json names the base model, not the trained one

# The Hugging Face Trainer's names, typed from habit: a close match would guess wrong (--learning_rate is not
# --warmup_ratio). A value starting with `--` is our flag for it; other text explains. A tuple holds
# Same name here as in the Trainer, so no entry: seed, output_dir, warmup_ratio, weight_decay, max_grad_norm,
# report_to, group_by_length, gradient_checkpointing, max_steps, early_stopping_patience.
TRAINER_NAMES: dict[str, str] = {
    "learning_rate": "--lr", "num_train_epochs": "--epochs",
    "per_device_train_batch_size": "--micro_batch_size",
    "per_device_eval_batch_size": "--eval_batch_size",
    "gradient_accumulation_steps": "--grad_accum_steps",
    "logging_steps": "--log_every",
    "save_total_limit": "--keep_last",
    "save_steps": "--save_every",
    "eval_steps": "--eval_every",
    "warmup_steps": "--warmup_ratio (a share of the optimizer steps, not a count)",
    "lr_scheduler_type": "the schedule is linear warmup (--warmup_ratio) then linear decay to 0, the Trainer's default",
    "fp16": "--precision fp16", "bf16": "--precision bf16",
    "use_cpu": "--device cpu", "no_cuda": "--device cpu",
    "resume_from_checkpoint": "--resume auto (or --resume PATH)",
    "adam_epsilon": "--adam_eps",
    "dataloader_num_workers": "--num_workers",
    "torch_compile": "--compile",
    "eval_strategy": "evaluation and a checkpoint happen at every epoch end, besides evaluation every --eval_every "
                     "and a checkpoint every --save_every steps",
    "load_best_model_at_end": "with --val_fraction > 0 the best model by validation accuracy is always loaded at the "
                              "end (and saved); without, the last",
    "batch_size": "the global batch is --global_batch_size, or --micro_batch_size x --grad_accum_steps x processes; "
                  "for evaluation --eval_batch_size",
}
TRAINER_NAMES["evaluation_strategy"] = TRAINER_NAMES["save_strategy"] = TRAINER_NAMES["eval_strategy"]

USAGE = {  # argparse would list every flag here; the groups below do that, with their meaning
    "train": "sentiment train [--preset NAME] [--config FILE.json] [--FLAG VALUE ...]",
    "evaluate": "sentiment evaluate --model_name_or_path RUN [--data_dir DIR | --test_file FILE] [--output FILE.json] "
                "[--FLAG VALUE ...]",
    "predict": "sentiment predict (TEXT [TEXT ...] | --input FILE) --model_name_or_path RUN [--output FILE] "
               "[--FLAG VALUE ...]",
    "pretrain": "sentiment pretrain --model_name_or_path MODEL (--train_file FILE | --data_dir DIR | --dataset NAME) "
                "[--FLAG VALUE ...]",
    "plot": "sentiment plot RUN_DIR",
    "doctor": "sentiment doctor [--device DEVICE] [--precision PRECISION] [--json]",
}
ABOUT = {  # what the command does, with two examples: a first-day user reads this before any flag
    "train": """\
Fine-tune a BERT-style classifier on IMDb reviews. With no flags it is the Hugging Face Trainer
tutorial: bert-base-uncased, 1000 train / 500 test reviews, 3 epochs, lr 5e-5.

examples:
  # a tiny random BERT, offline, in seconds (`python -m sentiment.tiny runs/tiny` writes it)
  sentiment train --model_name_or_path runs/tiny/model --data_dir runs/tiny/data \\
      --n_train 0 --n_test 0 --max_length 64 --epochs 10 --lr 3e-3 --output_dir runs/tiny/run
  # all-MiniLM-L6-v2 (a local folder, see README) on 1000 reviews, 10% held out to pick the best epoch
  sentiment train --model_name_or_path $MINILM --data_dir runs/imdb_split --val_fraction 0.1 \\
      --epochs 1 --max_length 256 --output_dir runs/minilm""",
    "pretrain": """\
Further pre-train the encoder with masked-LM (BERT's objective) on unlabeled text, e.g. IMDb's 50,000
unlabeled reviews and its train texts; labels are ignored. A --data_dir gives its train file plus its
unsupervised file, never its test split. A held-out slice (--mlm_val_fraction) gives MLM loss and accuracy at
each evaluation. RUN/model is then a --model_name_or_path for `sentiment train`.

examples:
  # all-MiniLM-L6-v2 (no MLM head: a new one is tied to its embeddings) on IMDb's 75,000 texts
  sentiment pretrain --model_name_or_path $MINILM --data_dir ../shared/imdb \\
      --max_length 128 --micro_batch_size 32 --epochs 1 --lr 5e-5 --warmup_ratio 0.1 --output_dir runs/mlm
  # then: sentiment train --model_name_or_path runs/mlm/model ...; a .txt file (one text per line) works too
  sentiment pretrain --model_name_or_path runs/tiny/model --train_file texts.txt --max_length 64 \\
      --whole_word_masking --max_steps 100 --output_dir runs/tiny/mlm""",
    "evaluate": """\
Measure a trained model on the test split: prints loss, accuracy, macro-F1, per-class precision,
recall, F1 and support, and the confusion matrix as JSON on stdout (and into --output). It reads
reviews with the max_length and truncation the model was trained with, unless you pass others, and
the test labels as the model names its classes.

examples:
  sentiment evaluate --model_name_or_path runs/latest      # the tutorial's 500 IMDb test reviews
  sentiment evaluate --model_name_or_path runs/minilm --data_dir runs/imdb_split --n_test 0 --output eval.json""",
    "predict": """\
Classify reviews with a trained model: one line per review on stdout (the label, as the model names its
classes, its probability, the text), or a .jsonl/.csv/.tsv/.parquet file with --output. Messages go to stderr.

examples:
  sentiment predict --model_name_or_path runs/latest "Loved it." "Dreadful."
  sentiment predict --model_name_or_path runs/minilm --input reviews.csv --output preds.jsonl""",
    "plot": """\
Draw a run's figures (loss, accuracy, learning rate, throughput, ...) into RUN/plots/.

examples:
  sentiment plot runs/latest
  sentiment plot runs/minilm""",
    "doctor": """\
Check this machine before a long job: versions (torch, CUDA/ROCm, cuDNN, NCCL, Hugging Face libraries),
each GPU (memory, compute capability, bf16, TF32), MPS, the CPU's features, what --device/--precision
pick and why, and whether the hub is reachable. Then a self-test of seconds: a tiny BERT's training
step in each precision the device runs, against fp32 on the CPU, and a 2-process all-reduce (NCCL with
2+ GPUs, else gloo). Exits 2 with the fix when a check fails.

examples:
  sentiment doctor                                 # what --device auto --precision auto would use
  sentiment doctor --device cuda --precision bf16 --json   # one JSON object, for scripts""",
}
SUMMARY = {  # one line each, for `sentiment --help`
    "train": "fine-tune a classifier (BERT, RoBERTa, DeBERTa, ...) on IMDb or your reviews",
    "pretrain": "further pre-train the encoder with masked-LM on unlabeled text",
    "evaluate": "measure a trained model on test reviews (metrics as JSON)",
    "predict": "classify reviews with a trained model",
    "plot": "draw a run's figures into RUN/plots/",
    "doctor": "check this machine (versions, GPUs, precisions) before a long job",
}
EPILOG = """\
README.md (section Config) has every flag in one table, with the presets.
Commands: {commands}; each has its own --help."""


class _Parser(argparse.ArgumentParser):
    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        # argparse reads "-1e-3" as a flag (its own pattern knows only -1 and -.5), so `--lr -1e-3` would be "expected
        # one argument" instead of our range check; every number, "-inf" and "-nan" included, is a value
        self._negative_number_matcher = re.compile(r"^-(\.?\d|inf$|nan$)")

    def error(self, message: str):
        """A bad command line is one `error:` line from main(), not argparse's usage block and exit."""
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


class _Formatter(argparse.RawDescriptionHelpFormatter):  # raw: keeps the examples' lines
    def _split_lines(self, text: str, width: int) -> list[str]:
        """Never break at a hyphen: "bert-base-" / "uncased" would read as another value."""
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def shown(value: object) -> str:
    """A default as it is typed on the command line: true/false, a quoted string (so "" shows), 5e-05."""
    if isinstance(value, bool):
        return str(value).lower()
    return json.dumps(value) if isinstance(value, str) else repr(value)


def add_field(group, name: str, default: object, text: str) -> None:
    """`--name VALUE`: every value arrives as a string and is coerced through the field's type in
    build_config; a bare boolean flag (`--compile`) means true. argparse %-formats help, hence the escape."""
    is_bool = isinstance(default, bool)
    group.add_argument(f"--{name}", default=None, metavar="BOOL" if is_bool else type(default).__name__.upper(),
                       nargs="?" if is_bool else None, const="true" if is_bool else None,
                       help=f"{text} (default: {shown(default)})".replace("%", "%%"))


def make_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"sentiment {command}", usage=USAGE[command], description=ABOUT[command],
                     epilog=EPILOG.format(commands=", ".join(COMMANDS)), allow_abbrev=False, formatter_class=_Formatter)
    if command == "predict":
        parser.add_argument("texts", nargs="*", help="review texts to classify, each in quotes")
        parser.add_argument("--input", default="", metavar="FILE", help="reviews to classify instead: a parquet/CSV/"
                            "JSONL file with a text column (--text_column), a .txt file with one review per line, "
                            "or - for stdin")
    if command in ("predict", "evaluate"):
        what = ("predictions, a row per review in input order (label, prob_NAME per class), as the suffix says: "
                ".jsonl, .csv, .tsv or .parquet; - = JSON lines on stdout" if command == "predict"
                else "the metrics as a .json file (- = stdout only)")
        parser.add_argument("--output", default="", metavar="FILE", help=f"write {what}. Checked before any work: "
                            "its folder must exist (it is not created); an existing file is kept unless "
                            "--overwrite true")
    if command == "plot":
        parser.add_argument("run_dir", help="a run's output_dir")
    if command == "doctor":
        parser.add_argument("--json", action="store_true", help="print one JSON object (facts, checks, errors "
                            "against fp32, versions) instead of the text")
    if command == "train":
        parser.add_argument("--preset", default="", metavar="NAME",
                            help=f"a named recipe over the defaults: {', '.join(PRESETS)}")
        parser.add_argument("--config", default="", metavar="FILE",
                            help="a JSON file of field: value (a run's config.json works); flags override it")
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name in (f.name for f in fields(Config) if f.name in COMMAND_FIELDS[command]):  # Config's order
        group, text = field_docs()[name]  # a field without its comment fails here, loudly
        if group not in groups:
            groups[group] = parser.add_argument_group(group)
        add_field(groups[group], name, getattr(DEFAULTS, name), text)
    return parser


def trainer_hint(name: str) -> str:
    hint = TRAINER_NAMES[name]
    return f"that is the Trainer's name; here it is {hint}" if hint.startswith("--") else hint


def unknown_flag(command: str, token: str) -> ConfigError:
    """One line for what this command's parser did not take: a flag of another command, a Trainer name
    with its counterpart, or the closest flag (this command's first)."""
    see = f" (see `sentiment {command} --help`)"
    if not token.startswith("-"):
        return ConfigError(f"unexpected argument {token!r}; flags are written --name value{see}")
    flag = token.split("=")[0]
    if users(flag) and command not in users(flag):
        return ConfigError(f"{flag} is not used by `sentiment {command}`, only by {' and '.join(users(flag))}{see}")
    if flag.lstrip("-") in TRAINER_NAMES:
        return ConfigError(f"unknown flag {flag}: {trainer_hint(flag.lstrip('-'))}{see}")
    close = difflib.get_close_matches(flag, flag_names(command), n=1)
    if close:
        return ConfigError(f"unknown flag {flag}; did you mean {close[0]}?{see}")
    close = difflib.get_close_matches(flag, [f"--{f.name}" for f in fields(Config)], n=1)  # another command's
    return ConfigError(f"unknown flag {flag}" + (f"; {close[0]} is a flag of {' and '.join(users(close[0]))} only"
                                                 if close else "") + see)


def flag_names(command: str) -> list[str]:
    return [f"--{n}" for n in COMMAND_FIELDS[command] + (TRAIN_ONLY_OPTIONS if command == "train" else ())]


def users(flag: str) -> list[str]:  # the commands that take `flag`
    return [c for c in COMMANDS if flag in flag_names(c)]


def repeated_flags(argv: list[str]) -> list[str]:
    """A line for each flag given more than once: argparse keeps the last silently. Not an error, since a later
    flag overriding an earlier one is what `make train ARGS=...` and wrapper scripts rely on, but said."""
    values: dict[str, list[str]] = {}
    for i, token in enumerate(argv):
        if token == "--":  # what follows is arguments, never flags
            break
        if token.startswith("--"):
            flag, eq, value = token.partition("=")
            following = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else ""
            values.setdefault(flag, []).append(value if eq else following)
    return [f"{flag} is given {len(seen)} times ({', then '.join(v or 'bare' for v in seen)}); the last one is used"
            for flag, seen in values.items() if len(seen) > 1]


def parse(argv: list[str]) -> tuple[str, argparse.Namespace, Config | None]:
    """(command, parsed args, config) from the command line; raises ConfigError on any bad flag."""
    command = "train"
    if argv and not argv[0].startswith("-"):
        command = argv[0]
        argv = argv[1:]
        if command not in COMMANDS:
            close = difflib.get_close_matches(command, COMMANDS, n=1)
            raise ConfigError(f"unknown command {command!r}" + (f"; did you mean {close[0]}?" if close else "")
                              + f" (commands: {', '.join(COMMANDS)})")
    args, unknown = make_parser(command).parse_known_args(argv)
    if unknown:
        raise unknown_flag(command, next((u for u in unknown if u.startswith("-")), unknown[0]))
    if command == "plot":
        return command, args, None
    if command in ("evaluate", "predict") and args.model_name_or_path is None:  # never the base model's random head
        raise ConfigError(f"sentiment {command} needs --model_name_or_path: a run folder or the model folder in it "
                          "(RUN or RUN/model)")
    # fields this command does not read keep their defaults: they change nothing it does
    overrides = {n: getattr(args, n) for n in COMMAND_FIELDS[command] if getattr(args, n) is not None}
    return command, args, build_config(getattr(args, "preset", ""), getattr(args, "config", ""), overrides)


def overview() -> str:
    """What `sentiment` alone and `sentiment --help` print: the commands, each with its first line of help."""
    width = max(len(c) for c in COMMANDS)
    lines = [f"  {c:<{width}}  {SUMMARY[c]}" for c in COMMANDS]
    return "\n".join(["usage: sentiment COMMAND [--FLAG VALUE ...]", "", "commands:", *lines, "",
                      "`sentiment COMMAND --help` lists a command's flags, with examples. "
                      "README.md (section Config) has every flag in one table."])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):  # never a default training run the user did not ask for
        print(overview())
        return 0
    try:
        command, args, cfg = parse(argv)
        console("stdout" if command in ("train", "pretrain") else "stderr")  # predict, evaluate: only results on stdout
        for note in repeated_flags(argv):
            LOG.warning(f"note: {note}")
        if cfg is not None and command != "doctor":  # the doctor reports the hub's state, and changes nothing
            from sentiment.hub import offline_if_unreachable
            note = offline_if_unreachable(cfg, command)  # before transformers/datasets are imported
            if note:
                LOG.info(note)
        if command == "train":
            from sentiment.train import train
            train(cfg)
        elif command == "pretrain":
            from sentiment.pretrain import pretrain
            pretrain(cfg)
        elif command == "evaluate":
            from sentiment.commands import evaluate_command
            evaluate_command(cfg, args.output)
        elif command == "predict":
            from sentiment.commands import predict_command
            predict_command(cfg, args.texts, args.input, args.output)
        elif command == "plot":
            from sentiment.report import redraw
            for path in redraw(args.run_dir):
                print(path)
        elif command == "doctor":
            from sentiment.doctor import doctor_command
            doctor_command(cfg.device, cfg.precision, args.json)
    except SentimentError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
