"""Padding-free batches (`--padding none`, sentiment/packing.py): the acceptance tests.

A packed micro-batch is its reviews' real tokens end to end in one row, with per-review positions and attention
(the CPU reference kernel: one SDPA call per review). It must compute what the padded batch computes:
  - model level, every family that packs: a classifier's logits, per-review losses and every parameter's
    gradient, and a masked LM's per-token losses and gradients, padded vs packed, to FP32_RTOL;
  - run level (train): micro 4 x accum 2 = micro 8 = 2 DDP processes x micro 4 = the padded run in the same
    order, and --micro_batch_size auto finds micro 4 x accum 2; SIGTERM then --resume auto is bitwise the
    uninterrupted run; pretrain: accumulation = one big batch = the padded run;
  - evaluate and predict of a model trained padded give the same probabilities packed;
  - and the pieces: pack(), token_counts, the error a padded batch raises in a packed model, the families that
    cannot pack, the attention kernel that cannot be asked for, gradient checkpointing.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (cli_args, is_timing, metrics_rows, read_metrics, saved_weights, sigterm_at_step, torchrun,
                      write)
from families import POSITIONS, TOKENIZERS, tiny_model_config

from sentiment.cli import main
from sentiment.commands import evaluate_model, predict
from sentiment.config import Config
from sentiment.data import Collator, collator
from sentiment.fit import PROBE_LIMIT_ENV
from sentiment.loop import token_counts
from sentiment.mlm_data import IGNORE, Masker, MLMCollator, PackedMLMCollator
from sentiment.model import load_mlm_model, load_model, packed_start, use_family
from sentiment.packing import REFERENCE, PackedCollator, is_packed, model_inputs, pack
from sentiment.pretrain import pretrain
from sentiment.tiny import make_reviews, make_tokenizer
from sentiment.train import train

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

# Padded vs packed in fp32: the same sums over the same real tokens, in another order (matmuls over 253 packed rows
# instead of 6 x 128 padded ones, SDPA over each review alone instead of with its masked padding keys). Measured:
# 1e-7 of the largest value at most (a few float32 ulps, eps = 1.2e-7); 1e-5 leaves 100x room for other BLAS
# builds, and anything real (a token attending across a boundary, a position off by one, the head reading the
# wrong token) moves the numbers by 1e-3 or more.
FP32_RTOL = 1e-5
PACKABLE = ("bert", "roberta", "electra", "distilbert", "albert", "xlm-roberta", "camembert")
LENGTHS = (37, 2, POSITIONS, 5, 64, 17)  # tokens per review, [CLS] and [SEP] included: not sorted, 2 and the longest


def assert_close(got: dict, want: dict, what: str) -> None:
    """Every tensor of `got` equals `want`'s to FP32_RTOL of the largest magnitude among all of them."""
    assert got.keys() == want.keys(), f"{what}: {sorted(set(got) ^ set(want))}"
    scale = max(float(w.abs().max()) for w in want.values())
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=FP32_RTOL, atol=FP32_RTOL * scale,
                                   msg=lambda m, key=key: f"{what} {key}: {m}")


# ----------------------------------------------------------------------------- model level, per family


@pytest.fixture(scope="module")
def family_model(tmp_path_factory):
    """family -> (folder, tokenizer): a tiny random classifier of `family`, dropout 0, saved once per module."""
    saved = {}

    def make(family: str):
        if family not in saved:
            from transformers import AutoModelForSequenceClassification

            tokenizer = TOKENIZERS.get(family, make_tokenizer)()
            config = tiny_model_config(family, len(tokenizer), tokenizer.pad_token_id, dropout=0.0)
            config.num_labels = 2
            torch.manual_seed(0)
            folder = tmp_path_factory.mktemp(family)
            AutoModelForSequenceClassification.from_config(config).save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            saved[family] = folder, tokenizer
        return saved[family]

    return make


def load(folder: Path, padding: str, loader=load_model, **options):
    """(model, first position or None) as train and pretrain load it: use_family on CPU, then `loader`."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(folder)
    use_family(config, "auto", "on CPU", options.get("gradient_checkpointing", False), padding, "on CPU")
    model = loader(str(folder), config=config, **options)
    return (model[0] if isinstance(model, tuple) else model), packed_start(config)


def reviews(tokenizer, seed: int = 0) -> list[np.ndarray]:
    """Random non-special tokens between the tokenizer's [CLS] and [SEP], LENGTHS long."""
    special = set(tokenizer.all_special_ids)
    words = [i for i in range(len(tokenizer)) if i not in special]
    rng = np.random.default_rng(seed)
    return [np.array([tokenizer.cls_token_id, *rng.choice(words, n - 2), tokenizer.sep_token_id]) for n in LENGTHS]


def forward_backward(model, batch: dict, training: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(logits, per-target cross-entropy, each parameter's gradient of the training loss: weights x losses).
    Evaluation mode unless `training`: no dropout (ALBERT's and DistilBERT's head dropout is not tiny_model_config's
    `dropout`)."""
    model.train(training)
    logits = model(**model_inputs(batch)).logits
    losses = F.cross_entropy(logits.flatten(0, -2), batch["labels"].flatten(), reduction="none")
    (losses * batch["weights"].flatten()).sum().backward()
    return logits.detach(), losses.detach(), {k: p.grad for k, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", PACKABLE)
def test_classifier_padded_and_packed_agree(family, family_model):
    folder, tokenizer = family_model(family)
    items = [(ids, i % 2, 1 / len(LENGTHS)) for i, ids in enumerate(reviews(tokenizer))]  # the mean loss
    out = {}
    for padding in ("dynamic", "none"):
        model, first = load(folder, padding)
        batch = collator(Config(padding=padding, max_length=POSITIONS), tokenizer.pad_token_id,
                         first_position=first)(items)
        assert is_packed(batch) == (padding == "none") and (first is not None) == (padding == "none")
        out[padding] = forward_backward(model, batch)
    padded, packed = out["dynamic"], out["none"]
    assert packed[0].shape == padded[0].shape == (len(LENGTHS), 2)
    assert_close({"logits": packed[0], "losses": packed[1]}, {"logits": padded[0], "losses": padded[1]}, family)
    assert len(padded[2]) == len(list(model.parameters()))  # every parameter has a gradient
    assert_close(packed[2], padded[2], f"{family} gradient")


@pytest.mark.parametrize("family", PACKABLE)
def test_masked_lm_padded_and_packed_agree(family, family_model):
    folder, tokenizer = family_model(family)
    masker = Masker.for_tokenizer(tokenizer, Config(seed=3))
    items = []
    for i, ids in enumerate(reviews(tokenizer, seed=1)):
        ids, labels = masker(ids, 0, i)
        predicted = labels != IGNORE  # the 2-token review has none: its weights are all 0
        weights = np.where(predicted, 1 / len(LENGTHS) / max(1, predicted.sum()), 0.0)  # as MaskedTexts
        items.append((ids, labels, weights.astype(np.float32)))
    out, state = {}, None
    for padding in ("dynamic", "none"):
        model, first = load(folder, padding, load_mlm_model)
        state = model.state_dict() if state is None else state  # its MLM head is new: the same one for both
        model.load_state_dict(state)
        batch = collator(Config(padding=padding, max_length=POSITIONS), tokenizer.pad_token_id, MLMCollator,
                         first)(items)
        logits, losses, grads = forward_backward(model, batch)
        out[padding] = losses[batch["labels"].flatten() != IGNORE], grads  # the predicted tokens, in order
    assert len(out["none"][0]) == sum((labels != IGNORE).sum() for _, labels, _ in items) > 0
    assert_close({"losses": out["none"][0]}, {"losses": out["dynamic"][0]}, family)
    assert_close(out["none"][1], out["dynamic"][1], f"{family} gradient")


# ----------------------------------------------------------------------------- train: accumulation, DDP, resume


def run_settings(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """33 reviews in global batches of 8: 5 steps an epoch, the last of one review (a weight-0 stand-in fills the
    other micro-batch); 15 test reviews in eval batches of 8; dropout 0 so that the splits compare."""
    return {**dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=33, n_test=15,
                   eval_batch_size=8, max_length=64, epochs=2, micro_batch_size=8, lr=3e-3, dropout=0.0,
                   device="cpu", precision="fp32", padding="none", output_dir=str(output_dir), log_every=0),
            **overrides}


@pytest.fixture(scope="module")
def packed_runs(tiny_dirs, tmp_path_factory) -> dict[str, Path]:
    """The same training four ways: packed micro 8 (`one`), packed micro 4 x accum 2 (`accum`), packed on 2 DDP
    processes x micro 4 (`ddp`: one torchrun) and padded micro 8 in the same (ungrouped) order (`padded`)."""
    folder = tmp_path_factory.mktemp("packed_runs")
    runs = {name: folder / name for name in ("one", "accum", "ddp", "padded")}
    train(Config(**run_settings(*tiny_dirs, runs["one"])))
    train(Config(**run_settings(*tiny_dirs, runs["accum"], micro_batch_size=4, grad_accum_steps=2)))
    train(Config(**run_settings(*tiny_dirs, runs["padded"], padding="dynamic", group_by_length=False)))
    torchrun(["-m", "sentiment", "train", *cli_args(run_settings(*tiny_dirs, runs["ddp"], micro_batch_size=4))])
    return runs


def assert_same_training(run: Path, reference: Path) -> None:
    """Per-step losses, lrs, gradient norms and final weights to float rounding; lrs and samples exactly."""
    got, want = read_metrics(run)[0], read_metrics(reference)[0]
    assert [r["step"] for r in got] == [r["step"] for r in want] == list(range(1, 11))
    assert [(r["lr"], r["samples"]) for r in got] == [(r["lr"], r["samples"]) for r in want]
    np.testing.assert_allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=FP32_RTOL)
    np.testing.assert_allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-4)
    assert_close(saved_weights(run), saved_weights(reference), f"{run.name} weights")


@pytest.mark.parametrize("name", ["accum", "ddp", "padded"])
def test_packed_training_is_the_same_however_it_is_split(packed_runs, name):
    assert_same_training(packed_runs[name], packed_runs["one"])
    rows = read_metrics(packed_runs[name])[0]
    assert rows[4]["samples"] == 1  # the short last global batch: one review, the stand-in weighs 0
    fractions = [r["padded_fraction"] for r in rows]
    assert any(fractions) if name == "padded" else not any(fractions)  # packed rows have no padding
    if name == "padded":  # the same reviews per step, so the same real tokens (split, a stand-in's count too)
        assert [r["tokens"] for r in rows] == [r["tokens"] for r in read_metrics(packed_runs["one"])[0]]
    tests = [json.loads((packed_runs[run] / "results.json").read_text())["test"] for run in (name, "one")]
    assert tests[0]["n"] == tests[1]["n"] == 15 and tests[0]["accuracy"] == tests[1]["accuracy"]
    assert tests[0]["loss"] == pytest.approx(tests[1]["loss"], rel=FP32_RTOL)


def test_micro_batch_size_auto_probes_packed_batches(packed_runs, tiny_dirs, tmp_path, monkeypatch):
    """--micro_batch_size auto, its probe told the device holds 5 reviews (a packed row of 8 copies of the longest
    does not fit, one of 4 does): micro 4 x accum 2, bit for bit the `accum` run."""
    monkeypatch.setenv(PROBE_LIMIT_ENV, "5")
    auto = train(Config(**run_settings(*tiny_dirs, tmp_path / "auto", micro_batch_size=0, global_batch_size=8)))
    assert auto["batch"] == {"global": 8, "micro": 4, "accum": 2, "world": 1}
    assert saved_weights(tmp_path / "auto").keys() == saved_weights(packed_runs["accum"]).keys()
    assert (tmp_path / "auto" / "model" / "model.safetensors").read_bytes() == \
        (packed_runs["accum"] / "model" / "model.safetensors").read_bytes()


def test_sigterm_then_resume_auto_is_bitwise_the_uninterrupted_packed_run(tiny_dirs, tmp_path):
    """Dropout on (the tiny model's 0.1, outside attention): the RNG states must resume too."""
    values = run_settings(*tiny_dirs, tmp_path / "reference", n_train=32, n_test=8, dropout=-1.0)
    train(Config(**values))
    cut = {**values, "output_dir": str(tmp_path / "cut")}
    assert sigterm_at_step(tmp_path / "cut", 3, lambda: train(Config(**cut))) == 143
    assert not (tmp_path / "cut" / "model").exists()
    train(Config(**cut, resume="auto"))
    got, want = saved_weights(tmp_path / "cut"), saved_weights(tmp_path / "reference")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    untimed = lambda run: [{k: v for k, v in r.items() if not is_timing(k)} for r in metrics_rows(run)]  # noqa: E731
    assert untimed(tmp_path / "cut") == untimed(tmp_path / "reference")
    assert len(untimed(tmp_path / "reference")) == 8 + 2  # 2 epochs of 4 steps, an evaluation after each


# ----------------------------------------------------------------------------- pretrain


def test_packed_pretrain_accumulation_equals_one_big_batch_and_the_padded_run(tiny_dirs, tmp_path, capsys):
    texts = write(tmp_path / "texts.txt", "\n".join(r["text"] for r in make_reviews(40, seed=5)) + "\n")
    same = dict(model_name_or_path=str(tiny_dirs[0]), train_file=texts, max_length=64, epochs=1, lr=5e-3,
                device="cpu", precision="fp32", mlm_val_fraction=0.2, dropout=0.0, log_every=0, padding="none")
    runs = {"one": dict(micro_batch_size=8), "accum": dict(micro_batch_size=4, grad_accum_steps=2),
            "padded": dict(micro_batch_size=8, padding="dynamic", group_by_length=False)}
    for name, overrides in runs.items():
        pretrain(Config(**{**same, **overrides, "output_dir": str(tmp_path / name)}))
    assert f"attention={REFERENCE}" in capsys.readouterr().out
    rows = {name: metrics_rows(tmp_path / name) for name in runs}
    for name in ("accum", "padded"):
        assert [r["step"] for r in rows[name]] == [r["step"] for r in rows["one"]] and len(rows["one"]) == 4 + 1
        np.testing.assert_allclose([r.get("loss", r.get("mlm_loss")) for r in rows[name]],
                                   [r.get("loss", r.get("mlm_loss")) for r in rows["one"]], rtol=FP32_RTOL)
        assert_close(saved_weights(tmp_path / name), saved_weights(tmp_path / "one"), f"pretrain {name} weights")


# ----------------------------------------------------------------------------- evaluate and predict


def test_evaluate_and_predict_of_a_padded_model_are_the_same_packed(packed_runs, tiny_dirs, tmp_path, capsys):
    model = str(packed_runs["padded"] / "model")
    base = dict(model_name_or_path=model, data_dir=str(tiny_dirs[1]), n_test=15, eval_batch_size=4, device="cpu",
                precision="fp32")
    metrics = {padding: evaluate_model(Config(**base, padding=padding)) for padding in ("dynamic", "none")}
    for m in metrics.values():
        m.pop("reviews_per_second")
    assert metrics["none"].keys() == metrics["dynamic"].keys() and metrics["none"]["n"] == 15
    assert metrics["none"]["confusion_matrix"] == metrics["dynamic"]["confusion_matrix"]
    assert metrics["none"]["loss"] == pytest.approx(metrics["dynamic"]["loss"], rel=FP32_RTOL)
    # and the other way: a model trained packed (its config.json names no packed kernel) evaluates padded
    trained = packed_runs["one"]
    assert "packed" not in (trained / "model" / "config.json").read_text()
    padded = evaluate_model(Config(**{**base, "model_name_or_path": str(trained)}))
    assert padded["loss"] == pytest.approx(json.loads((trained / "results.json").read_text())["test"]["loss"],
                                           rel=FP32_RTOL)

    texts = ["Great.", "boring " * 100, *(r["text"] for r in make_reviews(6, seed=9))]  # 3 tokens; one cut at 64
    padded = predict(Config(model_name_or_path=model, device="cpu", precision="fp32"), texts)
    capsys.readouterr()
    assert main(["predict", "--model_name_or_path", model, "--padding", "none", "--device", "cpu", "--precision",
                 "fp32", "--eval_batch_size", "4", "--output", "-", *texts]) == 0
    out = capsys.readouterr()
    assert "attention=packed_sdpa" in out.err
    packed = [json.loads(line) for line in out.out.splitlines()]
    assert [p["label"] for p in packed] == [p["label"] for p in padded]
    np.testing.assert_allclose([[p["prob_neg"], p["prob_pos"]] for p in packed],
                               [[p["prob_neg"], p["prob_pos"]] for p in padded], rtol=FP32_RTOL, atol=1e-7)


# ----------------------------------------------------------------------------- the pieces


@pytest.mark.parametrize("first", [0, 2])
def test_pack_restarts_positions_at_each_review(first):
    batch = pack([np.array([7, 8, 9]), np.array([4, 5]), np.array([1, 2, 3, 6])], first)
    assert batch["input_ids"].tolist() == [[7, 8, 9, 4, 5, 1, 2, 3, 6]] and batch["input_ids"].dtype == torch.long
    assert batch["position_ids"].tolist() == [[first + p for p in (0, 1, 2, 0, 1, 0, 1, 2, 3)]]
    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        assert batch[key].tolist() == [0, 3, 5, 9] and batch[key].dtype == torch.int32  # the kernels' type
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert set(model_inputs({**batch, "labels": 0, "weights": 0})) == set(batch)


def test_token_counts_of_packed_batches():
    """(samples with a nonzero weight, real tokens, tokens computed): packed, the last two are equal, and the
    samples and real tokens are the padded batch's."""
    rows = [np.arange(5) + 5, np.array([2, 3]), np.arange(9) + 5]
    items = [(ids, 1, w) for ids, w in zip(rows, (0.5, 0.5, 0.0))]  # the last: a weight-0 stand-in
    padded = token_counts(Collator(pad_id=0, max_length=64)(items))
    assert token_counts(PackedCollator(0)(items)).tolist() == [2, 16, 16] and padded.tolist()[:2] == [2, 16]
    labels = [np.where(np.arange(len(ids)) == 1, ids, IGNORE) for ids in rows]  # token 1 of each predicted
    weights = [np.where(lab != IGNORE, w, 0.0).astype(np.float32) for lab, w in zip(labels, (0.5, 0.0, 0.5))]
    mlm = list(zip(rows, labels, weights))  # the 2-token text predicts nothing here: not a sample
    assert token_counts(PackedMLMCollator(0)(mlm)).tolist() == [2, 16, 16]
    assert token_counts(MLMCollator(pad_id=0, max_length=64)(mlm)).tolist()[:2] == [2, 16]


def test_a_padded_batch_into_a_packed_model_is_an_error(family_model):
    folder, tokenizer = family_model("bert")
    model, first = load(folder, "none")
    batch = Collator(pad_id=tokenizer.pad_token_id)([(ids, 0, 1.0) for ids in reviews(tokenizer)])
    with pytest.raises(RuntimeError, match="set up for padding-free batches .* got a padded one"):
        model(**model_inputs(batch))


@pytest.mark.parametrize("family", ["deberta-v2", "mpnet", "modernbert"])
def test_a_family_that_cannot_pack_runs_padded_and_says_why(family):
    config = tiny_model_config(family, 64, 1)
    line = use_family(config, "auto", "on CPU", padding="none", varlen_unusable="on CPU")
    assert "padding none: " in line and "cannot take padding-free batches" in line and "padded batches" in line
    assert packed_start(config) is None
    assert type(collator(Config(padding="none"), 1, first_position=packed_start(config))) is Collator


def test_an_attention_kernel_asked_for_by_name_runs_padded_and_says_so():
    config = tiny_model_config("bert", 64, 0)
    line = use_family(config, "eager", "on CPU", padding="none", varlen_unusable="on CPU")
    assert "attention=eager (requested; padding none not used: attn_implementation=eager runs padded" in line
    assert packed_start(config) is None and config._attn_implementation == "eager"
    assert type(collator(Config(padding="none"), 0, first_position=packed_start(config))) is Collator


@pytest.mark.parametrize("family", ["bert", "albert"])  # transformers' checkpointing, and ours (ALBERT)
def test_gradient_checkpointing_gives_the_same_gradients_packed(family, family_model):
    folder, tokenizer = family_model(family)
    grads, attention_calls = {}, {}
    for on in (False, True):
        model, first = load(folder, "none", gradient_checkpointing=on)
        calls = []  # each attention's forward: run again in the backward where checkpointed
        for module in model.modules():
            if type(module).__name__ in ("BertSelfAttention", "AlbertAttention"):
                module.register_forward_hook(lambda *_: calls.append(1))
        batch = PackedCollator(first)([(ids, i % 2, 1 / 6) for i, ids in enumerate(reviews(tokenizer))])
        torch.manual_seed(0)  # ALBERT's head dropout (checkpointing restores the RNG for the recomputation)
        grads[on] = forward_backward(model, batch, training=True)[2]  # checkpointing is for training only
        attention_calls[on] = len(calls)
    assert attention_calls[True] == 2 * attention_calls[False] > 0, attention_calls
    assert grads[True].keys() == grads[False].keys()
    assert all(torch.equal(grads[True][k], grads[False][k]) for k in grads[False])
