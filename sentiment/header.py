"""What a run says of itself: the header it prints before the first step (print_header) and the facts of the run
that results.json records besides its metrics (run_facts). train and pretrain share both."""

from __future__ import annotations

import time

import torch

from sentiment import fit
from sentiment.config import Config
from sentiment.engine import Engine
from sentiment.runlog import RunLog, git_commit


def print_header(cfg: Config, engine: Engine, env: dict, model: torch.nn.Module, plan: fit.BatchPlan,
                 steps_per_epoch: int, warmup_steps: int, resumed_at: int | None, lines: list[str]) -> None:
    """The run's first lines: where and with what it runs, the run's own `lines` (its data, its model), the
    batch and step arithmetic, and the memory it needs against what is free (with a warning and the fixes
    before the first step, if too much)."""
    engine.print(f"run: {cfg.output_dir} | git {git_commit()} | torch {env['torch']} | "
                 f"transformers {env['transformers']} | {env['device_name']}")
    engine.print("config: " + " ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    for line in lines:
        engine.print(line)
    steps = f"max_steps {cfg.max_steps}" if cfg.max_steps else f"x {cfg.epochs} epochs = {cfg.epochs * steps_per_epoch}"
    engine.print(f"batch: global {plan.global_batch} = micro {plan.micro} x accum {plan.accum} x "
                 f"world {engine.world_size} | {steps_per_epoch} steps/epoch {steps} steps | "
                 f"warmup {warmup_steps} steps"
                 + (f" | resuming at step {resumed_at}" if resumed_at is not None else ""))
    if plan.why:
        engine.print(f"fit: {plan.why}")
    free = engine.memory()["free"]
    params = [(p.numel(), p.element_size(), p.requires_grad) for p in model.parameters()]
    for line in fit.memory_lines(fit.memory_estimate(params, plan.activations, free), free, plan, str(engine.device)):
        engine.print(line)


def run_facts(engine: Engine, log: RunLog, plan: fit.BatchPlan, env: dict, started: float,
              rss_peaks: dict[str, float] | None = None) -> dict:
    """What results.json says of the run itself, besides its metrics: speed, batch, time, memory (and this
    process's peak memory per phase, `rss_peaks`, if measured), where."""
    return {"samples_per_second": log.samples_per_second, "train_seconds": log.train_seconds,
            "batch": {"global": plan.global_batch, "micro": plan.micro, "accum": plan.accum, "world": plan.world},
            "runtime_s": time.perf_counter() - started,
            "peak_mem_mb": engine.peak_memory_mb(tuple((rss_peaks or {}).values())),
            **({"peak_rss_mb": rss_peaks} if rss_peaks else {}),
            "engine": list(engine.decisions), "environment": env, "model_dir": str(log.out / "model")}
