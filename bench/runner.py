"""`bench run`: schedule a paper artifact's pending cells on an executor and watch them.

Done cells are skipped (their result.json is the cache); partial cells resume from their
checkpoint; a failing cell is recorded (failed.json, MLflow status FAILED) and the others go on.
Ctrl-C stops the workers (they keep their checkpoints) and a rerun continues.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from bench import tracking
from core.errors import BenchError
from core.paths import done_result, read_result, run_dir
from bench.plan import Cell, run_status


def _iterations_done(cell: Cell, home: Path) -> int:
    path = cell.directory(home) / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    with path.open() as f:
        for line in f:
            if '"total_loss"' in line:
                last = json.loads(line)["iteration"] + 1
    return last


def _display(running, done: list[Cell], failed: list, total: int, t0: float, home: Path,
             iters_at_start: int, iters_total: int) -> Group:
    table = Table(title=f"{len(done)} done, {len(failed)} failed, {len(running)} running, "
                        f"{total - len(done) - len(failed) - len(running)} queued of {total}")
    for col in ("row", "column", "seed", "progress", "key"):
        table.add_column(col)
    iters_now = sum(c.work for c in done)
    for job in running:
        c = job.cell
        n = _iterations_done(c, home)
        iters_now += max(0, n - (c.iterations - c.work))
        table.add_row(c.row_id, c.column_id, str(c.seed), f"{n}/{c.iterations}" if n else "starting", c.key[:10])
    elapsed = time.perf_counter() - t0
    # ETA from the training iterations finished in this invocation (cells differ in length)
    rate = (iters_now - iters_at_start) / elapsed if elapsed > 0 else 0
    eta = f", eta {(iters_total - iters_now) / rate / 60:.1f} min" if rate > 0 and iters_now > iters_at_start else ""
    return Group(table, f"elapsed {elapsed / 60:.1f} min{eta}")


def _record_failure(cell: Cell, home: Path, error: str, traceback: str = "") -> None:
    """A worker that died without writing failed.json (killed, segfault, OOM), or a cell whose
    burn-in failed, is recorded here."""
    failed = cell.directory(home) / "failed.json"
    if not failed.exists() and not (cell.directory(home) / "result.json").exists():
        failed.parent.mkdir(parents=True, exist_ok=True)
        failed.write_text(json.dumps({"error": error, "traceback": traceback}))


def _priority(cell: Cell, starts: set[str]) -> int:
    """Cells others start from first (burn-ins, STAC's teachers), then the cells that wait for
    them (the long semi-supervised ones), then the rest."""
    return 0 if cell.key in starts else 1 if cell.depends_on else 2


def run_cells(cells: list[Cell], executor, home: Path, *, retries: int = 0, fail_fast: bool = False,
              parent_run_id: str | None = None, console: Console | None = None) -> dict[str, list[Cell]]:
    """Run every cell not done yet; returns {"done": [...], "failed": [...], "skipped": [...]}.

    A cell that depends on a burn-in waits for it; if the burn-in fails for good, so does the cell.
    """
    console = console or Console()
    starts = {c.depends_on for c in cells if c.depends_on}
    todo = sorted((c for c in cells if c.status(home) != "done"), key=lambda c: _priority(c, starts))
    for c in todo:  # a rerun retries failed cells
        (c.directory(home) / "failed.json").unlink(missing_ok=True)
        if c.status(home) == "corrupt":  # kept aside for a look; the cell reruns
            result = c.directory(home) / "result.json"
            console.print(f"[yellow]{result} is unreadable: moved to result.json.corrupt, the cell reruns[/yellow]")
            result.replace(result.with_name("result.json.corrupt"))
    queue = [(c, 1) for c in todo]
    done, failed = [c for c in cells if c.status(home) == "done"], []
    failed_keys: set[str] = set()
    t0 = time.perf_counter()
    total = len(cells)
    iters_total = sum(c.work for c in cells)
    iters_at_start = sum(c.work for c in done)

    def ready(cell: Cell) -> bool:
        return cell.depends_on is None or run_status(run_dir(home, cell.depends_on)) == "done"

    try:
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while queue or executor.jobs:
                for cell, _ in [q for q in queue if q[0].depends_on in failed_keys]:
                    _record_failure(cell, home, f"the cell it starts from ({cell.depends_on[:12]}) failed")
                    failed.append(cell)
                    failed_keys.add(cell.key)
                queue = [q for q in queue if q[0].key not in failed_keys]
                if queue and not executor.jobs and not any(ready(c) for c, _ in queue):  # a bug, not user input
                    raise RuntimeError(f"{len(queue)} cells wait for burn-in or teacher cells that are not scheduled")
                if hasattr(executor, "submit_many"):  # a cluster executor: every ready cell at once (job arrays)
                    picks = [q for q in queue if ready(q[0])][:executor.slots - len(executor.jobs)]
                    if picks and not (fail_fast and failed):
                        taken = {c.key for c, _ in picks}
                        queue = [q for q in queue if q[0].key not in taken]
                        executor.submit_many(picks, home, parent_run_id)
                while executor.free_slot() is not None and not (fail_fast and failed):
                    pick = next((q for q in queue if ready(q[0])), None)
                    if pick is None:
                        break
                    queue.remove(pick)
                    executor.submit(pick[0], home, parent_run_id, attempts=pick[1])
                for job, rc in executor.poll():
                    if rc == 0 and job.cell.status(home) == "done":
                        done.append(job.cell)
                        continue
                    tail = job.log.read_text()[-4000:] if job.log.exists() else ""
                    _record_failure(job.cell, home, f"worker exited with code {rc}", tail)
                    if job.attempts <= retries:
                        (job.cell.directory(home) / "failed.json").unlink(missing_ok=True)
                        queue.append((job.cell, job.attempts + 1))
                    else:
                        failed.append(job.cell)
                        failed_keys.add(job.cell.key)
                if fail_fast and failed:
                    queue.clear()
                live.update(_display(list(executor.jobs.values()), done, failed, total, t0, home,
                                     iters_at_start, iters_total))
                time.sleep(0.5)  # the orchestrator must not take CPU from the workers
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
        if c.is_start:
            continue
        status = c.status(home)
        if status == "done":
            result = read_result(c.directory(home) / "result.json")
            stats = result["metrics"][result["primary_model"]]
            rows.append({"row_id": c.row_id, "column_id": c.column_id, "seed": c.seed,
                         **{m: stats.get(m, float("nan")) for m in metrics}})
        elif status == "failed":
            failed.append((c.row_id, c.column_id, c.seed))
    return pd.DataFrame(rows, columns=["row_id", "column_id", "seed", *metrics]), failed


def planned_columns(cells: list[Cell]) -> list[str]:
    """The column ids the plan has cells of (a preset leaves some of a spec's columns out)."""
    return list(dict.fromkeys(c.column_id for c in cells if not c.is_start))


def table_header(command: str, preset: str, notes: list[str] = (), cells: list[Cell] = ()) -> dict:
    """The comment lines of a table (and of its figures' CSVs): command, commit, preset, time, the
    columns the plan left out, and the cells' `eval.area_scale` where it is not 1 (their APs/APm/APl
    bins are not COCO's; the tables also say so under the grid)."""
    from datetime import datetime, timezone

    header = {"command": command, "git_sha": tracking.git_sha(), "preset": preset,
              "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if column_notes := [n for n in notes if n.startswith("column ")]:
        header["not_run"] = "; ".join(column_notes)
    scales = sorted({c.config.eval.area_scale for c in cells if not c.is_start})
    if any(s != 1 for s in scales):
        header["area_scale"] = ", ".join(f"{s:g}" for s in scales)
    return header


def report(spec, cells: list[Cell], home: Path, out_dir: Path, preset: str, command: str, err: str = "std",
           tracker: tracking.Tracker | None = None, notes: list[str] = ()) -> list[Path]:
    """Write the artifact's tables from whatever is done (and the forest plot of its LSM − baseline
    pairs, `bench.report.deltas`, where it has some); log them to the parent run if given.

    `notes` on columns the plan left out go into the tables' headers (a reader sees why a
    column is empty)."""
    from bench.report.tables import write_all

    results, failed = collect(cells, home, spec.all_metrics)
    if results.empty:  # a published table is never replaced by an empty one
        raise BenchError(f"no cell of {spec.name} on preset {preset} is done in {home} ({len(failed)} failed); "
                         f"the tables in {out_dir} are left as they are; run `bench run {spec.name}` first")
    header = table_header(command, preset, notes, cells)
    paths = write_all(spec, results, failed, out_dir, err=err, header=header)
    if spec.baseline_pairs:  # the forest plot of the paired deltas, next to the table
        from bench.report.deltas import write_deltas_figure

        figure = write_deltas_figure(spec, results, out_dir, command, header, planned_columns(cells))
        paths += list(figure or ())
    if (Path(out_dir) / "index.html").exists():  # `bench report --all` made one: keep it current
        from bench.report.index import write_index

        write_index(out_dir, command)
    if tracker is not None and tracker.enabled:  # heal the runs an outage cost, before they are named
        from bench.sync import TrackingDown, sync_runs

        try:
            sync_runs(home, [c.directory(home) for c in cells], parent_run_id=tracker.run_id)
        except TrackingDown as down:
            tracking._warn_once(down)
    if tracker is not None:
        log_to_parent(tracker, spec, cells, home, results, err, paths, preset)
    return paths


def child_run_name(spec, cell: Cell) -> str:
    """`<row> <ratio>% seed <s>` after the table's row label (`UBteacher + LSM 5% seed 1`), the
    column's label added where it is not the ratio (COCO-additional, Figure 5's thresholds)."""
    ratio = f"{cell.config.data.ratio:g}%"
    name = f"{spec.row(cell.row_id).label} {ratio} seed {cell.seed}"
    label = spec.column(cell.column_id).label
    return name if label == ratio else f"{name} ({label})"


def log_to_parent(tracker: tracking.Tracker, spec, cells: list[Cell], home: Path, results, err: str,
                  paths: list[Path], preset: str) -> None:
    """The table's parent run: per-row means and paired deltas as metrics; the tables, the forest
    plot and a chart of the means as artifacts; its finished cells' runs named `child_run_name`."""
    import tempfile

    from bench.report.means import write_row_means_chart
    from bench.report.tables import aggregate, paired_deltas

    agg = aggregate(results, spec, err=err)
    flat = {}
    for r in agg.itertuples():
        if r.n:
            base = f"{r.row_id}.{r.column_id}.{r.metric}"
            flat.update({f"{base}.mean": r.mean, f"{base}.{err}": r.err, f"{base}.n": r.n})
    for d in paired_deltas(results, spec).itertuples():
        if d.n:
            base = f"delta.{d.lsm_id}.{d.column_id}.{d.metric}"
            flat.update({f"{base}.mean": d.mean, f"{base}.ci_low": d.ci_low, f"{base}.ci_high": d.ci_high,
                         f"{base}.n": d.n})
    tracker.log_metrics({k: v for k, v in flat.items() if v == v}, step=0)
    for p in paths:
        tracker.log_artifact(p)
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(write_row_means_chart(
            spec, agg, Path(tmp) / f"{spec.name}_means.png", err, planned_columns(cells),
            f"{spec.name} on preset {preset}: per-row means"))
    _name_child_runs(tracker, spec, cells, home)


def _name_child_runs(tracker: tracking.Tracker, spec, cells: list[Cell], home: Path) -> None:
    from bench.sync import recorded_run_id

    if not tracker.enabled:
        return
    for c in cells:
        result = None if c.is_start else done_result(c.directory(home) / "result.json")
        if result and (run_id := recorded_run_id(c.directory(home), result)):  # a synced run's id is in the file
            tracker.rename_run(run_id, child_run_name(spec, c))
