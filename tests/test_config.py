"""config.py and cli.parse: tutorial defaults, precedence, coercion, and every invalid value refused."""

import dataclasses
import json
import re

import pytest

from sentiment.cli import parse
from sentiment.config import Config, resume_conflicts
from sentiment.presets import PRESETS, build_config, coerce
from sentiment.errors import ConfigError


def test_defaults_are_the_tutorials():
    cfg = Config()
    assert cfg.model_name_or_path == "bert-base-uncased"
    assert cfg.dataset == "stanfordnlp/imdb" and cfg.dataset_id == "stanfordnlp/imdb"
    assert (cfg.n_train, cfg.n_test, cfg.val_fraction) == (1000, 500, 0.0)
    assert (cfg.max_length, cfg.truncation) == (512, "head")
    assert (cfg.micro_batch_size, cfg.grad_accum_steps, cfg.epochs) == (8, 1, 3)
    assert (cfg.lr, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_eps) == (5e-5, 0.9, 0.999, 1e-8)
    assert (cfg.weight_decay, cfg.warmup_ratio, cfg.max_grad_norm, cfg.seed) == (0.0, 0.0, 1.0, 42)
    assert not cfg.train_file and not cfg.test_file and not cfg.data_dir


def test_tutorial_preset_is_the_defaults():
    assert build_config("tutorial") == Config()
    assert parse([])[2] == Config()
    assert parse(["train"])[2] == Config()


def test_imdb_alias():
    assert Config(dataset="imdb").dataset_id == "stanfordnlp/imdb"
    assert Config(dataset="someone/else").dataset_id == "someone/else"


def test_required_fields_exist_with_these_names():
    names = {f.name for f in dataclasses.fields(Config)}
    assert {"dataset", "train_file", "test_file", "data_dir", "n_train", "n_test", "val_fraction", "max_length",
            "truncation", "padding", "group_by_length", "model_name_or_path", "epochs", "micro_batch_size",
            "grad_accum_steps", "eval_batch_size", "lr", "weight_decay", "warmup_ratio", "max_grad_norm", "seed",
            "device", "precision", "num_workers", "output_dir", "log_every"} <= names


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().lr = 1.0


def test_precedence_defaults_preset_file_cli(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"lr": 1e-4, "epochs": 5, "seed": 7}))
    preset = PRESETS["full"]
    assert preset["lr"] == 2e-5 and preset["epochs"] == 4
    cfg = build_config("full", str(file), {"epochs": "4"})
    assert cfg.epochs == 4  # CLI beats file beats preset
    assert cfg.lr == 1e-4 and cfg.seed == 7  # file beats preset and defaults
    assert cfg.warmup_ratio == 0.1 and cfg.n_train == 0  # preset beats defaults
    assert cfg.adam_eps == 1e-8  # untouched default
    # the same through the command line
    _, _, cli = parse(["train", "--preset", "full", "--config", str(file), "--epochs", "4"])
    assert cli == cfg
    _, _, cli = parse(["--preset", "full", "--lr", "3e-5"])
    assert cli.lr == 3e-5 and cli.weight_decay == 0.01


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_builds_a_valid_config(name):
    cfg = build_config(name)
    assert {k: getattr(cfg, k) for k in PRESETS[name]} == PRESETS[name]


def test_the_full_presets_are_sun_et_al_on_imdb():
    cfg = build_config("full")
    assert (cfg.n_train, cfg.val_fraction, cfg.max_length, cfg.truncation) == (0, 0.1, 512, "head_tail")
    assert (cfg.lr, cfg.warmup_ratio, cfg.weight_decay, cfg.layer_lr_decay) == (2e-5, 0.1, 0.01, 0.95)
    assert (cfg.global_batch_size, cfg.micro_batch_size) == (32, 0)  # micro-batch auto
    # the same recipe on `sentiment pretrain --output_dir runs/mlm`'s model (the README's commands)
    assert build_config("full_pretrained") == dataclasses.replace(cfg, model_name_or_path="runs/mlm/model")


def test_a_model_path_that_does_not_exist_is_named_as_a_path(tmp_path):
    """`runs/mlm/model` before `sentiment pretrain` wrote it: not 'could not load from the Hugging Face hub'."""
    from sentiment.errors import ModelError
    from sentiment.model import load_checked

    for name in ("runs/mlm/model", str(tmp_path / "missing"), "./model"):
        with pytest.raises(ModelError, match=f"could not load the tokenizer '{name}': there is no such folder"):
            load_checked(name, 128)


def test_the_cpu_minilm_preset_parses_on_the_command_line():
    _, _, cfg = parse(["train", "--preset", "cpu_minilm", "--epochs", "1"])
    assert cfg.model_name_or_path == "sentence-transformers/all-MiniLM-L6-v2" and cfg.epochs == 1
    assert (cfg.n_train, cfg.max_length, cfg.truncation, cfg.precision) == (2000, 256, "head_tail", "auto")


@pytest.mark.parametrize("value", [-0.1, 1.5])
def test_layer_lr_decay_is_a_factor_in_0_1(value):
    with pytest.raises(ConfigError, match=rf"^layer_lr_decay={value} must be in \[0, 1\]"):
        Config(layer_lr_decay=value)
    assert Config(layer_lr_decay=1).layer_lr_decay == 1.0  # off, like 0


def test_a_runs_config_json_is_a_valid_config_file(tmp_path):
    cfg = Config(lr=1e-4, truncation="tail", group_by_length=False)
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    assert build_config(config_file=str(tmp_path / "config.json")) == cfg


def test_coercion_from_strings():
    _, _, cfg = parse(["--lr", "1e-4", "--epochs", "2", "--group_by_length", "false", "--compile",
                       "--shuffle", "0", "--val_fraction", ".1", "--device", "cpu", "--n_train", "0"])
    assert cfg.lr == 1e-4 and isinstance(cfg.lr, float)
    assert cfg.epochs == 2 and isinstance(cfg.epochs, int)
    assert cfg.group_by_length is False and cfg.compile is True and cfg.shuffle is False
    assert cfg.val_fraction == 0.1 and cfg.device == "cpu" and cfg.n_train == 0


@pytest.mark.parametrize("text, value", [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                         ("false", False), ("0", False), ("no", False), ("OFF", False)])
def test_bool_coercion(text, value):
    assert coerce("overwrite", text) is value


def test_json_values_are_coerced(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"lr": 1, "epochs": 2.0, "overwrite": True, "max_length": 256}))
    cfg = build_config(config_file=str(file))
    assert isinstance(cfg.lr, float) and cfg.lr == 1.0
    assert isinstance(cfg.epochs, int) and cfg.epochs == 2
    assert cfg.overwrite is True and cfg.max_length == 256


@pytest.mark.parametrize("key, value, expected", [
    ("save_every", True, "an integer"), ("epochs", "2", "an integer"), ("keep_last", 2.5, "an integer"),
    ("dataset", ["a", "b"], "a string"), ("output_dir", {"a": 1}, "a string"), ("lr", "1e-4", "a number"),
    ("lr", False, "a number"), ("overwrite", 1, "true or false"), ("overwrite", "true", "true or false"),
    ("seed", None, "an integer"),
])
def test_config_file_values_must_have_the_fields_json_type(tmp_path, key, value, expected):
    """CLI strings are coerced; a JSON file already has types, and `true` for an int or a list for a path
    is a mistake in the file, not something to convert."""
    file = tmp_path / "c.json"
    file.write_text(json.dumps({key: value}))
    with pytest.raises(ConfigError, match=re.escape(f"config file {file}: {key!r} expects {expected}, "
                                                    f"got {json.dumps(value)}; fix that value")):
        build_config(config_file=str(file))


def test_a_bad_file_value_is_refused_even_when_the_command_line_overrides_it(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"epochs": True}))
    with pytest.raises(ConfigError, match="'epochs' expects an integer, got true"):
        build_config(config_file=str(file), overrides={"epochs": "2"})


@pytest.mark.parametrize("name, value", [("epochs", "two"), ("epochs", "1.5"), ("lr", "fast"),
                                         ("overwrite", "maybe"), ("n_train", "")])
def test_bad_coercion(name, value):
    with pytest.raises(ConfigError, match=name):
        coerce(name, value)


def test_non_integer_float_for_int_field_in_file(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"epochs": 1.5}))
    with pytest.raises(ConfigError, match="'epochs' expects an integer, got 1.5"):
        build_config(config_file=str(file))


def test_unknown_flag_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"^unknown flag --epoch; did you mean --epochs\?"):
        parse(["--epoch", "3"])
    with pytest.raises(ConfigError, match="did you mean --micro_batch_size"):
        parse(["--micro_batch_sze", "8"])
    with pytest.raises(ConfigError, match="did you mean --max_length"):
        parse(["train", "--max_lenght=128"])


def test_unknown_key_in_file_suggests_the_close_one(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"warmup_ration": 0.1}))
    with pytest.raises(ConfigError, match=r"unknown config key 'warmup_ration'.*did you mean warmup_ratio"):
        build_config(config_file=str(file))
    with pytest.raises(ConfigError, match="did you mean seed"):
        build_config(overrides={"sed": 1})


def test_unknown_preset_and_command():
    with pytest.raises(ConfigError, match="did you mean tutorial"):
        build_config("tutorail")
    with pytest.raises(ConfigError, match="did you mean train"):
        parse(["trian"])


@pytest.mark.parametrize("content, match", [(None, "does not exist"), ("{not json", "not readable JSON"),
                                            ("[1, 2]", "JSON object")])
def test_bad_config_file(tmp_path, content, match):
    file = tmp_path / "c.json"
    if content is not None:
        file.write_text(content)
    with pytest.raises(ConfigError, match=match):
        build_config(config_file=str(file))


INVALID = [
    ("n_train", -1), ("n_test", -5), ("epochs", 0), ("epochs", -1), ("micro_batch_size", -1), ("global_batch_size", -8),
    ("grad_accum_steps", 0), ("eval_batch_size", 0), ("max_length", 0), ("max_length", 4), ("lr", 0.0),
    ("lr", -1e-5), ("lr", float("nan")), ("weight_decay", -0.1), ("max_grad_norm", -1.0), ("adam_eps", 0.0),
    ("val_fraction", 1.0), ("val_fraction", -0.1), ("warmup_ratio", 1.5), ("adam_beta1", 1.0),
    ("adam_beta2", -0.5), ("dropout", 1.0), ("dropout", -0.5), ("truncation", "middle"),
    ("padding", "longest"), ("precision", "fp8"), ("device", "gpu"), ("device", "cuda:x"), ("report_to", "wandb"),
    ("num_workers", -1), ("log_every", -1), ("save_every", -1), ("keep_last", -1), ("max_steps", -1), ("eval_every", -1), ("seed", -1),
    ("max_bad_steps", 0), ("output_dir", ""),
    # non-finite floats: inf/nan slip past `x < 0` checks and poison the run later
    ("lr", float("inf")), ("weight_decay", float("nan")), ("max_grad_norm", float("nan")), ("adam_eps", float("inf")),
    ("warmup_ratio", float("nan")), ("val_fraction", float("nan")), ("dropout", float("nan")),
    ("adam_beta2", float("-inf")), ("seed", 2**32), ("seed", 99999999999),
    # wrong Python types, as from code building a Config directly
    ("epochs", "2"), ("lr", "x"), ("epochs", True), ("epochs", 2.0), ("overwrite", 1), ("output_dir", ["a"]),
    ("max_length", None), ("lr", True),
]


@pytest.mark.parametrize("name, value", INVALID)
def test_invalid_values_raise_config_error(name, value):
    with pytest.raises(ConfigError, match=name):
        Config(**{name: value})


@pytest.mark.parametrize("kwargs, message", [
    ({"lr": float("inf")}, "lr=inf must be a finite number"),
    ({"weight_decay": float("nan")}, "weight_decay=nan must be a finite number"),
    ({"seed": 2**32}, "seed=4294967296 must be in 0..4294967295 (numpy's seed range)"),
    ({"epochs": "2"}, "epochs='2' must be an integer, got str"),
    ({"lr": "x"}, "lr='x' must be a number, got str"),
    ({"epochs": True}, "epochs=True must be an integer, got bool"),
    ({"overwrite": 1}, "overwrite=1 must be true or false, got int"),
])
def test_invalid_value_messages(kwargs, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        Config(**kwargs)


def test_an_int_for_a_float_field_becomes_a_float():
    cfg = Config(lr=1, weight_decay=0, seed=2**32 - 1)
    assert type(cfg.lr) is float and cfg.lr == 1.0 and type(cfg.weight_decay) is float
    assert cfg.seed == 2**32 - 1  # the top of numpy's range is fine


@pytest.mark.parametrize("argv, message", [
    (["--lr", "inf"], "lr=inf must be a finite number"), (["--adam_eps", "inf"], "adam_eps=inf must be a finite"),
    (["--max_grad_norm", "nan"], "max_grad_norm=nan must be a finite"), (["--seed", "99999999999"], "seed=99999999999"),
])
def test_non_finite_and_out_of_range_flags(argv, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(argv)


def test_invalid_value_from_the_command_line():
    with pytest.raises(ConfigError, match="lr=-1.0 must be > 0"):
        parse(["--lr", "-1"])


def test_head_tail_needs_room_for_its_head():
    with pytest.raises(ConfigError, match="head_tail"):
        Config(truncation="head_tail", max_length=128)
    assert Config(truncation="head_tail", max_length=132).max_length == 132


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:0", "cuda:3", "mps"])
def test_valid_devices(device):
    assert Config(device=device).device == device


def test_resume_conflicts_list_the_fields_that_matter():
    saved = Config(lr=1e-4).to_dict()
    assert resume_conflicts(saved, Config(lr=2e-4, log_every=3, output_dir="x")) == ["lr"]
    assert resume_conflicts(saved, Config(lr=1e-4, eval_batch_size=7)) == []


def test_a_field_added_since_a_run_was_saved_counts_as_its_default():
    """A checkpoint of an older version lacks the fields added since (max_steps, ...): that run behaved as
    their defaults, so resuming it with the defaults is no conflict, and with another value it is."""
    saved = {k: v for k, v in Config(lr=1e-4).to_dict().items() if k not in ("max_steps", "layer_lr_decay")}
    assert resume_conflicts(saved, Config(lr=1e-4)) == []
    assert resume_conflicts(saved, Config(lr=1e-4, max_steps=7)) == ["max_steps"]
