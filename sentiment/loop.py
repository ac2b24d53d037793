"""The parts every training loop here shares (fine-tuning in train.py, and the next ones): the learning-rate
schedule, what one step counts and reduces, and how a loop stops on a signal, a run of bad steps or
out of memory.
"""

from __future__ import annotations

import contextlib
import math
import signal
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sentiment import checkpoint as ckpt
from sentiment.engine import Engine
from sentiment.errors import TrainingError
from sentiment.fit import MEMORY_FIXES
from sentiment.packing import is_packed


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Learning rate for optimizer update number `step` (0-based): linear warmup from 0, then linear
    decay to 0 at `total_steps`. Identical to transformers' get_linear_schedule_with_warmup, including
    its first warmup update at lr 0."""
    if step < warmup_steps:
        return peak_lr * step / max(1, warmup_steps)
    return peak_lr * max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> float:
    """Write `lr` x the group's lr_scale into every parameter group (the schedule is ours, not a torch
    LRScheduler; lr_scale is 1 except with layer-wise lr decay, see model.param_groups); returns `lr`."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
    return lr


def token_counts(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(samples, real tokens, padded tokens) of a micro-batch, counted on the host: no device sync.
    Samples are the rows with a nonzero weight (padding rows of a short last batch weigh 0; a masked LM's
    weights are per token, (B, T))."""
    weights = batch["weights"]
    if is_packed(batch):  # one row of real tokens only; a masked LM's weights are per token (T,)
        real, starts = batch["input_ids"].numel(), batch["cu_seq_lens_q"][:-1].numpy()
        live = np.logical_or.reduceat(weights.numpy() > 0, starts) if len(weights) == real else weights.numpy() > 0
        return torch.tensor([int(live.sum()), real, real], dtype=torch.float32)
    mask = batch["attention_mask"]
    samples = int((weights.reshape(len(weights), -1) > 0).any(1).sum())
    return torch.tensor([samples, int(mask.sum()), mask.numel()], dtype=torch.float32)


def step_totals(engine: Engine, loss_sum: torch.Tensor, grad_norm: torch.Tensor,
                counts: torch.Tensor) -> tuple[float, float, list[int]]:
    """(loss, gradient norm, [samples, real tokens, padded tokens]) of the global batch, summed over ranks.
    The step's one host sync: to log them, and to skip a non-finite update before it poisons the weights."""
    totals = engine.all_reduce_sum(torch.cat([loss_sum.float().reshape(1), counts.to(engine.device)]))
    loss, samples, real, padded, norm = torch.cat([totals, grad_norm.float().reshape(1)]).tolist()
    return loss, norm, [int(samples), int(real), int(padded)]


def is_bad(loss: float, grad_norm: float, scaler: torch.amp.GradScaler) -> bool:
    """A step that counts towards max_bad_steps: a non-finite loss, or (without fp16's loss scaling, which
    expects and handles overflowing gradients) a non-finite gradient."""
    return not math.isfinite(loss) or (not scaler.is_enabled() and not math.isfinite(grad_norm))


def too_many_bad_steps(bad_steps: int, step: int, out: Path) -> TrainingError:
    saved = ckpt.checkpoint_paths(out / ckpt.CHECKPOINT_DIR)
    return TrainingError(f"{bad_steps} consecutive steps had a non-finite loss or gradient (last at step {step}); "
                         + (f"the newest checkpoint, {saved[0]}, is intact" if saved
                            else "no checkpoint was written yet")
                         + ". Lower --lr, check the data, or use --precision fp32")


@contextlib.contextmanager
def out_of_memory_is_an_error(micro_batch_size: int, max_length: int, global_batch: int,
                              write_snapshot: Callable[[], Path | None] | None = None):
    """Out of device memory becomes one TrainingError line with the fix, instead of a traceback. First
    `write_snapshot()` (engine.write_memory_snapshot: CUDA only, else None) saves what filled the memory, while the
    failed step's tensors are still held: the line names the file and the viewer."""
    try:
        yield
    except torch.OutOfMemoryError:
        snapshot = write_snapshot() if write_snapshot else None
        raise TrainingError(
            f"out of memory at micro_batch_size={micro_batch_size}, max_length={max_length}: pass {MEMORY_FIXES}; "
            f"or by hand lower --micro_batch_size and raise --grad_accum_steps to keep the global batch of "
            f"{global_batch}" + (f". What filled the memory: drop {snapshot} on https://pytorch.org/memory_viz "
                                 "(--memory_snapshot true adds each allocation's stack)" if snapshot else "")) from None


# SIGTERM: a scheduler's preemption (SLURM, Kubernetes); SIGINT: Ctrl-C; SIGHUP: the terminal or ssh session closed
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave the stop signals to the main process: SLURM, Ctrl-C and a closed terminal signal
    the whole process group, and a worker killed by it would crash the main process before it can checkpoint."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_IGN)


class StopRequest:
    """SIGTERM/SIGINT/SIGHUP set a flag; the loop finishes its optimizer step, checkpoints and calls `exit`.
    A second SIGINT raises KeyboardInterrupt at once (checkpoints are atomic: nothing is corrupted).
    Once `immediate` is set (e.g. during the final evaluation, or before training starts), a signal stops at
    once, saying it; the exit status is the shell's 128 + the signal's number."""

    def __init__(self, say=print, immediate: str = "") -> None:
        self.signal_name = ""
        self.immediate = immediate
        self._previous = {}
        self.say = say  # engine.print once there is an engine: under torchrun every rank gets the signal

    def __enter__(self) -> "StopRequest":
        for sig in STOP_SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. in some notebooks): no graceful stop
                pass
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal_name and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        if self.immediate:
            self.say(f"\n{self.signal_name} received {self.immediate}")
            raise SystemExit(128 + signum)
        self.say(f"\n{self.signal_name} received: finishing this step, then checkpointing "
                  "(Ctrl-C again to quit at once)")

    @property
    def requested(self) -> bool:
        return bool(self.signal_name)

    def exit(self, step: int) -> None:
        """After the checkpoint of `step`: say how to go on, and exit as the signal asked (143 or 130)."""
        self.say(f"stopped by {self.signal_name or 'another rank'} after step {step}; "
                  f"checkpoint written. Resume with the same flags plus --resume auto")
        raise SystemExit(128 + signal.Signals[self.signal_name].value if self.signal_name else 130)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
