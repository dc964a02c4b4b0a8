"""Checkpoints that make a resumed run identical to an uninterrupted one.

A checkpoint holds every module, the optimizer, the LR scheduler, the adapter's extra state and
every RNG state (python, numpy, torch CPU and CUDA). The data stream needs no state: the batch of
iteration i is a pure function of (seed, i) (bench/data/loader.py), so resuming at i+1 only needs i.
Files are written to a temporary name and renamed, so a kill never leaves a truncated checkpoint.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """Saves `checkpoints/iter_XXXXXXX.pth` + `last_checkpoint`, keeps the newest `keep` files."""

    def __init__(self, directory: Path, keep: int = 2):
        self.directory = Path(directory)
        self.keep = keep

    def save(self, iteration: int, state: dict) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"iter_{iteration:07d}.pth"
        tmp = path.with_suffix(".tmp")
        torch.save({"iteration": iteration, "rng": rng_state(), **state}, tmp)
        os.replace(tmp, path)
        marker = self.directory / "last_checkpoint"
        marker.with_suffix(".tmp").write_text(path.name)
        os.replace(marker.with_suffix(".tmp"), marker)
        for old in sorted(self.directory.glob("iter_*.pth"))[: -self.keep]:
            old.unlink()
        return path

    def latest(self) -> Path | None:
        marker = self.directory / "last_checkpoint"
        if not marker.exists():
            return None
        path = self.directory / marker.read_text().strip()
        return path if path.exists() else None

    def load(self, path: Path) -> dict:
        # Checkpoints hold RNG states (numpy tuples), so they are not weights-only files; they are
        # only ever read from the run's own directory.
        return torch.load(path, map_location="cpu", weights_only=False)
