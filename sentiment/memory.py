"""Memory: the device's (free, allocated and peak bytes; the CUDA allocator's snapshot, for pytorch.org/memory_viz)
and this process's (its peak resident set size, per phase of a run).

engine.py's, split off: the Engine's memory methods call these, and the rest of the code asks the Engine. With
engine.py, the only module that mentions CUDA.
"""

from __future__ import annotations

import logging
import resource
from pathlib import Path

import torch

from sentiment import malloc

LOG = logging.getLogger("sentiment")
HISTORY_ENTRIES = 100_000  # allocations the CUDA allocator remembers with their stacks (~100 MB of host memory)


def device_memory(device: torch.device) -> dict[str, int | None]:
    """Bytes `free` (CUDA: cache released first; CPU: MemAvailable; MPS: None); CUDA's `allocated`, `peak`."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        return {"free": torch.cuda.mem_get_info(device)[0], "allocated": torch.cuda.memory_allocated(device),
                "peak": torch.cuda.max_memory_allocated(device)}
    return {"free": malloc.mem_available() if device.type == "cpu" else None, "allocated": None, "peak": None}


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_mb(device: torch.device, earlier: tuple[float, ...] = ()) -> float:
    """Peak allocated device memory on CUDA; on CPU the peak resident set size of this process, or the largest of
    the `earlier` peaks (PhasePeaks' phases) if larger: resetting a phase's peak resets the process's too."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return max((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, *earlier))  # Linux reports KiB


def record_history(device: torch.device, on: bool = True) -> bool:
    """CUDA: from now on (until on=False) the allocator keeps every allocation's Python stack, for the snapshot's
    timeline (a few microseconds per allocation). True if it records; elsewhere there is nothing to record."""
    if device.type != "cuda":
        return False
    torch.cuda.memory._record_memory_history("all" if on else None, max_entries=HISTORY_ENTRIES, stacks="python")
    return on


def write_snapshot(device: torch.device, path: Path) -> Path | None:
    """CUDA: the allocator's state (its segments and blocks, and the history if recorded) pickled to `path`,
    which pytorch.org/memory_viz opens; None elsewhere, or when it could not be written."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.memory._dump_snapshot(str(path))
    except (OSError, RuntimeError) as e:  # out of disk too, or the allocator refused: the run's error matters more
        LOG.info(f"warning: could not write the memory snapshot {path} ({type(e).__name__}: {e})")
        return None
    return path


# ----------------------------------------------------------------------------- host memory, per phase


def rss_peak_mb() -> float | None:
    """This process's peak resident set size since the last reset_rss_peak (VmHWM, Linux); None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration, ValueError, IndexError):
        return None


def reset_rss_peak() -> bool:
    """Start the peak resident set size again from the current size (Linux >= 4.0: `5` to clear_refs resets
    VmHWM and nothing else). False where it cannot: the peaks then only grow, from the process's start."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class PhasePeaks:
    """The peak resident memory (MB) of each phase of a run, in results.json as `peak_rss_mb`: `next(name)` ends
    the current phase, records its peak, and starts `name` from the memory held now. A phase entered twice
    keeps its larger peak. Host memory on every device: on a GPU run too, tokenizing is the host's."""

    def __init__(self, first: str) -> None:
        self.peaks: dict[str, float] = {}
        self.phase, self.resets = first, reset_rss_peak()

    def next(self, name: str) -> None:
        peak = rss_peak_mb()
        if peak is not None:
            self.peaks[self.phase] = max(peak, self.peaks.get(self.phase, 0.0))
        self.phase = name
        reset_rss_peak()

    def done(self) -> dict[str, float]:
        """Every phase's peak, the current one ended; cumulative (from the process's start) where the peak
        cannot be reset."""
        self.next("")
        return {name: round(mb, 1) for name, mb in self.peaks.items()}
