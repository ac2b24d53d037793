"""Named recipes (presets) and how a Config is built from them: defaults < `--preset NAME` <
`--config FILE.json` < `--field value` flags, each value coerced through its field's type.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import fields
from pathlib import Path

from sentiment.config import AUTO, TYPE_NAMES, Config, field_types, is_int
from sentiment.errors import ConfigError

# Sun et al. 2019 ("How to Fine-Tune BERT for Text Classification") on IMDb: all 25,000 reviews (10% held out
# to pick the best epoch, as they do), 512 tokens as head+tail, lr 2e-5 with 10% warmup, layer-wise lr decay
# 0.95, and their 4 epochs, of which the best on validation is kept. Batch 32
# (theirs is 24): micro-batch auto, the largest divisor of 32 that fits.
SUN_IMDB = {"n_train": 0, "n_test": 0, "val_fraction": 0.1, "max_length": 512, "truncation": "head_tail",
            "epochs": 4, "lr": 2e-5, "warmup_ratio": 0.1, "weight_decay": 0.01, "layer_lr_decay": 0.95,
            "global_batch_size": 32, "micro_batch_size": 0}

# Named recipes: each is a partial dict of fields applied over the defaults.
PRESETS: dict[str, dict] = {
    # The Hugging Face tutorial, exactly: the defaults above.
    "tutorial": {},
    # The tutorial's data and hyperparameters, but select the model on a held-out 10% of train.
    "tutorial_val": {"val_fraction": 0.1},
    # A full-data fine-tune of bert-base-uncased, Sun et al.'s recipe (above).
    "full": dict(SUN_IMDB),
    # The same recipe on an encoder further pre-trained on IMDb text (Sun et al.'s ITPT): by default the model of
    # `sentiment pretrain --output_dir runs/mlm` (the README's commands); another with --model_name_or_path.
    "full_pretrained": {**SUN_IMDB, "model_name_or_path": "runs/mlm/model"},
    # A laptop-sized run: all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT, 22M parameters) on 2,000 reviews at 256
    # tokens (head+tail), 2 epochs, 10% held out; bf16 where the CPU has it (precision auto decides).
    "cpu_minilm": {"model_name_or_path": "sentence-transformers/all-MiniLM-L6-v2", "n_train": 2000,
                   "val_fraction": 0.1, "max_length": 256, "truncation": "head_tail", "epochs": 2, "lr": 5e-5,
                   "micro_batch_size": 16, "warmup_ratio": 0.1, "weight_decay": 0.01},
}



# JSON values a config file may hold per field type: 2.0 is an integer, `true` is not 1, a list is no path
JSON_TYPE_OK = {
    bool: lambda v: isinstance(v, bool),
    int: lambda v: is_int(v) or (isinstance(v, float) and v.is_integer()),
    float: lambda v: is_int(v) or isinstance(v, float),
    str: lambda v: isinstance(v, str),
}


def check_file_types(data: dict, path: str) -> None:
    """A config file's values must have their field's JSON type: coercing them like CLI strings would
    turn `true` into 1 and a list into a path string."""
    for key, value in data.items():
        kind = field_types()[key]
        if not JSON_TYPE_OK[kind](value) and not (key in AUTO and value == "auto"):
            raise ConfigError(f"config file {path}: {key!r} expects {TYPE_NAMES[kind]}, got {json.dumps(value)}; "
                              "fix that value")


def coerce(name: str, value: object) -> object:
    """Convert a CLI string or a JSON value to the type of field `name`."""
    kind = field_types()[name]
    if name in AUTO and str(value).strip().lower() == "auto":
        return AUTO[name]
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{name} expects true or false, got {value!r}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"--{name} expects an integer, got {value!r}")
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--{name} expects {kind.__name__}, got {value!r}") from None


def _check_keys(keys, source: str) -> None:
    names = [f.name for f in fields(Config)]
    for key in keys:
        if key not in names:
            close = difflib.get_close_matches(key, names, n=1)
            hint = f"; did you mean {close[0]}?" if close else "; see `sentiment train --help`"
            raise ConfigError(f"unknown config key {key!r} in {source}{hint}")


def load_config_file(path: str) -> dict:
    """Read a JSON config file (a previous run's config.json works too)."""
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist; check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"config file {path} is not readable JSON ({e}); fix it") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object of field: value")
    return data


def build_config(preset: str = "", config_file: str = "", overrides: dict | None = None) -> Config:
    """Defaults < preset < config file < overrides (already parsed CLI flags, as strings or values)."""
    values: dict = {}
    if preset:
        if preset not in PRESETS:
            close = difflib.get_close_matches(preset, list(PRESETS), n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigError(f"unknown preset {preset!r}; {hint}choose one of {', '.join(PRESETS)}")
        values.update(PRESETS[preset])
    if config_file:
        file_values = load_config_file(config_file)
        _check_keys(file_values, config_file)
        check_file_types(file_values, config_file)
        values.update(file_values)
    _check_keys(overrides or {}, "the command line")
    values.update(overrides or {})
    return Config(**{k: coerce(k, v) for k, v in values.items()})
