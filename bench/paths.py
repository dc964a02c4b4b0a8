"""The working store (BENCH_HOME, default ./.bench): mlflow.db, runs/, splits/, data/."""

from __future__ import annotations

import os
from pathlib import Path


def bench_home() -> Path:
    return Path(os.environ.get("BENCH_HOME", ".bench")).resolve()


def run_dir(home: Path, key: str) -> Path:
    """One directory per cell, sharded by the first two hex digits of its key."""
    return Path(home) / "runs" / key[:2] / key
