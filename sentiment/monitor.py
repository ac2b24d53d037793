"""The per-layer monitor (`--monitor_every N`): which layers learn, and how far each optimizer step moves them.

For each group of weights a reader thinks in (the embeddings, each encoder layer, the pooler, the classifier head;
an MLM head), every N optimizer steps: the gradient norm, the weight norm and the update ratio |Δθ|/|θ| of that
step. The ratio is measured, not inferred from the gradient: the monitored step's weights are copied before the
update and compared after it, so it is the change AdamW, weight decay, clipping and fp16's skipped steps made.
Exact under accumulation and DDP: the gradients are read after the all-reduce and the unscale, and the weights
are the same on every rank. It only reads: the weights are bitwise those of a run without it, and an unmonitored
step costs nothing. Rows go to RUN/monitor.jsonl (rank 0) and TensorBoard; heatmaps.py draws them.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import torch

from sentiment.checkpoint import AppendFile
from sentiment.errors import ConfigError
from sentiment.model import layer_scales
from sentiment.rundir import MONITOR_FILE


def layer_groups(model: torch.nn.Module) -> list[tuple[str, list[torch.nn.Parameter]]]:
    """[(name, trainable parameters)] from the bottom up: `embeddings`, `layer 1` ... `layer L` (the layers
    model.layer_scales finds, as for layer-wise lr decay), then what sits above the encoder one module at a time
    (`pooler`, `classifier`; a masked LM's `cls`). A family whose layers model.py cannot find: one group per
    top-level module. Frozen parameters are left out, and so is a group with none left."""
    try:
        stack = [(name, params) for name, _, params in layer_scales(model, 1.0)]
    except ConfigError:
        stack = [("head", list(model.parameters()))]  # all of it "above the encoder", split by module below
    *layers, (_, head) = stack
    groups = [(name if not name.isdigit() else f"layer {name}", params) for name, params in layers]
    groups += by_top_module(model, head)
    return [(name, trainable) for name, params in groups if (trainable := [p for p in params if p.requires_grad])]


def by_top_module(model: torch.nn.Module, params: list[torch.nn.Parameter]) -> list[tuple[str, list]]:
    """`params` grouped by the module of the model (or of its base model) that holds them, in the model's order:
    bert.pooler.dense.weight -> pooler, classifier.weight -> classifier."""
    wanted, prefix = {id(p) for p in params}, getattr(model, "base_model_prefix", "") + "."
    groups: dict[str, list] = {}
    for name, p in model.named_parameters():  # each tensor once: a tied decoder is the embeddings' weight
        if id(p) in wanted:
            groups.setdefault(name.removeprefix(prefix).split(".")[0], []).append(p)
    return list(groups.items())


def group_norms(groups: list[list[torch.Tensor | None]], device: torch.device) -> torch.Tensor:
    """The L2 norm of each group of tensors (a missing gradient counts as zero), in fp32, on `device`: (groups,)."""
    return torch.stack([torch.nn.utils.get_total_norm([t.float() for t in group if t is not None]).to(device)
                        for group in groups])


class Monitor:
    """`with monitor.update(step):` around one optimizer update. Off (every == 0) or on an unmonitored step it
    does nothing. `mean_ms` is what the monitored steps cost, `close()` prints it."""

    def __init__(self, every: int, model: torch.nn.Module, out: Path, is_main: bool, say, tensorboard=None) -> None:
        self.every, self.say, self.tensorboard, self.costs = every, say, tensorboard, []
        self.groups = layer_groups(model) if every else []
        self.device = next(model.parameters()).device if every else None
        self.file = AppendFile(out / MONITOR_FILE) if every and is_main else None
        if every:
            say(f"monitor: every {every} steps, {len(self.groups)} groups ({', '.join(n for n, _ in self.groups)}): "
                f"gradient norm, weight norm and update ratio to {out / MONITOR_FILE}")

    @contextlib.contextmanager
    def update(self, step: int):
        """On monitored steps (every `every`-th, 1-based): the gradient norms and a copy of the weights before
        the block, their change after it; a row. The gradients must be unscaled and (DDP) all-reduced."""
        if not self.every or step % self.every:
            yield
            return
        start = time.perf_counter()
        params = [ps for _, ps in self.groups]
        # before clipping, as the step's grad_norm (the root of their squares' sum)
        grad_norm = group_norms([[p.grad for p in ps] for ps in params], self.device)
        weight_norm = group_norms([[p.detach() for p in ps] for ps in params], self.device)  # |θ| before the step
        change = [[p.detach().clone() for p in ps] for ps in params]  # one copy of the weights, freed after
        spent = time.perf_counter() - start
        yield
        start = time.perf_counter()
        for ps, cs in zip(params, change):
            for p, c in zip(ps, cs):
                c.sub_(p.detach())  # in place: θ before - θ after, the step's change (its sign does not matter)
        update_norm = group_norms(change, self.device)
        del change
        ratio = update_norm / weight_norm.clamp_min(1e-30)  # a group of zeros (a fresh bias) has no ratio: 0
        values = torch.stack([grad_norm, weight_norm, update_norm, ratio]).tolist()  # one host sync
        self.costs.append((spent + time.perf_counter() - start) * 1e3)
        self.write({"step": step, "every": self.every, "layers": [n for n, _ in self.groups],
                    "numel": [sum(p.numel() for p in ps) for ps in params],
                    **dict(zip(("grad_norm", "weight_norm", "update_norm", "update_ratio"), values)),
                    "monitor_ms": self.costs[-1]})

    def write(self, row: dict) -> None:
        if self.file:
            self.file.append(json.dumps(row) + "\n")
        if self.tensorboard:
            for key in ("grad_norm", "update_ratio"):
                for layer, value in zip(row["layers"], row[key]):
                    self.tensorboard.add_scalar(f"monitor/{key}/{layer.replace(' ', '_')}", value, row["step"])

    @property
    def mean_ms(self) -> float | None:
        return sum(self.costs) / len(self.costs) if self.costs else None

    def close(self) -> None:
        if self.file:
            self.file.close()
        if self.costs:
            self.say(f"monitor: {len(self.costs)} monitored steps, {self.mean_ms:.1f} ms each on average (norms of "
                     "gradients and weights, a copy of the weights, one host sync); other steps: nothing")
