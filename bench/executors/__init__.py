"""Executors run cells: submit, poll, cancel. The local one uses worker subprocesses; the Slurm one
(submitit job arrays) plugs in behind the same methods.

Both start a cell the same way: its config.yaml (with the device the slot gives it) in the cell's
directory, then `bench.worker.main(worker_argv(...))` with the directory of the cell it starts
from, as the plan resolved it; the helpers below are that shared part.
"""

from __future__ import annotations

from pathlib import Path

import yaml


def write_cell_config(cell, home: Path, device: str) -> Path:
    """The cell's config.yaml with the device its worker uses; returns its path."""
    rdir = cell.directory(home)
    rdir.mkdir(parents=True, exist_ok=True)
    cfg = cell.config.model_copy(update={"device": device})
    path = rdir / "config.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    return path


def worker_argv(cell, home: Path, device: str, parent_run_id: str | None, track: bool) -> list[str]:
    """Arguments of `bench.worker.main` for one cell (its config.yaml written here); every rank of
    a DDP job gets the same, its `--start-from` included."""
    argv = [str(write_cell_config(cell, home, device)), "--home", str(home)]
    if (start := cell.start_from(home)) is not None:
        argv += ["--start-from", str(start)]
    if parent_run_id:
        argv += ["--parent-run-id", parent_run_id]
    if not track:
        argv.append("--no-track")
    return argv
