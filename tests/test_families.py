"""The family matrix: every encoder family of families.py, as a tiny random model with its own kind of tokenizer
(tests/families.py), goes through the whole tool: it learns (train accuracy near 1), resumes bitwise, checkpoints
its gradients with the same losses, decays its own layers' learning rates, pre-trains and trains on the result at
its length limit in fp16 with `--micro_batch_size auto`, predicts, evaluates and writes its model card. One
trained run per family is shared by its checks (module scope)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import metrics_rows, read_metrics, saved_weights
from families import POSITIONS, tiny_model_config, write_family

from sentiment.cli import main
from sentiment.commands import evaluate_model, predict
from sentiment.config import Config
from sentiment.errors import ConfigError, ModelError
from sentiment.families import FAMILIES as TABLE
from sentiment.families import classifier_class
from sentiment.model import check_max_length, load_model_config, use_family
from sentiment.pretrain import pretrain
from sentiment.tiny import make_reviews, write_jsonl
from sentiment.train import train

EPOCHS = 10  # 48 reviews, batch 8: 60 steps, enough for every family to fit them (2 epochs end at chance)
HALF = 30  # the step the resumed run starts from


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """train.jsonl (48 short reviews, also the test file: test accuracy is train accuracy) and long.jsonl (16
    reviews of 150+ words: more tokens than any family takes, cut at max_length)."""
    folder = tmp_path_factory.mktemp("family_data")
    write_jsonl(folder / "train.jsonl", make_reviews(48, seed=3, max_words=24))
    write_jsonl(folder / "long.jsonl", make_reviews(16, seed=4, min_words=150, max_words=170))
    return folder


def settings(model: Path, data: Path, out: Path, **overrides) -> Config:
    values = dict(model_name_or_path=str(model), train_file=str(data / "train.jsonl"),
                  test_file=str(data / "train.jsonl"), n_train=0, n_test=0, max_length=64, epochs=EPOCHS,
                  micro_batch_size=8, lr=3e-3, warmup_ratio=0.1, layer_lr_decay=0.9, device="cpu", precision="fp32",
                  output_dir=str(out), log_every=0, keep_last=100, save_every=HALF)
    return Config(**{**values, **overrides})


@pytest.fixture(scope="module", params=sorted(TABLE))
def family_run(request, data, tmp_path_factory, one_thread):
    """(family, model dir, run folder, results) of one learning run (with layer-wise lr decay) per family."""
    folder = tmp_path_factory.mktemp(request.param)
    model = write_family(request.param, folder)
    results = train(settings(model, data, folder / "run"))
    return request.param, model, folder / "run", results


def test_each_family_learns_the_training_set_with_its_own_layer_rates(family_run, capsys):
    family, _, run, results = family_run
    assert results["test"]["accuracy"] >= 0.95, (family, results["test"])  # the test file is the training set
    assert results["test"]["loss"] < 0.6, (family, results["test"])  # chance is 0.693
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["model_type"] == family and "_attn_implementation" not in json.dumps(config)


def test_each_family_resumes_bitwise_with_gradient_checkpointing_on(family_run, data, tmp_path):
    """The second half of the run, resumed from its mid-run checkpoint with gradient checkpointing on, ends on the
    same weights, bit for bit: resume restores everything, and the recomputed forwards (dropout 0.1) draw the same
    masks and give the same losses as the run without checkpointing."""
    family, model, run, _ = family_run
    checkpoint = run / "checkpoints" / f"step_{HALF:07d}.pt"
    assert checkpoint.is_file(), sorted(p.name for p in (run / "checkpoints").iterdir())
    train(settings(model, data, tmp_path / "resumed", resume=str(checkpoint), gradient_checkpointing=True))
    reference, resumed = saved_weights(run), saved_weights(tmp_path / "resumed")
    assert reference.keys() == resumed.keys()
    assert all(torch.equal(reference[k], resumed[k]) for k in reference), family
    rows = [r for r in metrics_rows(tmp_path / "resumed") if "split" not in r]
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_metrics(run)[0][HALF:]], family


def test_each_family_predicts_evaluates_and_has_a_model_card(family_run, data):
    family, _, run, results = family_run
    scores = evaluate_model(Config(model_name_or_path=str(run), test_file=str(data / "train.jsonl"), n_test=0,
                                   device="cpu", precision="fp32"))
    assert scores["accuracy"] == results["test"]["accuracy"], family
    rows = predict(Config(model_name_or_path=str(run), device="cpu", precision="fp32"),
                   ["great great wonderful film", "awful boring terrible film"])
    assert [r["label"] for r in rows] == ["pos", "neg"], (family, rows)
    card = (run / "model" / "README.md").read_text()
    assert "sentiment" in card and "accuracy" in card


def test_each_family_pretrains_then_trains_at_its_length_limit_in_fp16_with_auto_micro_batch(family_run, data,
                                                                                             tmp_path, capsys):
    """The reviews are longer than any family takes: max_length at the limit (RoBERTa's 128 of 130 rows) must run
    its first step, where a limit one token higher crashed. DeBERTa-v3's relative positions take more."""
    family, model, _, _ = family_run
    pretrained = pretrain(settings(model, data, tmp_path / "mlm", train_file=str(data / "long.jsonl"),
                                   test_file="", layer_lr_decay=0.0, max_steps=3, mlm_val_fraction=0.0,
                                   save_every=0))["model_dir"]
    limit = POSITIONS + 32 if family == "deberta-v2" else POSITIONS
    results = train(settings(pretrained, data, tmp_path / "run", train_file=str(data / "long.jsonl"),
                             test_file=str(data / "long.jsonl"), max_length=limit, precision="fp16",
                             micro_batch_size=0, global_batch_size=8, max_steps=2, save_every=0))
    assert results["steps"] == 2
    out = capsys.readouterr().out
    assert "precision=fp16" in out and "family: " in out and "attention=" in out, out
    if family in ("bert", "albert"):  # their classifier reads the pooler: pretrain carried it over, not a new one
        assert "pooler from the checkpoint, frozen" in out, out


@pytest.mark.parametrize("family", sorted(TABLE))
def test_the_table_says_what_each_class_runs(family):
    """families.py's kernels are those transformers' class declares; a new transformers that adds SDPA to
    DeBERTa-v2 fails here until the table says so (and the README's table with it)."""
    config = tiny_model_config(family, 40, 0)
    cls = classifier_class(config)
    assert ("sdpa" in TABLE[family].attention) == cls._supports_sdpa
    assert ("flash_attention_2" in TABLE[family].attention) == cls._supports_flash_attn
    assert TABLE[family].own_checkpointing == (not cls.supports_gradient_checkpointing)


@pytest.mark.parametrize("family", sorted(TABLE))
def test_each_family_refuses_one_token_past_its_limit_before_writing(family, data, tmp_path):
    model = write_family(family, tmp_path)
    limit = {"deberta-v2": None}.get(family, POSITIONS)
    if limit is None:  # relative positions only: nothing to overflow, said in the header line
        check_max_length(4096, load_model_config(str(model)))
        return
    offset = r" \(130 position embeddings, numbered from padding index 1 \+ 1\)" if family in (
        "roberta", "xlm-roberta", "camembert", "mpnet") else ""  # their limit is not max_position_embeddings: say why
    with pytest.raises(ConfigError, match=rf"^max_length={limit + 1} exceeds the model's {limit} positions{offset}; "
                                          rf"use --max_length {limit} or less$"):
        train(settings(model, data, tmp_path / "run", max_length=limit + 1))
    assert not (tmp_path / "run").exists()


def test_attention_is_chosen_per_family_and_printed_with_its_reason():
    bert, deberta = tiny_model_config("bert", 40, 0), tiny_model_config("deberta-v2", 40, 0)
    line = use_family(bert, "auto", "it runs on CUDA in bf16/fp16 only")
    assert "attention=sdpa (auto: BertForSequenceClassification has PyTorch's fused SDPA; flash_attention_2 not " \
           "used: it runs on CUDA in bf16/fp16 only)" in line and bert._attn_implementation == "sdpa"
    assert "attention=flash_attention_2 (auto" in use_family(bert, "auto", "")
    assert "attention=eager (auto: DebertaV2ForSequenceClassification has no SDPA" in use_family(deberta, "auto", "")
    assert deberta._attn_implementation == "eager"
    assert "attention=eager (requested)" in use_family(bert, "eager", "")
    with pytest.raises(ConfigError, match="attn_implementation=sdpa: DebertaV2ForSequenceClassification runs only "
                                          "eager"):
        use_family(deberta, "sdpa", "")
    with pytest.raises(ConfigError, match="flash_attention_2 cannot run here: no GPU"):
        use_family(bert, "flash_attention_2", "no GPU")


def test_a_requested_kernel_is_what_the_model_runs(tmp_path, data, capsys):
    model = write_family("bert", tmp_path)
    train(settings(model, data, tmp_path / "run", attn_implementation="eager", max_steps=1))
    assert "attention=eager (requested; padding none not used" in capsys.readouterr().out
    assert main(["predict", "--model_name_or_path", str(tmp_path / "run"), "--attn_implementation", "sdpa",
                 "--device", "cpu", "great film"]) == 0


def test_a_load_error_keeps_the_library_reason(tmp_path, data):
    folder = tmp_path / "model"
    write_family("bert", tmp_path)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-family"}))
    with pytest.raises(ModelError, match=r"could not load the model config .* \(ValueError: .*no-such-family.*\); "
                                         "check that it holds config.json"):
        train(settings(folder, data, tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_a_deberta_v3_folder_with_only_spm_model_is_not_refused_as_tokenizer_less(tmp_path):
    """microsoft/deberta-v3-base ships spm.model and no tokenizer.json: our check lets the library try it, and a
    broken one is the library's reason on our one line, not "has no tokenizer files"."""
    from sentiment.model import load_tokenizer

    (tmp_path / "config.json").write_text(json.dumps(tiny_model_config("deberta-v2", 40, 0).to_dict()))
    (tmp_path / "spm.model").write_bytes(b"not a sentencepiece model")
    with pytest.raises(ModelError, match=r"could not load the tokenizer .* \(\w+: .+\); check that it holds"):
        load_tokenizer(str(tmp_path))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("family", ["bert", "deberta-v2"])
def test_on_cuda_in_bf16_auto_takes_flash_attention_where_it_can_and_the_model_runs_on_it(family, data, tmp_path,
                                                                                         capsys):
    from transformers.utils import is_flash_attn_2_available

    from sentiment.engine import setup_engine

    engine = setup_engine("cuda", "bf16")
    flash = is_flash_attn_2_available() and torch.cuda.get_device_capability()[0] >= 8
    assert (engine.flash_attention_unusable == "") == flash
    expected = {"deberta-v2": "eager"}.get(family, "flash_attention_2" if flash else "sdpa")
    model = write_family(family, tmp_path)
    results = train(settings(model, data, tmp_path / "run", device="cuda", precision="bf16", max_steps=4,
                             save_every=0))
    assert results["steps"] == 4 and f"attention={expected} (auto: " in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["wordpiece", "bpe", "unigram"])
def test_whole_words_are_found_by_each_kind_of_tokenizer(kind):
    """Words the vocabulary lacks split into pieces; grouping each piece with the word it continues gives the
    words back, whichever mark the tokenizer uses (## on later pieces, ▁ or Ġ on first ones)."""
    from families import bpe_tokenizer, unigram_tokenizer
    from transformers import BertTokenizerFast

    from sentiment.mlm_data import continuation_pieces
    from sentiment.tiny import VOCAB

    wordpiece = lambda: BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB + ["##ic", "##ish"])})  # noqa: E731
    tokenizer = {"wordpiece": wordpiece, "bpe": bpe_tokenizer, "unigram": unigram_tokenizer}[kind]()
    continuation = continuation_pieces(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))
    words = ["the", "filmic", "plot", "was", "dullish"]
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    assert len(ids) > len(words)  # some words are in pieces
    groups: list[list[int]] = []
    for i in ids:
        if continuation[i] and groups:
            groups[-1].append(i)
        else:
            groups.append([i])
    assert [tokenizer.decode(g).replace(" ##", "").replace("##", "").strip() for g in groups] == words
