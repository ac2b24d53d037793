"""`sentiment pretrain`: BERT's masking, a tiny masked-LM run, its model fine-tuned by `train`, exact resume
and accumulation, unlabeled sources, and bad inputs as one error line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import cli_args, metrics_rows, read_metrics, saved_weights, sigterm_at_step, torchrun, write

from sentiment.cli import main
from sentiment.config import Config
from sentiment.errors import ConfigError
from sentiment.fit import PROBE_LIMIT_ENV
from sentiment.heatmaps import read_monitor
from sentiment.mlm_data import IGNORE, MaskedTexts, Masker, MLMCollator, read_unlabeled, tokenize_texts
from sentiment.model import load_model
from sentiment.pretrain import pretrain
from sentiment.tiny import FILLER, NEGATIVE, POSITIVE, make_reviews, make_tokenizer
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


def corpus(n: int, seed: int = 0) -> list[str]:
    """Texts with structure to learn (fixed frames around a few random words): the MLM loss falls fast."""
    rng = np.random.default_rng(seed)
    words = lambda options: str(rng.choice(options))  # noqa: E731
    return [f"the movie was {words(POSITIVE)} and the plot was {words(NEGATIVE)} i loved this {words(FILLER)} "
            f"with the music and the cast" for _ in range(n)]


@pytest.fixture
def mlm_config(tiny_dirs, tmp_path):
    """make(**overrides) -> Config pre-training the tiny model on `corpus` texts (a .txt file), CPU, fp32."""
    model_dir, _ = tiny_dirs
    text_file = write(tmp_path / "texts" / "unlabeled.txt", "\n".join(corpus(80)) + "\n")

    def make(**overrides) -> Config:
        values = dict(model_name_or_path=str(model_dir), train_file=text_file, max_length=64, epochs=4,
                      micro_batch_size=8, lr=5e-3, device="cpu", precision="fp32", mlm_val_fraction=0.1,
                      output_dir=str(tmp_path / "mlm"), log_every=0)
        values.update(overrides)
        return Config(**values)

    return make


# ----------------------------------------------------------------------------- masking


def test_masking_statistics():
    """15% of the non-special tokens per text, 80% [MASK] / 10% random / 10% kept; [CLS], [SEP] and padding
    never predicted; labels IGNORE everywhere else; the same masks for the same (epoch, text), new ones per epoch."""
    tokenizer = make_tokenizer()
    split = tokenize_texts([r["text"] for r in make_reviews(400, seed=3)], tokenizer, Config(max_length=64))
    masker = Masker.for_tokenizer(tokenizer, Config(seed=7))
    special = set(tokenizer.all_special_ids)
    predicted = candidates = masked = random = kept = 0
    for i in range(len(split)):
        ids = split.ids(i).astype(np.int64)
        out, labels = masker(ids, 0, i)
        picked = labels != IGNORE
        assert not any(int(t) in special for t in ids[picked])  # specials are never predicted
        assert (labels[picked] == ids[picked]).all() and (out[~picked] == ids[~picked]).all()
        n = sum(int(t) not in special for t in ids)
        assert picked.sum() == max(1, round(0.15 * n))
        predicted, candidates = predicted + picked.sum(), candidates + n
        masked += (out[picked] == tokenizer.mask_token_id).sum()
        kept += (out[picked] == ids[picked]).sum()
        random += ((out[picked] != ids[picked]) & (out[picked] != tokenizer.mask_token_id)).sum()
        assert not any(int(t) in special - {tokenizer.mask_token_id} for t in out[picked])  # random: no specials
    assert abs(predicted / candidates - 0.15) < 0.01
    # kept includes random draws that hit the original token (1 in 36 here)
    assert abs(masked / predicted - 0.8) < 0.03 and abs(random / predicted - 0.1) < 0.03
    assert abs(kept / predicted - 0.1) < 0.03
    again, other = masker(split.ids(5), 0, 5), masker(split.ids(5), 1, 5)
    assert all((a == b).all() for a, b in zip(masker(split.ids(5), 0, 5), again))
    assert not (again[1] == other[1]).all()  # dynamic masking: another epoch, other positions

    collate = MLMCollator(pad_id=tokenizer.pad_token_id, max_length=64)
    batch = collate([MaskedTexts(split, masker, 0)[(i, 1.0)] for i in range(8)])
    padding = batch["attention_mask"] == 0
    assert padding.any() and (batch["labels"][padding] == IGNORE).all()
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()


def test_whole_word_masking_masks_words_whole():
    """A word = a token and the ## pieces after it: either all of it is predicted, or none."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "un", "##believ", "##able", "film", "great", "##ly", "a"]
    special = np.array([i < 5 for i in range(len(vocab))])
    continuation = np.array([w.startswith("##") for w in vocab])
    masker = Masker(special, continuation, mask_id=4, probability=0.3, whole_word=True)
    ids = np.array([2] + [5, 6, 7, 8, 9, 10, 11] * 5 + [3])
    words = [[1, 2, 3], [4], [5, 6], [7]]  # positions within each repeat of 7 tokens
    for index in range(50):
        _, labels = masker(ids, 0, index)
        picked = labels != IGNORE
        assert 1 <= picked.sum() <= round(0.3 * 35)
        for repeat in range(5):
            for word in words:
                flags = {bool(picked[repeat * 7 + p]) for p in word}
                assert len(flags) == 1, (index, repeat, word)


# ----------------------------------------------------------------------------- runs


def test_pretrain_writes_model_and_metrics_and_learns(mlm_config, tmp_path, capsys):
    cfg = mlm_config(epochs=6)
    results = pretrain(cfg)
    run = Path(cfg.output_dir)
    steps, evals = read_metrics(run)
    assert len(steps) == results["steps"] == 6 * 9 and len(evals) == 6
    assert all(set(e) >= {"mlm_loss", "mlm_accuracy", "perplexity", "n_tokens"} and e["split"] == "val" for e in evals)
    assert np.mean([r["loss"] for r in steps[-9:]]) < 0.6 * np.mean([r["loss"] for r in steps[:3]])
    assert evals[-1]["mlm_loss"] < evals[0]["mlm_loss"] and evals[-1]["mlm_accuracy"] > evals[0]["mlm_accuracy"]
    assert (run / "model" / "model.safetensors").is_file() and (run / "model" / "tokenizer.json").is_file()
    assert json.loads((run / "results.json").read_text())["mlm_loss"] == evals[-1]["mlm_loss"]
    out = capsys.readouterr().out
    assert "MLM head new" in out and "decoder tied to the input embeddings" in out
    assert "pooler from the checkpoint, frozen" in out
    assert "eval epoch 6 | val | mlm_loss" in out

    # its model is a --model_name_or_path for train: the encoder carried over, the classifier new
    pretrained = saved_weights(run)
    name = "bert.encoder.layer.0.attention.self.query.weight"
    assert torch.equal(load_model(str(run / "model")).state_dict()[name], pretrained[name])
    source = load_model(cfg.model_name_or_path).state_dict()  # the pooler, unused by MLM, is the source's
    assert torch.equal(pretrained["bert.pooler.dense.weight"], source["bert.pooler.dense.weight"])
    assert not torch.equal(pretrained[name], source[name])  # while the encoder has learned
    data_dir = tmp_path / "labeled"
    write(data_dir / "train.jsonl", "".join(json.dumps(r) + "\n" for r in make_reviews(32)))
    write(data_dir / "test.jsonl", "".join(json.dumps(r) + "\n" for r in make_reviews(16, seed=1)))
    fine = train(Config(model_name_or_path=str(run / "model"), data_dir=str(data_dir), n_train=0, n_test=0,
                        max_length=64, max_steps=2, micro_batch_size=8, device="cpu", precision="fp32",
                        output_dir=str(tmp_path / "fine"), log_every=0))
    assert fine["steps"] == 2 and (tmp_path / "fine" / "model" / "model.safetensors").is_file()
    assert not torch.equal(saved_weights(tmp_path / "fine")[name], pretrained[name])  # and fine-tuned it


def test_sigterm_then_resume_equals_an_uninterrupted_run(mlm_config, tmp_path):
    """A real SIGTERM at step 5 (of 2 x 9, accumulating 2 micro-batches), then --resume auto: the same metrics
    and bitwise the same final weights as a run never stopped. Both monitored (every 2 steps): the monitor's rows
    of the masked LM (its `cls` head included) are the same too, the cut run's cut back to its checkpoint."""
    reference = mlm_config(epochs=2, micro_batch_size=4, grad_accum_steps=2, output_dir=str(tmp_path / "ref"),
                           monitor_every=2)
    pretrain(reference)
    cfg = mlm_config(epochs=2, micro_batch_size=4, grad_accum_steps=2, output_dir=str(tmp_path / "cut"),
                     monitor_every=2)
    assert sigterm_at_step(Path(cfg.output_dir), 5, lambda: pretrain(cfg)) == 143
    pretrain(mlm_config(epochs=2, micro_batch_size=4, grad_accum_steps=2, output_dir=cfg.output_dir, resume="auto",
                        monitor_every=2))
    a, b = saved_weights(tmp_path / "ref"), saved_weights(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.endswith(("_ms", "_s", "mem_mb"))} for r in rows]  # noqa
    assert strip(metrics_rows(tmp_path / "ref")) == strip(metrics_rows(tmp_path / "cut"))
    monitored = strip(read_monitor(tmp_path / "ref"))
    assert [r["step"] for r in monitored] == list(range(2, 19, 2)) and monitored[0]["layers"][-1] == "cls"
    assert strip(read_monitor(tmp_path / "cut")) == monitored


def test_accumulation_equals_one_big_batch(mlm_config, tmp_path, monkeypatch):
    """micro 4 x accum 2 and micro 8 x accum 1: the same masks, the same per-step loss (the mean over the global
    batch's texts of each one's mean over its predicted tokens), up to float rounding. And --micro_batch_size
    auto, its probe told the device holds 3 texts, picks that same 4 x 2 and the same numbers, bit for bit."""
    same = dict(epochs=1, mlm_val_fraction=0, dropout=0.0)  # dropout masks depend on the micro-batch shapes
    one = pretrain(mlm_config(output_dir=str(tmp_path / "one"), **same))
    two = pretrain(mlm_config(micro_batch_size=4, grad_accum_steps=2, output_dir=str(tmp_path / "two"), **same))
    assert one["steps"] == two["steps"] == 10
    a, b = read_metrics(tmp_path / "one")[0], read_metrics(tmp_path / "two")[0]
    assert np.allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5, atol=1e-6)
    wa, wb = saved_weights(tmp_path / "one"), saved_weights(tmp_path / "two")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    monkeypatch.setenv(PROBE_LIMIT_ENV, "5")  # of 8's divisors, 4 fits and 8 does not
    auto = pretrain(mlm_config(micro_batch_size=0, global_batch_size=8, output_dir=str(tmp_path / "auto"), **same))
    assert auto["batch"] == {"global": 8, "micro": 4, "accum": 2, "world": 1}
    numbers = lambda rows: [(r["loss"], r["lr"], r["grad_norm"]) for r in rows]  # noqa: E731
    assert numbers(read_metrics(tmp_path / "auto")[0]) == numbers(b)
    assert (tmp_path / "auto" / "model" / "model.safetensors").read_bytes() == \
        (tmp_path / "two" / "model" / "model.safetensors").read_bytes()


def test_ddp_equals_one_process_accumulating(mlm_config, tmp_path):
    """torchrun, 2 CPU processes x micro 4 = one process x micro 4 x accum 2: the same masks and loss weights
    (per text, not per rank), so the same losses, evaluations and weights."""
    same = dict(epochs=1, micro_batch_size=4, dropout=0.0, mlm_val_fraction=0.1)
    single = mlm_config(grad_accum_steps=2, output_dir=str(tmp_path / "single"), **same)
    pretrain(single)
    ddp = mlm_config(output_dir=str(tmp_path / "ddp"), **same)
    values = {k: v for k, v in ddp.to_dict().items() if k in ("model_name_or_path", "train_file", "max_length",
                                                             "epochs", "micro_batch_size", "lr", "dropout", "device",
                                                             "precision", "mlm_val_fraction", "output_dir")}
    torchrun(["-m", "sentiment", "pretrain", *cli_args(values)])
    a, b = metrics_rows(tmp_path / "single"), metrics_rows(tmp_path / "ddp")
    assert [r.get("loss", r.get("mlm_loss")) for r in a] == pytest.approx([r.get("loss", r.get("mlm_loss")) for r in b],
                                                                          rel=1e-6)
    wa, wb = saved_weights(tmp_path / "single"), saved_weights(tmp_path / "ddp")
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_a_run_of_the_other_command_is_refused(tiny_config, mlm_config, tmp_path, capsys):
    """One command's run folder or checkpoint is not the other's: refused in one line, nothing written (a
    classifier's state would not load into a masked LM, and a finished pretrain run has no test accuracy)."""
    cfg = tiny_config(max_steps=4, output_dir=str(tmp_path / "train"))
    assert sigterm_at_step(Path(cfg.output_dir), 1, lambda: train(cfg)) == 143  # an unfinished train run
    before = sorted(p.name for p in Path(cfg.output_dir).rglob("*"))
    with pytest.raises(ConfigError, match="holds a `sentiment train` run, not a pretrain run"):
        pretrain(mlm_config(output_dir=cfg.output_dir, resume="auto"))
    checkpoint = next(Path(cfg.output_dir, "checkpoints").glob("step_*.pt"))
    with pytest.raises(ConfigError, match="written by `sentiment train`, not `sentiment pretrain`"):
        pretrain(mlm_config(output_dir=str(tmp_path / "new"), resume=str(checkpoint)))
    assert sorted(p.name for p in Path(cfg.output_dir).rglob("*")) == before and not (tmp_path / "new").exists()

    mlm = mlm_config(max_steps=2, output_dir=str(tmp_path / "mlm"))
    pretrain(mlm)  # finished: train --resume auto there must not return its results as a classifier's
    with pytest.raises(ConfigError, match="holds a `sentiment pretrain` run, not a train run"):
        train(tiny_config(max_steps=2, output_dir=mlm.output_dir, resume="auto"))
    capsys.readouterr()
    for command, model in (("predict", mlm.output_dir), ("evaluate", str(Path(mlm.output_dir, "model")))):
        code = main([command, "--model_name_or_path", model, "--max_length", "64", "--device", "cpu",
                     *(["a fine film"] if command == "predict" else ["--data_dir", tiny_config().data_dir])])
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
        assert code == 2 and len(errors) == 1 and "classification head" in errors[0], errors


# ----------------------------------------------------------------------------- sources and bad inputs


def test_unlabeled_sources_are_read(tmp_path):
    """Labels -1, no label column, a .txt file: all texts, labels ignored; blank .txt lines skipped."""
    texts = ["a good film", "a bad one", "the plot"]
    parquet = tmp_path / "unsup.parquet"
    pd.DataFrame({"text": texts, "label": [-1, -1, -1]}).to_parquet(parquet)
    jsonl = write(tmp_path / "nolabel.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in texts))
    txt = write(tmp_path / "lines.txt", "a good film\n\na bad one\nthe plot\n")
    for source in (str(parquet), jsonl, txt):
        assert read_unlabeled(Config(train_file=source)) == (texts, source)
    write(tmp_path / "dir" / "train.csv", "text,label\na good film,-1\na bad one,1\nthe plot,\n")
    assert read_unlabeled(Config(data_dir=str(tmp_path / "dir")))[0] == texts
    # a ../shared-style folder: its train and unsupervised files, never its test file
    write(tmp_path / "dir" / "test.csv", "text,label\nheld out,1\n")
    pd.DataFrame({"text": ["more text"], "label": [-1]}).to_parquet(tmp_path / "dir" / "unsupervised.parquet")
    found, source = read_unlabeled(Config(data_dir=str(tmp_path / "dir")))
    assert found == [*texts, "more text"] and source.endswith("train.csv + " + str(tmp_path / "dir" / "unsupervised.parquet"))
    # aclImdb: train/neg, pos and unsup
    for sub, text in (("neg", "bad"), ("pos", "good"), ("unsup", "no label"), ("../test/pos", "held out")):
        write(tmp_path / "acl" / "train" / sub / "0_1.txt", text)
    assert read_unlabeled(Config(data_dir=str(tmp_path / "acl")))[0] == ["bad", "good", "no label"]


@pytest.mark.parametrize("content, expected", [
    (None, "does not exist"),
    ("\n\n", "holds no texts"),
])
def test_bad_inputs_are_one_error_line(tiny_dirs, tmp_path, capsys, content, expected):
    path = tmp_path / "texts.txt"
    if content is not None:
        write(path, content)
    code = main(["pretrain", "--model_name_or_path", str(tiny_dirs[0]), "--train_file", str(path), "--device", "cpu",
                 "--max_length", "64", "--output_dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and expected in err[0], err
    assert not (tmp_path / "run").exists()



def test_texts_of_one_or_two_tokens_and_a_high_mask_rate_train(mlm_config, tmp_path):
    """Odd inputs found in issue 19's sweep: 1-2 token texts with nearly every token masked still give finite
    losses and a saved model; mlm_probability 1 (nothing left to read) is refused in one line."""
    texts = write(tmp_path / "short.txt", "great\nbad film\nthe\nloved it\n" * 4)
    results = pretrain(mlm_config(train_file=texts, mlm_probability=0.99, mlm_val_fraction=0.25, epochs=2,
                                  micro_batch_size=4))
    rows = read_metrics(Path(results["model_dir"]).parent)[0]
    assert rows and all(np.isfinite(r["loss"]) for r in rows)
    with pytest.raises(ConfigError, match=r"mlm_probability=1.0 must be in \(0, 1\)"):
        mlm_config(mlm_probability=1.0)
