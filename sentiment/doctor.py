"""`sentiment doctor`: is this machine ready for a long job? Facts (versions, GPUs, CPU, what --device/--precision
pick and why, the hub), then checks: a tiny BERT's training step in each precision the device runs against fp32 on
the CPU, and a 2-process all-reduce. Facts -> dict, checks -> list, report -> text or JSON; torch imported inside."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import math
import os
import platform
import socket
import time
import warnings
from importlib import metadata
from pathlib import Path

from sentiment.errors import ConfigError, SentimentError
from sentiment.hub import LOOKUP_TIMEOUT_S, chosen_outside, host_resolves, hub_host

# Largest relative error of the loss and of the gradient norm against the fp32 CPU reference. Measured on an AMD
# EPYC with AVX512-BF16 (torch 2.13, 1 and 2 threads), the step below with seeds 0-15: bf16 at most 1.6e-4 (loss)
# and 2.5e-3 (grad norm), fp16 1.4e-5 and 2.9e-4, fp32 0 (seed 0, the one used: 6.2e-5/7.1e-4, 1.8e-6/1.7e-4).
# Bounds are 4-7x the worst seen, 2-4 roundings of each format: bf16 keeps 8 mantissa bits (2^-8 = 3.9e-3), fp16
# 11 (4.9e-4); CUDA fp32 matmuls are TF32 (10 bits) as in training: fp32 gets fp16's bound. Bugs are off by far more.
TOLERANCE = {"fp32": 2e-3, "bf16": 1e-2, "fp16": 2e-3}
FP16_TRIES = 8  # GradScaler halves its scale after each overflowing (skipped) step, as in training
ALL_REDUCE_TIMEOUT_S = 120.0  # two fresh Python processes importing torch, then one collective
CPU_FLAGS = ("avx512_bf16", "amx_bf16", "amx_tile", "avx512f", "avx2")  # bf16 in hardware, then wide vectors
YES = {True: "yes", False: "no"}


def versions() -> dict:
    """Python, torch and what it was built with (CUDA or ROCm, cuDNN, NCCL), and the Hugging Face libraries."""
    import torch
    nccl = torch.distributed.is_available() and torch.distributed.is_nccl_available()
    out = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
           "rocm": torch.version.hip, "nccl": ".".join(map(str, torch.cuda.nccl.version())) if nccl else None,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    installed = {d.name.lower(): d.version for d in metadata.distributions()}  # no import: transformers takes seconds
    return {**out, **{name: installed.get(name) for name in ("transformers", "datasets", "tokenizers")}}


def cuda_devices() -> list[dict]:
    """Each visible CUDA (or ROCm) device: name, memory, compute capability, bf16 and TF32 in hardware."""
    import torch
    out = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        props, (free, total) = torch.cuda.get_device_properties(i), torch.cuda.mem_get_info(i)
        with torch.cuda.device(i):  # is_bf16_supported asks about the current device
            bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        out.append({"index": i, "name": props.name, "total_gib": round(total / 2**30, 1),
                    "free_gib": round(free / 2**30, 1), "capability": f"{props.major}.{props.minor}",
                    "bf16": bool(bf16), "tf32": torch.version.hip is None and props.major >= 8})  # TF32: Ampere+
    return out


def cpu_facts() -> dict:
    """The CPU's model, the instruction sets that matter for training speed, torch's threads, and MPS."""
    import torch

    from sentiment.engine import cpu_has_native_bf16
    info = Path("/proc/cpuinfo").read_text().split("\n\n")[0] if Path("/proc/cpuinfo").exists() else ""  # Linux
    info = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in info.splitlines())}  # CPU 0's
    model, flags = info.get("model name") or platform.processor() or platform.machine(), info.get("flags", "").split()
    return {"model": model, "flags": {f: f in flags for f in CPU_FLAGS}, "native_bf16": cpu_has_native_bf16(),
            "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
            "mps_available": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}


def hub_facts() -> dict:
    """hub.py's decision (offline_if_unreachable) without acting on it: the doctor downloads nothing."""
    host, outside = hub_host(), chosen_outside()
    if outside and outside[0] == "offline":
        state, detail = "offline", "offline mode is set: local folders and the HF cache only"
    elif outside:
        state, detail = "proxy", f"not checked: {outside[1]} is set, the proxy resolves names"
    elif host_resolves(host):  # within LOOKUP_TIMEOUT_S
        state, detail = "reachable", "resolves: hub models and datasets can be downloaded"
    else:
        state, detail = "unreachable", (f"does not resolve within {LOOKUP_TIMEOUT_S:.0f} s: train/evaluate/"
                                        "predict switch to offline mode (local folders and the HF cache only)")
    return {"host": host, "state": state, "detail": detail}


def decide(device: str, precision: str) -> dict:
    """What `--device D --precision P` resolves to, with engine's reasons, or the error it raises."""
    import torch

    from sentiment.engine import resolve_device, resolve_precision
    out = {"requested_device": device, "requested_precision": precision}
    try:
        dev, out["device_reason"] = resolve_device(device, 0)
        if dev.type == "cuda":  # as setup_engine: bind the GPU first, bf16 support is the current device's
            torch.cuda.set_device(dev)
        out["device"] = str(dev)
        out["precision"], out["precision_reason"] = resolve_precision(precision, dev)
    except ConfigError as e:
        out["error"] = str(e)
    return out


def precisions_for(device) -> list[str]:
    """fp32, and each of bf16/fp16 that autocast really computes in on `device` (CUDA bf16: in hardware only)."""
    import torch
    out = ["fp32"]
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if device.type == "cuda" and name == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
            continue
        with warnings.catch_warnings(), contextlib.suppress(RuntimeError):
            warnings.simplefilter("ignore")  # an unsupported dtype warns and disables autocast: the product stays fp32
            with torch.autocast(device.type, dtype=dtype):
                product = torch.ones(8, 8, device=device) @ torch.ones(8, 8, device=device)
            out += [name] if product.dtype == dtype else []
    return out


def tiny_inputs(seed: int = 0):
    """(model, batch): the tiny random BERT, 16 synthetic reviews of 64 tokens, all labelled positive: its head says
    ~0.5 for every review, so balanced labels' gradients nearly cancel: their sum's bf16 error measured that (30%)."""
    import torch

    from sentiment.tiny import make_model, make_reviews, make_tokenizer
    rows = make_reviews(16, seed)
    batch = dict(make_tokenizer()([r["text"] for r in rows], padding="max_length", truncation=True,
                                  max_length=64, return_tensors="pt"))
    batch["labels"] = torch.ones(len(rows), dtype=torch.long)
    return make_model(seed, hidden=64), batch


def train_step(model, batch: dict, engine) -> dict:
    """train.py's step (autocast, GradScaler, unscale, fused AdamW) on a copy of `model`: loss, grad norm, ms."""
    import torch
    model = copy.deepcopy(model).to(engine.device).eval()  # eval: no dropout, whose masks differ by device
    batch, optimizer = engine.to_device(batch), torch.optim.AdamW(model.parameters(), lr=1e-3, fused=engine.fused_adamw)
    scaler = engine.grad_scaler()  # fp16 only; a pass-through otherwise
    start = time.perf_counter()
    for _ in range(FP16_TRIES if scaler.is_enabled() else 1):
        optimizer.zero_grad(set_to_none=True)
        with engine.autocast():
            loss = model(**batch).loss
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), math.inf)  # the norm, nothing clipped
        scaler.step(optimizer)  # skipped by the scaler when the gradients overflowed
        scaler.update()
        if torch.isfinite(norm):
            break
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    return {"loss": loss.item(), "grad_norm": norm.item(), "finite": finite, "ms": (time.perf_counter() - start) * 1e3}


def compare(precision: str, reference: dict, result: dict) -> dict:
    """The check of one precision's step against the fp32 CPU reference: both errors within TOLERANCE."""
    tol = TOLERANCE[precision]
    errors = {k: abs(result[k] - reference[k]) / (abs(reference[k]) or 1.0) for k in ("loss", "grad_norm")}
    errors = {k: e if math.isfinite(e) else None for k, e in errors.items()}  # inf, NaN: None, always a failure
    bad = [k for k, e in errors.items() if e is None or e > tol] + ([] if result.get("finite", True) else
                                                                    ["weights after the AdamW step"])
    shown = ", ".join(f"{k} error {'inf/nan' if e is None else f'{e:.1e}'}" for k, e in errors.items())
    fix = (f"{precision} disagrees with fp32 ({', '.join(bad)} beyond {tol:g}): train with --precision fp32 "
           "here, and update the GPU driver or reinstall torch") if bad else ""
    return {"check": f"step {precision}", "ok": not bad, "precision": precision, "errors": errors, "tolerance": tol,
            "detail": f"{shown} (tolerance {tol:g}), {result.get('ms', 0):.0f} ms", "fix": fix}


def selftest(device: str, precision: str) -> list[dict]:
    """A step in each precision `device` runs, each compared with the fp32 CPU reference."""
    import torch

    from sentiment.engine import Engine
    if device.startswith("cuda"):  # as setup_engine: training's fp32 matmuls are TF32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    (model, batch), device = tiny_inputs(), torch.device(device)
    reference = train_step(model, batch, Engine(torch.device("cpu"), "fp32"))
    checks, runs = [], precisions_for(device)
    for name in runs:
        try:
            checks.append(compare(name, reference, train_step(model, batch, Engine(device, name))))
        except RuntimeError as e:  # a kernel that does not run here
            checks.append({"check": f"step {name}", "ok": False, "detail": str(e).split("\n")[0],
                           "fix": f"{name} fails on {device}: use --precision fp32"})
        if device.type == "cpu" and name == "fp16":
            checks[-1]["detail"] += " (on CPU fp16 is emulated: slower than fp32, for checking the fp16 path)"
    if precision not in runs:
        checks.append({"check": f"step {precision}", "ok": False, "detail": "autocast does not run it",
                       "fix": f"precision={precision} does not run on {device} here; use --precision fp32"})
    return checks


def _all_reduce_worker(rank: int, backend: str, port: int) -> None:
    """One of the two processes: rank r contributes r + 1 everywhere, so every element must sum to 3."""
    import torch
    import torch.distributed as dist
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=ALL_REDUCE_TIMEOUT_S),
                            device_id=device if backend == "nccl" else None)
    try:
        t = torch.full((1 << 20,), float(rank + 1), device=device)
        dist.all_reduce(t)
        if not bool((t == 3).all()):
            raise RuntimeError(f"rank {rank} got {sorted(set(t.tolist()))[:3]} from an all-reduce of 1 + 2")
    finally:
        dist.destroy_process_group()


def start_all_reduce(n_gpus: int) -> dict:
    """2 processes all-reduce on localhost: NCCL with 2+ GPUs, else gloo (torchrun's CPU path), beside the self-test."""
    import torch.distributed as dist
    import torch.multiprocessing as mp
    backend = "nccl" if n_gpus >= 2 and dist.is_nccl_available() else "gloo"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = mp.start_processes(_all_reduce_worker, args=(backend, port), nprocs=2, join=False, start_method="spawn")
    return {"backend": backend, "context": context, "deadline": time.perf_counter() + ALL_REDUCE_TIMEOUT_S}


def finish_all_reduce(job: dict) -> dict:
    """The all-reduce's check: both processes exited cleanly within ALL_REDUCE_TIMEOUT_S."""
    backend, context, problem = job["backend"], job["context"], ""
    try:
        while not problem and not context.join(timeout=1):
            if time.perf_counter() > job["deadline"]:
                problem = f"no answer in {ALL_REDUCE_TIMEOUT_S:.0f} s"
                for process in context.processes:
                    process.terminate()
    except Exception as e:  # noqa: BLE001 - a child's exception or exit: the check's failure
        problem = ([line for line in str(e).splitlines() if line.strip()] or [type(e).__name__])[-1]
    fix = f"2-process {backend} all-reduce failed: check that localhost TCP ports are open" + (
        ", then the NVIDIA driver and NCCL (NCCL_DEBUG=INFO; try NCCL_P2P_DISABLE=1)" if backend == "nccl" else "")
    return {"check": "all-reduce", "ok": not problem, "backend": backend, "fix": fix if problem else "",
            "detail": f"{backend}: {problem or '2 processes on localhost, every element summed right'}"}


def run_doctor(device: str = "auto", precision: str = "auto") -> dict:
    """Every fact and check, as one dict (the --json output)."""
    start = time.perf_counter()
    report = {"versions": versions(), "cuda_devices": cuda_devices(), "cpu": cpu_facts(), "hub": hub_facts(),
              "choice": (choice := decide(device, precision))}
    checks = [{"check": "device and precision", "ok": "error" not in choice, "fix": choice.get("error", ""),
               "detail": choice.get("error") or f"{choice['device']} {choice['precision']}"}]
    if checks[0]["ok"]:
        job = start_all_reduce(len(report["cuda_devices"]))
        try:
            checks += selftest(choice["device"], choice["precision"])
        finally:  # the two processes are waited for (or ended) whatever happened
            checks.append(finish_all_reduce(job))
    report.update(device=choice.get("device"), precision=choice.get("precision"), checks=checks,
                  precisions_checked={c["precision"]: {**c["errors"], "tolerance": c["tolerance"]} for c in checks
                                      if "errors" in c},
                  ok=all(c["ok"] for c in checks), seconds=round(time.perf_counter() - start, 1))
    return report


def format_text(r: dict) -> list[str]:
    """The report as sections of one fact per line, ending in the verdict."""
    v, cpu, c, hub = r["versions"], r["cpu"], r["choice"], r["hub"]
    lines = ["versions", *(f"  {k:<13}{'-' if x is None else x}" for k, x in v.items()), "gpus"]
    lines += [f"  cuda:{d['index']:<8}{d['name']} | {d['total_gib']} GiB total, {d['free_gib']} GiB free | "
              f"compute {d['capability']} | bf16 {YES[d['bf16']]} | tf32 {YES[d['tf32']]}" for d in r["cuda_devices"]]
    lines += [] if r["cuda_devices"] else [f"  {'cuda':<13}none visible"]
    lines += [f"  {'mps':<13}{'available' if cpu['mps_available'] else 'not available'}", "cpu",
              f"  {'model':<13}{cpu['model']}",
              f"  {'features':<13}" + ", ".join(f"{k} {YES[x]}" for k, x in cpu["flags"].items()),
              f"  {'native bf16':<13}{YES[cpu['native_bf16']]}",
              f"  {'threads':<13}torch {cpu['torch_threads']}, {cpu['usable_cores']}/{cpu['cpu_count']} cores usable",
              f"choice (--device {c['requested_device']} --precision {c['requested_precision']})"]
    lines += ([f"  {'error':<13}{c['error']}"] if "error" in c else
              [f"  {'device':<13}{c['device']} ({c['device_reason']})",
               f"  {'precision':<13}{c['precision']} ({c['precision_reason']})"])
    lines += ["hub", f"  {'host':<13}{hub['host']}", f"  {'state':<13}{hub['state']}: {hub['detail']}",
              f"checks (a tiny BERT's training step on {r['device'] or '-'} against fp32 on the CPU; all-reduce)"]
    lines += [f"  {x['check']:<22}{'ok' if x['ok'] else 'FAILED'}: {x['detail']}" for x in r["checks"]]
    bad = [x for x in r["checks"] if not x["ok"]]
    lines.append(f"doctor: {len(bad)} check(s) failed ({r['seconds']:.1f} s): {bad[0]['check']}: {bad[0]['fix']}"
                 if bad else f"doctor: all checks passed ({r['seconds']:.1f} s)")
    return lines


def doctor_command(device: str = "auto", precision: str = "auto", as_json: bool = False) -> dict:
    """`sentiment doctor`: the report on stdout; raises SentimentError with the first failure's fix."""
    report = run_doctor(device, precision)
    print(json.dumps(report, indent=2) if as_json else "\n".join(format_text(report)), flush=True)
    bad = [c for c in report["checks"] if not c["ok"]]
    if bad:
        raise SentimentError(f"doctor: {bad[0]['check']} failed: {bad[0]['fix']}")
    return report
