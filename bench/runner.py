"""`bench run`: schedule a paper artifact's pending cells on an executor and watch them.

Done cells are skipped (their result.json is the cache); partial cells resume from their
checkpoint; a failing cell is recorded (failed.json, MLflow status FAILED) and the others go on.
Ctrl-C stops the workers (they keep their checkpoints) and a rerun continues.

`plan_table` is the plan every table verb starts from (plan, run, report, export); `run_table` is
`bench run` (device choice, executor, MLflow server, parent run, the summary); `train_cell` is
`bench train`, and `run_with_start` trains one configuration after the cell it starts from.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from bench import tracking
from core.errors import BenchError
from bench.keys import cell_key
from core.data.sources import prepare_data
from core.paths import RunDir, done_result, read_result
from bench.plan import Cell, start_cell

console = Console()
err_console = Console(stderr=True)


def _iterations_done(cell: Cell, home: Path) -> int:
    """Iterations a running cell has logged. Its worker appends to metrics.jsonl while this reads:
    a last line without its newline is still being written and is not counted yet."""
    path = cell.directory(home) / "metrics.jsonl"
    if not path.exists():
        return 0
    last = 0
    with path.open() as f:
        for line in f:
            if '"total_loss"' in line and line.endswith("\n"):
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


def _finished_line(cell: Cell, outcome: str, finished: int, total: int, t0: float) -> str:
    """One plain line per finished cell where the live table cannot draw (output to a file or a
    pipe: a log of `bench run > run.log` then says what finished when)."""
    return (f"[{finished}/{total}] {outcome} {cell.row_id} {cell.column_id} seed {cell.seed} ({cell.key[:10]}), "
            f"elapsed {(time.perf_counter() - t0) / 60:.1f} min")


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
        return cell.depends_on is None or RunDir.of(home, cell.depends_on).status() == "done"

    def finished(cell: Cell, outcome: str, into: list) -> None:
        into.append(cell)
        if not console.is_terminal:
            console.print(_finished_line(cell, outcome, len(done) + len(failed), total, t0), markup=False,
                          highlight=False)

    try:
        with Live(console=console, refresh_per_second=1, transient=False) as live:
            while queue or executor.jobs:
                for cell, _ in [q for q in queue if q[0].depends_on in failed_keys]:
                    cell.run_dir(home).record_failure(f"the cell it starts from ({cell.depends_on[:12]}) failed")
                    finished(cell, "failed", failed)
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
                        finished(job.cell, "done", done)
                        continue
                    tail = job.log.read_text()[-4000:] if job.log.exists() else ""
                    # a worker that died without writing failed.json (killed, segfault, OOM)
                    job.cell.run_dir(home).record_failure(f"worker exited with code {rc}", tail)
                    if job.attempts <= retries:
                        (job.cell.directory(home) / "failed.json").unlink(missing_ok=True)
                        queue.append((job.cell, job.attempts + 1))
                    else:
                        finished(job.cell, "failed", failed)
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
    from bench.report.teachers import burn_in_teachers, write_teachers

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
    if not (teachers := burn_in_teachers(cells, home, spec)).empty:  # the regime the rows rest on
        paths += write_teachers(teachers, spec.name, out_dir, header)
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


# -- the verbs' work: plan a table, run it, train one cell ------------------------------------------
def plan_table(table: str, preset: Optional[str], seeds: int, ratios: Optional[str], overrides: list[str],
               home: Path):
    """(spec, cells, notes, preset) of a table as given on the command line: its values checked first
    (one line each), without --preset the spec's own preset (forest), else demo."""
    from bench.cli_common import check_config, check_overrides, check_seeds, parse_ratios
    from bench.plan import build_plan
    from bench.specs import load_spec
    from core.config import load_config

    check_seeds(seeds)
    ratio_list = parse_ratios(ratios)
    check_overrides(overrides, table=True)
    spec = load_spec(table)
    preset = preset or spec.preset or "demo"
    check_config(load_config(preset, overrides))  # before any split is made or anything written
    cells, notes = build_plan(spec, preset, seeds, home, ratio_list, overrides)
    for c in cells:  # named by path; they count as not done (`bench run` trains them again)
        if c.status(home) == "corrupt":
            err_console.print(f"warning: {c.directory(home) / 'result.json'} is unreadable; the cell counts as not "
                              "done (`bench run` trains it again, `bench clean --corrupt` removes it)",
                              markup=False, highlight=False, soft_wrap=True)
    if not any(not c.is_start for c in cells):
        asked = f" with --ratios {ratios}" if ratios else ""
        known = sorted({float(c.overrides["data.ratio"]) for c in spec.columns if "data.ratio" in c.overrides})
        why = "; ".join(n for n in notes if n.startswith("column ")) or (f"its columns' ratios: {', '.join(f'{r:g}' for r in known)}" if known else "")
        raise BenchError(f"table {spec.name} on preset {preset} has no cell to run{asked}" + (f" ({why})" if why else ""))
    return spec, cells, notes, preset


def plan_rows(cells: list[Cell], home: Path, preset: str) -> tuple[list[dict], str]:
    """`bench plan`: a row per cell (row, column, method, lsm, seed, status, iterations, est_min, key)
    and the line on the work left, timed by this store's finished cells, else the preset's reference."""
    from bench.plan import estimate_seconds, reference_seconds_per_iteration, seconds_per_iteration

    measured, reference = seconds_per_iteration(home), reference_seconds_per_iteration(preset)
    speeds = {**reference, **measured}  # this store's own timings win
    rows, left, seconds, unknown, from_reference = [], 0, 0.0, 0, 0
    for c in cells:
        status = c.status(home)
        est = None if status == "done" else estimate_seconds(c, speeds)
        if status != "done":
            left += c.work
            seconds += est or 0.0
            unknown += est is None
            from_reference += est is not None and estimate_seconds(c, measured) is None
        iters = f"{c.iterations - c.work}+{c.work}" if c.work != c.iterations else f"{c.iterations}"
        rows.append({"row": c.row_id, "column": c.column_id, "method": c.config.method, "lsm": c.config.lsm.enabled,
                     "seed": c.seed, "status": status, "iterations": iters,
                     "est_min": None if est is None else round(est / 60, 1), "key": c.key})
    estimate = f"; about {seconds / 60:.0f} min of one worker slot" if seconds else ""
    if from_reference:
        estimate += f" ({from_reference} cells from preset {preset}'s reference timings)"
    if unknown:
        estimate += f" ({unknown} cells of kinds not timed yet in this store)"
    return rows, f"training iterations left: {left}{estimate}"


def report_table(table: Optional[str], seeds: int, preset: Optional[str], ratios: Optional[str],
                 overrides: list[str], err: str, out: Path, all_: bool, home: Optional[Path]) -> None:
    """`bench report`: the table from whatever cells are done (runs nothing); with `all_` the results
    folder's index page after it."""
    from bench.cli_common import invocation, resolve_home

    if table is None and not all_:
        raise BenchError("bench report needs a TABLE (e.g. `bench report table1`), or --all for the results index")
    command = invocation()
    if table is not None:
        home = resolve_home(home)
        spec, cells, notes, preset = plan_table(table, preset, seeds, ratios, overrides, home)
        paths = report(spec, cells, home, out, preset, command, err=err, notes=notes)
        console.print(paths[0].read_text(), markup=False, highlight=False)
    elif overrides:
        raise BenchError(f"bench report --all without a TABLE takes no config overrides (got {' '.join(overrides)})")
    if all_:
        from bench.report.index import write_index

        console.print(f"index: {escape(str(write_index(out, command)))}")


def export_table(table: str, out: Path, seeds: int, preset: Optional[str], ratios: Optional[str],
                 overrides: list[str], home: Optional[Path]) -> None:
    """`bench export`: a table's done cells packed into an archive for `bench import` (never overwrites)."""
    from bench.archive import export_cells
    from bench.cli_common import invocation, resolve_home

    home = resolve_home(home)
    if out.exists():
        raise BenchError(f"{out} exists; choose another --out or remove it first (an export never overwrites)")
    spec, cells, _, preset = plan_table(table, preset, seeds, ratios, overrides, home)
    n = export_cells([c.directory(home) for c in cells], home, out,
                     {"command": invocation(), "git_sha": tracking.git_sha(), "table": spec.name, "preset": preset})
    console.print(f"{n} of {len(cells)} cells of {spec.name} written to {out}", markup=False, highlight=False)


def show_plan(table: str, preset: Optional[str], seeds: int, ratios: Optional[str], overrides: list[str],
              home: Optional[Path], fmt: str) -> None:
    """`bench plan`: a table's cells, their status and the work left; runs nothing."""
    from bench.cli_common import print_rows, resolve_home

    home = resolve_home(home)
    spec, cells, notes, preset = plan_table(table, preset, seeds, ratios, overrides, home)
    rows, left = plan_rows(cells, home, preset)
    out = print_rows(fmt, rows, f"{spec.name} on preset {preset}: {len(cells)} cells",
                     ["row", "column", "seed", "status", "iterations", "est. min", "key"],
                     lambda r, cut: [r["row"], r["column"], str(r["seed"]), r["status"], r["iterations"],
                                     "" if r["est_min"] is None else f"{r['est_min']:.1f}",
                                     r["key"][:12] if cut else r["key"]])
    for n in notes:
        out.print(f"[dim]{escape(n)}[/dim]")
    out.print(left)


@dataclass
class RunOptions:
    """`bench run`'s options (`bench run --help`; docs/runner.md, docs/cluster.md)."""
    seeds: int = 5
    preset: Optional[str] = None
    ratios: Optional[str] = None
    overrides: list[str] = field(default_factory=list)  # key=value: they enter every cell's config and key
    devices: Optional[str] = None
    slots_per_device: Optional[int] = None
    retries: int = 0
    fail_fast: bool = False
    track: bool = True
    out: Path = Path("results")
    executor: str = "local"
    gpus_per_cell: int = 1
    partition: Optional[str] = None
    time_limit: str = "48:00:00"
    cpus_per_cell: Optional[int] = None
    array_parallelism: int = 256
    slurm_folder: Optional[Path] = None
    home: Optional[Path] = None


def run_table(table: str, options: RunOptions) -> dict[str, list[Cell]]:
    """`bench run TABLE`: every cell not done yet on the chosen executor, then the tables and the
    summary; returns run_cells' outcome (the caller exits 1 if a cell failed or was not run)."""
    from bench.cli_common import check_devices, invocation, resolve_home
    from bench.executors.local import LocalExecutor

    o = options
    devices, slots_per_device = o.devices, o.slots_per_device
    if o.executor not in ("local", "slurm"):
        raise BenchError(f"unknown executor '{o.executor}'; use --executor local or --executor slurm")
    if devices is not None and o.executor == "local":  # a missing GPU: one refusal, not every cell failing
        devices = ",".join(check_devices(devices))
    if slots_per_device is not None and slots_per_device < 1:
        raise BenchError(f"--slots-per-device {slots_per_device}: must be >= 1")
    if o.retries < 0:
        raise BenchError(f"--retries {o.retries}: must be >= 0")
    home = resolve_home(o.home)
    slurm = None
    if o.executor == "slurm":  # before planning: a missing sbatch is reported at once
        from bench.executors.slurm import SlurmExecutor

        slurm = SlurmExecutor(partition=o.partition, gpus_per_cell=o.gpus_per_cell, cpus_per_cell=o.cpus_per_cell,
                              time=o.time_limit, array_parallelism=o.array_parallelism, folder=o.slurm_folder,
                              track=o.track)
    spec, cells, notes, preset = plan_table(table, o.preset, o.seeds, o.ratios, o.overrides, home)
    nothing_to_run = all(c.status(home) == "done" for c in cells)
    if devices is None:
        if nothing_to_run or slurm is not None:
            devices = "cpu"  # no need to import torch to look for GPUs (Slurm's nodes have their own)
        else:
            import torch

            n = torch.cuda.device_count()
            devices = ",".join(f"cuda:{i}" for i in range(n)) if n else "cpu"
    if slots_per_device is None:
        slots_per_device = 1 if devices.startswith("cuda") else max(1, min(os.cpu_count() or 1, 4))
    if slurm is not None:
        executor = slurm
    else:
        executor = LocalExecutor(devices.split(","), slots_per_device, track=o.track, prestart=not nothing_to_run,
                                 gpus_per_cell=o.gpus_per_cell)
    command = invocation()
    # a server on this machine's loopback is out of reach of Slurm's nodes: there, `bench serve mlflow`
    serve = (o.track and slurm is None and not os.environ.get("MLFLOW_TRACKING_URI")
             and executor.slots > tracking.SQLITE_MAX_WORKERS)
    if o.track and slurm is not None and not os.environ.get("MLFLOW_TRACKING_URI") and not nothing_to_run:
        console.print(f"[dim]Slurm workers log straight to {escape(tracking.tracking_uri(home))}; with many cells at once "
                      "run `bench serve mlflow` and export MLFLOW_TRACKING_URI (docs/cluster.md)[/dim]")
    with tracking.LocalServer(home) if serve else contextlib.nullcontext() as server:
        if server is not None:
            console.print(f"[dim]{executor.slots} workers: MLflow logging goes through {server.url} "
                          f"(sqlite alone serialises writers)[/dim]")
        outcome, paths = _run_and_report(spec, cells, notes, executor, home, preset, o.seeds, command, o.retries,
                                         o.fail_fast, o.track, o.out)
    if paths:
        console.print(paths[0].read_text(), markup=False, highlight=False)
    for n in notes:
        console.print(f"[dim]{escape(n)}[/dim]")
    tables = (f"tables: {', '.join(str(p) for p in paths)}" if paths
              else f"no cell is done: tables not written ({o.out} left as it was)")
    console.print(f"{len(outcome['done'])} done, {len(outcome['failed'])} failed, {len(outcome['skipped'])} not run; "
                  f"{tables}", markup=False, highlight=False)
    for c in outcome["failed"]:
        err = c.run_dir(home).error()
        console.print(f"[red]failed[/red] {c.row_id} {c.column_id} seed {c.seed}: {escape(err)} "
                      f"({escape(str(c.directory(home)))})")
    return outcome


def _run_and_report(spec, cells, notes, executor, home, preset, seeds, command, retries, fail_fast, track, out):
    """One MLflow parent run around the cells and the tables; KILLED if interrupted."""
    tracker, parent = start_parent_run(home, spec.name, preset, seeds, command) if track else (None, None)
    try:
        outcome = run_cells(cells, executor, home, retries=retries, fail_fast=fail_fast,
                            parent_run_id=parent, console=console)
    except BaseException:
        if tracker is not None:
            tracker.end("KILLED")
        raise
    paths = report(spec, cells, home, out, preset, command, tracker=tracker, notes=notes) if any(
        c.status(home) == "done" for c in cells if not c.is_start) else []
    if tracker is not None:
        tracker.end("FAILED" if outcome["failed"] else "FINISHED")
    return outcome, paths


def train_cell(method: str, preset: str, overrides: list[str], *, ratio: Optional[float] = None,
               seed: Optional[int] = None, lsm: bool = False, data_root: Optional[Path] = None,
               device: Optional[str] = None, track: bool = True, home: Optional[Path] = None) -> dict:
    """`bench train`: one configuration trained in this process (or its cached result), its COCO
    metrics printed; returns result.json's dict."""
    from bench.cli_common import check_config, check_device, check_overrides, resolve_home
    from core.config import load_config

    overrides = check_overrides(list(overrides))
    if device is not None:
        check_device(device)
    if ratio is not None:
        overrides.append(f"data.ratio={ratio}")
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if lsm:
        if method == "supervised":  # its adapter has no pseudo-labels to mine: the cell would be Supervised's
            raise BenchError("--lsm: the supervised method has no LSM variant (LSM mines a semi-supervised "
                             "method's pseudo-labels); drop --lsm or pick a semi-supervised --method")
        overrides.append("lsm.enabled=true")
    cfg = load_config(preset, overrides, method=method, seed=seed, device=device)
    check_config(cfg)
    result = run_with_start(cfg, resolve_home(home), track=track)
    print_result(result)
    return result


def run_with_start(cfg, home: Path, *, extra_hooks: list | None = None, **run_args) -> dict:
    """One configuration without a plan (`bench train`, a study's trial): the cell it starts from
    (`bench.plan.start_cell`: its burn-in, STAC's teacher) is trained first unless the cell is done
    already, then the cell from it. `run_args` go to both `run_cell` calls, the hooks to the cell's."""
    from bench.worker import run_cell

    data = prepare_data(cfg.data, home)
    if (start := start_cell(cfg, data)) is None:
        return run_cell(cfg, home, extra_hooks=extra_hooks, **run_args)
    if RunDir.of(home, cell_key(cfg, data)).status() != "done":  # a done cell needs nothing upstream
        run_cell(start.config, home, **run_args)
    return run_cell(cfg, home, start_from=RunDir.of(home, start.key).path, extra_hooks=extra_hooks, **run_args)


def print_result(result: dict) -> None:
    """A cell's COCO metrics, a column per evaluated model, the reported one marked."""
    table = Table(title=f"{result['method']}{' + LSM' if result['lsm'] else ''}  ratio {result['ratio']:g}%  "
                        f"seed {result['seed']}  (cell {result['key'][:12]})")
    names = list(result["metrics"])
    table.add_column("metric")
    for n in names:
        table.add_column(n + (" (reported)" if n == result["primary_model"] else ""), justify="right")
    for k in ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100"):
        table.add_row(k, *[f"{result['metrics'][n].get(k, float('nan')):.2f}" for n in names])
    console.print(table)
    console.print(f"COCO AP ({result['primary_model']}): {result['metrics'][result['primary_model']]['AP']:.2f}")
