"""Helpers shared by the benchmark scripts (not a test: they print measured numbers)."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, warmup: int, repeats: int, clock: str = "wall") -> list[float]:
    """Time of `fn()` per call, after `warmup` calls. `clock="cpu"`: this process's CPU time
    (all its threads), which other jobs on a shared machine do not inflate as they do wall time."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f}, n={len(times)})"
