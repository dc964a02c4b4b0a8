"""The working store (BENCH_HOME, default ./.bench): mlflow.db, runs/, splits/, data/."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.errors import BenchError


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


class CorruptFile(BenchError):
    """A store file that exists but cannot be read (truncated, not JSON, missing keys)."""


def _result_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not a JSON object"
    if r.get("stage") == "burn_in" or "burn_in_teacher" in r:  # a burn-in has its teacher's numbers, no metrics
        return None
    metrics, primary = r.get("metrics"), r.get("primary_model")
    if not isinstance(metrics, dict) or not isinstance(primary, str) or not isinstance(metrics.get(primary), dict):
        return "no metrics of its primary model"
    return None


def read_result(path: Path) -> dict:
    """A cell's result.json; `CorruptFile` naming the file and the fix if it cannot be used."""
    path = Path(path)
    try:
        r = json.loads(path.read_text())
        problem = _result_problem(r)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise CorruptFile(f"{path} is unreadable ({problem}); the cell counts as not done and reruns "
                          "(`bench clean --corrupt` removes it)")
    return r


def done_result(path: Path) -> dict | None:
    """The result of a done cell, or None when `path` is missing or unreadable (not done)."""
    try:
        return read_result(path)
    except CorruptFile:
        return None


def result_ok(path: Path) -> bool:
    """A readable result.json: the cell is done."""
    return done_result(path) is not None
