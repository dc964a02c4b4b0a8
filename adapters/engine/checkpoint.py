"""Checkpoints that make a resumed run identical to an uninterrupted one.

A checkpoint holds every module, the optimizer, the LR scheduler, the adapter's extra state and
every RNG state (python, numpy, torch CPU and CUDA). The data stream needs no state: the batch of
iteration i is a pure function of (seed, i) (bench/data/loader.py), so resuming at i+1 only needs i.
Files are written to a temporary name and renamed, so a kill never leaves a truncated checkpoint.

Under DDP every rank calls `save` (the RNG states of all ranks are gathered: each rank samples its
own RoIs and anchors) and rank 0 writes; on resume every rank loads the same file and takes its own
RNG state (`rank_rng_state`).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from adapters.engine import distributed


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
        path = self.directory / f"iter_{iteration:07d}.pth"
        rng = rng_state()
        extra = {}
        if distributed.is_distributed():  # a collective: every rank calls save, rank 0 writes
            extra["rng_per_rank"] = distributed.all_gather_object(rng)
            if not distributed.is_main():
                return path
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"iteration": iteration, "rng": rng, **state, **extra}, tmp)
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


def rank_rng_state(state: dict) -> dict | None:
    """This rank's RNG state from a checkpoint: its own under the same number of processes,
    rank 0's ("rng") in a single process; None for another rank of a different process count."""
    per_rank = state.get("rng_per_rank")
    if not distributed.is_distributed():
        return state["rng"]
    if per_rank is not None and len(per_rank) == distributed.world_size():
        return per_rank[distributed.rank()]
    return state["rng"] if distributed.is_main() else None


def named_training_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, scaler) -> dict:
    """Model weights and optimizer state keyed by parameter *name*, not position.

    A shared burn-in checkpoint is trained without LSM's F_aux and loaded into a model that has it:
    positional optimizer state would pair the wrong tensors, names pair them right.
    """
    name_of = {id(p): n for n, p in model.named_parameters()}
    opt = optimizer.state_dict()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    names = [name_of[id(p)] for p in params]
    return {
        "model": model.state_dict(),
        "optimizer_state": {names[i]: s for i, s in opt["state"].items()},
        "param_groups": [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[i] for i in g["params"]]}
                         for g in opt["param_groups"]],
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
    }


def load_named_training_state(state: dict, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                              scaler, new_prefixes: tuple[str, ...] = ()) -> None:
    """Inverse of `named_training_state`. Parameters under `new_prefixes` may be absent from the
    state (they keep their values and start without optimizer state); anything else missing is an error."""
    missing, unexpected = model.load_state_dict(state["model"], strict=False)
    bad = [k for k in missing if not k.startswith(new_prefixes)] + list(unexpected)
    if bad:
        raise KeyError(f"checkpoint does not match the model: {', '.join(bad[:5])}")
    name_of = {id(p): n for n, p in model.named_parameters()}
    if len(optimizer.param_groups) != len(state["param_groups"]):
        raise KeyError("checkpoint has a different number of optimizer parameter groups")
    indexed_state, groups, index = {}, [], 0
    for group, saved in zip(optimizer.param_groups, state["param_groups"]):
        ids = []
        for p in group["params"]:
            name = name_of[id(p)]
            if name in state["optimizer_state"]:
                indexed_state[index] = state["optimizer_state"][name]
            ids.append(index)
            index += 1
        groups.append({**{k: v for k, v in saved.items() if k != "params"}, "params": ids})
    optimizer.load_state_dict({"state": indexed_state, "param_groups": groups})
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
