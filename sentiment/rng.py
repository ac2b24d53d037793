"""Every random number generator a process draws from (Python, NumPy, torch on the host and on its device): seeding
them, and their states, which a checkpoint saves so that a resumed run draws what an uninterrupted one would.

engine.py's, split off: the Engine's RNG methods call these. With engine.py, the only module that mentions CUDA.
"""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices). Every rank uses the same seed, so the model's
    random classifier head starts identical everywhere (DDP also broadcasts rank 0's weights)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state(device: torch.device) -> dict:
    """Every RNG this process draws from: Python, NumPy, torch CPU and this process's CUDA device."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(device: torch.device, state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
