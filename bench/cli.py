"""`bench`: the command line. Verbs: train, eval, plan, run, report, export, import, sync, status, clean,
study, figure, ui, serve, data (synth | split | check | fetch), config.

Bad input raises BenchError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli_common import (
    HOME_OPT,
    check_config,
    check_device,
    check_devices,
    check_overrides,
    check_seeds,
    invocation,
    parse_ratios,
    resolve_home,
)
from core.errors import BenchError
from studies.cli import FIGURES, OUT_OPT, STORAGE_OPT, study_app
from studies.cli import figure as figure_cmd
from studies.cli import ui as ui_cmd

app = typer.Typer(help="lsm-bench: semi-supervised object detection benchmark (LSM, IJCAI 2023).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Data sets: generate the synthetic set, fetch the forest set, make split manifests, "
                       "validate.",
                       no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)




@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    method: str = typer.Option("supervised", help="Method: supervised, ubteacher, softteacher, pseco, stac, ddetr."),
    preset: str = typer.Option("demo", help="Preset in core/presets (demo, demo_long, forest, coco, coco_additional, "
                               "voc, coco_imagenet)."),
    ratio: Optional[float] = typer.Option(None, help="Percent of training images that keep their labels."),
    seed: Optional[int] = typer.Option(None, help="Training seed (the split is chosen by data.fold)."),
    lsm: bool = typer.Option(False, "--lsm", help="Turn LSM (PIM + SD) on."),
    data_root: Optional[Path] = typer.Option(None, help="Data set root for coco/voc presets."),
    device: Optional[str] = typer.Option(None, help="auto, cpu, cuda, cuda:N."),
    track: bool = typer.Option(True, help="Log to MLflow."),
    home: Optional[Path] = HOME_OPT,
):
    """Train one configuration (or return its cached result) and print its COCO metrics.

    Extra arguments are config overrides, e.g. `solver.max_iter=500 lsm.alpha=0.4`.
    """
    from core.config import load_config
    from bench.worker import run_cell

    overrides = check_overrides(list(ctx.args))
    if device is not None:
        check_device(device)
    if ratio is not None:
        overrides.append(f"data.ratio={ratio}")
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if lsm:
        overrides.append("lsm.enabled=true")
    cfg = load_config(preset, overrides, method=method, seed=seed, device=device)
    check_config(cfg)
    result = run_cell(cfg, resolve_home(home), track=track)
    _print_result(result)


def _print_result(result: dict) -> None:
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


def _plan(table: str, preset: Optional[str], seeds: int, ratios: Optional[str], overrides: list[str], home: Path):
    """(spec, cells, notes, preset): without --preset, the spec's own preset (forest), else demo."""
    from core.config import load_config
    from bench.plan import build_plan
    from bench.specs import load_spec

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


RATIOS_OPT = typer.Option(None, help="Only these label ratios, e.g. 1,10 (named ratios run even with few labels).")
TABLE_HELP = "table1 ... table6, figure5, forest, or a spec .yaml file."
TABLE_PRESET_OPT = typer.Option(None, help="Preset (default: the spec's own, e.g. forest for `forest`; else demo).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def plan(ctx: typer.Context, table: str = typer.Argument(..., help=TABLE_HELP),
         seeds: int = typer.Option(5, help="Seeds (= split folds) per cell."),
         preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
         home: Optional[Path] = HOME_OPT):
    """List a table's cells with their cache status and the work left; runs nothing."""
    home = resolve_home(home)
    spec, cells, notes, preset = _plan(table, preset, seeds, ratios, list(ctx.args), home)
    from bench.plan import estimate_seconds, reference_seconds_per_iteration, seconds_per_iteration

    t = Table(title=f"{spec.name} on preset {preset}: {len(cells)} cells")
    for col in ("row", "column", "seed", "status", "iterations", "est. min", "key"):
        t.add_column(col)
    measured, reference = seconds_per_iteration(home), reference_seconds_per_iteration(preset)
    speeds = {**reference, **measured}  # this store's own timings win
    left, seconds, unknown, from_reference = 0, 0.0, 0, 0
    for c in cells:
        status = c.status(home)
        est = None if status == "done" else estimate_seconds(c, speeds)
        if status != "done":
            left += c.work
            seconds += est or 0.0
            unknown += est is None
            from_reference += est is not None and estimate_seconds(c, measured) is None
        iters = f"{c.iterations - c.work}+{c.work}" if c.work != c.iterations else f"{c.iterations}"
        t.add_row(c.row_id, c.column_id, str(c.seed), status, iters, "" if est is None else f"{est / 60:.1f}", c.key[:12])
    console.print(t)
    for n in notes:
        console.print(f"[dim]{escape(n)}[/dim]")
    estimate = f"; about {seconds / 60:.0f} min of one worker slot" if seconds else ""
    if from_reference:
        estimate += f" ({from_reference} cells from preset {preset}'s reference timings)"
    if unknown:
        estimate += f" ({unknown} cells of kinds not timed yet in this store)"
    console.print(f"training iterations left: {left}{estimate}")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def run(ctx: typer.Context, table: str = typer.Argument(..., help=TABLE_HELP),
        seeds: int = typer.Option(5, help="Seeds (= split folds) per cell."),
        preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
        devices: Optional[str] = typer.Option(None, help="cpu or cuda:0,cuda:1 (default: all GPUs, else cpu)."),
        slots_per_device: Optional[int] = typer.Option(
            None, help="Cells run at once per device (default: 1 per GPU; on CPU one per core, at most 4)."),
        retries: int = typer.Option(0, help="Retry a failed cell this many times."),
        fail_fast: bool = typer.Option(False, help="Stop scheduling after the first failure."),
        track: bool = typer.Option(True, help="Log to MLflow."),
        out: Path = typer.Option(Path("results"), help="Where the tables are written."),
        executor_name: str = typer.Option("local", "--executor", help="local (worker processes here) or slurm "
                                          "(submitit job arrays; docs/cluster.md)."),
        gpus_per_cell: int = typer.Option(1, help="GPUs per cell (>1: one DDP process per GPU); slurm: 0 for CPU "
                                          "cells."),
        partition: Optional[str] = typer.Option(None, help="slurm: partition (default: the cluster's default)."),
        time_limit: str = typer.Option("48:00:00", "--time", help="slurm: time limit of one full cell (burn-ins "
                                       "get their share); a timed-out cell is requeued and resumes."),
        cpus_per_cell: Optional[int] = typer.Option(None, help="slurm: CPUs per cell (default: the partition's)."),
        array_parallelism: int = typer.Option(256, help="slurm: cells of one job array running at once."),
        slurm_folder: Optional[Path] = typer.Option(None, help="slurm: where submitit's job files and logs go, a "
                                                    "folder per submission (default BENCH_HOME/slurm; must be "
                                                    "on the shared filesystem)."),
        home: Optional[Path] = HOME_OPT):
    """Run every cell of a table that is not done yet (cached cells cost nothing), then report."""
    from bench import tracking
    from bench.executors.local import LocalExecutor

    if executor_name not in ("local", "slurm"):
        raise BenchError(f"unknown executor '{executor_name}'; use --executor local or --executor slurm")
    if devices is not None and executor_name == "local":  # a missing GPU: one refusal, not every cell failing
        devices = ",".join(check_devices(devices))
    if slots_per_device is not None and slots_per_device < 1:
        raise BenchError(f"--slots-per-device {slots_per_device}: must be >= 1")
    if retries < 0:
        raise BenchError(f"--retries {retries}: must be >= 0")
    home = resolve_home(home)
    slurm = None
    if executor_name == "slurm":  # before planning: a missing sbatch is reported at once
        from bench.executors.slurm import SlurmExecutor

        slurm = SlurmExecutor(partition=partition, gpus_per_cell=gpus_per_cell, cpus_per_cell=cpus_per_cell,
                              time=time_limit, array_parallelism=array_parallelism, folder=slurm_folder,
                              track=track)
    spec, cells, notes, preset = _plan(table, preset, seeds, ratios, list(ctx.args), home)
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
        executor = LocalExecutor(devices.split(","), slots_per_device, track=track, prestart=not nothing_to_run,
                                 gpus_per_cell=gpus_per_cell)
    command = invocation()
    # a server on this machine's loopback is out of reach of Slurm's nodes: there, `bench serve mlflow`
    serve = (track and slurm is None and not os.environ.get("MLFLOW_TRACKING_URI")
             and executor.slots > tracking.SQLITE_MAX_WORKERS)
    if track and slurm is not None and not os.environ.get("MLFLOW_TRACKING_URI") and not nothing_to_run:
        console.print(f"[dim]Slurm workers log straight to {escape(tracking.tracking_uri(home))}; with many cells at once "
                      "run `bench serve mlflow` and export MLFLOW_TRACKING_URI (docs/cluster.md)[/dim]")
    with tracking.LocalServer(home) if serve else contextlib.nullcontext() as server:
        if server is not None:
            console.print(f"[dim]{executor.slots} workers: MLflow logging goes through {server.url} "
                          f"(sqlite alone serialises writers)[/dim]")
        outcome, paths = _run_and_report(spec, cells, notes, executor, home, preset, seeds, command, retries,
                                         fail_fast, track, out)
    if paths:
        console.print(paths[0].read_text(), markup=False, highlight=False)
    for n in notes:
        console.print(f"[dim]{escape(n)}[/dim]")
    tables = (f"tables: {', '.join(str(p) for p in paths)}" if paths
              else f"no cell is done: tables not written ({out} left as it was)")
    console.print(f"{len(outcome['done'])} done, {len(outcome['failed'])} failed, {len(outcome['skipped'])} not run; "
                  f"{tables}", markup=False, highlight=False)
    for c in outcome["failed"]:
        err = json.loads((c.directory(home) / "failed.json").read_text())["error"]
        console.print(f"[red]failed[/red] {c.row_id} {c.column_id} seed {c.seed}: {escape(err)} "
                      f"({escape(str(c.directory(home)))})")
    if outcome["failed"] or outcome["skipped"]:
        raise typer.Exit(1)


def _run_and_report(spec, cells, notes, executor, home, preset, seeds, command, retries, fail_fast, track, out):
    """One MLflow parent run around the cells and the tables; KILLED if interrupted."""
    from bench.runner import report, run_cells, start_parent_run

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


@app.command("report", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def report_cmd(ctx: typer.Context, table: Optional[str] = typer.Argument(None, help=TABLE_HELP + " Optional with --all."),
               seeds: int = typer.Option(5, help="Seeds (= split folds) per cell."),
               preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
               err: str = typer.Option("std", help="std or sem."),
               out: Path = typer.Option(Path("results"), help="Where the tables are written."),
               all_: bool = typer.Option(False, "--all", help="Rebuild OUT/index.html: every table and figure in OUT "
                                         "with its command, preset, commit and date (after TABLE, if given)."),
               home: Optional[Path] = HOME_OPT):
    """Build the table (md, csv, tex, html, and the forest plot of its LSM − baseline pairs) from
    whatever cells are done; runs nothing. --all: the results folder's index page."""
    from bench.runner import report

    if table is None and not all_:
        raise BenchError("bench report needs a TABLE (e.g. `bench report table1`), or --all for the results index")
    command = invocation()
    if table is not None:
        home = resolve_home(home)
        spec, cells, notes, preset = _plan(table, preset, seeds, ratios, list(ctx.args), home)
        paths = report(spec, cells, home, out, preset, command, err=err, notes=notes)
        console.print(paths[0].read_text(), markup=False, highlight=False)
    elif ctx.args:
        raise BenchError(f"bench report --all without a TABLE takes no config overrides (got {' '.join(ctx.args)})")
    if all_:
        from rich.markup import escape

        from bench.report.index import write_index

        console.print(f"index: {escape(str(write_index(out, command)))}")


@app.command("export", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export_cmd(ctx: typer.Context, table: str = typer.Argument(..., help=TABLE_HELP),
               out: Path = typer.Option(..., help="The archive to write (.tar.gz)."),
               seeds: int = typer.Option(5, help="Seeds (= split folds) per cell."),
               preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
               home: Optional[Path] = HOME_OPT):
    """Pack a table's done cells (configs, results, training logs; no weights) into an archive that
    `bench import` merges into another store: a table run in parts on several machines or sessions."""
    from bench import tracking
    from bench.archive import export_cells

    home = resolve_home(home)
    if out.exists():
        raise BenchError(f"{out} exists; choose another --out or remove it first (an export never overwrites)")
    spec, cells, _, preset = _plan(table, preset, seeds, ratios, list(ctx.args), home)
    n = export_cells([c.directory(home) for c in cells], home, out,
                     {"command": invocation(), "git_sha": tracking.git_sha(), "table": spec.name, "preset": preset})
    console.print(f"{n} of {len(cells)} cells of {spec.name} written to {out}", markup=False, highlight=False)


@app.command("import")
def import_cmd(archive: Path = typer.Argument(..., help="An archive written by `bench export`."),
               home: Optional[Path] = HOME_OPT):
    """Merge the cells of an exported archive into this store; cells it already has are kept as they are."""
    from bench.archive import import_cells

    home = resolve_home(home)
    added, kept = import_cells(archive, home)
    console.print(f"{added} cells added to {home / 'runs'}; {kept} already there, kept", markup=False, highlight=False)


@app.command("sync")
def sync_cmd(home: Optional[Path] = HOME_OPT):
    """Log to MLflow the done cells whose runs are missing (after a tracking outage)."""
    from bench.sync import sync_runs

    report = sync_runs(resolve_home(home))
    console.print(report.summary(), *(f"skipped: {s}" for s in report.skipped), sep="\n", markup=False, highlight=False)


@app.command()
def status(home: Optional[Path] = HOME_OPT):
    """Every run directory under BENCH_HOME: method, setting, status (done / corrupt / failed / partial /
    running); unreadable result.json and config.yaml files are named."""
    import yaml

    from rich.markup import escape

    from core.paths import CorruptFile, read_result
    from bench.plan import run_status

    home = resolve_home(home)
    t = Table(title=f"runs in {home / 'runs'}")
    for col in ("key", "method", "lsm", "preset", "ratio", "seed", "status", "AP (reported)"):
        t.add_column(col)
    counts: dict[str, int] = {}
    corrupt: list[str] = []
    for d in sorted((home / "runs").glob("*/*")):
        if not (d / "config.yaml").exists():
            continue
        ap, state = "", run_status(d)
        try:
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            method = cfg["method"] + (":burn-in" if cfg.get("stage") == "burn_in" else "")
            row = [method, str(cfg["lsm"]["enabled"]).lower(), cfg["preset"], f"{cfg['data']['ratio']:g}",
                   str(cfg["seed"])]
        except Exception as err:  # a truncated or hand-edited config.yaml: named, the other runs still listed
            state, row = "corrupt", ["?"] * 5
            corrupt.append(f"{d / 'config.yaml'} is unreadable ({type(err).__name__}); `bench clean --corrupt` "
                           "removes the run directory")
        if state == "done":
            r = read_result(d / "result.json")
            if "metrics" in r:  # a burn-in cell has a checkpoint, no metrics
                ap = f"{r['metrics'][r['primary_model']].get('AP', float('nan')):.2f}"
        elif (d / "result.json").exists() and run_status(d) == "corrupt":
            try:
                read_result(d / "result.json")
            except CorruptFile as err:
                corrupt.append(str(err))
        counts[state] = counts.get(state, 0) + 1
        t.add_row(d.name[:12], *row, state, ap)
    console.print(t)
    console.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs yet")
    for line in corrupt:
        console.print(f"[red]corrupt[/red] {escape(line)}", highlight=False, soft_wrap=True)


@app.command()
def clean(failed: bool = typer.Option(False, "--failed", help="Remove failed cells (they rerun)."),
          corrupt: bool = typer.Option(False, "--corrupt", help="Remove cells whose result.json or config.yaml "
                                       "cannot be read (`bench status` lists them; they rerun)."),
          all_: bool = typer.Option(False, "--all", help="Remove every run directory (results too)."),
          home: Optional[Path] = HOME_OPT):
    """Remove failed or corrupt run directories, or all of them."""
    import shutil

    from bench.plan import run_status

    def unreadable(d: Path) -> bool:
        if run_status(d) == "corrupt":
            return True
        try:
            import yaml

            return (d / "config.yaml").exists() and not isinstance(yaml.safe_load((d / "config.yaml").read_text()),
                                                                   dict)
        except Exception:
            return True

    home = resolve_home(home)
    if not (failed or corrupt or all_):
        raise BenchError("say what to remove: --failed, --corrupt or --all")
    removed = 0
    for d in sorted((home / "runs").glob("*/*")):
        if all_ or (failed and (d / "failed.json").exists()) or (corrupt and unreadable(d)):
            shutil.rmtree(d)
            removed += 1
    console.print(f"removed {removed} run directories under {home / 'runs'}", markup=False, highlight=False)


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., help="A run directory or cell key (prefix) under BENCH_HOME/runs."),
    backend: str = typer.Option("faster", help="faster (faster-coco-eval) or pycocotools."),
    home: Optional[Path] = HOME_OPT,
):
    """Evaluate a finished run's final weights on its validation set."""
    import torch
    import yaml

    from adapters.base import get_adapter
    from core.config import RunConfig
    from core.data.sources import prepare_data
    from bench.worker import evaluate_models, resolve_device

    from core.paths import find_run_dir

    rdir = find_run_dir(run, resolve_home(home))
    weights = rdir / "model_final.pth"
    cfg = RunConfig.model_validate(yaml.safe_load((rdir / "config.yaml").read_text()))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    data = prepare_data(cfg.data, resolve_home(home))
    device = resolve_device(cfg.device)
    adapter = get_adapter(cfg.method)(cfg, data.num_classes, device)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for name, model in adapter.eval_models().items():
        model.load_state_dict(state[name])
    for name, stats in evaluate_models(adapter, data, cfg, device).items():
        console.print(f"[bold]{escape(name)}[/bold]\n{escape(str(stats.get('summary', stats)))}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory."),
    images: int = typer.Option(600, help="Number of images."),
    seed: int = typer.Option(0, help="Generator seed."),
    image_size: int = typer.Option(160, help="Image side in pixels."),
    split: str = typer.Option("train", help="Split name (file and folder names)."),
):
    """Generate the synthetic detection data set (COCO JSON + PNG), deterministic from the seed."""
    from core.data import synth

    path = synth.generate(out, images, seed, image_size=image_size, split_name=split)
    console.print(f"wrote {path}", markup=False, highlight=False)


@data_app.command("split")
def data_split(
    dataset: str = typer.Option("synthetic", help="synthetic, coco, voc or forest."),
    ratio: float = typer.Option(10.0, help="Percent labeled."),
    fold: int = typer.Option(1, help="Fold (split seed), 1-5 in the paper's protocol."),
    root: Optional[Path] = typer.Option(None, help="Data set root (coco/voc)."),
    import_ubteacher: Optional[Path] = typer.Option(None, help="Unbiased Teacher COCO_supervision.txt to import."),
    import_stac: Optional[Path] = typer.Option(None, help="STAC/mmdet instances_train2017.{fold}@{pct}.json to import."),
    out: Optional[Path] = typer.Option(None, help="Manifest path (default: BENCH_HOME/splits/...)."),
    home: Optional[Path] = HOME_OPT,
):
    """Write a split manifest: labeled / unlabeled image ids and a sha256."""
    from core.config import DataConfig
    from core.data import splits
    from core.data.sources import prepare_data

    if dataset == "voc":
        raise BenchError("VOC's split is fixed (07 trainval labeled, 12 trainval unlabeled); nothing to generate")
    cfg = DataConfig(dataset=dataset, ratio=ratio, fold=fold, root=str(root) if root else None)
    data = prepare_data(cfg, resolve_home(home))
    manifest = data.manifest
    if import_ubteacher or import_stac:
        pool = data.train_pool()
        manifest = (splits.import_ubteacher(import_ubteacher, pool, ratio, fold) if import_ubteacher
                    else splits.import_stac(import_stac, pool))
    if out is not None:
        if out.exists():
            raise BenchError(f"{out} exists; choose another --out or delete it first")
        manifest.save(out)
    console.print(f"{manifest.dataset} {manifest.setting} {manifest.ratio:g}% fold {manifest.fold}: "
                  f"{len(manifest.labeled_ids)} labeled, {len(manifest.unlabeled_ids)} unlabeled, "
                  f"sha256 {manifest.sha256[:16]}" + (f" -> {out}" if out else ""), markup=False, highlight=False)


@data_app.command("fetch")
def data_fetch(
    name: str = typer.Argument(..., help="The data set: forest (DeepForest's aerial tree crowns, for preset forest)."),
    wheel: Optional[Path] = typer.Option(None, help="A downloaded deepforest-2.1.0-py3-none-any.whl to use "
                                         "instead of `pip download` (machines without PyPI access)."),
    force: bool = typer.Option(False, "--force", help="Rebuild the tiles even if a verified set is there."),
    home: Optional[Path] = HOME_OPT,
):
    """Download a real data set into BENCH_HOME and prepare it (forest: a 20 MB wheel -> 56 tiles, once).

    forest: `pip download --no-deps deepforest==2.1.0` into BENCH_HOME/downloads (never installed).

    The wheel's sha256 is checked, its annotated rasters are cut into tiles of at most 400 px.

    COCO files go to BENCH_HOME/data/forest-v1, hash-checked (docs/forest.md). Then: `bench run forest --seeds 3`.
    """
    if name != "forest":
        raise BenchError(f"unknown data set '{name}' to fetch; known: forest (the synthetic set is generated on "
                         "first use; for COCO and VOC pass data.root)")
    from core.data import forest

    forest.fetch_forest(resolve_home(home), wheel, force, log=lambda s: console.print(s, markup=False, highlight=False))


@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="A COCO JSON file, a COCO root (annotations/instances_*.json) "
                                           "or a VOC root."),
               image_dir: Optional[Path] = typer.Option(None, help="Image directory (COCO) if not next to the JSON."),
               area_scale: float = typer.Option(1.0, min=1e-3, help="Scale of COCO's 32 and 96 px size bounds, as a "
                                                "preset's eval.area_scale (the demo's 128 px images: 0.2).")):
    """Validate a data set and print a summary (boxes per class, size fractions, problems); exit 2 if
    it lists problems (missing or undecodable images, size mismatches, classes without boxes)."""
    from core.data.check import check_path, format_summary

    summaries = check_path(path, image_dir=image_dir, area_scale=area_scale)
    for summary in summaries:
        console.print(format_summary(summary), markup=False, highlight=False)
    bad = [s for s in summaries if s["problems"]]
    if bad:
        n = sum(len(s["problems"]) for s in bad)
        raise BenchError(f"{', '.join(s['path'] for s in bad)}: {n} problem(s) listed above; fix them before "
                         "training on it")


@config_app.command("show")
def config_show(preset: str = typer.Option("demo", help="Preset name."),
                method: str = typer.Option("supervised", help="Method whose protocol (the preset's "
                                           "method_defaults) is shown."),
                overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides.")):
    """Print the validated configuration of a preset for one method (with overrides)."""
    from core.config import dump_config, load_config
    from core.methods import method_spec

    method_spec(method)  # an unknown name: one line listing the known ones
    console.print(dump_config(load_config(preset, overrides or [], method=method)), markup=False, highlight=False)


app.add_typer(study_app, name="study")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def figure(ctx: typer.Context,
           name: str = typer.Argument(..., help="fig1, fig4, pl-quality, figure5, samples, or deltas TABLE "
                                      "(the table's LSM − baseline pairs as a forest plot)."),
           preset: str = typer.Option("demo", help="Preset."),
           seeds: int = typer.Option(3, help="fig4 / pl-quality: seeds of each method."),
           ratio: Optional[float] = typer.Option(None, help="Label ratio (fig1 default 100, fig4 default 5)."),
           score_thresh: Optional[float] = typer.Option(
               None, help="fig1: pseudo-label score threshold (default semi.t); samples: lowest score drawn "
               "(default 0.1)."),
           train: bool = typer.Option(False, "--train", help="Train the cells that are not done (else: error)."),
           study_name: Optional[str] = typer.Option(None, "--name", help="figure5: the studies' base name."),
           run: Optional[str] = typer.Option(
               None, "--run", help="samples: the cell to draw (run directory or key prefix); default: a finished "
               "ubteacher cell of --preset."),
           images: int = typer.Option(4, "--images", min=1, help="samples: how many unlabeled images."),
           storage: Optional[str] = STORAGE_OPT, out: Path = OUT_OPT, home: Optional[Path] = HOME_OPT):
    """Draw a figure from finished cells: PNG + the CSV behind it, the command in both.

    samples: a trained teacher's detections on a few unlabeled images and their hidden ground truth.

    Boxes are coloured by score: dotted <= alpha (dropped), dashed (alpha, t] (LSM only), solid > t.

    fig1, fig4, pl-quality: extra arguments are config overrides; fig4 needs solver.eval_period=N.
    """
    if name not in (*FIGURES, "samples"):
        raise BenchError(f"unknown figure '{name}'; figures: {', '.join((*FIGURES, 'samples'))}")
    if name != "samples":
        figure_cmd(ctx, name=name, preset=preset, seeds=seeds, ratio=ratio, score_thresh=score_thresh, train=train,
                   study_name=study_name, storage=storage, out=out, home=home)
        return
    if ctx.args:
        raise BenchError(f"figure samples takes no config overrides (got {' '.join(ctx.args)}); "
                         "choose the cell with --run")
    from bench.report.samples import samples_figure

    png, csv = samples_figure(resolve_home(home), preset, run, images,
                              0.1 if score_thresh is None else score_thresh, out, invocation())
    console.print(f"figure: {png}  data: {csv}", markup=False, highlight=False)


app.command("ui")(ui_cmd)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@app.command()
def serve(service: str = typer.Argument(..., help="mlflow or optuna."),
          backend_store: Optional[str] = typer.Option(
              None, help="mlflow: the runs' database (default sqlite BENCH_HOME/mlflow.db; "
              "postgresql+psycopg://... for a project); optuna: the studies' storage (default the journal file; "
              "postgresql+psycopg://...)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback is reachable by "
                                   "whoever reaches this machine."),
          port: Optional[int] = typer.Option(None, help="Port (default 5000 for mlflow, 8080 for optuna)."),
          dashboard: bool = typer.Option(True, help="optuna: serve optuna-dashboard over the storage (the "
                                         "`dashboard` extra); --no-dashboard only checks the storage."),
          home: Optional[Path] = HOME_OPT):
    """A project's tracking service for many workers (docs/cluster.md); Ctrl-C stops it.

    mlflow: `mlflow server` over BENCH_HOME's store (or --backend-store), artifacts served from
    BENCH_HOME/mlartifacts; prints the MLFLOW_TRACKING_URI line for the workers.

    optuna: connects to the studies' storage (creating its tables), prints the --storage value for
    `bench study ...`, then serves optuna-dashboard over it.
    """
    import signal
    import socket

    # Ctrl-C (SIGINT) stops the service even where it was started in the background by a shell,
    # which leaves SIGINT ignored (`nohup bench serve mlflow &`, then `kill -INT`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if service not in ("mlflow", "optuna"):
        raise BenchError(f"unknown service '{service}'; use `bench serve mlflow` or `bench serve optuna`")
    home = resolve_home(home)
    port = port or (5000 if service == "mlflow" else 8080)
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning: listening on {escape(host)}: anyone who reaches this machine's port {port} can "
                          "read and write this project's runs; keep it behind the cluster's access control[/yellow]")
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as err:
            raise BenchError(f"cannot listen on {host}:{port} ({err.strerror}); "
                             "pass another --port or --host") from None
    public = socket.getfqdn() if host in ("0.0.0.0", "::") else host
    if service == "mlflow":
        _serve_mlflow(home, backend_store, host, public, port)
    else:
        _serve_optuna(home, backend_store, host, public, port, dashboard)


def _serve_mlflow(home: Path, backend_store: Optional[str], host: str, public: str, port: int) -> None:
    import time

    from bench import tracking
    from studies.ui import Service, _wait, stop

    if backend_store and not backend_store.startswith("sqlite"):
        _check_database(backend_store, "--backend-store")
    log_dir = home / "serve"
    log_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{public}:{port}"
    service = Service("mlflow server", url, tracking.spawn_mlflow_server(
        home, port, log_dir / "mlflow.log", host=host, backend_store=backend_store, serve_artifacts=True))
    try:
        _wait(Service(service.name, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health",
                      service.process), time.time() + 90, log_dir)
        store = backend_store or f"sqlite:///{home / 'mlflow.db'}"
        console.print(f"MLflow: {url}  (runs: {_hide_password(store)}; artifacts: {home / 'mlartifacts'}; "
                      f"log: {log_dir / 'mlflow.log'})", markup=False, highlight=False)
        console.print("workers and `bench run` log through it after:")
        console.print(f"export MLFLOW_TRACKING_URI={url}", markup=False, highlight=False, soft_wrap=True)
        console.print("Ctrl-C stops it")
        while service.process.poll() is None:
            time.sleep(0.5)
        raise BenchError(f"mlflow server exited with code {service.process.returncode}; see {log_dir / 'mlflow.log'}")
    except KeyboardInterrupt:
        pass
    finally:
        stop([service])


def _serve_optuna(home: Path, backend_store: Optional[str], host: str, public: str, port: int,
                  dashboard: bool) -> None:
    from studies.storage import default_url, is_rdb, open_storage
    from studies.ui import dashboard_available

    url = backend_store or default_url(home)
    storage = open_storage(home, url)  # a BenchError naming the fix if the database is not reachable
    shown = _hide_password(url)
    console.print(f"Optuna storage: {shown} ({len(storage.get_all_studies())} studies)", markup=False, highlight=False)
    if not is_rdb(url):
        console.print("[dim]a journal file: every worker must see it on the shared filesystem; for workers on "
                      "several nodes a PostgreSQL URL (--backend-store postgresql+psycopg://...) adds "
                      "heartbeats[/dim]")
    console.print("studies use it with:")
    console.print(f"bench study figure5 --storage '{shown}'", markup=False, highlight=False, soft_wrap=True)
    if not dashboard:
        return
    if not dashboard_available():
        raise BenchError("optuna-dashboard is not installed; pip install 'lsm-bench[dashboard]' or pass --no-dashboard")
    from optuna_dashboard import run_server

    console.print(f"optuna-dashboard: http://{public}:{port}  (Ctrl-C stops it)", markup=False, highlight=False)
    try:
        run_server(storage, host=host, port=port)
    except KeyboardInterrupt:
        pass


def _hide_password(url: str) -> str:
    """A database URL as printed: user and host, never the password."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def _check_database(url: str, option: str) -> None:
    """Connect once, so that a wrong URL is one line here rather than a server that dies at start."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).connect().close()
    except ImportError as err:
        raise BenchError(f"{option} {_hide_password(url)}: the database driver is missing ({err.name}); "
                         "pip install 'psycopg[binary]' for postgresql+psycopg:// URLs") from None
    except Exception as err:  # sqlalchemy's OperationalError, ArgumentError: a server that is not there, a bad URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"{option} {_hide_password(url)}: cannot connect ({first}); check the URL and that "
                         "the server runs") from None


def _click_errors() -> tuple[tuple, tuple, tuple]:
    """(usage/click errors, aborts, exits) of click and of typer's own copy of them: typer >= 0.26
    raises `typer._click` / `typer.exceptions` classes, which click's do not catch."""
    import click

    errors, aborts, exits = [click.ClickException], [click.exceptions.Abort], [click.exceptions.Exit]
    try:
        from typer import exceptions as typer_exceptions
        from typer._click import exceptions as vendored

        errors.append(vendored.ClickException)
        aborts.append(typer_exceptions.Abort)
        exits.append(typer_exceptions.Exit)
    except (ImportError, AttributeError):
        pass
    return tuple(errors), tuple(aborts), tuple(exits)


_terminated = False


def _on_sigterm(signum, frame):
    """SIGTERM (kill, a scheduler, systemd) unwinds like Ctrl-C: `finally` blocks stop the workers and
    servers this process started (the default action would orphan them, still listening)."""
    global _terminated
    _terminated = True
    raise KeyboardInterrupt


def _debug() -> bool:
    """--debug anywhere on the command line (removed before parsing) or BENCH_DEBUG=1: tracebacks shown."""
    flag = "--debug" in sys.argv[1:]
    sys.argv[1:] = [a for a in sys.argv[1:] if a != "--debug"]
    return flag or os.environ.get("BENCH_DEBUG", "") not in ("", "0")


def main() -> None:
    import signal
    import traceback

    debug = _debug()
    errors, aborts, exits = _click_errors()
    signal.signal(signal.SIGTERM, _on_sigterm)
    # a shell starts background jobs with SIGINT ignored; `kill -INT` must still stop them
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        # Without standalone mode typer returns an exit code (Ctrl-C as 130, typer.Exit(n) as n)
        code = app(standalone_mode=False)
        if code == 130 or _terminated:
            raise KeyboardInterrupt
        if isinstance(code, int) and code:
            sys.exit(code)
    except exits as exc:
        sys.exit(exc.exit_code)
    except errors as exc:  # a usage error: the message and the usage line, exit 2
        exc.show()
        sys.exit(exc.exit_code)
    except aborts:
        sys.exit(1)
    except BenchError as err:
        if debug:
            traceback.print_exc()
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        err_console.print("terminated" if _terminated else "interrupted", "; rerun the same command to resume", sep="")
        sys.exit(143 if _terminated else 130)
    except Exception as err:  # a bug: one line and how to see more
        if debug:
            raise
        first = (str(err).strip().splitlines() or [""])[0][:300]
        print(f"error: internal error ({type(err).__name__}: {first}); rerun with --debug (or BENCH_DEBUG=1) for "
              "the traceback and report it", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
