"""Bad input fails at second 1 with one clear line: for each case, a nonzero exit, exactly one
`error: ...` line on stderr naming the problem, no traceback, and an existing run left untouched."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import snapshot, subprocess_env, write

from sentiment.cli import main

# a whole tqdm redraw from a library ("Loading weights: 100%|####| 41/41 [00:00<00:00, 9.1it/s]",
# "Generating train split: 2 examples [00:00, 9.5 examples/s]"): a progress bar, not a message
PROGRESS = re.compile(r"[\w .-]*: *(\d+%\|[^|]*\| *)?\d+(/\d+)?( \w+)? \[[^\]]*\]")


DIAGNOSTIC = re.compile(r"(engine|settings|family): ")

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def error_line(stderr: str) -> str:
    """The one `error:` line of stderr; fails if there is a traceback, another message, or not exactly one."""
    assert "Traceback" not in stderr, stderr
    lines = [line for line in re.split(r"[\r\n]+", stderr) if line.strip()]
    # evaluate and predict say what they decided on stderr too ("engine: ...", "settings: ...", "family: ..."): lines,
    # not errors
    messages = [line for line in lines if not PROGRESS.fullmatch(line) and not DIAGNOSTIC.match(line)]
    assert len(messages) == 1 and messages[0].startswith("error: "), f"expected one error line, got:\n{stderr}"
    assert lines[-1] == messages[0], "the error line comes last"
    return messages[0]


# ----------------------------------------------------------------------------- files to feed it


def jsonl(rows) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_parquet(path: Path, rows) -> str:
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_parquet(path)
    return str(path)


def _torch_file(path: Path, obj: object) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return str(path)


GOOD_ROWS = [{"text": "great film", "label": 1}, {"text": "bad film", "label": 0}] * 4


def class_label_parquet(path: Path, names: list[str]) -> str:
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names)})
    datasets.Dataset.from_dict({"text": ["great", "bad"] * 4, "label": [0, 1] * 4}, features=features).to_parquet(
        str(path))
    return str(path)


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, tiny_dirs) -> dict[str, str]:
    """Copies of the tiny model folder with a broken tokenizer: no tokenizer files, no [PAD]/[CLS]/[SEP],
    more tokens than the model's embedding table."""
    import shutil

    from transformers import BertTokenizerFast

    from sentiment.tiny import VOCAB, make_tokenizer

    model_dir, _ = tiny_dirs
    root = tmp_path_factory.mktemp("bad_models")
    bigger = make_tokenizer()
    bigger.add_tokens(["extra1", "extra2"])
    tokenizers = {"no_tokenizer": None, "bigger_tokenizer": bigger}
    for kind in ("pad", "cls", "sep"):
        vocab = {w: i for i, w in enumerate(VOCAB)}
        tokenizers[f"no_{kind}"] = BertTokenizerFast(vocab=vocab, **{f"{kind}_token": None})
    for name, tokenizer in tokenizers.items():
        shutil.copytree(model_dir, root / name)
        for file in ("tokenizer.json", "tokenizer_config.json"):
            (root / name / file).unlink()
        if tokenizer is not None:
            tokenizer.save_pretrained(root / name)
    return {name: str(root / name) for name in tokenizers}


def two_candidates(d: Path, acl_imdb: bool) -> str:
    """A data_dir with two sources for the train split."""
    if acl_imdb:
        write(d / "train" / "pos" / "0_9.txt", "great film")
        write(d / "train" / "neg" / "1_2.txt", "bad film")
    else:
        write(d / "train.csv", "text,label\ngreat,1\nbad,0\n")
    write(d / "train.jsonl", jsonl(GOOD_ROWS))
    write(d / "test.jsonl", jsonl(GOOD_ROWS))
    return str(d)


@pytest.fixture
def files(tmp_path, tiny_dirs, bad_models):
    """Name -> path of a bad (or good) input file."""
    model_dir, data_dir = tiny_dirs
    d = tmp_path / "inputs"
    not_a_dir = write(d / "plain_file", "I am a file, not a folder")
    return {
        **bad_models,
        "good": str(data_dir / "train.jsonl"),
        "good_test": str(data_dir / "test.jsonl"),
        "missing": str(d / "nope.parquet"),
        "garbage_parquet": write(d / "garbage.parquet", os.urandom(2000)),
        "truncated_parquet": write(d / "truncated.parquet", b"PAR1" + os.urandom(100)),
        "latin1_csv": write(d / "latin1.csv", "text,label\nCaf\xe9 was great,1\nbad,0\n".encode("latin-1")),
        "latin1_jsonl": write(d / "latin1.jsonl", '{"text": "Caf\xe9 great", "label": 1}\n'.encode("latin-1")),
        "unknown_ext": write(d / "reviews.txt", "great film\n"),
        "no_text": write(d / "no_text.csv", "review,label\ngreat,1\nbad,0\n"),
        "no_label": write(d / "no_label.jsonl", jsonl([{"text": "great"}, {"text": "bad"}])),
        "empty_text": write(d / "empty_text.jsonl", jsonl(GOOD_ROWS + [{"text": "   ", "label": 1}])),
        "missing_text": write(d / "missing_text.csv", "text,label\ngreat,1\n,0\n"),
        "label_2": write(d / "label_2.jsonl", jsonl(GOOD_ROWS + [{"text": "meh", "label": 2}])),
        "label_minus_1": write(d / "label_minus_1.jsonl", jsonl(GOOD_ROWS + [{"text": "meh", "label": -1}])),
        "label_word": write(d / "label_word.csv", "text,label\ngreat,pos\nso-so,neutral\n"),
        "names_and_numbers": write(d / "mixed.jsonl", jsonl(GOOD_ROWS + [{"text": "great", "label": "pos"}])),
        "no_rows": write(d / "no_rows.csv", "text,label\n"),
        "no_config_ckpt": _torch_file(d / "step_0000003.pt", {"model": {}, "step": 3}),
        "corrupt_ckpt": write(d / "step_0000005.pt", b"PK\x03\x04 this is not a torch checkpoint" + os.urandom(64)),
        "bad_json": write(d / "config.json", "{not json"),
        "not_a_dir": not_a_dir,
        "true_for_int": write(d / "true_for_int.json", '{"save_every": true}'),
        "list_for_str": write(d / "list_for_str.json", '{"dataset": ["a", "b"]}'),
        "string_for_int": write(d / "string_for_int.json", '{"keep_last": "2"}'),
        "float_for_int": write(d / "float_for_int.json", '{"keep_last": 2.5}'),
        "half_label": write(d / "half.jsonl", jsonl(GOOD_ROWS + [{"text": "meh", "label": 0.5}])),
        "unknown_class_names": class_label_parquet(d / "good_bad.parquet", ["bad", "good"]),
        "bad_json_line": write(d / "bad_line.jsonl", jsonl(GOOD_ROWS[:6]) + '{"text": "so-so", label: 1}\n'),
        "multiline_csv": write(d / "multiline.csv", 'text,label\n"great\nfilm",1\n"bad\n\nfilm",0\n"  ",1\n'),
        "empty_text_parquet": write_parquet(d / "empty_text.parquet", GOOD_ROWS + [{"text": "", "label": 1}]),
        "one_class": write(d / "one_class.jsonl", jsonl([{"text": "great film", "label": 1}] * 8)),
        "class_of_one": write(d / "class_of_one.jsonl",
                              jsonl([{"text": "great", "label": 1}] * 9 + [{"text": "bad", "label": 0}])),
        "two_files": two_candidates(d / "two_files", acl_imdb=False),
        "acl_and_file": two_candidates(d / "acl_and_file", acl_imdb=True),
        "model": str(model_dir),
        "data_dir": str(data_dir),
    }


# ----------------------------------------------------------------------------- an existing run to protect


def make_existing_run(out: Path) -> dict[str, bytes]:
    """A previous (unfinished) run's files in `out`, marked as ours, plus a user's own file; returns
    path -> bytes to compare later."""
    write(out / ".sentiment-run.json", json.dumps({"run_id": "0123456789ab", "program": "sentiment"}))
    write(out / "config.json", json.dumps({"lr": 1e-5}))
    write(out / "metrics.jsonl", '{"step": 1, "loss": 0.7}\n')
    write(out / "model" / "config.json", "{}")
    write(out / "checkpoints" / "step_0000001.pt", b"old checkpoint bytes")
    write(out / "notes.txt", "the user's own file")
    return snapshot(out)


# ----------------------------------------------------------------------------- the table

# (case id, argv after `train` with {name} placeholders filled from `files`, what the error must mention)
TRAIN_CASES = [
    ("missing_train_file", ["--train_file", "{missing}", "--test_file", "{good_test}"], r"nope\.parquet does not exist"),
    ("missing_test_file", ["--train_file", "{good}", "--test_file", "{missing}"], r"nope\.parquet does not exist"),
    ("no_test_file_given", ["--train_file", "{good}"], r"no test data: --test_file is missing"),
    ("missing_data_dir", ["--data_dir", "{missing}"], r"data_dir .*nope\.parquet is not a folder"),
    ("data_dir_without_data", ["--data_dir", "{model}"], r"has neither train/pos/\*\.txt .*nor train\.parquet"),
    ("garbage_parquet", ["--train_file", "{garbage_parquet}", "--test_file", "{good_test}"],
     r"garbage\.parquet could not be read as parquet"),
    ("truncated_parquet", ["--train_file", "{truncated_parquet}", "--test_file", "{good_test}"],
     r"truncated\.parquet could not be read as parquet"),
    ("non_utf8_csv", ["--train_file", "{latin1_csv}", "--test_file", "{good_test}"], r"latin1\.csv .*not UTF-8"),
    ("non_utf8_jsonl", ["--train_file", "{latin1_jsonl}", "--test_file", "{good_test}"], r"latin1\.jsonl .*not UTF-8"),
    ("unknown_extension", ["--train_file", "{unknown_ext}", "--test_file", "{good_test}"], r"unknown format '\.txt'"),
    ("missing_text_column", ["--train_file", "{no_text}", "--test_file", "{good_test}"],
     r"no_text\.csv has no column 'text'; its columns are review, label: name the text and label columns with "
     r"--text_column and --label_column \(now 'text' and 'label'\)$"),
    ("missing_label_column", ["--train_file", "{good}", "--test_file", "{no_label}"],
     r"no_label\.jsonl has no column 'label'; its columns are text: name the text and label columns with "
     r"--text_column and --label_column \(now 'text' and 'label'\)$"),
    ("label_column_not_there", ["--train_file", "{good}", "--test_file", "{good_test}", "--label_column", "stars"],
     r"train\.jsonl has no column 'stars'; its columns are text, label: .* \(now 'text' and 'stars'\)$"),
    ("empty_text", ["--train_file", "{empty_text}", "--test_file", "{good_test}"], r"empty_text\.jsonl line 9: empty or missing text; fill in its text$"),
    ("missing_text", ["--train_file", "{missing_text}", "--test_file", "{good_test}"], r"missing_text\.csv line 3: empty or missing text; fill in its text$"),
    ("test_label_2", ["--train_file", "{good}", "--test_file", "{label_2}"],
     r"label_2\.jsonl line 9: label 2 is not a class index of the training data's labels \(0\.\.1: neg, pos\); fix "
     r"the row$"),
    ("label_minus_1", ["--train_file", "{good}", "--test_file", "{label_minus_1}"],
     r"label_minus_1\.jsonl line 9: label -1 is not a class \(a name, or an index 0\.\.1; -1 marks an unlabeled "
     r"row, which cannot be trained on or scored\); fix or drop the row$"),
    ("test_label_the_training_data_lacks", ["--train_file", "{good}", "--test_file", "{label_word}"],
     r"^error: .*label_word\.csv line 3: label 'neutral' is not one of the training data's labels \(neg, pos\); "
     r"a model cannot predict a class it never saw: drop these rows, or add the class to the training data$"),
    ("label_outside_label_names", ["--train_file", "{label_word}", "--test_file", "{label_word}", "--label_names",
                                   "neg,pos"],
     r"label_word\.csv line 3: label 'neutral' is not one of --label_names \(neg, pos\); add it to --label_names "
     r"or fix the row$"),
    ("labels_mix_names_and_numbers", ["--train_file", "{names_and_numbers}", "--test_file", "{good_test}"],
     r"mixed\.jsonl: the labels mix names \('pos'\) and numbers \(0, 1\); use one kind, or give --label_names"),
    ("label_names_of_one_class", ["--data_dir", "{data_dir}", "--label_names", "pos"],
     r"^error: label_names='pos' names one class; a classifier needs at least 2; give 2 or more distinct names"),
    ("text_column_is_label_column", ["--data_dir", "{data_dir}", "--text_column", "label"],
     r"^error: text_column and label_column are both 'label'"),
    ("no_rows", ["--train_file", "{no_rows}", "--test_file", "{good_test}"], r"no_rows\.csv .*(holds no rows|no data)"),
    ("n_train_too_large", ["--data_dir", "{data_dir}", "--n_train", "1000"],
     r"--n_train 1000 is larger than the 96 reviews available"),
    ("n_test_too_large", ["--data_dir", "{data_dir}", "--n_test", "49"], r"--n_test 49 is larger than the 48"),
    ("val_split_too_small", ["--data_dir", "{data_dir}", "--n_train", "4", "--val_fraction", "0.1"],
     r"val_fraction=0\.1 of 4 reviews leaves too few"),
    ("max_length_above_model", ["--data_dir", "{data_dir}", "--max_length", "256"],
     r"max_length=256 exceeds the model's 128 positions"),
    ("corrupt_checkpoint", ["--data_dir", "{data_dir}", "--resume", "{corrupt_ckpt}"],
     r"checkpoint .*step_0000005\.pt is corrupt or unreadable"),
    ("resume_a_folder", ["--data_dir", "{data_dir}", "--resume", "{data_dir}"],
     r"--resume .*data is a folder; pass a checkpoint file in it"),
    ("resume_checkpoint_without_config", ["--data_dir", "{data_dir}", "--resume", "{no_config_ckpt}"],
     r"step_0000003\.pt is not a sentiment checkpoint \(it lacks optimizer, scaler, best_accuracy, bad_steps, "
     r"config, rng\); pass another --resume"),
    ("missing_checkpoint", ["--data_dir", "{data_dir}", "--resume", "{missing}"], r"nope\.parquet does not exist"),
    ("missing_model", ["--data_dir", "{data_dir}", "--model_name_or_path", "{not_a_dir}/model"],
     r"could not load the tokenizer"),
    ("model_folder_without_model", ["--data_dir", "{data_dir}", "--model_name_or_path", "{data_dir}"],
     r"could not load the tokenizer .* from the local folder"),
    ("zero_epochs", ["--data_dir", "{data_dir}", "--epochs", "0"], r"epochs=0 must be a positive integer"),
    ("negative_micro_batch", ["--data_dir", "{data_dir}", "--micro_batch_size", "-1"], r"micro_batch_size=-1 must be >= 0"),
    ("accum_with_auto", ["--data_dir", "{data_dir}", "--micro_batch_size", "auto", "--grad_accum_steps", "2"],
     r"grad_accum_steps=2 is derived when global_batch_size is set or micro_batch_size is auto"),
    ("global_batch_not_a_multiple", ["--data_dir", "{data_dir}", "--global_batch_size", "12"],
     r"global_batch_size=12 is not a multiple of micro_batch_size=8; pick a divisor, or --micro_batch_size auto"),
    ("negative_grad_accum", ["--data_dir", "{data_dir}", "--grad_accum_steps", "-2"], r"grad_accum_steps=-2 must be"),
    ("zero_eval_batch", ["--data_dir", "{data_dir}", "--eval_batch_size", "0"], r"eval_batch_size=0"),
    ("negative_n_train", ["--data_dir", "{data_dir}", "--n_train", "-5"], r"n_train=-5 must be >= 0"),
    ("zero_max_length", ["--data_dir", "{data_dir}", "--max_length", "0"], r"max_length=0 must be a positive"),
    ("zero_lr", ["--data_dir", "{data_dir}", "--lr", "0"], r"lr=0\.0 must be > 0"),
    ("negative_lr", ["--data_dir", "{data_dir}", "--lr=-3e-5"], r"lr=-3e-05 must be > 0"),
    ("negative_lr_as_separate_word", ["--data_dir", "{data_dir}", "--lr", "-1"], r"lr=-1\.0 must be > 0"),
    ("flag_without_value", ["--data_dir", "{data_dir}", "--epochs"], r"argument --epochs: expected one argument"),
    ("warmup_ratio_above_1", ["--data_dir", "{data_dir}", "--warmup_ratio", "1.5"], r"warmup_ratio=1\.5 must be in \[0, 1\)"),
    ("val_fraction_1", ["--data_dir", "{data_dir}", "--val_fraction", "1"], r"val_fraction=1\.0 must be in \[0, 1\)"),
    ("negative_weight_decay", ["--data_dir", "{data_dir}", "--weight_decay", "-0.01"], r"weight_decay"),
    ("not_a_number", ["--data_dir", "{data_dir}", "--lr", "fast"], r"--lr expects float, got 'fast'"),
    ("not_an_int", ["--data_dir", "{data_dir}", "--epochs", "three"], r"--epochs expects int, got 'three'"),
    ("not_a_bool", ["--data_dir", "{data_dir}", "--overwrite", "perhaps"], r"--overwrite expects true or false"),
    ("bad_choice", ["--data_dir", "{data_dir}", "--truncation", "middle"], r"truncation='middle' is not one of head"),
    ("unknown_flag", ["--data_dir", "{data_dir}", "--learning_rate", "1e-4"], r"unknown flag --learning_rate"),
    ("unknown_flag_suggestion", ["--data_dir", "{data_dir}", "--epoch", "3"],
     r"unknown flag --epoch; did you mean --epochs\?"),
    ("unknown_flag_typo", ["--data_dir", "{data_dir}", "--grad_acum_steps", "3"], r"did you mean --grad_accum_steps\?"),
    ("unknown_preset", ["--data_dir", "{data_dir}", "--preset", "tutorail"], r"unknown preset 'tutorail'; did you mean tutorial"),
    ("missing_config_file", ["--data_dir", "{data_dir}", "--config", "{missing}"], r"config file .* does not exist"),
    ("bad_config_file", ["--data_dir", "{data_dir}", "--config", "{bad_json}"], r"config file .* is not readable JSON"),
    # issue 10: inputs refused before they poison a run
    ("lr_inf", ["--data_dir", "{data_dir}", "--lr", "inf"], r"^error: lr=inf must be a finite number$"),
    ("weight_decay_nan", ["--data_dir", "{data_dir}", "--weight_decay", "nan"],
     r"^error: weight_decay=nan must be a finite number$"),
    ("max_grad_norm_nan", ["--data_dir", "{data_dir}", "--max_grad_norm", "nan"],
     r"^error: max_grad_norm=nan must be a finite number$"),
    ("adam_eps_inf", ["--data_dir", "{data_dir}", "--adam_eps", "inf"], r"^error: adam_eps=inf must be a finite number$"),
    ("seed_too_large", ["--data_dir", "{data_dir}", "--seed", "99999999999"],
     r"^error: seed=99999999999 must be in 0\.\.4294967295 \(numpy's seed range\)$"),
    ("config_true_for_int", ["--data_dir", "{data_dir}", "--config", "{true_for_int}"],
     r"true_for_int\.json: 'save_every' expects an integer, got true; fix that value$"),
    ("config_list_for_str", ["--data_dir", "{data_dir}", "--config", "{list_for_str}"],
     r"list_for_str\.json: 'dataset' expects a string, got \[\"a\", \"b\"\]; fix that value$"),
    ("config_string_for_int", ["--data_dir", "{data_dir}", "--config", "{string_for_int}"],
     r"string_for_int\.json: 'keep_last' expects an integer, got \"2\"; fix that value$"),
    ("config_float_for_int", ["--data_dir", "{data_dir}", "--config", "{float_for_int}"],
     r"float_for_int\.json: 'keep_last' expects an integer, got 2\.5; fix that value$"),
    ("label_half", ["--train_file", "{half_label}", "--test_file", "{good_test}"],
     r"half\.jsonl line 9: label 0\.5 is not a class"),
    ("invalid_json_line", ["--train_file", "{bad_json_line}", "--test_file", "{good_test}"],
     r"bad_line\.jsonl line 7: not valid JSON \(Expecting property name enclosed in double quotes\); fix "
     r"that line$"),
    ("empty_text_after_multiline_csv_fields", ["--train_file", "{multiline_csv}", "--test_file", "{good_test}"],
     r"multiline\.csv line 7: empty or missing text; fill in its text$"),
    ("empty_text_parquet", ["--train_file", "{empty_text_parquet}", "--test_file", "{good_test}"],
     r"empty_text\.parquet row 8 \(0-based\): empty or missing text; fill in its text$"),
    ("two_files_for_a_split", ["--data_dir", "{two_files}"],
     r"two_files holds both train\.csv and train\.jsonl for the train split; keep one \(move the other away\)$"),
    ("acl_imdb_and_a_file", ["--data_dir", "{acl_and_file}"],
     r"acl_and_file holds both train/pos/ \(aclImdb\) and train\.jsonl for the train split"),
    ("single_class", ["--train_file", "{one_class}", "--test_file", "{good_test}"],
     r"^error: training data has only one class \(neg: 0, pos: 8\); check the label column or raise --n_train$"),
    ("val_split_with_a_class_of_one", ["--train_file", "{class_of_one}", "--test_file", "{good_test}",
                                       "--val_fraction", "0.2"],
     r"^error: val_fraction=0\.2: a stratified split needs at least 2 reviews of each class, got neg: 1, pos: 9; "
     r"raise --n_train or set --val_fraction 0$"),
    ("model_without_tokenizer_files", ["--data_dir", "{data_dir}", "--model_name_or_path", "{no_tokenizer}"],
     r"model folder .*no_tokenizer has no tokenizer files \(tokenizer\.json, .*\); copy them from the base model"),
    ("tokenizer_without_pad", ["--data_dir", "{data_dir}", "--model_name_or_path", "{no_pad}"],
     r"the tokenizer of .*no_pad has no pad token \(pad_token_id is None\)"),
    ("tokenizer_without_cls", ["--data_dir", "{data_dir}", "--model_name_or_path", "{no_cls}"],
     r"the tokenizer of .*no_cls has no cls token \(cls_token_id is None\)"),
    ("tokenizer_without_sep", ["--data_dir", "{data_dir}", "--model_name_or_path", "{no_sep}"],
     r"the tokenizer of .*no_sep has no sep token \(sep_token_id is None\)"),
    ("tokenizer_bigger_than_model", ["--data_dir", "{data_dir}", "--model_name_or_path", "{bigger_tokenizer}"],
     r"the tokenizer of .*bigger_tokenizer has 43 tokens but the model's embedding table has 41 rows"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in TRAIN_CASES], ids=[c[0] for c in TRAIN_CASES])
def test_bad_train_input(argv, pattern, files, tmp_path, capsys):
    out = tmp_path / "run"
    before = make_existing_run(out)
    argv = ["train", "--model_name_or_path", files["model"], "--device", "cpu", "--precision", "fp32",
            "--max_length", "64", "--epochs", "1", "--n_train", "0", "--n_test", "0", "--output_dir", str(out),
            "--overwrite", "true", *[a.format(**files) for a in argv]]
    code = main(argv)
    err = error_line(capsys.readouterr().err)
    assert code != 0
    assert re.search(pattern, err), f"{err!r} does not match {pattern!r}"
    assert snapshot(out) == before  # validation comes before anything is replaced, even with --overwrite


def test_existing_run_is_not_overwritten(files, tmp_path, capsys):
    out = tmp_path / "run"
    before = make_existing_run(out)
    code = main(["train", "--model_name_or_path", files["model"], "--data_dir", files["data_dir"], "--device", "cpu",
                 "--max_length", "64", "--output_dir", str(out)])
    err = error_line(capsys.readouterr().err)
    assert code != 0
    assert f"output_dir {out} holds an unfinished run; pass --resume auto to continue it" in err
    assert "--overwrite true would delete it" in err
    assert snapshot(out) == before


def test_overwrite_replaces_only_the_runs_files(files, tmp_path):
    """The other side of the refusal: with --overwrite the old run is replaced, the user's own file kept."""
    out = tmp_path / "run"
    make_existing_run(out)
    code = main(["train", "--model_name_or_path", files["model"], "--data_dir", files["data_dir"], "--device", "cpu",
                 "--precision", "fp32", "--max_length", "64", "--epochs", "1", "--n_train", "8", "--n_test", "8",
                 "--output_dir", str(out), "--overwrite", "true", "--log_every", "0"])
    assert code == 0
    assert (out / "notes.txt").read_text() == "the user's own file"
    assert (out / "checkpoints" / "step_0000001.pt").read_bytes() != b"old checkpoint bytes"
    assert json.loads((out / "config.json").read_text())["n_train"] == 8
    assert json.loads((out / "results.json").read_text())["steps"] == 1
    assert json.loads((out / ".sentiment-run.json").read_text())["run_id"] != "0123456789ab"  # a new run


@pytest.mark.parametrize("make_unwritable", ["under_a_file", "read_only_dir"])
def test_output_dir_not_writable(make_unwritable, files, tmp_path, capsys):
    if make_unwritable == "under_a_file":
        out = Path(files["not_a_dir"]) / "run"  # a path below a regular file: never creatable, even as root
        before = Path(files["not_a_dir"]).read_bytes()
    else:
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only folders; the under_a_file case covers this")
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        out = locked / "run"
    try:
        code = main(["train", "--model_name_or_path", files["model"], "--data_dir", files["data_dir"], "--device",
                     "cpu", "--max_length", "64", "--output_dir", str(out)])
    finally:
        if make_unwritable == "read_only_dir":
            locked.chmod(0o700)
    err = error_line(capsys.readouterr().err)
    assert code != 0
    assert re.search(r"output_dir .*run is not writable", err), err
    if make_unwritable == "under_a_file":
        assert Path(files["not_a_dir"]).read_bytes() == before


# ----------------------------------------------------------------------------- evaluate and predict

OTHER_CASES = [
    ("evaluate_missing_model", ["evaluate", "--model_name_or_path", "{missing}", "--data_dir", "{data_dir}"],
     r"could not load the tokenizer"),
    ("evaluate_missing_test_file", ["evaluate", "--model_name_or_path", "{model}", "--test_file", "{missing}"],
     r"nope\.parquet does not exist"),
    ("evaluate_bad_labels", ["evaluate", "--model_name_or_path", "{model}", "--test_file", "{label_2}"],
     r"label_2\.jsonl line 9: label 2 is not a class index of the model's labels \(0\.\.1: neg, pos\)"),
    ("evaluate_labels_the_model_lacks", ["evaluate", "--model_name_or_path", "{model}", "--test_file",
                                         "{unknown_class_names}"],
     r"good_bad\.parquet row 0 \(0-based\): label 0 \('bad' in its ClassLabel\) is not one of the model's labels "
     r"\(neg, pos\); the model was trained without it: drop these rows, or train on the class$"),
    ("evaluate_tokenizer_without_pad", ["evaluate", "--model_name_or_path", "{no_pad}", "--data_dir", "{data_dir}",
                                        "--n_test", "0"],
     r"the tokenizer of .*no_pad has no pad token"),
    ("predict_model_without_tokenizer_files", ["predict", "great", "--model_name_or_path", "{no_tokenizer}"],
     r"model folder .*no_tokenizer has no tokenizer files"),
    ("predict_empty_text", ["predict", "  ", "--model_name_or_path", "{model}"], r"text 1 of 1 is empty; remove it or give it a review"),
    ("predict_without_text", ["predict", "--model_name_or_path", "{model}"], r"predict takes review texts as arguments or --input FILE"),
    ("predict_missing_model", ["predict", "great", "--model_name_or_path", "{missing}"], r"could not load"),
    ("unknown_command", ["trian", "--epochs", "1"], r"unknown command 'trian'; did you mean train\?"),
]


@pytest.mark.parametrize("argv, pattern", [c[1:] for c in OTHER_CASES], ids=[c[0] for c in OTHER_CASES])
def test_bad_evaluate_and_predict_input(argv, pattern, files, capsys):
    code = main([a.format(**files) for a in argv] + ["--device", "cpu", "--max_length", "64"])
    err = error_line(capsys.readouterr().err)
    assert code != 0
    assert re.search(pattern, err), f"{err!r} does not match {pattern!r}"


# ----------------------------------------------------------------------------- as a real process


@pytest.mark.parametrize("args, pattern", [
    (["--epoch", "3"], r"did you mean --epochs"),
    (["--train_file", "{latin1_csv}", "--test_file", "{good_test}"], r"not UTF-8"),
], ids=["unknown_flag", "non_utf8_csv"])
def test_python_m_sentiment_exits_nonzero_with_one_line(args, pattern, files, tmp_path):
    argv = [sys.executable, "-m", "sentiment", "train", "--model_name_or_path", files["model"], "--device", "cpu",
            "--max_length", "64", "--output_dir", str(tmp_path / "run"), *[a.format(**files) for a in args]]
    proc = subprocess.run(argv, capture_output=True, text=True, env=subprocess_env(), cwd=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert re.search(pattern, error_line(proc.stderr))
    assert not (tmp_path / "run" / "config.json").exists()
