"""The `sentiment` command: parse flags, build the config, call.

    sentiment train [--preset NAME] [--config FILE.json] [--FIELD VALUE ...]
    sentiment evaluate --model_name_or_path DIR [--test_file F | --data_dir D] [--FIELD VALUE ...]
    sentiment predict "review one" "review two" --model_name_or_path DIR
    sentiment plot OUTPUT_DIR

Every Config field is a flag spelled exactly like the field; `python -m sentiment` is the same.
"""

from __future__ import annotations

import argparse
import difflib
import sys
from dataclasses import fields

from sentiment.config import PRESETS, Config, build_config
from sentiment.errors import ConfigError, SentimentError
from sentiment.runlog import LOG, console

COMMANDS = ("train", "evaluate", "predict", "plot")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):
        """A bad command line is one `error:` line from main(), not argparse's usage block and exit."""
        raise ConfigError(f"{message} (see `{self.prog} --help`)")


def make_parser(command: str) -> argparse.ArgumentParser:
    parser = _Parser(prog=f"sentiment {command}", allow_abbrev=False,
                     description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    if command == "predict":
        parser.add_argument("texts", nargs="+", help="review texts to classify")
    if command == "plot":
        parser.add_argument("run_dir", help="a finished run's output_dir")
        return parser
    parser.add_argument("--preset", default="", help=f"named recipe: {', '.join(PRESETS)}")
    parser.add_argument("--config", default="", help="JSON file of field: value (a run's config.json works)")
    for f in fields(Config):
        # every value arrives as a string and is coerced through the field's type in build_config;
        # a bare boolean flag (`--compile`) means true
        parser.add_argument(f"--{f.name}", default=None, metavar=f.type.upper() if f.type != "bool" else "BOOL",
                            nargs="?" if f.type == "bool" else None, const="true" if f.type == "bool" else None,
                            help=f"default: {f.default!r}")
    return parser


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
    parser = make_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        flag = next((u for u in unknown if u.startswith("-")), unknown[0])
        names = [f"--{f.name}" for f in fields(Config)] + ["--preset", "--config"]
        close = difflib.get_close_matches(flag.split("=")[0], names, n=1)
        raise ConfigError(f"unknown flag {flag}" + (f"; did you mean {close[0]}?" if close else "")
                          + f" (see `sentiment {command} --help`)")
    if command == "plot":
        return command, args, None
    overrides = {f.name: getattr(args, f.name) for f in fields(Config) if getattr(args, f.name) is not None}
    return command, args, build_config(args.preset, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        command, args, cfg = parse(argv)
        console("stdout" if command == "train" else "stderr")  # predict, evaluate: stdout holds only results
        if cfg is not None:
            from sentiment.hub import offline_if_unreachable
            note = offline_if_unreachable(cfg, command)  # before transformers/datasets are imported
            if note:
                LOG.info(note)
        if command == "train":
            from sentiment.train import train
            train(cfg)
        elif command == "evaluate":
            from sentiment.commands import evaluate_saved
            evaluate_saved(cfg, getattr(args, "output", ""))
        elif command == "predict":
            from sentiment.commands import predict_command
            predict_command(cfg, args.texts, getattr(args, "input", ""), getattr(args, "output", ""))
        elif command == "plot":
            from sentiment.report import plot_run
            for path in plot_run(args.run_dir):
                print(path)
    except SentimentError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0
