"""How the global batch is split, what fits in memory: `--micro_batch_size auto` and the run header's estimate.

The global batch (reviews per optimizer step) is the unit: the schedule and the data order depend on it
alone, and since accumulation is exact (data.micro_batches weighs every review 1/global batch), so do the
numbers. A split is micro x accum x world = global batch, exactly. `auto` probes the largest micro-batch
that fits: one forward + backward of the run's longest padded batch, gradients allocated and AdamW's
state held aside, freed after. The probe leaves no trace: every RNG state is restored, gradients are
dropped, and no optimizer steps, so a run with `auto` computes what the same split typed by hand does.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sentiment.config import Config
from sentiment.engine import Engine
from sentiment.packing import is_packed, model_inputs
from sentiment.errors import ConfigError, TrainingError

# A knob for tests and simulations, not for runs: the probe behaves as if the device ran out of memory
# above this many reviews per micro-batch (on any device, the CPU included, where the probe is skipped otherwise).
PROBE_LIMIT_ENV = "SENTIMENT_PROBE_MAX_BATCH"
AUTO_GLOBAL_BATCH = 8  # the global batch of `--micro_batch_size auto` without --global_batch_size: the tutorial's
MEMORY_FIXES = ("--micro_batch_size auto (the largest micro-batch that fits, same global batch), "
                "--gradient_checkpointing true, or --precision bf16 (fp16 on GPUs without bf16)")


@dataclass(frozen=True)
class BatchPlan:
    micro: int  # reviews per forward/backward on each process; 0 until `auto` has probed
    accum: int  # micro-batches per optimizer step
    world: int  # processes
    global_batch: int  # micro x accum x world, once micro is known
    why: str = ""  # the decision line for the header, when the split was not typed as is
    tokens: int = 0  # the width of the run's longest padded batch, where a probe ran
    activations: float | None = None  # their bytes at `micro` (measured on CUDA), inf if it did not fit; None: unknown


def trainable_bytes(model: torch.nn.Module) -> int:
    """Bytes of the trainable parameters: what their gradients take, and each of AdamW's two moments."""
    return sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_batch(global_batch: int, world: int, max_micro: int) -> tuple[int, int]:
    """(micro, accum) with micro x accum x world == global_batch: micro is the largest divisor of the
    per-process share that is at most `max_micro`. ConfigError when world does not divide the batch."""
    if global_batch < 1 or world < 1 or global_batch % world:
        raise ConfigError(f"a global batch of {global_batch} cannot be shared by {world} processes; set "
                          f"--global_batch_size to a multiple of {world}")
    if max_micro < 1:
        raise ConfigError(f"a micro-batch of at most {max_micro} reviews is no micro-batch")
    share = global_batch // world
    micro = max(d for d in divisors(share) if d <= max_micro)
    return micro, share // micro


def plan_batch(cfg: Config, world: int) -> BatchPlan:
    """The split as configured, checked against the world size (ConfigError if impossible); under `auto`
    the micro-batch stays 0 until `fit_micro_batch` probes it."""
    micro, accum, wanted = cfg.micro_batch_size, cfg.grad_accum_steps, cfg.global_batch_size
    if micro and not wanted:
        return BatchPlan(micro, accum, world, micro * accum * world)
    global_batch = wanted or AUTO_GLOBAL_BATCH
    if not micro:
        split_batch(global_batch, world, 1)  # only its checks
        return BatchPlan(0, 0, world, global_batch)
    got, accum = split_batch(global_batch, world, micro)
    if got != micro:
        raise ConfigError(f"global_batch_size={global_batch} over {world} processes is {global_batch // world} "
                          f"reviews each, not a multiple of micro_batch_size={micro}; pick a divisor, or "
                          "--micro_batch_size auto")
    return BatchPlan(micro, accum, world, global_batch, f"grad_accum_steps={accum} (global_batch_size "
                     f"{global_batch} / (micro {micro} x world {world}))")


# ----------------------------------------------------------------------------- the probe


def probe_batch(dataset, collate, size: int) -> dict[str, torch.Tensor]:
    """`size` copies of the longest training example (a review, or pretrain's masked text), collated as the run
    collates: its widest batch."""
    return collate([dataset[(int(dataset.split.lengths.argmax()), 1.0)]] * size)


def probe(model: torch.nn.Module, engine: Engine, batch: dict[str, torch.Tensor], reserve: int) -> int | None:
    """Activation bytes of one forward + backward on `batch` with gradients allocated and `reserve` bytes
    (AdamW's state, which the first optimizer step allocates) held aside; None where the device does not
    measure. Raises engine.out_of_memory if it does not fit (or the test knob says so)."""
    limit = int(os.environ.get(PROBE_LIMIT_ENV) or 0)
    reviews = len(batch["cu_seq_lens_q"]) - 1 if is_packed(batch) else len(batch["input_ids"])  # packed: 1 row
    if limit and reviews > limit:
        raise engine.out_of_memory(f"{PROBE_LIMIT_ENV}={limit}: simulated out of memory")
    engine.reset_peak_memory()
    start = engine.memory()["allocated"]
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:  # as at the second micro-batch of a step: backward adds into existing gradients
        p.grad = torch.zeros_like(p)
    held = torch.empty(reserve, dtype=torch.uint8, device=engine.device)
    batch = engine.to_device(batch)
    with engine.autocast():
        logits = model(**model_inputs(batch)).logits
    F.cross_entropy(logits.float().flatten(0, -2), batch["labels"].flatten()).backward()  # as train.steps does
    del held, logits
    peak = engine.memory()["peak"]
    return None if peak is None else max(0, peak - start - reserve - trainable_bytes(model))


def fit_micro_batch(plan: BatchPlan, cfg: Config, engine: Engine, model: torch.nn.Module, dataset,
                    collate) -> BatchPlan:
    """The plan with its micro-batch and what the probe measured. Under `auto` on CUDA (or with the test knob
    set) the largest divisor of the per-process share that fits; elsewhere the whole share. A fixed
    micro-batch is probed once on CUDA (or with the knob), for the header's estimate and warning."""
    measures = engine.memory()["allocated"] is not None or bool(os.environ.get(PROBE_LIMIT_ENV))
    if plan.micro and not measures:
        return plan
    share, width = plan.global_batch // plan.world, probe_batch(dataset, collate, 1)["input_ids"].shape[1]
    if not measures:
        return BatchPlan(share, 1, plan.world, plan.global_batch, f"micro_batch_size={share} grad_accum_steps=1 "
                         f"(auto on {engine.device.type}: no device memory to probe; the whole share of the global "
                         f"batch of {plan.global_batch} per forward)")
    reserve = 2 * trainable_bytes(model)  # AdamW's exp_avg and exp_avg_sq
    rng, was_training, measured = engine.rng_state(), model.training, {}
    model.train()  # dropout and gradient checkpointing act in training mode only
    try:
        def fits(size: int) -> bool:
            try:
                measured[size] = probe(model, engine, probe_batch(dataset, collate, size), reserve)
            except engine.out_of_memory:
                measured[size] = math.inf
            model.zero_grad(set_to_none=True)
            gc.collect()  # the failed probe's tensors, before the next one
            engine.memory()  # on CUDA: returns the cached blocks
            return measured[size] != math.inf

        if plan.micro:
            fits(plan.micro)
            return dataclasses.replace(plan, tokens=width, activations=measured[plan.micro])
        sizes = divisors(share)
        if not fits(sizes[-1]):  # else binary search: memory grows with the micro-batch
            low, high = 0, len(sizes) - 2
            while low <= high:
                mid = (low + high) // 2
                low, high = (mid + 1, high) if fits(sizes[mid]) else (low, mid - 1)
            if high < 0:
                raise TrainingError(f"out of memory even at micro_batch_size=1 with {width} tokens: pass "
                                    "--gradient_checkpointing true, --precision bf16 (fp16 on GPUs without bf16) "
                                    "or a smaller --max_length")
        best = max(s for s, a in measured.items() if a != math.inf)
        best = min(engine.all_gather_objects(best))  # every rank takes the same split: the smallest one's
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)
        engine.set_rng_state(rng)
    micro, accum = split_batch(plan.global_batch, plan.world, best)
    tried = sorted(s for s, a in measured.items() if a == math.inf)
    why = (f"micro_batch_size={micro} grad_accum_steps={accum} (auto: the largest divisor of the {share} reviews per "
           f"process that fits forward + backward + AdamW at {width} tokens, {engine.precision}, gradient "
           f"checkpointing {'on' if cfg.gradient_checkpointing else 'off'}"
           + (f"; {', '.join(map(str, tried))} did not" if tried else "")
           + f"; {micro} x {accum} x world {plan.world} = global batch {plan.global_batch})")
    return BatchPlan(micro, accum, plan.world, plan.global_batch, why, width, measured.get(micro))


# ----------------------------------------------------------------------------- the estimate


def memory_estimate(params: list[tuple[int, int, bool]], activations: float | None,
                    free: int | None) -> dict[str, float | None]:
    """Bytes of training state from (numel, bytes per element, trainable) per parameter: weights, gradients
    and AdamW's two moments (each of a trainable parameter's dtype), the measured `activations` (None: not
    measured, inf: did not fit), their total, and whether what is not yet allocated (all but the weights,
    loaded already) fits in `free` bytes (None: unknown)."""
    weights = sum(n * size for n, size, _ in params)
    gradients = sum(n * size for n, size, trainable in params if trainable)
    out = {"weights": weights, "gradients": gradients, "adamw": 2 * gradients, "activations": activations}
    out["total"] = weights + 3 * gradients + (activations or 0)
    out["fits"] = None if free is None else out["total"] - weights <= free
    return out


def size_text(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n:.0f} B"


def memory_lines(est: dict, free: int | None, plan: BatchPlan, device: str) -> list[str]:
    """The header's memory line, and a warning with the fixes when the run will not fit."""
    act, width = est["activations"], plan.tokens
    act_text = (f"not measured on {device}" if act is None else
                f"over the device's memory at micro {plan.micro} x {width} tokens (probe)" if act == math.inf
                else f"{size_text(act)} at micro {plan.micro} x {width} tokens (measured)")
    lines = [f"memory: weights {size_text(est['weights'])} + gradients {size_text(est['gradients'])} + AdamW "
             f"{size_text(est['adamw'])} + activations {act_text} = "
             + ("?" if act == math.inf else size_text(est["total"]) + ("+" if act is None else ""))
             + f" | {device} free: {'unknown' if free is None else size_text(free)}"]
    if est["fits"] is False:
        why = (f"forward + backward at micro {plan.micro} x {width} tokens ran out of memory" if act == math.inf else
               f"{size_text(est['total'] - est['weights'])} needed besides the weights, {size_text(free or 0)} free")
        lines.append(f"warning: this run will not fit in {device} memory ({why}); fixes: {MEMORY_FIXES}")
    return lines
