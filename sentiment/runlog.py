"""What a run says, and where: the header, a row per optimizer step and per evaluation (metrics.jsonl,
TensorBoard, the fixed-format line above the progress bar), and the speed figures in those rows.

Library noise is silenced here too: progress bars of transformers/datasets in a log file, and on ranks
other than 0 everything but errors (rank 0 speaks for the job).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm

from sentiment.checkpoint import AppendFile, read_rows
from sentiment.config import Config
from sentiment.engine import Engine
from sentiment.errors import ConfigError
from sentiment.model import count_params
from sentiment.monitor import Monitor
from sentiment.profiler import Profiler
from sentiment.rundir import MEMORY_SNAPSHOT

LOG = logging.getLogger("sentiment")  # every line a run prints; a notebook quiets it with LOG.setLevel(WARNING)


class Console(logging.Handler):
    """The `sentiment` logger's lines, unadorned, on sys.stdout or sys.stderr as they are at each line (notebooks
    and test capture swap them), through tqdm.write so an active progress bar is redrawn below, not torn."""

    def __init__(self, stream_name: str = "stdout") -> None:
        super().__init__(logging.INFO)
        self.stream_name = stream_name

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record), file=getattr(sys, self.stream_name))
            getattr(sys, self.stream_name).flush()  # SLURM and nohup logs interleave correctly
        except Exception:  # noqa: BLE001 - logging's contract: never raise from a handler
            self.handleError(record)


def console(stream_name: str = "stdout", replace: bool = True) -> None:
    """Send the `sentiment` logger's lines to stdout or stderr. The CLI calls it for every command (predict and
    evaluate: stderr, so stdout holds only results); train/evaluate/predict called from Python call it with
    replace=False, which adds the console only where nobody configured logging (then quiet it with
    logging.getLogger("sentiment").setLevel(logging.WARNING))."""
    if not replace and LOG.handlers:
        return
    for handler in list(LOG.handlers):
        if isinstance(handler, Console):
            LOG.removeHandler(handler)
    LOG.addHandler(Console(stream_name))
    if LOG.level == logging.NOTSET:
        LOG.setLevel(logging.INFO)
    LOG.propagate = False


# Dense bf16/fp16 tensor-core peaks (FLOP/s, no sparsity) for the MFU figure; the longest name contained in the
# GPU's name wins ("H100 PCIe" before "H100", "L40S" and "L40" before "L4"). NVIDIA data sheets. CPUs: no MFU.
PEAK_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "A10G": 125e12,
              "L40S": 362e12, "L40": 181e12, "L4": 121e12, "RTX 4090": 165e12, "RTX 3090": 71e12, "V100": 125e12,
              "T4": 65e12}


def peak_flops(device_name: str, precision: str) -> float | None:
    """The device's dense peak FLOP/s at this precision, for MFU; None where unknown (CPUs, other GPUs)."""
    names = sorted((k for k in PEAK_FLOPS if k in device_name), key=len, reverse=True)
    peak = PEAK_FLOPS[names[0]] if names else None
    if peak is not None and precision == "fp32":
        peak /= 2  # TF32 tensor cores run at half the bf16 rate
    return peak


def flops_per_token(n_layers: int, hidden: int, seq_len: float, non_embedding_params: int) -> float:
    """Training FLOPs per (padded) token: 6N for the weight matmuls (forward 2N, backward 4N) plus
    12·L·H·T for attention scores and values (Kaplan et al. 2020; Chinchilla appendix F)."""
    return 6 * non_embedding_params + 12 * n_layers * hidden * seq_len


def quiet_libraries(is_main: bool) -> None:
    """Silence transformers' and datasets' progress bars when stderr is a log file (noise in front of the
    messages), and on ranks other than 0 their info logs too. Errors still print. Changes process-wide state."""
    if is_main and sys.stderr.isatty():
        return
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()
    if not is_main:
        transformers.utils.logging.set_verbosity_error()
        datasets.utils.logging.set_verbosity_error()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).parent,
                             capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(engine: Engine) -> dict:
    """Library versions and the device name, for the run header and results.json."""
    import torch
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "device_name": engine.device_name,
            "world_size": engine.world_size}


def check_report_to(cfg: Config) -> None:
    """Fail before anything is written if the logging backend asked for is not installed."""
    if cfg.report_to == "tensorboard":
        try:
            import torch.utils.tensorboard  # noqa: F401
        except ImportError:
            raise ConfigError("report_to=tensorboard needs the tensorboard package: "
                              "pip install tensorboard (or pip install -e \".[extras]\")") from None


class StepClock:
    """The few timestamps one step's timing row is computed from: its start, the time spent waiting for
    batches (read off the TimedBatches it draws from), the host sync, and the end."""

    def __init__(self, batches: "TimedBatches") -> None:
        self.batches, self.waited = batches, batches.waited
        self.start = self.sync = time.perf_counter()

    def synced(self) -> None:
        self.sync = time.perf_counter()


class TimedBatches:
    """An iterator of batches that adds up the seconds spent waiting for them (the data_ms figure)."""

    def __init__(self, batches) -> None:
        self.batches, self.waited = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            self.waited += time.perf_counter() - start


def scalars(row: dict, prefix: str) -> list[tuple[str, float]]:
    """A row's numbers as TensorBoard (tag, value) pairs, `prefix/key`; a nested dict's under its key, as each
    class's figures: `val/per_class/neg/f1`."""
    out = []
    for key, value in row.items():
        if isinstance(value, dict):
            out += scalars(value, f"{prefix}/{key}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            out.append((f"{prefix}/{key}", value))
    return out


def hms(seconds: float) -> str:
    """1:02:03 for an hour and more, else 2:03: the step line's clock."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_step(row: dict, total_steps: int) -> str:
    """The fixed-format log line; metrics.jsonl holds the same numbers."""
    line = (f"step {row['step']}/{total_steps} | epoch {row['epoch']} | loss {row['loss']:.4f} | "
            f"lr {row['lr']:.1e} | grad_norm {row['grad_norm']:.3f}{' (clipped)' if row['clipped'] else ''} | "
            f"{row['samples_per_s']:.1f} ex/s | {row['tokens_per_s'] / 1000:.1f}k tok/s | "
            f"pad {row['padded_fraction']:.0%} | {row['step_ms']:.0f} ms "
            f"(data {row['data_ms']:.0f}, fwd+bwd {row['fwd_bwd_ms']:.0f}, opt {row['opt_ms']:.0f}) | "
            f"{hms(row['elapsed_s'])} elapsed, ETA {hms(row['eta_s'])}")
    if "scale" in row:
        line += f" | scale {row['scale']:.0f}"
    if "mfu" in row:
        line += f" | mfu {row['mfu']:.1%}"
    return line + (" | SKIPPED (non-finite)" if row["skipped"] else "")


def steps_so_far(metrics: Path) -> tuple[int, float]:
    """(samples, seconds) of the optimizer steps in a run's metrics.jsonl (0, 0.0 for a new run); a line cut by a
    kill is skipped. A resumed run's file holds only the steps up to its checkpoint (truncate_metrics)."""
    steps = [row for row in read_rows(metrics) if "split" not in row and "step_ms" in row]
    return sum(row["samples"] for row in steps), sum(row["step_ms"] for row in steps) / 1e3


class RunLog:
    """One object for everything the loop reports: rows to metrics.jsonl (every step and evaluation) and
    TensorBoard on rank 0, the fixed-format line every `log_every` steps, the progress bar, and the training
    throughput for results.json; and what watches the loop when asked: `monitor` (per-layer norms), `profiler`
    and the CUDA memory snapshot. A `with` block: it closes its files and the bar however the loop ends."""

    def __init__(self, out: Path, cfg: Config, engine: Engine, model, total_steps: int, start_step: int) -> None:
        self.out, self.cfg, self.engine = out, cfg, engine
        self.total_steps, self.start_step = total_steps, start_step
        self.model, self.model_config, self.non_embedding = model, model.config, count_params(model)[1]
        self.peak = peak_flops(engine.device_name, engine.precision)
        self.train_samples, self.train_seconds = 0, 0.0
        self.file = self.tensorboard = self.bar = None

    def __enter__(self) -> "RunLog":
        main = self.engine.is_main
        self.bar = tqdm(total=self.total_steps, initial=self.start_step, desc="train", disable=(not main) or None,
                        dynamic_ncols=True)
        if main:  # a resumed run's speed is the whole run's: its earlier steps' rows count too
            self.train_samples, self.train_seconds = steps_so_far(self.out / "metrics.jsonl")
        self.file = AppendFile(self.out / "metrics.jsonl") if main else None
        if main and self.cfg.report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(self.out / "tensorboard"))
            self.tensorboard.add_text("config", "\n".join(f"    {k} = {v!r}" for k, v in self.cfg.to_dict().items()))
        # watching the loop, each off (and free) by default: per-layer norms, a profile, the allocator's history
        self.monitor = Monitor(self.cfg.monitor_every, self.model, self.out, main, self.engine.print, self.tensorboard)
        self.profiler = Profiler(self.cfg.profile_steps, self.start_step, self.out, self.engine, self.model)
        if self.cfg.memory_snapshot:
            recording = self.engine.record_memory_history()
            self.engine.print(f"memory_snapshot: {'recording every allocation' if recording else 'CUDA only: off'}")
        self.engine.reset_peak_memory()
        self.started = time.perf_counter()  # the ETA extrapolates from this process's steps, evaluations included
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.monitor.close()
        self.profiler.close()
        if self.cfg.memory_snapshot and exc[0] is None:  # on an error, out_of_memory_is_an_error writes it
            path = self.engine.write_memory_snapshot(self.out / MEMORY_SNAPSHOT)
            if path:
                self.engine.print(f"memory_snapshot: {path}: drop it on https://pytorch.org/memory_viz")
            self.engine.record_memory_history(on=False)
        if self.file:
            self.file.close()
        if self.tensorboard:
            self.tensorboard.close()

    def write(self, row: dict) -> None:
        """One row to metrics.jsonl and to TensorBoard (every number but the step, under train/ or the split)."""
        if self.file:
            self.file.append(json.dumps(row) + "\n")
        if self.tensorboard:
            for tag, value in scalars({k: v for k, v in row.items() if k != "step"}, row.get("split", "train")):
                self.tensorboard.add_scalar(tag, value, row["step"])

    def step(self, step: int, epoch: int, loss: float, lr: float, grad_norm: float, skipped: bool,
             scale: float | None, counts: list[int], clock: StepClock) -> dict:
        """Log optimizer step `step` (1-based); its line is printed every log_every steps, at the first step
        of the run, and whenever the step was skipped."""
        samples, real_tokens, padded_tokens = counts
        end = time.perf_counter()
        step_s, data_s = end - clock.start, clock.batches.waited - clock.waited
        self.train_samples += samples
        self.train_seconds += step_s
        max_norm = self.cfg.max_grad_norm
        row = {"step": step, "epoch": epoch, "loss": loss, "lr": lr, "grad_norm": grad_norm,
               "clipped": bool(max_norm > 0 and grad_norm > max_norm), "skipped": skipped,
               "samples": samples, "tokens": real_tokens, "padded_fraction": 1 - real_tokens / padded_tokens,
               "samples_per_s": samples / step_s, "tokens_per_s": real_tokens / step_s,
               "data_ms": data_s * 1e3, "fwd_bwd_ms": (clock.sync - clock.start - data_s) * 1e3,
               "opt_ms": (end - clock.sync) * 1e3, "step_ms": step_s * 1e3,
               "peak_mem_mb": self.engine.peak_memory_mb(), "elapsed_s": end - self.started,
               "eta_s": (end - self.started) / (step - self.start_step) * (self.total_steps - step)}
        if scale is not None:
            row["scale"] = scale
        if self.peak:
            c = self.model_config
            flops = flops_per_token(c.num_hidden_layers, c.hidden_size, padded_tokens / max(1, samples),
                                    self.non_embedding) * padded_tokens
            row["mfu"] = flops / step_s / (self.peak * self.engine.world_size)
        self.write(row)
        self.bar.update(1)
        every = self.cfg.log_every
        if self.engine.is_main and ((every and (step % every == 0 or step == self.start_step + 1)) or skipped):
            LOG.info(format_step(row, self.total_steps))
        return row

    def eval(self, step: int, epoch: int, split: str, metrics: dict, is_best: bool,
             shown: tuple[str, ...] = ("loss", "accuracy", "f1")) -> None:
        """Log an evaluation: its row, and a line with the `shown` figures (pretrain: mlm_loss, mlm_accuracy)."""
        self.write({"step": step, "epoch": epoch, "split": split, **metrics})
        if self.engine.is_main:
            LOG.info(f"eval epoch {epoch} | {split} | " + " | ".join(f"{k} {metrics[k]:.4f}" for k in shown)
                     + (" | best so far" if is_best else ""))

    def final(self, results: dict) -> None:
        """The test metrics, to TensorBoard with the config as hyperparameters (its HPARAMS tab compares runs)."""
        if self.tensorboard:
            hparams = {k: v for k, v in self.cfg.to_dict().items() if isinstance(v, (bool, int, float, str))}
            metrics = {f"test/{k}": results[k] for k in ("accuracy", "f1", "macro_f1", "loss") if k in results}
            self.tensorboard.add_hparams(hparams, metrics, run_name=".", global_step=results["steps"])

    @property
    def samples_per_second(self) -> float | None:
        """Training throughput over the run's steps, a resumed run's earlier ones included; None if none ran."""
        return self.train_samples / self.train_seconds if self.train_seconds else None
