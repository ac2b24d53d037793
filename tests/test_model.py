"""model.py's tokenizer checks: a tokenizer that cannot build [CLS] text [SEP] + [PAD] batches, or that has
more tokens than the model's embedding table, or a model folder without tokenizer files, is refused."""

import shutil

import pytest

from sentiment.errors import ModelError
from sentiment.model import check_tokenizer, load_tokenizer
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
