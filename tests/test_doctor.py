"""doctor.py: `sentiment doctor` reports the machine, checks a training step in each precision against fp32 on
the CPU and a 2-process all-reduce, and fails with one `error:` line naming the fix."""

import contextlib
import io
import json
import math
import re

import pytest
import torch

from sentiment import doctor, hub
from sentiment.cli import main
from sentiment.engine import Engine, resolve_device

HAS_CUDA = torch.cuda.is_available()
HAS_MPS = bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err[len("error: "):].rstrip("\n")


@pytest.fixture(scope="module")
def report() -> dict:
    """`sentiment doctor --json`, run once for the module (it takes seconds): its exit status and JSON."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        status = main(["doctor", "--json"])
    return {"status": status, **json.loads(out.getvalue())}


def test_json_exits_0_and_names_the_device(report):
    assert report["status"] == 0
    assert report["ok"] is True and all(check["ok"] for check in report["checks"]), report["checks"]
    assert report["device"] == str(resolve_device("auto", 0)[0])
    if not (HAS_CUDA or HAS_MPS):
        assert report["device"] == "cpu"
        assert report["precision"] in ("fp32", "bf16")  # bf16 where the CPU has it in hardware
    assert report["choice"]["device_reason"].startswith("auto: ")


def test_json_lists_the_precisions_checked_within_their_tolerances(report):
    checked = report["precisions_checked"]
    expected = {"fp32", "bf16"} if report["device"] == "cpu" else {"fp32"}  # CPU autocast always has bf16
    assert expected <= set(checked), checked
    assert report["precision"] in checked  # the precision training would pick is among those checked
    for precision, errors in checked.items():
        assert errors["tolerance"] == doctor.TOLERANCE[precision]
        assert 0 <= errors["loss"] <= errors["tolerance"] and 0 <= errors["grad_norm"] <= errors["tolerance"]


def test_json_has_versions_facts_and_the_all_reduce(report):
    versions = report["versions"]
    assert versions["python"] and versions["torch"] == torch.__version__ and versions["transformers"]
    assert {"cuda", "rocm", "cudnn", "nccl", "datasets", "tokenizers"} <= set(versions)
    assert report["cpu"]["torch_threads"] >= 1 and set(report["cpu"]["flags"]) == set(doctor.CPU_FLAGS)
    assert report["hub"]["state"] in ("offline", "proxy", "reachable", "unreachable")
    all_reduce = next(check for check in report["checks"] if check["check"] == "all-reduce")
    assert all_reduce["backend"] == ("nccl" if torch.cuda.device_count() >= 2 else "gloo") and all_reduce["ok"]


def test_text_has_its_sections_and_the_final_line(capsys):
    assert main(["doctor"]) == 0
    lines = capsys.readouterr().out.splitlines()
    headings = [line for line in lines if line and not line.startswith(" ")]
    assert headings[:5] == ["versions", "gpus", "cpu", "choice (--device auto --precision auto)", "hub"]
    assert headings[5].startswith("checks (")
    assert re.fullmatch(r"doctor: all checks passed \(\d+\.\d s\)", lines[-1]), lines[-1]
    assert any(re.match(r"  step fp32 +ok: loss error", line) for line in lines)
    assert any(re.match(r"  all-reduce +ok: (gloo|nccl)", line) for line in lines)


@pytest.mark.skipif(HAS_CUDA, reason="CUDA is present here")
def test_cuda_requested_without_cuda_is_one_error_line_with_the_fix(capsys):
    assert main(["doctor", "--device", "cuda"]) == 2
    assert one_error_line(capsys) == ("doctor: device and precision failed: device=cuda but CUDA is not available "
                                      "here; use --device cpu or auto")


def test_fp16_on_cpu_is_checked_like_any_precision(capsys):
    """fp16 trains on CPU too (slowly): asked for, the doctor checks it against fp32 and passes."""
    assert main(["doctor", "--device", "cpu", "--precision", "fp16", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["precision"] == "fp16" and report["ok"]
    assert report["precisions_checked"]["fp16"]["loss"] < doctor.TOLERANCE["fp16"]


def test_compare_flags_a_real_disagreement():
    model, batch = doctor.tiny_inputs()
    reference = doctor.train_step(model, batch, Engine(torch.device("cpu"), "fp32"))
    bf16 = doctor.train_step(model, batch, Engine(torch.device("cpu"), "bf16"))
    assert doctor.compare("bf16", reference, bf16)["ok"]
    tol = doctor.TOLERANCE["bf16"]
    wrong = {**bf16, "grad_norm": reference["grad_norm"] * (1 + 3 * tol)}  # a gradient 3 tolerances off
    check = doctor.compare("bf16", reference, wrong)
    assert not check["ok"] and check["errors"]["grad_norm"] == pytest.approx(3 * tol)
    assert "grad_norm" in check["fix"] and "--precision fp32" in check["fix"]
    assert doctor.compare("bf16", reference, {**bf16, "grad_norm": reference["grad_norm"] * (1 + tol / 2)})["ok"]
    broken = doctor.compare("fp16", reference, {**reference, "loss": math.nan})
    assert not broken["ok"] and broken["errors"]["loss"] is None  # NaN never passes, and stays valid JSON
    assert not doctor.compare("fp32", reference, {**reference, "finite": False})["ok"]


def test_hub_state_never_waits_long(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert doctor.hub_facts()["state"] == "offline"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HTTPS_PROXY", "http://proxy.invalid:3128")
    assert doctor.hub_facts()["state"] == "proxy"
    for name in hub.PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")  # .invalid never resolves (RFC 2606)
    facts = doctor.hub_facts()  # a DNS lookup of at most hub.LOOKUP_TIMEOUT_S
    assert facts["host"] == "hub.invalid" and facts["state"] == "unreachable"
