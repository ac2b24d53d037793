"""scripts/gpu_check.py, gpu_prepare.py and gpu_summary.py (issue 23): the pieces, then the whole check end to end
as `--dry-run` (the tiny random BERT on the CPU, every step shrunk to seconds; test-gpu's tests skip without CUDA)
on a carry folder that gpu_prepare.py filled, as the GPU machine gets it."""

import argparse
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, load_script, subprocess_env

from sentiment.data import truncate_ids
from sentiment.tiny import make_model, make_tokenizer

check = load_script("gpu_check")
prepare = load_script("gpu_prepare")
summary = load_script("gpu_summary")


def test_cut_texts_keep_exactly_the_tokens_head_truncation_reads():
    tok = make_tokenizer()
    long = " ".join(["the movie was great and the plot was dull"] * 6)  # 54 words, one token each
    texts = [long, "a short review.", long.replace("great", "superb")]
    cut, whole = prepare.cut_texts(texts, tok, max_length=16)
    assert whole == 0
    assert cut[1] == texts[1]  # under 16 tokens: nothing to cut
    for text, short in zip(texts, cut):
        full_ids, short_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (text, short))
        assert truncate_ids(full_ids, 16, "head", tok.cls_token_id, tok.sep_token_id) == \
            truncate_ids(short_ids, 16, "head", tok.cls_token_id, tok.sep_token_id)
        assert text.startswith(short)
    assert len(cut[0].split()) == 15  # [CLS] + 14 + [SEP] read, cut at the space after the 15th token


def test_packed_weights_come_back_as_fp32_rounded_through_fp16(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path / "model")
    make_tokenizer().save_pretrained(tmp_path / "model")
    prepare.pack_model(tmp_path / "model", tmp_path / "packed")
    assert not (tmp_path / "packed" / "model.safetensors").exists()
    prepare.unpack_model(tmp_path / "packed", tmp_path / "back")
    before = load_file(tmp_path / "model" / "model.safetensors")
    after = load_file(tmp_path / "back" / "model.safetensors")
    assert before.keys() == after.keys()
    for name, tensor in before.items():
        assert after[name].dtype == tensor.dtype
        assert torch.equal(after[name], tensor.half().float() if tensor.is_floating_point() else tensor), name
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (tmp_path / "model" / "tokenizer.json").read_text()


def test_unpack_without_a_packed_model_is_one_error_line(tmp_path, capsys):
    assert prepare.main(["unpack", str(tmp_path), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "prepare" in err
    assert not (tmp_path / "out").exists()


def test_a_slow_step_is_stopped_within_its_box_and_a_failed_one_recorded(tmp_path):
    log, env = tmp_path / "step.log", subprocess_env()
    # the child starts a grandchild: the whole process group goes when the box ends
    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; "
             "time.sleep(60)']); print(p.pid, flush=True); time.sleep(60)")
    start = time.monotonic()
    status = check.run_commands([[sys.executable, "-c", spawn]], log, env, box=3, parallel=False)
    assert status == "timeout (3 s box)" and time.monotonic() - start < 20
    grandchild = int(log.read_text().splitlines()[1])
    for _ in range(50):  # reaped by init once killed
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        pytest.fail("the step's grandchild outlived its box")
    failing = [[sys.executable, "-c", "raise SystemExit(3)"], [sys.executable, "-c", "print('not reached')"]]
    assert check.run_commands(failing, log, env, box=30, parallel=False) == "failed (exit 3)"
    assert log.read_text().splitlines()[-1].endswith("'raise SystemExit(3)'")  # the step ended there
    assert check.run_commands(failing, log, env, box=30, parallel=True) == "failed (exit 3)"


def test_a_step_past_the_budget_is_skipped(tmp_path):
    ctx = argparse.Namespace(work=tmp_path, out=tmp_path, deadline=time.monotonic() - 1)
    record = check.run_step(ctx, "full")
    assert record["status"] == "skipped (budget spent)" and record["item"] == "c"


def test_the_gain_appears_only_above_the_spread_over_seeds():
    base = {"mean": 0.7783, "std": 0.0225, "values": [0.769, 0.762, 0.804]}
    assert summary.gain(base, {"mean": 0.7433, "std": 0.0115}) == {"gain": "-3.5 points", "gain appears": "no"}
    assert summary.gain(base, {"mean": 0.79, "std": 0.01})["gain appears"] == "no"  # +1.2 < 2.25
    assert summary.gain(base, {"mean": 0.81, "std": 0.01}) == {"gain": "+3.2 points", "gain appears": "yes"}
    assert summary.mean_std(base) == "0.7783 ± 0.0225 (0.769 / 0.762 / 0.804)"
    assert summary.mean_std({"mean": 0.5, "std": None, "values": [0.5]}) == "0.5000 ± - (0.500)"


def test_key_figures_are_read_from_logs():
    assert summary.json_in('noise\n{"torch": "2.11"}\nmore\n') == {"torch": "2.11"}
    assert summary.json_in('{\n  "ok": true,\n  "a": [1]\n}\n') == {"ok": True, "a": [1]}
    assert summary.pytest_line("x\n====== 7 passed, 1 skipped in 40.2s ======\n") == "7 passed, 1 skipped in 40.2s"


def test_dry_run_of_every_step_on_a_prepared_carry_folder(tmp_path):
    """gpu_prepare.py fills a carry folder from the tiny model and reviews (no wheels: offline); gpu_check.py
    --dry-run installs from it (unpacking the model), then runs every step at tiny sizes: all ok, all in the table."""
    model, data = check.tiny_inputs(tmp_path / "inputs")
    prepare.prepare(prepare.Path(data), prepare.Path(model), tmp_path / "carry", wheels=False)
    assert sorted(p.name for p in (tmp_path / "carry" / "imdb").iterdir()) == ["train.parquet",
                                                                               "unsupervised_128.parquet"]
    out, work = tmp_path / "out", tmp_path / "work"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "gpu_check.py"), "--dry-run", "--data",
                           str(tmp_path / "carry" / "imdb"), "--model", str(tmp_path / "carry" / "minilm"),
                           "--work", str(work), str(out)], capture_output=True, text=True, env=subprocess_env(),
                          timeout=600)
    report = json.loads((out / "summary.json").read_text())
    assert [r["step"] for r in report["steps"]] == list(check.STEPS)
    assert {r["step"]: r["status"] for r in report["steps"]} == dict.fromkeys(check.STEPS, "ok"), \
        proc.stdout[-3000:] + (out / "steps.log").read_text()[-3000:]
    assert proc.returncode == 0
    table = (out / "summary.md").read_text()
    for name in check.STEPS:
        assert f" {name} | ok | " in table
    assert "unpacked from" in table and (work / "minilm" / "model.safetensors").is_file()
    figures = {r["step"]: r["figures"] for r in report["steps"]}
    line = figures["test-gpu"]["pytest"]  # no CUDA here: every gpu test skips, none fails
    assert re.match(r"\d+ skipped", line) and not re.search(r"failed|error", line), line
    assert figures["doctor"]["ok"] is True
    assert 0 <= figures["full"]["accuracy"] <= 1 and figures["pretrain"]["steps"] >= 10
    assert figures["pretrain"]["epochs"] > 0
    assert {"minilm accuracy", "pretrained accuracy", "gain", "gain appears"} <= figures["few-shot"].keys()
    assert (out / "steps.log").read_text().count("\n===== ") == len(check.STEPS)


def test_bench_figures_read_what_the_benchmark_writes(tmp_path):
    rows = [{"part": "tutorial", "name": "ours", "status": "ok", "wall_s": 30.0, "tokens_per_s": 9e4},
            {"part": "tutorial", "name": "ours_compile", "status": "timeout (45 s box)", "wall_s": 45.0},
            {"part": "accuracy", "name": "ours_packed", "status": "ok", "wall_s": 20.0, "accuracy": 0.81}]
    (tmp_path / "bench").mkdir()
    (tmp_path / "bench" / "bench.json").write_text(json.dumps({"matmul": {"tflops": 700.0}, "rows": rows}))
    found = summary.bench_figures(argparse.Namespace(work=tmp_path))
    assert found == {"matmul TFLOP/s": 700.0, "tutorial ours wall_s": 30.0, "tutorial ours tokens_per_s": 9e4,
                     "tutorial ours_compile": "timeout (45 s box)", "tutorial ours_compile wall_s": 45.0,
                     "tutorial ours_compile tokens_per_s": None, "accuracy ours_packed accuracy": 0.81}
