"""model.py's tokenizer checks: a tokenizer that cannot build [CLS] text [SEP] + [PAD] batches, or that has
more tokens than the model's embedding table, or a model folder without tokenizer files, is refused; and
AdamW's parameter groups, with and without layer-wise lr decay."""

import shutil

import pytest
import torch

from sentiment.errors import ConfigError, ModelError
from sentiment.model import check_tokenizer, layer_lr_line, load_tokenizer, param_groups
from sentiment.tiny import VOCAB, make_model, make_tokenizer


def bert_tokenizer(**special):
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={w: i for i, w in enumerate(VOCAB)}, **special)


@pytest.fixture(scope="module")
def model():
    return make_model()


def test_the_tiny_tokenizer_passes(model):
    check_tokenizer(make_tokenizer(), model.config, "tiny")


@pytest.mark.parametrize("special, missing", [
    ({"pad_token": None}, "pad token (pad_token_id is None)"),
    ({"cls_token": None}, "cls token (cls_token_id is None)"),
    ({"sep_token": None}, "sep token (sep_token_id is None)"),
    ({"cls_token": None, "sep_token": None}, "cls, sep token (cls_token_id, sep_token_id is None)"),
])
def test_a_tokenizer_without_special_tokens_is_refused(model, special, missing):
    with pytest.raises(ModelError, match=r"^the tokenizer of m/x has no " + missing.replace("(", r"\(").replace(
            ")", r"\)") + r"; batches are \[CLS\] text \[SEP\] padded with \[PAD\]"):
        check_tokenizer(bert_tokenizer(**special), model.config, "m/x")


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(model):
    tokenizer = make_tokenizer()
    tokenizer.add_tokens(["extra1", "extra2"])
    assert len(tokenizer) == len(VOCAB) + 2
    with pytest.raises(ModelError, match=rf"^the tokenizer of m/x has {len(VOCAB) + 2} tokens but the model's "
                                         rf"embedding table has {len(VOCAB)} rows"):
        check_tokenizer(tokenizer, model.config, "m/x")


def test_a_model_folder_without_tokenizer_files_is_refused(tiny_dirs, tmp_path):
    """AutoTokenizer would build a tokenizer of the 5 special tokens alone: every word [UNK], and the run
    'trains' on nothing."""
    model_dir, _ = tiny_dirs
    folder = tmp_path / "finetuned"
    shutil.copytree(model_dir, folder)
    assert len(load_tokenizer(str(folder))) == len(VOCAB)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (folder / name).unlink()
    with pytest.raises(ModelError, match=rf"^model folder {folder} has no tokenizer files "
                                         r"\(tokenizer\.json, vocab\.txt, .*\); copy them from the base model"):
        load_tokenizer(str(folder))


# ----------------------------------------------------------------------------- AdamW's groups, layer-wise lr decay


def group_of(groups: list[dict]) -> dict[int, dict]:
    """{id(parameter): its group}, checking that no parameter is in two groups."""
    seen: dict[int, dict] = {}
    for group in groups:
        for p in group["params"]:
            assert id(p) not in seen, "a parameter in two groups"
            seen[id(p)] = group
    return seen


def test_without_layer_decay_the_groups_are_the_two_of_before(model):
    for off in (0.0, 1.0):
        groups = param_groups(model, 0.01, off)
        params = [p for p in model.parameters() if p.requires_grad]
        assert [(g["weight_decay"], g["lr_scale"]) for g in groups] == [(0.01, 1.0), (0.0, 1.0)]
        assert groups[0]["params"] == [p for p in params if p.ndim >= 2]  # same tensors, same order
        assert groups[1]["params"] == [p for p in params if p.ndim < 2]


def test_layer_decay_gives_each_layer_decay_to_the_depth_below_the_top(model):
    decay, bert = 0.9, model.bert
    n = len(bert.encoder.layer)
    groups = group_of(param_groups(model, 0.01, decay))
    assert set(groups) == {id(p) for p in model.parameters() if p.requires_grad}  # every parameter, once
    for p in bert.embeddings.parameters():
        assert groups[id(p)]["lr_scale"] == decay ** n  # the lowest
    for i, layer in enumerate(bert.encoder.layer):
        for p in layer.parameters():
            assert groups[id(p)]["lr_scale"] == decay ** (n - (i + 1))
    for p in [*bert.pooler.parameters(), *model.classifier.parameters()]:
        assert groups[id(p)]["lr_scale"] == 1.0  # the head, at the peak
    assert max(g["lr_scale"] for g in groups.values()) == 1.0
    assert min(g["lr_scale"] for g in groups.values()) == decay ** n
    for p in model.parameters():  # no decay on 1-D tensors (biases, LayerNorm), decay on every matrix
        assert groups[id(p)]["weight_decay"] == (0.01 if p.ndim >= 2 else 0.0)


def test_layer_decay_skips_frozen_parameters(model):
    frozen = model.bert.embeddings.word_embeddings.weight
    frozen.requires_grad_(False)
    try:
        assert id(frozen) not in group_of(param_groups(model, 0.0, 0.9))
    finally:
        frozen.requires_grad_(True)


def test_layer_decay_header_line(model):
    line = layer_lr_line(model, 2e-5, 0.9)
    assert line == "lr: layer decay 0.9 of peak 2.0e-05: embeddings x0.81 | layers 1-2 x0.90 1.00 | head x1.00"


def test_layer_decay_refuses_a_model_without_bert_layers():
    with pytest.raises(ConfigError, match=r"^layer_lr_decay needs the layers of Linear, which has no base_model."
                                          r"embeddings and base_model.encoder.layer: use --layer_lr_decay 0$"):
        param_groups(torch.nn.Linear(2, 2), 0.0, 0.95)
    assert len(param_groups(torch.nn.Linear(2, 2), 0.0, 0.0)) == 2  # off: any model


def test_set_lr_honours_each_groups_lr_scale(model):
    from sentiment.loop import set_lr

    optimizer = torch.optim.AdamW(param_groups(model, 0.0, 0.5), lr=1.0)
    assert set_lr(optimizer, 0.25) == 0.25  # the scheduled (peak) lr, as logged
    assert [g["lr"] for g in optimizer.param_groups] == [0.25 * g["lr_scale"] for g in optimizer.param_groups]
