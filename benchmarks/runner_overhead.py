"""Runner + tracking overhead: one cell through `bench run`'s machinery (plan, worker subprocess,
MLflow parent/child runs, live display) versus the same training called directly in-process.

    python benchmarks/runner_overhead.py [--preset demo] [--method ubteacher] [overrides ...]

Default: one cell of the demo's Table 1 (UBT + LSM, 170 iterations). "Directly" is the worker
called as a program (`python -m bench.worker CONFIG`: one process that imports torch and mlflow,
trains, evaluates and logs to MLflow, as `bench train` does); "through the runner" adds planning
the cell, the MLflow parent run, the fork server, the worker process and the live display. Both
train the same config from scratch in fresh homes (the data is generated once beforehand and
copied). Prints both wall times and the relative overhead (target < 2%).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (puts the repository on sys.path)

from core.config import dump_config, load_config
from core.data.sources import prepare_data
from bench.executors.local import LocalExecutor
from bench.keys import cell_key
from bench.plan import Cell
from bench.runner import run_cells, start_parent_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--method", default="ubteacher")
    ap.add_argument("overrides", nargs="*", default=["lsm.enabled=true"])
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    cfg = load_config(args.preset, args.overrides + ["device=cpu"], method=args.method)
    seed_home = root / "seed"
    prepare_data(cfg.data, seed_home)  # generate the data once
    homes = {name: root / name for name in ("direct", "runner")}
    for h in homes.values():
        shutil.copytree(seed_home, h)

    config = root / "config.yaml"
    config.write_text(dump_config(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}  # as the runner's single slot
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bench.worker", str(config), "--home", str(homes["direct"])],
                   check=True, env=env)
    direct = time.perf_counter() - t0

    t0 = time.perf_counter()
    executor = LocalExecutor(["cpu"], track=True)
    data = prepare_data(cfg.data, homes["runner"])
    cell = Cell("row", "column", cfg.seed, cfg, cell_key(cfg, data))
    tracker, parent = start_parent_run(homes["runner"], "overhead", args.preset, 1, "runner_overhead")
    outcome = run_cells([cell], executor, homes["runner"], parent_run_id=parent)
    tracker.end("FINISHED")
    runner = time.perf_counter() - t0
    assert len(outcome["done"]) == 1, outcome
    print(f"preset {args.preset}, {cfg.solver.max_iter} iterations, method {cfg.method}")
    print(f"directly (python -m bench.worker): {direct:.1f} s")
    print(f"through the runner: {runner:.1f} s")
    print(f"overhead: {(runner - direct) / direct * 100:+.1f}% ({runner - direct:+.1f} s)")
    shutil.rmtree(root)


if __name__ == "__main__":
    main()
