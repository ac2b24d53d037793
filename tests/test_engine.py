"""engine.py on CPU: fp32, bf16 and fp16, autocast, loss scaling, the decisions it prints, and what it refuses."""

import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sentiment.engine import Engine, cpu_has_native_bf16, setup_engine
from sentiment.errors import ConfigError
from sentiment.tiny import make_model


def test_cpu_fp32(capsys):
    engine = setup_engine(device="cpu", precision="fp32", seed=0)
    assert engine.device == torch.device("cpu")
    assert engine.precision == "fp32" and engine.amp_dtype is None
    assert (engine.rank, engine.world_size, engine.is_main, engine.distributed) == (0, 1, True, False)
    assert not engine.grad_scaler().is_enabled()
    a = torch.randn(4, 8)
    with engine.autocast():
        assert (a @ a.T).dtype == torch.float32
    out = capsys.readouterr().out
    assert "engine: device=cpu (requested)" in out
    assert "engine: precision=fp32 (requested)" in out


def test_cpu_bf16_autocast(capsys):
    engine = setup_engine(device="cpu", precision="bf16", seed=0)
    assert engine.precision == "bf16" and engine.amp_dtype == torch.bfloat16
    assert not engine.grad_scaler().is_enabled()  # bf16 has fp32's range: no loss scaling
    a = torch.randn(4, 8)
    with engine.autocast():
        assert (a @ a.T).dtype == torch.bfloat16
        assert torch.nn.functional.linear(a, torch.randn(3, 8)).dtype == torch.bfloat16
    assert (a @ a.T).dtype == torch.float32  # only inside the context
    out = capsys.readouterr().out
    assert "engine: precision=bf16 (requested" in out
    if not cpu_has_native_bf16():
        assert "emulates bf16" in out  # the user is told it will be slow


def test_bf16_forward_and_backward_of_the_model():
    engine = setup_engine(device="cpu", precision="bf16", seed=0)
    model = engine.wrap(make_model())
    assert engine.unwrap(model) is model
    ids = torch.randint(5, 30, (2, 16))
    with engine.autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.bfloat16 and logits.shape == (2, 2)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_inference_wrap_stores_weights_in_the_amp_dtype(capsys):
    ids = torch.randint(5, 30, (2, 16))
    fp32 = setup_engine(device="cpu", precision="fp32", seed=0)
    model = fp32.wrap(make_model(), inference=True)
    assert all(p.dtype == torch.float32 for p in model.parameters())  # nothing to gain under fp32
    expected = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert "weights=" not in capsys.readouterr().out

    bf16 = setup_engine(device="cpu", precision="bf16", seed=0)
    model = bf16.wrap(model, inference=True)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert "engine: weights=bf16 (inference only" in capsys.readouterr().out
    with torch.no_grad(), bf16.autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    torch.testing.assert_close(logits.float(), expected, atol=0.05, rtol=0.05)


def test_cpu_fp16_autocast_with_loss_scaling(capsys):
    engine = setup_engine(device="cpu", precision="fp16", seed=0)
    assert engine.precision == "fp16" and engine.amp_dtype == torch.float16
    scaler = engine.grad_scaler()
    assert scaler.is_enabled()  # fp16's narrow range: loss scaling on, on CPU as on CUDA
    assert (scaler.get_scale(), scaler.get_growth_interval()) == (2.0**16, 2000)  # torch's defaults
    a = torch.randn(4, 8)
    with engine.autocast():
        assert (a @ a.T).dtype == torch.float16
    assert (a @ a.T).dtype == torch.float32
    out = capsys.readouterr().out
    # the user is told it is slow, and why one would ask for it anyway
    assert ("engine: precision=fp16 (requested: on CPU fp16 is emulated and slower than fp32; it exercises the "
            "fp16 path: loss scaling, overflow skips)\n") in out
    assert "engine: grad_scaler=on (fp16 gradients underflow without loss scaling" in out


def test_fp16_forward_and_backward_of_the_model():
    engine = setup_engine(device="cpu", precision="fp16", seed=0)
    model = engine.wrap(make_model())
    ids = torch.randint(5, 30, (2, 16))
    with engine.autocast():
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
    assert logits.dtype == torch.float16 and logits.shape == (2, 2)
    scaler = engine.grad_scaler()
    scaler.scale(torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1]))).backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)  # fp32 master weights


def test_grad_scaler_settings_come_from_the_engine():
    engine = Engine(device=torch.device("cpu"), precision="fp16", init_scale=2.0**30, growth_interval=5)
    scaler = engine.grad_scaler()
    assert (scaler.get_scale(), scaler.get_growth_interval()) == (2.0**30, 5)
    assert not Engine(device=torch.device("cpu"), precision="bf16", init_scale=2.0**30).grad_scaler().is_enabled()


def test_auto_on_cpu_explains_its_choice(capsys):
    engine = setup_engine(device="cpu", precision="auto", seed=0)
    expected = "bf16" if cpu_has_native_bf16() else "fp32"
    assert engine.precision == expected
    out = capsys.readouterr().out
    assert f"engine: precision={expected} (auto: CPU " in out
    assert engine.decisions == tuple(line.removeprefix("engine: ") for line in out.splitlines()
                                     if line.startswith("engine: "))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_requested_without_cuda_is_refused():
    with pytest.raises(ConfigError, match="CUDA is not available"):
        setup_engine(device="cuda", precision="fp32")
    with pytest.raises(ConfigError, match="CUDA is not available"):
        setup_engine(device="cuda:1", precision="fp32")


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="needs a CPU-only machine")
def test_auto_device_without_accelerator_is_cpu(capsys):
    engine = setup_engine(device="auto", precision="fp32")
    assert engine.device.type == "cpu"
    assert "device=cpu (auto: no CUDA or MPS device found)" in capsys.readouterr().out


def test_seeding_is_deterministic():
    setup_engine(device="cpu", precision="fp32", seed=123)
    first = (random.random(), np.random.rand(), torch.rand(3))
    engine = setup_engine(device="cpu", precision="fp32", seed=123)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])
    state = engine.rng_state()
    a = (random.random(), np.random.rand(), torch.rand(3))
    engine.set_rng_state(state)
    b = (random.random(), np.random.rand(), torch.rand(3))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])


def test_single_process_helpers_are_pass_throughs():
    engine = Engine(device=torch.device("cpu"), precision="fp32")
    t = torch.tensor([3.0])
    assert engine.all_reduce_sum(t) is t and t.item() == 3.0
    assert engine.all_gather_objects({"a": 1}) == [{"a": 1}]
    assert engine.any_rank(True) and not engine.any_rank(False)
    loss = torch.tensor(0.25)
    assert engine.sum_over_ranks(loss) is loss  # one process: no DDP average to undo


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_cpu_peak_memory_is_the_peak_resident_set_in_mb():
    """On CPU, peak memory is this process's peak RSS in MB: the kernel's VmHWM (in kB), as /proc reports it."""
    engine = Engine(device=torch.device("cpu"), precision="fp32")
    peak = engine.peak_memory_mb()
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    high_water = int(status["VmHWM"].split()[0]) / 1024  # "VmHWM:  220000 kB"
    assert peak == pytest.approx(high_water, rel=0.01, abs=2)


def test_print_only_on_rank_zero(capsys):
    Engine(device=torch.device("cpu"), precision="fp32", rank=1, world_size=2).print("hidden")
    Engine(device=torch.device("cpu"), precision="fp32").print("shown")
    assert capsys.readouterr().out == "shown\n"


def test_flash_attention_and_varlen_each_need_only_their_own_software(monkeypatch):
    """Both need an Ampere+ GPU in bf16/fp16; past that, flash_attention_2 needs the flash_attn package alone, and
    varlen_attn torch's torch.nn.attention.varlen alone (a torch without it must not refuse flash_attn)."""
    import importlib.util

    import transformers.utils

    from sentiment.engine import Engine

    engine = Engine(device=torch.device("cpu"), precision="bf16")
    assert engine.flash_attention_unusable == engine.varlen_unusable == engine.flash_hardware_unusable != ""
    monkeypatch.setattr(Engine, "flash_hardware_unusable", property(lambda self: ""))  # as on an H100 in bf16
    find_spec = importlib.util.find_spec
    for flash_attn, varlen in ((True, False), (False, True), (True, True)):
        monkeypatch.setattr(transformers.utils, "is_flash_attn_2_available", lambda: flash_attn)
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
            (find_spec("torch") if varlen else None) if name == "torch.nn.attention.varlen" else find_spec(name, *a)))
        assert (engine.flash_attention_unusable == "") == flash_attn
        assert (engine.varlen_unusable == "") == varlen
