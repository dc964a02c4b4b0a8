"""`bench run`: schedule a paper artifact's pending cells on an executor and watch them.

Done cells are skipped (their result.json is the cache); partial cells resume from their
checkpoint; a failing cell is recorded (failed.json, MLflow status FAILED) and the others go on.
Ctrl-C stops the workers (they keep their checkpoints) and a rerun continues.
"""

from __future__ import annotations

import json
import time
from collections import deque
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from bench import tracking
from bench.plan import Cell


def _progress(cell: Cell, home: Path) -> str:
    path = cell.directory(home) / "metrics.jsonl"
    if not path.exists():
        return "starting"
    last = 0
    with path.open() as f:
        for line in f:
            if '"total_loss"' in line:
                last = json.loads(line)["iteration"]
    return f"{last}/{cell.config.solver.max_iter}"


def _display(running, done: int, failed: list, total: int, t0: float, home: Path) -> Group:
    table = Table(title=f"{done} done, {len(failed)} failed, {len(running)} running, "
                        f"{total - done - len(failed) - len(running)} queued of {total}")
    for col in ("row", "column", "seed", "progress", "key"):
        table.add_column(col)
    for job in running:
        c = job.cell
        table.add_row(c.row_id, c.column_id, str(c.seed), _progress(c, home), c.key[:10])
    elapsed = time.perf_counter() - t0
    eta = "" if done == 0 else f", eta {elapsed / done * (total - done - len(failed)) / 60:.1f} min"
    return Group(table, f"elapsed {elapsed / 60:.1f} min{eta}")


def _record_crash(cell: Cell, home: Path, rc: int, log: Path) -> None:
    """A worker that died without writing failed.json (killed, segfault, OOM) is recorded here."""
    failed = cell.directory(home) / "failed.json"
    if not failed.exists() and not (cell.directory(home) / "result.json").exists():
        tail = log.read_text()[-4000:] if log.exists() else ""
        failed.write_text(json.dumps({"error": f"worker exited with code {rc}", "traceback": tail}))


def run_cells(cells: list[Cell], executor, home: Path, *, retries: int = 0, fail_fast: bool = False,
              parent_run_id: str | None = None, console: Console | None = None) -> dict[str, list[Cell]]:
    """Run every cell not done yet; returns {"done": [...], "failed": [...], "skipped": [...]}."""
    console = console or Console()
    todo = [c for c in cells if c.status(home) != "done"]
    for c in todo:  # a rerun retries failed cells
        (c.directory(home) / "failed.json").unlink(missing_ok=True)
    queue = deque((c, 1) for c in todo)
    done, failed = [c for c in cells if c.status(home) == "done"], []
    t0 = time.perf_counter()
    total = len(cells)
    try:
        with Live(console=console, refresh_per_second=2, transient=False) as live:
            while queue or executor.jobs:
                while queue and executor.free_slot() is not None and not (fail_fast and failed):
                    cell, attempt = queue.popleft()
                    executor.submit(cell, home, parent_run_id, attempts=attempt)
                for job, rc in executor.poll():
                    if rc == 0 and job.cell.status(home) == "done":
                        done.append(job.cell)
                        continue
                    _record_crash(job.cell, home, rc, job.log)
                    if job.attempts <= retries:
                        (job.cell.directory(home) / "failed.json").unlink(missing_ok=True)
                        queue.append((job.cell, job.attempts + 1))
                    else:
                        failed.append(job.cell)
                if fail_fast and failed:
                    queue.clear()
                live.update(_display(list(executor.jobs.values()), len(done), failed, total, t0, home))
                time.sleep(0.2)
    except KeyboardInterrupt:
        executor.cancel()
        raise
    skipped = [c for c, _ in queue]
    return {"done": done, "failed": failed, "skipped": skipped}


def start_parent_run(home: Path, spec_name: str, preset: str, seeds: int, command: str) -> tuple[tracking.Tracker, str | None]:
    """The invocation's MLflow parent run; cells log as its children."""
    tracker = tracking.Tracker(home)
    run_id = tracker.start(f"{spec_name}-{preset}", {"table": spec_name, "preset": preset, "seeds": str(seeds),
                                                     "git_sha": tracking.git_sha(), "command": command}, {})
    return tracker, run_id


def collect(cells: list[Cell], home: Path, metrics: list[str]):
    """(results frame: row_id, column_id, seed + metrics of the reported model; failed cells)."""
    import pandas as pd

    rows, failed = [], []
    for c in cells:
        status = c.status(home)
        if status == "done":
            result = json.loads((c.directory(home) / "result.json").read_text())
            stats = result["metrics"][result["primary_model"]]
            rows.append({"row_id": c.row_id, "column_id": c.column_id, "seed": c.seed,
                         **{m: stats.get(m, float("nan")) for m in metrics}})
        elif status == "failed":
            failed.append((c.row_id, c.column_id, c.seed))
    return pd.DataFrame(rows, columns=["row_id", "column_id", "seed", *metrics]), failed


def report(spec, cells: list[Cell], home: Path, out_dir: Path, preset: str, command: str, err: str = "std",
           tracker: tracking.Tracker | None = None) -> list[Path]:
    """Write the artifact's tables from whatever is done; log them to the parent run if given."""
    from datetime import datetime, timezone

    from bench.report.tables import aggregate, write_all

    results, failed = collect(cells, home, list(spec.metrics))
    header = {"command": command, "git_sha": tracking.git_sha(), "preset": preset,
              "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    paths = write_all(spec, results, failed, out_dir, err=err, header=header)
    if tracker is not None:
        agg = aggregate(results, spec, err=err)
        flat = {}
        for r in agg.itertuples():
            if r.n:
                base = f"{r.row_id}.{r.column_id}.{r.metric}"
                flat.update({f"{base}.mean": r.mean, f"{base}.{err}": r.err, f"{base}.n": r.n})
        tracker.log_metrics({k: v for k, v in flat.items() if v == v}, step=0)
        for p in paths:
            tracker.log_artifact(p)
    return paths
