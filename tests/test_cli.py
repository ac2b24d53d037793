"""cli.py: --help built from Config's own comments, each command's own flags, and one-line hints for
flags from another command or from the Hugging Face Trainer."""

import re
import shlex
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

import pytest

from sentiment import cli
from sentiment.cli import (ABOUT, COMMAND_FIELDS, COMMANDS, EVALUATE_FIELDS, PREDICT_FIELDS, TRAINER_NAMES, main,
                           parse)
from sentiment.config import Config, field_docs
from sentiment.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
FIELDS = [f.name for f in fields(Config)]
GROUPS = ("data", "model", "optimization", "system", "pretraining")
TRAINING_ONLY = ("lr", "epochs", "micro_batch_size", "output_dir", "resume", "warmup_ratio", "n_train", "val_fraction")


def help_text(command: str, monkeypatch) -> str:
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse wraps (and splits at hyphens) otherwise
    return cli.make_parser(command).format_help()


def sections(text: str) -> dict[str, list[str]]:
    """{section heading: the --flags listed under it} of an argparse help text."""
    out, heading = {}, None
    for line in text.splitlines():
        if re.fullmatch(r"[a-z ]+:", line):
            heading = line[:-1]
            out[heading] = []
        elif heading and (m := re.match(r"  (--\w+)", line)):
            out[heading].append(m.group(1))
    return out


def entry(text: str, name: str) -> str:
    """The help entry of --name, whitespace collapsed: a long flag puts its help on the next line."""
    lines = text.splitlines()
    i = next(i for i, line in enumerate(lines) if line.startswith(f"  --{name} ") or line == f"  --{name}")
    more = [line for line in lines[i + 1:i + 2] if line.startswith(" " * 4)]
    return " ".join(" ".join([lines[i], *more]).split())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


# ----------------------------------------------------------------------------- which flags each command takes


@pytest.mark.parametrize("names", [EVALUATE_FIELDS, PREDICT_FIELDS], ids=["evaluate", "predict"])
def test_command_field_sets_are_config_fields(names):
    assert set(names) <= set(FIELDS), set(names) - set(FIELDS)
    assert len(set(names)) == len(names)


def test_every_field_has_a_group_and_a_meaning():
    assert list(field_docs()) == FIELDS
    assert all(group in GROUPS and text for group, text in field_docs().values())


@pytest.mark.parametrize("command", ["train", "pretrain", "evaluate", "predict"])
def test_help_gives_each_flag_its_meaning_and_default_from_field_docs(command, monkeypatch):
    text = help_text(command, monkeypatch)
    for name in COMMAND_FIELDS[command]:
        shown = entry(text, name)
        assert shown.endswith(f" {field_docs()[name][1]} (default: {cli.shown(getattr(Config(), name))})"), shown


def test_defaults_are_shown_as_typed():
    text = cli.make_parser("train").format_help()
    flat = " ".join(text.split())
    for shown in ['(default: "stanfordnlp/imdb")', '(default: "")', "(default: 5e-05)", "(default: true)",
                  "(default: false)", "(default: 3)", "wastes ~46%)"]:  # argparse's %-formatting is escaped
        assert shown in flat


def test_narrow_terminals_never_split_a_value_at_its_hyphen(monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    text = cli.make_parser("predict").format_help()
    assert '"bert-base-uncased"' in text and "max_length-130" in text


def test_cli_holds_no_copy_of_the_help_text():
    source = (REPO / "sentiment" / "cli.py").read_text()
    copied = [text for _, text in field_docs().values() if text in source]
    assert not copied, f"cli.py repeats Config's comments: {copied}"


COMMAND_OPTIONS = {"train": ["--preset", "--config"], "pretrain": [], "evaluate": ["--output"],
                   "predict": ["--input", "--output"]}


@pytest.mark.parametrize("command", ["train", "pretrain", "evaluate", "predict"])
def test_flags_are_grouped_as_in_config(command, monkeypatch):
    listed = sections(help_text(command, monkeypatch))
    for group in GROUPS:
        expected = [f"--{n}" for n in FIELDS if n in COMMAND_FIELDS[command] and field_docs()[n][0] == group]
        assert listed.get(group, []) == expected
    assert listed["options"] == COMMAND_OPTIONS[command]
    assert [h for h in listed if h in GROUPS] == [g for g in GROUPS if g in listed]  # in Config's order


@pytest.mark.parametrize("command", ["evaluate", "predict"])
def test_evaluate_and_predict_list_no_training_flag(command, monkeypatch):
    text = help_text(command, monkeypatch)
    named = set(re.findall(r"--\w+", text))  # usage, examples and epilog included
    assert named <= {f"--{n}" for n in COMMAND_FIELDS[command]} | {"--help", "--FLAG", *COMMAND_OPTIONS[command]}
    assert not {"--lr", "--epochs", "--preset", "--config", "--output_dir"} & named


def test_examples_in_the_help_are_valid_command_lines(tmp_path):
    for command, about in ABOUT.items():
        lines = about.replace("\\\n", " ").splitlines()
        examples = [shlex.split(line, comments=True) for line in lines if line.strip().startswith("sentiment ")]
        assert len(examples) == 2, command
        for argv in examples:
            argv = [a.replace("$MINILM", str(tmp_path)) for a in argv[1:]]
            assert parse(argv)[0] == command


def test_adding_a_field_to_a_command_is_one_name(monkeypatch):
    monkeypatch.setitem(cli.COMMAND_FIELDS, "predict", PREDICT_FIELDS + ("seed",))
    assert "  --seed " in help_text("predict", monkeypatch)
    assert parse(["predict", "fine", "--seed", "7", "--model_name_or_path", "m"])[2].seed == 7


def test_evaluate_and_predict_take_their_flags():
    command, _, cfg = parse(["evaluate", "--model_name_or_path", "m", "--test_file", "t.jsonl", "--n_test", "7",
                             "--seed", "3", "--compile", "--precision", "fp32"])
    assert command == "evaluate"
    assert (cfg.model_name_or_path, cfg.test_file, cfg.n_test, cfg.seed, cfg.compile) == ("m", "t.jsonl", 7, 3, True)
    assert cfg.lr == Config().lr and cfg.output_dir == Config().output_dir
    command, args, cfg = parse(["predict", "great", "awful", "--max_length", "64", "--truncation", "tail",
                                "--model_name_or_path", "m"])
    assert args.texts == ["great", "awful"] and (cfg.max_length, cfg.truncation) == (64, "tail")


# ----------------------------------------------------------------------------- one line for a misplaced flag


@pytest.mark.parametrize("command, name", [(c, n) for c in ("evaluate", "predict")
                                           for n in FIELDS + ["preset", "config"] if n not in COMMAND_FIELDS[c]])
def test_a_flag_of_another_command_is_one_line_naming_it(command, name, capsys):
    argv = [command, *(["great"] if command == "predict" else []), f"--{name}", "1"]
    assert main(argv) == 2
    users = " and ".join(c for c in ("train", "pretrain", "evaluate")
                         if name in COMMAND_FIELDS[c] or (c == "train" and name in ("preset", "config")))
    assert one_error_line(capsys) == (f"--{name} is not used by `sentiment {command}`, only by {users} "
                                      f"(see `sentiment {command} --help`)")


def test_training_flag_to_predict(capsys):
    assert main(["predict", "a fine film", "--lr", "1e-4"]) == 2
    assert one_error_line(capsys) == "--lr is not used by `sentiment predict`, only by train and pretrain " \
                                     "(see `sentiment predict --help`)"


# ----------------------------------------------------------------------------- the Trainer's names

RENAMED = {  # the Trainer's name: ours (the table)
    "learning_rate": "--lr", "num_train_epochs": "--epochs", "per_device_train_batch_size": "--micro_batch_size",
    "per_device_eval_batch_size": "--eval_batch_size", "gradient_accumulation_steps": "--grad_accum_steps",
    "logging_steps": "--log_every", "save_total_limit": "--keep_last", "save_steps": "--save_every",
    "fp16": "--precision fp16", "bf16": "--precision bf16", "resume_from_checkpoint": "--resume",
    "adam_epsilon": "--adam_eps", "dataloader_num_workers": "--num_workers", "torch_compile": "--compile",
}
SAME_NAMES = {"warmup_ratio": "0.1", "seed": "7", "output_dir": "x", "weight_decay": "0.01", "max_grad_norm": "0.5",
              "report_to": "none", "group_by_length": "false", "gradient_checkpointing": "true"}


@pytest.mark.parametrize("name", sorted(TRAINER_NAMES))
def test_each_trainer_name_gets_its_hint(name, capsys):
    assert main(["train", f"--{name}", "1"]) == 2
    err = one_error_line(capsys)
    assert err == f"unknown flag --{name}: {cli.trainer_hint(name)} (see `sentiment train --help`)"
    assert "did you mean" not in err
    assert set(re.findall(r"--\w+", cli.trainer_hint(name))) <= {f"--{n}" for n in FIELDS}  # only real flags


@pytest.mark.parametrize("name, ours", RENAMED.items())
def test_renamed_trainer_flags_name_ours(name, ours):
    assert cli.trainer_hint(name).startswith(f"that is the Trainer's name; here it is {ours}")


def test_trainer_hints_for_what_has_no_one_flag():
    for name in ("eval_strategy", "evaluation_strategy", "save_strategy"):
        assert cli.trainer_hint(name).startswith("evaluation and a checkpoint happen at every epoch end")
    assert "best model by validation accuracy is always loaded" in cli.trainer_hint("load_best_model_at_end")
    assert "--val_fraction > 0" in cli.trainer_hint("load_best_model_at_end")


def test_batch_size_names_the_global_batch(capsys):
    assert main(["--batch_size", "16"]) == 2
    assert one_error_line(capsys) == ("unknown flag --batch_size: the global batch is --global_batch_size, or "
                                      "--micro_batch_size x --grad_accum_steps x processes; for evaluation "
                                      "--eval_batch_size "
                                      "(see `sentiment train --help`)")


def test_names_the_trainer_shares_with_us_just_work():
    _, _, cfg = parse([arg for name, value in SAME_NAMES.items() for arg in (f"--{name}", value)])
    assert {name: str(getattr(cfg, name)).lower() for name in SAME_NAMES} == SAME_NAMES
    assert not set(SAME_NAMES) & set(TRAINER_NAMES)


# ----------------------------------------------------------------------------- what worked before still works


def test_bare_boolean_flag_means_true():
    assert parse(["--compile"])[2].compile is True
    assert parse(["--compile", "false", "--epochs", "1"])[2].compile is False
    assert parse(["evaluate", "--compile", "--model_name_or_path", "m"])[2].compile is True


def test_unknown_flag_close_match_and_unknown_command(capsys):
    assert main(["train", "--epoch", "3"]) == 2
    assert one_error_line(capsys) == "unknown flag --epoch; did you mean --epochs? (see `sentiment train --help`)"
    assert main(["evaluate", "--n_tset", "3"]) == 2
    assert one_error_line(capsys) == "unknown flag --n_tset; did you mean --n_test? (see `sentiment evaluate --help`)"
    assert main(["evaluate", "--epoch", "3"]) == 2
    assert one_error_line(capsys).startswith("unknown flag --epoch; --epochs is a flag of train and pretrain only")
    assert main(["trian"]) == 2
    assert one_error_line(capsys) == "unknown command 'trian'; did you mean train? (commands: train, pretrain, " \
                                     "evaluate, predict, plot, doctor)"
    assert main(["train", "stray"]) == 2
    assert one_error_line(capsys).startswith("unexpected argument 'stray'")


def test_evaluate_and_predict_need_a_model(capsys):
    """Never the default bert-base-uncased with an untrained head: that would score reviews at random."""
    for command in (["evaluate"], ["predict", "fine"]):
        assert main(command) == 2
        assert one_error_line(capsys).startswith(f"sentiment {command[0]} needs --model_name_or_path")


def test_predict_needs_texts_or_an_input_file(capsys):
    for argv in ([], ["a", "--input", "reviews.csv"]):
        assert main(["predict", "--model_name_or_path", "m", *argv]) == 2
        assert one_error_line(capsys).startswith("predict takes review texts as arguments or --input FILE")


def test_help_from_a_real_process():
    proc = subprocess.run([sys.executable, "-m", "sentiment", "predict", "--help"], capture_output=True, text=True,
                          cwd=REPO, timeout=60, env={"PYTHONPATH": str(REPO), "COLUMNS": "120"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: sentiment predict (TEXT [TEXT ...] | --input FILE)")
    assert "system:" in proc.stdout and "--lr" not in proc.stdout


@pytest.mark.parametrize("argv", [[], ["--help"], ["-h"]], ids=["bare", "--help", "-h"])
def test_sentiment_alone_and_its_help_list_the_commands_and_start_nothing(argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default run would write runs/latest here
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: sentiment COMMAND")
    listed = [line.split()[0] for line in out.splitlines() if line.startswith("  ")]
    assert listed == list(COMMANDS)
    assert list(tmp_path.iterdir()) == []


def test_config_takes_auto_for_the_micro_batch_as_the_command_line_does():
    assert Config(micro_batch_size="auto") == Config(micro_batch_size=0) == parse(["--micro_batch_size", "auto"])[2]
    with pytest.raises(ConfigError, match="micro_batch_size='big' must be an integer"):
        Config(micro_batch_size="big")
