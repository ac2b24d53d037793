"""On a CUDA GPU, whatever it is (issue "Your GPU, whatever it is", item 6): `make test-gpu` runs these.

Every test here needs a CUDA device and skips without one (`pytest -m gpu -rs` says why). A tiny model
on the synthetic reviews of conftest's `tiny_dirs`, one epoch of 12 optimizer steps, in:
- fp32 (with TF32 matmuls, a decision the run prints), bf16 (where the card has it), fp16 (loss
  scaling: every metrics row carries the scale);
- torch.compile, against the eager fp32 run;
- torchrun: one process on one GPU, and DDP with NCCL on two GPUs where there are two. With a single
  process the engine forms no process group (world size 1 is a plain process), so NCCL itself only
  runs where two GPUs are visible;
- the MFU figure of every metrics row, in (0, 1) for a card in runlog.PEAK_FLOPS;
- out of memory: a micro-batch far past any card ends in the one-line TrainingError, not a traceback.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, cli_args, torchrun

from sentiment.config import Config
from sentiment.runlog import PEAK_FLOPS, peak_flops
from sentiment.train import train

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TF32_LINE = "engine: tf32=on (CUDA: fp32 matmuls run on tensor cores)"


def settings(model_dir: Path, data_dir: Path, output_dir: Path, **overrides) -> dict:
    """96 training reviews in micro-batches of 8: 12 steps; every step's line printed (log_every 1)."""
    values = dict(model_name_or_path=str(model_dir), data_dir=str(data_dir), n_train=0, n_test=0,
                  eval_batch_size=16, max_length=64, epochs=1, micro_batch_size=8, lr=3e-3, dropout=0.0,
                  device="cuda", precision="fp32", output_dir=str(output_dir), log_every=1)
    return {**values, **overrides}


def train_here(values: dict) -> tuple[dict, str]:
    """(results, what the run printed on stdout): `train` in this process."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):  # the console writes to sys.stdout as it is at each line
        results = train(Config(**values))
    return results, out.getvalue()


def train_rows(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "split" not in r]


def device_name() -> str:
    return torch.cuda.get_device_name(0)  # every run here uses cuda:0 (the local rank's GPU under torchrun)


def check_run(run: Path, results: dict, precision: str) -> list[dict]:
    """What every one-process GPU run must show: 12 finite steps on cuda:0 at `precision`, a scale in the rows exactly
    under fp16, an MFU figure exactly where the card's peak is known, and fp32 weights saved."""
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert all(math.isfinite(r["loss"]) for r in rows), [r["loss"] for r in rows]
    assert "device=cuda:0 (requested)" in results["engine"]
    assert f"precision={precision} (requested)" in results["engine"]
    assert TF32_LINE.removeprefix("engine: ") in results["engine"]
    assert results["environment"]["device_name"] == device_name()
    assert all(r["peak_mem_mb"] > 0 for r in rows)  # CUDA's allocator figure, not the host's RSS
    assert all(("scale" in r) == (precision == "fp16") for r in rows)
    peak = peak_flops(device_name(), precision)
    assert all(("mfu" in r) == (peak is not None) for r in rows)
    weights = load_file(str(run / "model" / "model.safetensors"))
    assert {t.dtype for t in weights.values()} == {torch.float32}  # fp32 master weights, whatever the autocast
    return rows


@pytest.fixture(scope="module")
def fp32_run(tiny_dirs, tmp_path_factory) -> dict:
    run = tmp_path_factory.mktemp("gpu_fp32") / "run"
    results, printed = train_here(settings(*tiny_dirs, run))
    return {"run": run, "results": results, "printed": printed}


def test_fp32_prints_its_tf32_decision(fp32_run):
    assert TF32_LINE in fp32_run["printed"].splitlines()
    check_run(fp32_run["run"], fp32_run["results"], "fp32")
    assert "step 12/12 | epoch 1 | loss" in fp32_run["printed"]


def test_bf16(tiny_dirs, tmp_path):
    if not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip(f"{device_name()} has no bf16 (pre-Ampere): the engine refuses --precision bf16 there")
    results, printed = train_here(settings(*tiny_dirs, tmp_path / "run", precision="bf16"))
    check_run(tmp_path / "run", results, "bf16")
    assert "engine: precision=bf16 (requested)" in printed


def test_fp16_logs_its_loss_scale(tiny_dirs, tmp_path):
    results, printed = train_here(settings(*tiny_dirs, tmp_path / "run", precision="fp16"))
    rows = check_run(tmp_path / "run", results, "fp16")
    assert any(d.startswith("grad_scaler=on (fp16 gradients underflow without loss scaling") for d in results["engine"])
    scales = [r["scale"] for r in rows]
    # GradScaler starts at 2**16 and only ever halves or doubles it: powers of two
    assert scales[0] == 2.0**16 and all(s > 0 and math.log2(s).is_integer() for s in scales), scales
    assert not all(r["skipped"] for r in rows)
    step_lines = [ln for ln in printed.splitlines() if ln.startswith("step ")]
    assert len(step_lines) == 12 and all(" | scale " in ln for ln in step_lines)


def test_mfu_is_a_fraction_of_the_cards_peak(fp32_run):
    name = device_name()
    if peak_flops(name, "fp32") is None:
        pytest.skip(f"{name!r} is not in runlog.PEAK_FLOPS ({', '.join(PEAK_FLOPS)}): the rows carry no MFU")
    rows = train_rows(fp32_run["run"])
    mfu = [r["mfu"] for r in rows]
    assert all(0 < m < 1 for m in mfu), mfu
    step_lines = [ln for ln in fp32_run["printed"].splitlines() if ln.startswith("step ")]
    assert step_lines and all(" | mfu " in ln for ln in step_lines)


def test_compile_matches_eager(fp32_run, tiny_dirs, tmp_path):
    try:
        import triton  # noqa: F401 - torch.compile's GPU code generator
    except ImportError:
        pytest.skip("torch.compile on CUDA needs triton, which this environment lacks")
    run = tmp_path / "run"
    results, printed = train_here(settings(*tiny_dirs, run, compile=True))
    assert any(ln.startswith("engine: compile=on") for ln in printed.splitlines())
    rows = check_run(run, results, "fp32")
    eager = train_rows(fp32_run["run"])
    # the same batches (lengths padded to 64 instead of 8: the padding is masked) and the same starting weights:
    # the first loss differs only by kernel arithmetic
    assert [r["samples"] for r in rows] == [r["samples"] for r in eager]
    np.testing.assert_allclose(rows[0]["loss"], eager[0]["loss"], rtol=1e-3)


# ----------------------------------------------------------------------------- torchrun on GPUs

def test_torchrun_one_process_on_one_gpu(tiny_dirs, tmp_path):
    run = tmp_path / "run"
    printed = torchrun(nproc=1, args=["-m", "sentiment", "train", *cli_args(settings(*tiny_dirs, run))])
    results = json.loads((run / "results.json").read_text())
    check_run(run, results, "fp32")
    assert results["environment"]["world_size"] == 1
    # a process group, if the engine ever forms one for a single process, is NCCL's on a GPU
    assert all("backend=nccl" in d for d in results["engine"] if d.startswith("distributed="))
    assert "test | accuracy" in printed


def test_ddp_with_nccl_matches_one_process(tiny_dirs, tmp_path):
    """2 GPUs x micro-batch 8 against one GPU at micro-batch 8 x accumulation 2: the same micro-batches."""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"DDP with NCCL needs 2 processes on 2 GPUs, {torch.cuda.device_count()} visible (NCCL refuses "
                    "two ranks on one GPU, and one process forms no process group)")
    ddp, one = tmp_path / "ddp", tmp_path / "one"
    printed = torchrun(nproc=2, args=["-m", "sentiment", "train", *cli_args(settings(*tiny_dirs, ddp))])
    assert "engine: distributed=DDP world_size=2 backend=nccl (torchrun environment found)" in printed
    assert "batch: global 16 = micro 8 x accum 1 x world 2" in printed
    train_here(settings(*tiny_dirs, one, grad_accum_steps=2))
    rows = {name: train_rows(run) for name, run in (("ddp", ddp), ("one", one))}
    assert [r["samples"] for r in rows["ddp"]] == [r["samples"] for r in rows["one"]]
    a, b = (load_file(str(run / "model" / "model.safetensors")) for run in (ddp, one))
    diff = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"NCCL DDP vs one GPU: max |weight difference| {diff:.2e}")
    # same kernels on the same kind of card; only the gradient sum's order (and atomics in attention's
    # backward) differ
    assert diff <= 1e-4, f"DDP weights differ from one process by {diff:.2e}"
    np.testing.assert_allclose([r["loss"] for r in rows["ddp"]], [r["loss"] for r in rows["one"]], rtol=1e-4)
    np.testing.assert_allclose([r["grad_norm"] for r in rows["ddp"]], [r["grad_norm"] for r in rows["one"]],
                               rtol=1e-3)


# ----------------------------------------------------------------------------- out of memory

def test_out_of_memory_is_one_error_line_with_the_fix(tmp_path):
    """A BERT-base-sized random model (the tiny tokenizer's vocabulary, so its embedding table fits the ids) at
    max_length 512, padded to it, in micro-batches of 4096: over 100 GB of activations per layer, past any card."""
    from transformers import BertConfig, BertForSequenceClassification

    from sentiment.tiny import VOCAB, make_reviews, make_tokenizer, write_jsonl

    model_dir, data_dir = tmp_path / "model", tmp_path / "data"
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                        intermediate_size=3072, max_position_embeddings=512, num_labels=2)
    BertForSequenceClassification(config).save_pretrained(model_dir)
    make_tokenizer().save_pretrained(model_dir)
    write_jsonl(data_dir / "train.jsonl", make_reviews(4096, seed=0, max_words=20))  # one full micro-batch
    write_jsonl(data_dir / "test.jsonl", make_reviews(16, seed=1, max_words=20))
    values = dict(model_name_or_path=model_dir, data_dir=data_dir, n_train=0, n_test=0, max_length=512,
                  padding="max_length", micro_batch_size=4096, epochs=1, device="cuda", precision="fp32",
                  output_dir=tmp_path / "run", log_every=0)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "sentiment", "train", *cli_args(values)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    expected = ("error: out of memory at micro_batch_size=4096, max_length=512: pass --micro_batch_size auto (the "
                "largest micro-batch that fits, same global batch), --gradient_checkpointing true, or --precision bf16 "
                "(fp16 on GPUs without bf16); or by hand lower --micro_batch_size and raise --grad_accum_steps to keep "
                "the global batch of 4096")
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    # the probe saw it coming: the header warned, with the same fixes, before the first step
    assert "activations over the device's memory at micro 4096 x 512 tokens (probe)" in proc.stdout, proc.stdout[-3000:]
    assert "warning: this run will not fit in cuda:0 memory" in proc.stdout, proc.stdout[-3000:]
    # ... and the line names the allocator's snapshot, written while the failed step's tensors were still held
    snapshot = tmp_path / "run" / "memory_snapshot.pickle"
    assert (f"{expected}. What filled the memory: drop {snapshot} on https://pytorch.org/memory_viz "
            "(--memory_snapshot true adds each allocation's stack)") in proc.stderr.splitlines(), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    with snapshot.open("rb") as f:
        assert pickle.load(f)["segments"], "the snapshot holds no memory segment"


def test_memory_snapshot_on_request_holds_the_allocations_stacks(tiny_config, tmp_path):
    train(tiny_config(device="cuda", epochs=1, memory_snapshot=True))
    with (tmp_path / "run" / "memory_snapshot.pickle").open("rb") as f:
        snapshot = pickle.load(f)
    assert snapshot["segments"] and any(trace for trace in snapshot["device_traces"]), "no allocation history"
