"""Runner + tracking overhead: one cell through `bench run`'s machinery (plan, worker subprocess,
MLflow parent/child runs, live display) versus the same training called directly in-process.

    python benchmarks/runner_overhead.py [--preset demo] [overrides ...]

Both sides train the same config from scratch in fresh homes (data generation excluded: it is
made once beforehand and copied). Prints both wall times and the relative overhead (target < 2%
for a cell of a few minutes; the fixed cost is the worker's interpreter + torch import).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from bench.config import load_config
from bench.data.sources import prepare_data
from bench.executors.local import LocalExecutor
from bench.plan import Cell
from bench.runner import run_cells, start_parent_run
from bench.keys import cell_key
from bench.worker import run_cell


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("overrides", nargs="*", default=["solver.max_iter=120", "solver.steps=[100]"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = load_config(args.preset, args.overrides + ["device=cpu"])
    seed_home = root / "seed"
    prepare_data(cfg.data, seed_home)  # generate the data once
    homes = {name: root / name for name in ("direct", "runner")}
    for h in homes.values():
        shutil.copytree(seed_home, h)

    t0 = time.perf_counter()
    run_cell(cfg, homes["direct"], track=True, progress=False)
    direct = time.perf_counter() - t0

    t0 = time.perf_counter()
    data = prepare_data(cfg.data, homes["runner"])
    cell = Cell("row", "column", cfg.seed, cfg, cell_key(cfg, data))
    tracker, parent = start_parent_run(homes["runner"], "overhead", args.preset, 1, "runner_overhead")
    outcome = run_cells([cell], LocalExecutor(["cpu"], track=True), homes["runner"], parent_run_id=parent)
    tracker.end("FINISHED")
    runner = time.perf_counter() - t0
    assert len(outcome["done"]) == 1, outcome
    print(f"preset {args.preset}, {cfg.solver.max_iter} iterations, method {cfg.method}")
    print(f"direct run_cell: {direct:.1f} s")
    print(f"through the runner: {runner:.1f} s")
    print(f"overhead: {(runner - direct) / direct * 100:+.1f}% ({runner - direct:+.1f} s)")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
