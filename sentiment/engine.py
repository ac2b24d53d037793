"""Everything about where and how the math runs: device, precision, seeding, processes.

This is the only module that mentions CUDA, MPS, autocast, GradScaler, ranks and DDP. `setup_engine()` decides
once and prints every automatic choice with its reason; the rest of the code asks the returned `Engine`
(`engine.autocast()`, `engine.wrap(model)`, `engine.flash_attention_unusable`, ...).
"""

from __future__ import annotations

import contextlib
import datetime
import importlib.util
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from sentiment import malloc
from sentiment import memory as mem
from sentiment import rng
from sentiment.errors import ConfigError

LOG = logging.getLogger("sentiment")
AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class Engine:
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved, never "auto")
    rank: int = 0  # global rank under torchrun, else 0
    local_rank: int = 0  # rank within this node: picks the GPU
    world_size: int = 1  # processes in the job
    decisions: tuple[str, ...] = field(default=())  # "name=value (reason)" lines, for the run header
    # fp16 loss scaling (torch's defaults): start at 2**16, double after growth_interval clean steps in a row;
    # an overflow halves it. Only tests change them (dataclasses.replace), to force overflows and growth.
    init_scale: float = 2.0**16
    growth_interval: int = 2000

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def amp_dtype(self) -> torch.dtype | None:
        return AMP_DTYPES[self.precision]

    def print(self, *args) -> None:
        """A line to the `sentiment` logger on rank 0 only (rank 0 speaks for the job); see runlog.console."""
        if self.is_main:
            LOG.info(" ".join(str(a) for a in args))

    def autocast(self):
        """Mixed-precision context for forward passes; a no-op under fp32."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """Loss scaling for fp16 (its range is too narrow for small gradients), on CUDA and on CPU alike;
        disabled otherwise, and a disabled scaler's scale/unscale_/step/update are plain pass-throughs."""
        return torch.amp.GradScaler(self.device.type, init_scale=self.init_scale,
                                    growth_interval=self.growth_interval, enabled=self.precision == "fp16")

    def to_device(self, batch: dict) -> dict:
        # non_blocking copies overlap with compute, from pinned host memory (pin_memory); ints stay (max_length_q)
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    @property
    def flash_attention_unusable(self) -> str:
        """Why FlashAttention-2 cannot run here, or "" where it can: CUDA, an Ampere+ GPU, bf16/fp16, flash_attn."""
        from transformers.utils import is_flash_attn_2_available
        package = "" if is_flash_attn_2_available() else "the flash_attn package is not installed"
        return self.flash_hardware_unusable or package

    @property
    def varlen_unusable(self) -> str:
        """Why torch's varlen_attn (its own FlashAttention-2, no package needed) cannot run here, or "" where it can."""
        module = importlib.util.find_spec("torch.nn.attention.varlen") is not None
        return self.flash_hardware_unusable or ("" if module else f"torch {torch.__version__} lacks varlen_attn (2.9+)")

    @property
    def flash_hardware_unusable(self) -> str:
        """What both FlashAttention-2 kernels (flash_attn's, torch's varlen_attn) need and this device lacks, or ""."""
        ampere = self.device.type == "cuda" and torch.cuda.get_device_capability(self.device)[0] >= 8
        return "" if ampere and self.amp_dtype is not None else "it runs on Ampere+ CUDA GPUs (sm80) in bf16/fp16 only"

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    @property
    def fused_adamw(self) -> bool:
        """One kernel for the whole AdamW update instead of a dozen per parameter (CPU and CUDA)."""
        return self.device.type in ("cuda", "cpu")

    def wrap(self, model: torch.nn.Module, compile=False, inference=False, packed=False) -> torch.nn.Module:
        """Move to the device, optionally torch.compile (packed: for padding-free rows), and wrap in DDP when
        distributed. inference=True (evaluate/predict of a saved model, never training) also stores the weights in
        bf16/fp16: autocast would otherwise re-cast every weight in every forward."""
        model = model.to(self.device)
        if inference and self.amp_dtype is not None:
            model = model.to(self.amp_dtype)
            self.print(f"engine: weights={self.precision} (inference only: saves autocast's per-forward "
                       "weight casts, ~10% faster on CPU; training keeps fp32 master weights)")
        if compile:
            # padded lengths are multiples of 64 (data.pad_multiple): at most 8 shapes per batch size, each compiled
            # statically; a padding-free row has any length (its reviews' total): one graph with dynamic shapes
            limit = torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
            self.print("engine: compile=on (" + ("dynamic shapes: padding-free rows have any length" if packed else
                       f"static shapes; torch._dynamo's cache_size_limit raised to {limit} for this process: one "
                       "graph per padded length") + ")")
            model = torch.compile(model, dynamic=packed)
        if self.distributed:
            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    @staticmethod
    def unwrap(model: torch.nn.Module) -> torch.nn.Module:
        """The plain model under DDP and torch.compile wrappers (for saving and evaluation)."""
        if isinstance(model, DDP):
            model = model.module
        return getattr(model, "_orig_mod", model)

    @staticmethod
    def local_model(model: torch.nn.Module) -> torch.nn.Module:
        """The model without its DDP wrapper (still compiled, if it was), for evaluation: DDP broadcasts buffers in a
        forward, and ranks running different numbers of eval batches would pair that with another collective: a hang."""
        return model.module if isinstance(model, DDP) else model

    def no_sync(self, model: torch.nn.Module, sync: bool):
        """Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation group."""
        return model.no_sync() if self.distributed and not sync else contextlib.nullcontext()

    def sum_over_ranks(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss to backpropagate on this rank. DDP averages gradients over ranks; each rank's loss is
        already its share of the global batch's mean, so multiplying by world_size makes that average a sum."""
        return loss * self.world_size if self.distributed else loss

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def all_gather_objects(self, obj: object) -> list:
        """Every rank's `obj`, in rank order (small Python objects only: it pickles them)."""
        if not self.distributed:
            return [obj]
        out = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def any_rank(self, flag: bool) -> bool:
        """True on every rank if `flag` is on any (one got SIGTERM): else the others wait in the next all-reduce."""
        if not self.distributed:
            return flag
        t = torch.tensor([float(flag)], device=self.device if dist.get_backend() == "nccl" else torch.device("cpu"))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def main_process_first(self):
        """Rank 0 runs the block first (e.g. filling a cache); the other ranks run it after."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    out_of_memory = torch.OutOfMemoryError  # what an allocation past the device's memory raises (not a field)

    def memory(self) -> dict[str, int | None]:
        """Bytes `free` (CUDA: cache released first; CPU: MemAvailable; MPS: None); CUDA's `allocated`, `peak`."""
        return mem.device_memory(self.device)

    def reset_peak_memory(self) -> None:
        mem.reset_peak(self.device)

    def peak_memory_mb(self, earlier: tuple[float, ...] = ()) -> float:
        """Peak device memory on CUDA; this process's peak RSS on CPU (or the largest `earlier`: memory.PhasePeaks)."""
        return mem.peak_mb(self.device, earlier)

    def record_memory_history(self, on: bool = True) -> bool:
        """CUDA: keep every allocation's stack from now on (until on=False), for write_memory_snapshot."""
        return mem.record_history(self.device, on)

    def write_memory_snapshot(self, path: Path) -> Path | None:
        """CUDA: the allocator's snapshot at `path` (rank r > 0: NAME_rankR.pickle), for pytorch.org/memory_viz."""
        path = path.with_stem(f"{path.stem}_rank{self.rank}") if self.rank else path
        return mem.write_snapshot(self.device, path)

    @property
    def profiler_activities(self) -> list:
        """What torch.profiler records here: the host's operators, and the GPU's kernels on CUDA."""
        cuda = [torch.profiler.ProfilerActivity.CUDA] if self.device.type == "cuda" else []
        return [torch.profiler.ProfilerActivity.CPU, *cuda]

    @property
    def device_name(self) -> str:
        """The GPU's marketing name (e.g. "NVIDIA H100 80GB HBM3"), else the device type."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type

    def rng_state(self) -> dict:
        """Every RNG this process draws from: Python, NumPy, torch CPU and this process's CUDA device."""
        return rng.rng_state(self.device)

    def seed_per_rank(self, seed: int) -> None:
        """Reseed torch with seed + rank once the model exists. Its weights were drawn alike on every rank (and DDP
        broadcasts rank 0's anyway), but dropout must not draw the same masks on every rank's share of the batch."""
        torch.manual_seed(seed + self.rank)

    def gather_rng_states(self) -> list[dict]:
        """Every rank's RNG states in rank order, for a checkpoint (a collective: every rank calls it)."""
        return self.all_gather_objects(self.rng_state())

    def restore_rng_states(self, states: list[dict]) -> None:
        """This rank's RNG states from a checkpoint's list; on another world size they are reused round-robin."""
        if len(states) != self.world_size:
            self.print(f"warning: checkpoint was written by {len(states)} processes, resuming on "
                       f"{self.world_size}: dropout masks will differ from an uninterrupted run")
        self.set_rng_state(states[self.rank % len(states)])

    def set_rng_state(self, state: dict) -> None:
        rng.set_rng_state(self.device, state)

    def close(self) -> None:
        """Tear down the process group (call on success and on error)."""
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16, AMX); elsewhere bf16 autocast is emulated, slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        flags = Path("/proc/cpuinfo").read_text() if os.path.exists("/proc/cpuinfo") else ""
        return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(requested: str, local_rank: int) -> tuple[torch.device, str]:
    """The device to run on, and why."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank), "auto: CUDA is available"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps"), "auto: Apple MPS is available"
        return torch.device("cpu"), "auto: no CUDA or MPS device found"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={requested} but CUDA is not available here; use --device cpu or auto")
        index = int(requested.partition(":")[2] or local_rank)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={requested} but only {torch.cuda.device_count()} CUDA device(s) are "
                               "visible; pick a lower index or check CUDA_VISIBLE_DEVICES")
        return torch.device("cuda", index), "requested"
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ConfigError("device=mps but MPS is not available here; use --device cpu or auto")
    return torch.device(requested), "requested"


def resolve_precision(requested: str, device: torch.device) -> tuple[str, str]:
    """fp32 | bf16 | fp16 for this device, and why. `auto` picks the fastest mode that is safe."""
    if device.type == "cuda":
        bf16_ok = torch.cuda.is_bf16_supported(including_emulation=False)
        if requested == "auto":
            if bf16_ok:
                return "bf16", "auto: CUDA device supports bf16"
            return "fp16", "auto: CUDA device lacks bf16 (pre-Ampere); fp16 with loss scaling"
        if requested == "bf16" and not bf16_ok:
            raise ConfigError("precision=bf16 but this GPU has no bf16 support; use --precision fp16 or fp32")
        return requested, "requested"
    if device.type == "cpu":
        native = cpu_has_native_bf16()
        if requested == "auto":
            if native:
                return "bf16", "auto: CPU has native bf16 (AVX512-BF16/AMX)"
            return "fp32", "auto: CPU lacks native bf16, emulated bf16 would be slower"
        if requested == "fp16":  # CPU autocast and GradScaler("cpu") do fp16: slow, but the whole fp16 path
            return "fp16", ("requested: on CPU fp16 is emulated and slower than fp32; it exercises the fp16 path: "
                            "loss scaling, overflow skips")
        if requested == "bf16" and not native:
            return "bf16", "requested (warning: this CPU emulates bf16, expect it slower than fp32)"
        return requested, "requested"
    # mps: bf16/fp16 autocast support varies by macOS version; fp32 always works
    if requested == "auto":
        return "fp32", "auto: MPS autocast support varies by macOS version; fp32 is safe"
    return requested, "requested"


def setup_engine(device: str = "auto", precision: str = "auto", seed: int = 0,
                 keep_freed_memory: bool = True) -> Engine:
    """Decide device, precision and process group once; print each decision and its reason.

    Under `torchrun` (RANK/LOCAL_RANK/WORLD_SIZE set) this joins the process group: nccl on CUDA,
    gloo on CPU. A plain `python -m sentiment` stays a single process with no process group.
    """
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    dev, dev_why = resolve_device(device, local_rank)
    decisions = [f"device={dev} ({dev_why})"]
    if world_size > 1:
        if dev.type == "cuda":
            torch.cuda.set_device(dev)  # bind this rank to its GPU before NCCL creates its communicator
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not dist.is_initialized():
            dist.init_process_group(backend=backend, timeout=datetime.timedelta(minutes=30),
                                    device_id=dev if dev.type == "cuda" else None)
        decisions.append(f"distributed=DDP world_size={world_size} backend={backend} "
                         "(torchrun environment found)")
    elif dev.type == "cuda":
        torch.cuda.set_device(dev)
    prec, prec_why = resolve_precision(precision, dev)
    decisions.append(f"precision={prec} ({prec_why})")
    if prec == "fp16":
        decisions.append("grad_scaler=on (fp16 gradients underflow without loss scaling; an overflowing step is "
                         "skipped and halves the scale)")
    if dev.type == "cuda":
        # TF32 matmuls: ~8x the fp32 rate on Ampere+ with a 10-bit mantissa, ample for fine-tuning
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        decisions.append("tf32=on (CUDA: fp32 matmuls run on tensor cores)")
    if dev.type == "cpu" and world_size > 1:
        # torchrun sets OMP_NUM_THREADS=1; give each rank its share of the cores instead
        threads = max(1, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", world_size)))
        torch.set_num_threads(threads)
        decisions.append(f"threads={threads} per rank (CPU cores split between local ranks)")
    if dev.type == "cpu":
        decisions.append(malloc.configure(keep_freed_memory))
    rng.seed_everything(seed)
    decisions.append(f"seed={seed} (Python, NumPy and torch generators of this process)")
    engine = Engine(device=dev, precision=prec, rank=rank, local_rank=local_rank,
                    world_size=world_size, decisions=tuple(decisions))
    for line in decisions:
        engine.print(f"engine: {line}")
    return engine

