"""Checkpoints that make a resumed run identical to an uninterrupted one.

A checkpoint holds every module, the optimizer, the LR scheduler, the adapter's extra state and
every RNG state (python, numpy, torch CPU and CUDA). The data stream needs no state: the batch of
iteration i is a pure function of (seed, i) (core/data/loader.py), so resuming at i+1 only needs i.
Files are written to a temporary name, fsynced and renamed, so a kill never leaves a truncated
checkpoint; one truncated anyway (a full disk, a copy cut short) is skipped for the newest whole one.

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
        with open(tmp, "wb") as f:  # on disk before the rename: a power cut leaves the old file or the new
            torch.save({"iteration": iteration, "rng": rng, **state, **extra}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        marker = self.directory / "last_checkpoint"
        with open(marker.with_suffix(".tmp"), "w") as f:
            f.write(path.name)
            f.flush()
            os.fsync(f.fileno())
        os.replace(marker.with_suffix(".tmp"), marker)
        fsync_directory(self.directory)
        for old in sorted(self.directory.glob("iter_*.pth"))[: -self.keep]:
            old.unlink()
        return path

    def candidates(self) -> list[Path]:
        """Checkpoints newest first: the one `last_checkpoint` names, then the others by iteration."""
        files = sorted(self.directory.glob("iter_*.pth"), reverse=True)
        marker = self.directory / "last_checkpoint"
        named = self.directory / marker.read_text().strip() if marker.exists() else None
        return ([named] if named in files else []) + [f for f in files if f != named]

    def latest(self) -> Path | None:
        """The newest checkpoint that is a whole file (a torch zip archive with its directory at the
        end: a write cut short has none); an older one where the newest is truncated."""
        for path in self.candidates():
            if _whole_archive(path):
                return path
            _warn(f"checkpoint {path} is truncated or unreadable; resuming from an older one")
        return None

    def load(self, path: Path) -> dict:
        """The state in `path`, or where it cannot be read, in the newest older checkpoint that can."""
        # Checkpoints hold RNG states (numpy tuples), so they are not weights-only files; they are
        # only ever read from the run's own directory.
        tried = []
        for p in [path] + [c for c in self.candidates() if c.name < Path(path).name]:
            try:
                return torch.load(p, map_location="cpu", weights_only=False)
            except Exception as err:  # zip, pickle or tensor errors: a damaged file
                tried.append(f"{p} ({type(err).__name__})")
                _warn(f"checkpoint {p} cannot be read ({type(err).__name__}: {err}); trying an older one")
        raise RuntimeError(f"no readable checkpoint: {'; '.join(tried)}; delete {self.directory} to train the "
                           "cell from its start")


def _whole_archive(path: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return bool(z.namelist())
    except (OSError, zipfile.BadZipFile, ValueError):
        return False


def _warn(message: str) -> None:
    import sys

    print(f"warning: {message}", file=sys.stderr, flush=True)


def fsync_directory(directory: Path) -> None:
    """A rename is durable once its directory is synced (POSIX); a no-op where that is not allowed."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


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
