"""Orchestration overhead per cell: the local executor versus Slurm (submitit job arrays).

    python benchmarks/orchestration_overhead.py [--cells 4] [--slots 2] [--executors local,slurm]

Trivial cells (the tests' tiny config: 24 images of 64 px, a tiny trunk, 6 iterations, no MLflow)
go through `bench.runner.run_cells` with each executor (local: CPU slots; Slurm: 1 CPU per cell on
a cluster with --slots free CPUs, e.g. `sudo .ci/slurm_cluster.sh start`). Per executor: one
untimed warm-up cell (the fork server's or the node's first imports), then N cells one at a time,
so that no cell queues behind another. A watcher thread samples the cells' directories every
10 ms; for each cell:

- start latency: submit() -> the worker enters `run_cell` (its `lock` file appears: interpreter,
  imports and data preparation done);
- first iteration: submit() -> the first line of metrics.jsonl (log period 1);
- overhead: submit() -> the runner sees the cell done (its poll), minus the worker's own training
  time (result.json's train_seconds_this_session; evaluation and imports count as overhead).

Then N other cells at once, --slots at a time: the wall time, and the wall time beyond the
training divided evenly over the slots, per cell. Prints medians (min-max) and Slurm / local ratios.
"""

from __future__ import annotations

import argparse
import io
import json
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from rich.console import Console

from core.config import load_config
from core.data.sources import prepare_data
from bench.keys import cell_key
from bench.plan import Cell
from bench.runner import run_cells
from tests.conftest import TINY


def make_cells(seeds, home: Path) -> list[Cell]:
    cells = []
    for seed in seeds:
        cfg = load_config("demo", TINY + ["solver.log_period=1", "device=cpu"], method="supervised", seed=seed)
        cells.append(Cell("supervised", "tiny", seed, cfg, cell_key(cfg, prepare_data(cfg.data, home))))
    return cells


class Recorder:
    """Wraps an executor: when each cell was submitted and when the runner saw it end; a thread
    samples when each cell's worker started and logged its first iteration."""

    def __init__(self, executor, cells: list[Cell], home: Path):
        self.ex, self.home = executor, home
        self.submitted: dict[str, float] = {}
        self.ended: dict[str, float] = {}
        self.started: dict[str, float] = {}
        self.first_iter: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, args=(cells,), daemon=True)
        self._thread.start()

    def _watch(self, cells):
        while not self._stop.is_set():
            now = time.time()
            for c in cells:
                d = c.directory(self.home)
                if c.key not in self.started and (d / "lock").exists():
                    self.started[c.key] = now
                if c.key not in self.first_iter and (d / "metrics.jsonl").exists():
                    self.first_iter[c.key] = now
            time.sleep(0.01)

    def stop(self):
        self._stop.set()
        self._thread.join()

    def __getattr__(self, name):  # jobs, slots, free_slot, cancel
        return getattr(self.ex, name)

    def submit(self, cell, home, parent_run_id, attempts=1):
        self.submitted[cell.key] = time.time()
        return self.ex.submit(cell, home, parent_run_id, attempts)

    def poll(self):
        ended = self.ex.poll()
        for job, _ in ended:
            self.ended[job.cell.key] = time.time()
        return ended


class ArrayRecorder(Recorder):
    def submit_many(self, items, home, parent_run_id):
        t = time.time()
        for cell, _ in items:
            self.submitted[cell.key] = t
        return self.ex.submit_many(items, home, parent_run_id)


def measure(name: str, seed_home: Path, root: Path, n: int, slots: int) -> dict:
    """One executor: a warm-up cell (untimed: the fork server's or the node's first imports), then
    n cells one at a time (per-cell latencies, no queueing behind other cells), then n other
    cells at once, `slots` at a time (wall time)."""
    home = root / name
    shutil.copytree(seed_home, home)
    cells = make_cells(range(1, 2 * n + 2), home)
    warmup, single, batch = cells[0], cells[1:n + 1], cells[n + 1:]
    if name == "local":
        from bench.executors.local import LocalExecutor

        executor = Recorder(LocalExecutor(["cpu"], slots_per_device=slots, track=False), cells, home)
    else:
        from bench.executors.slurm import SlurmExecutor

        executor = ArrayRecorder(SlurmExecutor(gpus_per_cell=0, cpus_per_cell=1, time="00:10:00",
                                               array_parallelism=slots, track=False), cells, home)
    quiet = Console(file=io.StringIO())  # the live display would flood the output
    for c in [warmup, *single]:
        assert len(run_cells([c], executor, home, console=quiet)["done"]) == 1
    t0 = time.time()
    outcome = run_cells(batch, executor, home, console=quiet)
    wall = time.time() - t0
    executor.stop()
    assert len(outcome["done"]) == n, outcome
    train = {c.key: json.loads((c.directory(home) / "result.json").read_text())["train_seconds_this_session"]
             for c in cells}
    keys = [c.key for c in single]
    return {
        "start": [executor.started[k] - executor.submitted[k] for k in keys],
        "first_iter": [executor.first_iter[k] - executor.submitted[k] for k in keys],
        "train": [train[k] for k in keys],
        "overhead": [executor.ended[k] - executor.submitted[k] - train[k] for k in keys],
        "wall": wall, "batch_train": sum(train[c.key] for c in batch),
    }


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):6.2f} ({min(xs):.2f}-{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cells", type=int, default=4)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--executors", default="local,slurm")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-orchestration-"))
    seed_home = root / "seed"
    iterations = make_cells([1], seed_home)[0].iterations  # generates the data once; each executor gets a copy
    results = {name: measure(name, seed_home, root, args.cells, args.slots) for name in args.executors.split(",")}
    print(f"\none cell at a time, {args.cells} cells of {iterations} iterations; seconds, median (min-max) "
          f"over cells; 'wall': {args.cells} other cells submitted at once, {args.slots} at a time")
    print(f"| {'executor':8} | {'submit->worker start':>22} | {'submit->1st iteration':>22} | "
          f"{'training':>22} | {'overhead/cell':>22} | {'wall':>6} |")
    print(f"|{'-' * 10}|{'-' * 24}|{'-' * 24}|{'-' * 24}|{'-' * 24}|{'-' * 8}|")
    for name, r in results.items():
        print(f"| {name:8} | {fmt(r['start']):>22} | {fmt(r['first_iter']):>22} | {fmt(r['train']):>22} | "
              f"{fmt(r['overhead']):>22} | {r['wall']:6.1f} |")
    for name, r in results.items():
        print(f"{name}: {args.cells} cells at once took {r['wall']:.1f} s wall for {r['batch_train']:.1f} s of "
              f"training: {(r['wall'] - r['batch_train'] / args.slots) / args.cells:.2f} s per cell beyond it")
    if {"local", "slurm"} <= set(results):
        lo, sl = results["local"], results["slurm"]
        ratio = {k: statistics.median(sl[k]) / statistics.median(lo[k]) for k in ("start", "first_iter", "overhead")}
        print(f"slurm / local: start latency x{ratio['start']:.2f}, first iteration x{ratio['first_iter']:.2f}, "
              f"overhead per cell x{ratio['overhead']:.2f}, wall x{sl['wall'] / lo['wall']:.2f}")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
