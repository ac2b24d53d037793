"""train.py end to end on the tiny model: outputs, exact gradient accumulation, learning, and the
`evaluate` / `predict` commands on the saved model."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import read_metrics, saved_weights

from sentiment.cli import main
from sentiment.config import Config
from sentiment.data import read_split, take
from sentiment.train import train


def max_weight_diff(a: Path, b: Path) -> float:
    wa, wb = saved_weights(a), saved_weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


# ----------------------------------------------------------------------------- one full run, shared


@pytest.fixture(scope="module")
def trained(tiny_dirs, tmp_path_factory):
    """A tiny run long enough to learn the synthetic reviews: (config, results, output dir)."""
    model_dir, data_dir = tiny_dirs
    out = tmp_path_factory.mktemp("trained") / "run"
    cfg = Config(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0, max_length=64,
                 epochs=10, micro_batch_size=8, lr=3e-3, dropout=0.0, device="cpu", precision="fp32",
                 output_dir=str(out), log_every=5)
    return cfg, train(cfg), out


def test_run_writes_config_metrics_results_and_model(trained):
    cfg, results, out = trained
    assert json.loads((out / "config.json").read_text()) == cfg.to_dict()
    assert Config(**json.loads((out / "config.json").read_text())) == cfg  # a valid config file again
    on_disk = json.loads((out / "results.json").read_text())
    for key in ("accuracy", "f1", "precision", "recall", "loss", "confusion_matrix", "samples_per_second",
                "runtime_s", "steps"):
        assert key in on_disk, key
        assert on_disk[key] == results[key]
    assert results["steps"] == 10 * 96 // 8
    cm = np.array(results["confusion_matrix"])
    assert cm.shape == (2, 2) and cm.sum() == 48
    assert results["accuracy"] == pytest.approx(np.trace(cm) / 48)
    # throughput: the training samples over the seconds spent in optimizer steps, a part of the whole run
    assert results["samples_per_second"] == pytest.approx(10 * 96 / results["train_seconds"])
    assert 0 < results["train_seconds"] < results["runtime_s"]
    assert (out / "model" / "config.json").is_file() and (out / "model" / "model.safetensors").is_file()
    assert (out / "model" / "tokenizer.json").is_file() or (out / "model" / "vocab.txt").is_file()
    model_config = json.loads((out / "model" / "config.json").read_text())
    assert model_config["id2label"] == {"0": "neg", "1": "pos"}
    assert model_config["label2id"] == {"neg": 0, "pos": 1}


def test_metrics_have_a_row_per_step_and_per_eval(trained):
    _, results, out = trained
    steps, evals = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(1, results["steps"] + 1))
    assert [r["epoch"] for r in steps] == [s // 12 + 1 for s in range(120)]
    for row in steps:
        for key in ("loss", "lr", "grad_norm", "samples", "tokens", "padded_fraction", "samples_per_s", "step_ms"):
            assert key in row, key
        assert np.isfinite(row["loss"]) and not row["skipped"]
    assert sum(r["samples"] for r in steps) == 10 * 96
    assert steps[0]["lr"] == 3e-3 and steps[-1]["lr"] == pytest.approx(3e-3 / 120)  # linear decay, no warmup
    assert [(r["step"], r["split"]) for r in evals] == [(12 * e, "test") for e in range(1, 11)]
    assert evals[-1]["accuracy"] == results["accuracy"]
    # it learned: the loss fell (first 12 steps vs last 12)
    assert np.mean([r["loss"] for r in steps[-12:]]) < 0.5 * np.mean([r["loss"] for r in steps[:12]])


def test_log_lines_have_the_fixed_format(tiny_config, capsys):
    train(tiny_config(epochs=1, log_every=4))  # 12 steps: lines at steps 1, 4, 8, 12
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.startswith("step ")]
    assert [line.split(" |")[0] for line in lines] == ["step 1/12", "step 4/12", "step 8/12", "step 12/12"]
    assert all(" | loss " in line and " | lr " in line and " ex/s | " in line and " ms" in line for line in lines)
    assert "engine: device=cpu (requested)" in out and "engine: precision=fp32 (requested)" in out
    assert "batch: global 8 = micro 8 x accum 1 x world 1 | 12 steps/epoch x 1 epochs = 12 steps" in out


def test_tiny_model_learns_the_synthetic_reviews(trained):
    _, results, _ = trained
    assert results["accuracy"] >= 0.85  # held-out synthetic reviews; chance is 0.5
    assert results["loss"] < 0.45  # below ln 2 = 0.693, the loss of a coin flip


def test_tiny_model_overfits_its_training_set(tiny_config, tiny_dirs):
    _, data_dir = tiny_dirs
    cfg = tiny_config(train_file=str(data_dir / "train.jsonl"), test_file=str(data_dir / "train.jsonl"),
                      data_dir="", epochs=12, dropout=0.0)
    results = train(cfg)
    assert results["accuracy"] == 1.0
    assert results["loss"] < 0.05


def test_pipeline_loads_the_saved_model(trained):
    from transformers import pipeline

    _, results, out = trained
    clf = pipeline("text-classification", model=str(out / "model"), device="cpu")
    pos, neg = clf(["great excellent wonderful movie loved it", "awful boring terrible film hated it"])
    assert pos["label"] == "pos" and neg["label"] == "neg"
    assert pos["score"] > 0.8 and neg["score"] > 0.8
    # and it agrees with our own evaluation on the test reviews
    cfg, _, _ = trained
    test = take(read_split(cfg, "test"), 0, cfg.seed, "n_test")
    preds = clf(list(test["text"]), truncation=True, max_length=64, batch_size=16)
    accuracy = np.mean([p["label"] == ("pos" if y else "neg") for p, y in zip(preds, test["label"])])
    assert abs(accuracy - results["accuracy"]) <= 1 / 48 + 1e-9  # other batching: a near-tie may flip, no more


def test_evaluate_command_reproduces_the_test_accuracy(trained, capsys):
    cfg, results, out = trained
    code = main(["evaluate", "--model_name_or_path", str(out / "model"), "--data_dir", cfg.data_dir,
                 "--n_test", "0", "--max_length", "64", "--device", "cpu", "--precision", "fp32"])
    assert code == 0
    metrics = json.loads(capsys.readouterr().out)  # stdout holds the metrics and nothing else
    assert metrics["accuracy"] == pytest.approx(results["accuracy"])
    assert metrics["loss"] == pytest.approx(results["loss"], abs=1e-5)
    assert metrics["confusion_matrix"] == results["confusion_matrix"]


def test_evaluate_in_bf16_agrees_with_fp32(trained, capsys):
    cfg, results, out = trained  # evaluate casts the weights to bf16 (engine.wrap(inference=True))
    code = main(["evaluate", "--model_name_or_path", str(out / "model"), "--data_dir", cfg.data_dir,
                 "--n_test", "0", "--max_length", "64", "--device", "cpu", "--precision", "bf16"])
    assert code == 0
    captured = capsys.readouterr()
    assert "engine: weights=bf16" in captured.err  # diagnostics on stderr
    metrics = json.loads(captured.out)
    assert abs(metrics["accuracy"] - results["accuracy"]) <= 1 / 48 + 1e-9  # a near-tie may flip, no more
    assert metrics["loss"] == pytest.approx(results["loss"], abs=0.02)


def test_predict_command(trained, capsys):
    _, _, out = trained
    code = main(["predict", "great excellent wonderful movie", "awful boring terrible film", "--model_name_or_path",
                 str(out / "model"), "--device", "cpu", "--precision", "fp32", "--max_length", "64"])
    assert code == 0
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]  # only results on stdout
    assert [(label, text) for label, _, text in lines] == [("pos", "great excellent wonderful movie"),
                                                           ("neg", "awful boring terrible film")]
    # the probability printed is the model's softmax for the label printed
    from sentiment.model import load_model, load_tokenizer

    model, tok = load_model(str(out / "model")).eval(), load_tokenizer(str(out / "model"))
    with torch.no_grad():
        for label, prob, text in lines:
            probs = model(**tok(text, return_tensors="pt")).logits.softmax(-1)[0]
            assert float(prob) == pytest.approx(probs[model.config.label2id[label]].item(), abs=1e-4)
            assert float(prob) > 0.8  # the trained model is sure of these two


@pytest.mark.parametrize("command", ["train", "evaluate", "predict"])
def test_one_max_length_rule_for_every_command(trained, tiny_dirs, tmp_path, command, capsys):
    """A max_length past the model's 128 positions is refused the same way by every command, before any work."""
    _, data_dir = tiny_dirs
    model = str(trained[2] / "model")
    extra = {"train": ["--data_dir", str(data_dir), "--output_dir", str(tmp_path / "run")],
             "evaluate": ["--data_dir", str(data_dir)], "predict": ["a fine film"]}[command]
    code = main([command, *extra, "--model_name_or_path", model, "--device", "cpu", "--max_length", "129"])
    assert code == 2
    assert capsys.readouterr().err.splitlines()[-1] == ("error: max_length=129 exceeds the model's 128 positions; "
                                                         "use --max_length 128 or less")
    assert not (tmp_path / "run").exists()


def test_predict_truncates_a_review_longer_than_max_length(trained, capsys):
    long_review = " ".join(["great excellent movie"] * 100)  # 300 words, cut to 128 tokens
    code = main(["predict", long_review, "--model_name_or_path", str(trained[2] / "model"), "--device", "cpu",
                 "--precision", "fp32", "--max_length", "128"])
    assert code == 0
    assert [line.split("\t")[0] for line in capsys.readouterr().out.splitlines() if "\t" in line] == ["pos"]


def test_cli_train_runs(tiny_dirs, tmp_path):
    model_dir, data_dir = tiny_dirs
    out = tmp_path / "cli_run"
    code = main(["train", "--model_name_or_path", str(model_dir), "--data_dir", str(data_dir), "--n_train", "16",
                 "--n_test", "8", "--max_length", "64", "--epochs", "1", "--device", "cpu", "--precision", "fp32",
                 "--output_dir", str(out), "--log_every", "0"])
    assert code == 0
    assert json.loads((out / "results.json").read_text())["steps"] == 2
    assert json.loads((out / "config.json").read_text())["n_train"] == 16


# ----------------------------------------------------------------------------- exact gradient accumulation


def run_variant(tiny_config, out: Path, **overrides) -> tuple[list[dict], Path]:
    values = dict(dropout=0.0, precision="fp32", n_test=8, log_every=0, output_dir=str(out))
    values.update(overrides)
    train(tiny_config(**values))
    return read_metrics(out)[0], out


def assert_same_run(a, b, tol=1e-6):
    (rows_a, out_a), (rows_b, out_b) = a, b
    assert [r["samples"] for r in rows_a] == [r["samples"] for r in rows_b]
    np.testing.assert_allclose([r["loss"] for r in rows_a], [r["loss"] for r in rows_b], rtol=0, atol=tol)
    np.testing.assert_allclose([r["grad_norm"] for r in rows_a], [r["grad_norm"] for r in rows_b], rtol=1e-5, atol=tol)
    assert max_weight_diff(out_a, out_b) < tol


def test_one_micro_batch_of_16_equals_two_of_8(tiny_config, tmp_path):
    one = run_variant(tiny_config, tmp_path / "one", n_train=16, epochs=3, micro_batch_size=16, grad_accum_steps=1)
    two = run_variant(tiny_config, tmp_path / "two", n_train=16, epochs=3, micro_batch_size=8, grad_accum_steps=2)
    assert len(one[0]) == 3  # one update per epoch: the first comes after both micro-batches
    assert_same_run(one, two)
    # the weights moved at all (otherwise equality proves nothing)
    untouched = run_variant(tiny_config, tmp_path / "lr", n_train=16, epochs=3, micro_batch_size=16, lr=1e-9)
    assert max_weight_diff(one[1], untouched[1]) > 1e-3


def test_short_last_group_is_stepped_and_weighted_by_its_samples(tiny_config, tmp_path):
    # 20 reviews, global batch 8: steps of 8, 8 and 4 samples per epoch, however the batch is split
    plain = run_variant(tiny_config, tmp_path / "plain", n_train=20, epochs=2, micro_batch_size=8)
    assert [r["samples"] for r in plain[0]] == [8, 8, 4] * 2
    assert [r["step"] for r in plain[0]] == [1, 2, 3, 4, 5, 6]
    split = run_variant(tiny_config, tmp_path / "split", n_train=20, epochs=2, micro_batch_size=4, grad_accum_steps=2)
    assert_same_run(plain, split)
    # a last group of 1 sample spread over 4 micro-batches: three are weight-0 stand-ins
    big = run_variant(tiny_config, tmp_path / "big", n_train=17, epochs=2, micro_batch_size=16)
    many = run_variant(tiny_config, tmp_path / "many", n_train=17, epochs=2, micro_batch_size=4, grad_accum_steps=4)
    assert [r["samples"] for r in big[0]] == [16, 1, 16, 1]
    assert_same_run(big, many)


def test_logged_loss_is_the_mean_over_the_short_group(tiny_config, tiny_dirs, tmp_path):
    """4 reviews in a global batch of 8: the loss (and so the gradient) is their mean, not their sum / 8."""
    from sentiment.model import load_model, load_tokenizer

    model_dir, _ = tiny_dirs
    cfg = tiny_config(n_train=4, epochs=1, micro_batch_size=8, dropout=0.0, n_test=8, output_dir=str(tmp_path / "r"))
    train(cfg)
    rows, _ = read_metrics(tmp_path / "r")
    assert [r["samples"] for r in rows] == [4]
    reviews = take(read_split(cfg, "train"), 4, cfg.seed, "n_train")
    tok = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dropout=0.0).eval()  # the weights the first step started from
    enc = tok(list(reviews["text"]), padding=True, truncation=True, max_length=64, return_tensors="pt")
    with torch.no_grad():
        expected = F.cross_entropy(model(**enc).logits, torch.tensor(list(reviews["label"]))).item()
    assert rows[0]["loss"] == pytest.approx(expected, abs=1e-5)


def test_bf16_run_on_cpu_learns(tiny_config):
    """bf16 autocast trains as fp32 does: 6 epochs (72 steps) reach 0.92 held-out accuracy (fp32: 0.96)."""
    results = train(tiny_config(epochs=6, dropout=0.0, precision="bf16"))
    assert any(d.startswith("precision=bf16") for d in results["engine"])
    cm = np.array(results["confusion_matrix"])
    assert cm.sum() == 48 and results["accuracy"] == pytest.approx(np.trace(cm) / 48)
    assert results["accuracy"] >= 0.8 and results["loss"] < 0.45  # chance: 0.5 and ln 2 = 0.693


def test_validation_split_selects_the_best_model(tiny_config, tmp_path):
    from sentiment.checkpoint import checkpoint_path, checkpoint_paths, load_checkpoint

    out = tmp_path / "val"
    results = train(tiny_config(val_fraction=0.25, epochs=3, dropout=0.0, output_dir=str(out)))
    _, evals = read_metrics(out)
    assert [r["split"] for r in evals] == ["val"] * 3
    assert results["best_val_accuracy"] == max(r["accuracy"] for r in evals)
    newest = load_checkpoint(checkpoint_paths(out / "checkpoints")[0])  # it names the best checkpoint
    best = load_checkpoint(checkpoint_path(out, newest["best_step"]))
    best_epoch = 1 + [r["accuracy"] for r in evals].index(results["best_val_accuracy"])
    assert best["step"] == best_epoch * 9  # 72 training reviews / 8
    saved = saved_weights(out)
    assert all(torch.equal(saved[k], best["model"][k]) for k in saved)  # the best one is what is saved


def test_layer_lr_decay_run_prints_its_rates_and_finishes(tiny_config, capsys):
    results = train(tiny_config(layer_lr_decay=0.9, epochs=1, log_every=0))
    out = capsys.readouterr().out
    assert "lr: layer decay 0.9 of peak 3.0e-03: embeddings x0.81 | layers 1-2 x0.90 1.00 | head x1.00\n" in out
    assert results["steps"] == 12
