"""The working store (BENCH_HOME, default ./.bench): mlflow.db, runs/, splits/, data/."""

from __future__ import annotations

import os
from pathlib import Path

from bench.errors import BenchError


def bench_home() -> Path:
    value = os.environ.get("BENCH_HOME", ".bench")
    if not value.strip():  # an empty value would silently mean the current directory
        raise BenchError("BENCH_HOME is set but empty; set it to the store's folder or unset it (default ./.bench)")
    return Path(value).resolve()


def run_dir(home: Path, key: str) -> Path:
    """One directory per cell, sharded by the first two hex digits of its key."""
    return Path(home) / "runs" / key[:2] / key


def find_run_dir(run: str, home: Path) -> Path:
    """A finished run directory from a path or a key prefix under HOME/runs."""
    rdir = Path(run)
    if not rdir.is_dir():
        matches = sorted((home / "runs").glob(f"*/{run}*"))
        if len(matches) != 1:
            raise BenchError(f"run '{run}' matches {len(matches)} run directories; give a longer key or a path")
        rdir = matches[0]
    weights = rdir / "model_final.pth"
    if not weights.exists():
        raise BenchError(f"{weights} does not exist; the run has not finished (rerun `bench train` to resume it)")
    return rdir
