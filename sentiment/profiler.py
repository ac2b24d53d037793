"""`--profile_steps K`: torch.profiler over K steady steps of the loop, operation by operation.

It writes RUN/profile/trace.json, which https://ui.perfetto.dev and chrome://tracing open (every operator on a
timeline, the GPU's kernels too on CUDA), and RUN/profile/summary.json: the operations that took the most time
themselves (self time, CPU and CUDA), and the share of the steps' wall time spent waiting for data, in forward,
backward, the optimizer and communication. report.md shows both. The loop calls `profiler.step()` once per step;
the phases are read off the names torch already gives its events, and the forward off a label this module puts
around the model's forward (two hooks, there only while profiling). Off (K = 0), nothing is installed. Rank 0
only: under DDP its trace shows the all-reduce it waits for.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from sentiment.checkpoint import atomic_write
from sentiment.engine import Engine
from sentiment.rundir import PROFILE_DIR

SKIPPED = 2  # steps run before the profiler warms up: the first allocate AdamW's state, pick kernels, fill caches
WARMUP = 1  # then one step under the profiler, not recorded: its own start-up cost
TOP_OPS = 12  # rows of the top-operations table
FORWARD = "forward (model)"  # the label around the model's forward
# Each phase: the prefixes of its events' names (torch's own: the DataLoader's iterator, autograd's nodes, the
# optimizer's step and zero_grad); communication: any collective (DDP's gradient all-reduce, our step totals).
PHASES = {"data": ("enumerate(DataLoader)",), "forward": (FORWARD,),
          "backward": ("autograd::engine::evaluate_function",), "optimizer": ("Optimizer.",)}
COLLECTIVES = ("nccl:", "gloo:", "c10d::", "allreduce", "all_reduce", "broadcast", "barrier")


def phase_of(name: str) -> str | None:
    for phase, prefixes in PHASES.items():
        if name.startswith(prefixes):
            return phase
    return "communication" if any(c in name.lower() for c in COLLECTIVES) else None


def union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Overlapping and nested (start, end) spans merged into disjoint ones, in order."""
    merged: list[list[float]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return [(s, e) for s, e in merged]


def overlap(a: list[tuple[float, float]], b: list[tuple[float, float]]) -> float:
    """Total length of the intersection of two sets of disjoint spans."""
    return sum(max(0.0, min(e1, e2) - max(s1, s2)) for s1, e1 in a for s2, e2 in b)


def phase_shares(events: list[tuple[str, float, float]]) -> dict[str, float]:
    """{phase: share of the profiled steps' wall time} from (name, start, end) events; the steps are the events
    named ProfilerStep*. A phase's time is the union of its events' spans on any thread, so nested events count
    once; phases can overlap (DDP's all-reduce runs during backward), so the shares can sum past 1."""
    steps = union([(s, e) for name, s, e in events if name.startswith("ProfilerStep")])
    total = sum(e - s for s, e in steps) or 1.0
    return {phase: overlap(union([(s, e) for name, s, e in events if phase_of(name) == phase]), steps) / total
            for phase in (*PHASES, "communication")}


def top_operations(averages, steps: int, on_cuda: bool) -> list[dict]:
    """The TOP_OPS operators with the most self time (CPU, or CUDA's kernels on CUDA), in ms per step, with their
    share of all self time: what to optimize first. Our labels and the step markers hold no work of their own."""
    key = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    rows = [a for a in averages if not a.key.startswith(("ProfilerStep", FORWARD))]
    total = sum(getattr(a, key) for a in rows) or 1.0
    rows = sorted(rows, key=lambda a: getattr(a, key), reverse=True)[:TOP_OPS]
    return [{"name": a.key, "calls_per_step": a.count / steps, "self_cpu_ms": a.self_cpu_time_total / 1e3 / steps,
             **({"self_cuda_ms": a.self_device_time_total / 1e3 / steps} if on_cuda else {}),
             "share": getattr(a, key) / total} for a in rows]


class Profiler:
    """Started by RunLog; `step()` after each optimizer step; `close()` stops it. Profiles the steps
    start_step + SKIPPED + WARMUP + 1 .. + steps (1-based), or as many of them as the run has."""

    def __init__(self, steps: int, start_step: int, out: Path, engine: Engine, model: torch.nn.Module) -> None:
        self.steps, self.engine, self.folder = steps if engine.is_main else 0, engine, out / PROFILE_DIR
        self.first, self.start_step = start_step + SKIPPED + WARMUP + 1, start_step
        self.prof, self.hooks, self.labels, self.written = None, [], [], False
        if not self.steps:
            return
        self.prof = torch.profiler.profile(
            activities=engine.profiler_activities, on_trace_ready=self._write,
            schedule=torch.profiler.schedule(skip_first=SKIPPED, wait=0, warmup=WARMUP, active=self.steps, repeat=1))
        # under torch.compile the hooks run eagerly, outside the compiled graph
        self.hooks = [model.register_forward_pre_hook(torch.compiler.disable(lambda *_: self._open())),
                      model.register_forward_hook(torch.compiler.disable(lambda *_: self._close_label()))]
        engine.print(f"profile: steps {self.first}-{self.first + self.steps - 1} (after {SKIPPED + WARMUP} warm-up "
                     f"steps) to {self.folder / 'trace.json'} (open it in https://ui.perfetto.dev)")
        self.prof.start()

    def _open(self) -> None:
        label = torch.profiler.record_function(FORWARD)
        label.__enter__()
        self.labels.append(label)

    def _close_label(self) -> None:
        if self.labels:
            self.labels.pop().__exit__(None, None, None)

    def step(self) -> None:
        """One optimizer step is done: the next one's window in the trace opens."""
        if self.prof is not None:
            self.prof.step()

    def _write(self, prof) -> None:
        """on_trace_ready: the trace and its summary, and their lines on the console."""
        self.folder.mkdir(exist_ok=True)
        prof.export_chrome_trace(str(self.folder / "trace.json"))
        events = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()]
        steps = max(1, sum(name.startswith("ProfilerStep") for name, _, _ in events))
        summary = {"steps": [self.first, self.first + steps - 1], "trace": str(self.folder / "trace.json"),
                   "trace_offset": self.start_step + 1,  # the trace's ProfilerStep#N is step N + this (1-based)
                   "device": self.engine.device_name, "phases": phase_shares(events),
                   "top_operations": top_operations(prof.key_averages(), steps, self.engine.device.type == "cuda")}
        atomic_write(self.folder / "summary.json", lambda f: f.write(json.dumps(summary, indent=2).encode()))
        self.written = True
        for line in summary_lines(summary)[:2]:
            self.engine.print(f"profile: {line}")

    def close(self) -> None:
        for hook in self.hooks:
            hook.remove()
        if self.prof is None:
            return
        self.prof.stop()  # mid-recording (a run shorter than asked for), this writes what it has
        if not self.written:
            self.engine.print(f"profile: the run ended before step {self.first}: nothing traced (it needs "
                              f"{SKIPPED + WARMUP} warm-up steps before the {self.steps} profiled)")


def read_summary(run: Path) -> dict | None:
    path = run / PROFILE_DIR / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else None


def summary_lines(summary: dict) -> list[str]:
    """Where the trace is, the time per phase, then the top operations as a markdown table."""
    first, last = summary["steps"]
    phases = ", ".join(f"{name} {share:.0%}" for name, share in summary["phases"].items())
    ops = summary["top_operations"]
    cuda = "self_cuda_ms" in (ops[0] if ops else {})
    offset = summary.get("trace_offset", 1)
    lines = [f"steps {first}-{last} traced to {summary['trace']} (https://ui.perfetto.dev or chrome://tracing; "
             f"there ProfilerStep#{first - offset}-#{last - offset}: torch counts from 0)",
             f"share of the steps' wall time: {phases} (communication overlaps backward under DDP)", "",
             "| operation | calls/step | self CPU ms/step |" + (" self CUDA ms/step |" if cuda else "")
             + " share of self time |", "|---|---|---|" + ("---|" if cuda else "") + "---|"]
    for op in ops:
        lines.append(f"| `{op['name']}` | {op['calls_per_step']:.0f} | {op['self_cpu_ms']:.1f} |"
                     + (f" {op['self_cuda_ms']:.1f} |" if cuda else "") + f" {op['share']:.1%} |")
    return lines


def profile_lines(run: Path) -> list[str]:
    """report.md's profile section, from RUN/profile/summary.json; nothing when the run was not profiled."""
    summary = read_summary(run)
    if summary is None:
        return []
    return ["## Profile", "", *summary_lines(summary), "",
            "Self time: an operation's own, without the operations it called. Data: waiting for the next "
            "batch; forward: the model's forward (the loss is outside it); backward: autograd's nodes; optimizer: "
            "AdamW's step and zero_grad. The rest of a step (moving the batch, the loss, clipping, the host sync) "
            "is in no phase; an evaluation or checkpoint that fell in these steps is in their time (its forwards "
            "as forward).", ""]
