"""`bench`: the command line. Verbs: train, eval, plan, run, report, export, import, sync, status,
clean, study, figure, ui, serve, data (synth | split | check | fetch), config.

Each verb parses its options and calls one function: tables in bench/runner.py, services in
bench/serve.py (optuna's in studies/ui.py), the shared pieces in bench/cli_common.py. Bad input
raises BenchError, printed as one line on stderr with exit code 2 (`cli_common.run_app`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from bench.cli_common import (FORMAT_OPT, HOME_OPT, check_data, clean_runs, evaluate_run, fetch_data, import_archive,
                               make_split, out_file, out_folder, resolve_home, run_app, show_config, show_status)
from core.errors import BenchError
from core.methods import METHODS
from studies.cli import EXTRA, figure, study_app, ui

app = typer.Typer(help="lsm-bench: semi-supervised object detection benchmark (LSM, IJCAI 2023).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Data sets: generate the synthetic set, fetch the forest set, make split manifests, "
                       "validate.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
console = Console()


@app.command(context_settings=EXTRA)
def train(
    ctx: typer.Context,
    method: str = typer.Option("supervised", help=f"Method: {', '.join(METHODS)}."),
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
    from bench.runner import train_cell

    train_cell(method, preset, ctx.args, ratio=ratio, seed=seed, lsm=lsm, data_root=data_root, device=device,
               track=track, home=home)


RATIOS_OPT = typer.Option(None, help="Only these label ratios, e.g. 1,10 (named ratios run even with few labels).")
SEEDS_OPT = typer.Option(5, help="Seeds (= split folds) per cell.")
TABLE_HELP = "table1 ... table6, figure5, forest, or a spec .yaml file."
TABLE_ARG = typer.Argument(..., help=TABLE_HELP)
TABLE_PRESET_OPT = typer.Option(None, help="Preset (default: the spec's own, e.g. forest for `forest`; else demo).")


@app.command(context_settings=EXTRA)
def plan(ctx: typer.Context, table: str = TABLE_ARG, seeds: int = SEEDS_OPT, preset: Optional[str] = TABLE_PRESET_OPT,
         ratios: Optional[str] = RATIOS_OPT, fmt: str = FORMAT_OPT, home: Optional[Path] = HOME_OPT):
    """List a table's cells with their cache status and the work left; runs nothing."""
    from bench.runner import show_plan

    show_plan(table, preset, seeds, ratios, list(ctx.args), home, fmt)


@app.command(context_settings=EXTRA)
def run(ctx: typer.Context, table: str = TABLE_ARG, seeds: int = SEEDS_OPT,
        preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
        devices: Optional[str] = typer.Option(None, help="cpu or cuda:0,cuda:1 (default: all GPUs, else cpu)."),
        slots_per_device: Optional[int] = typer.Option(
            None, help="Cells run at once per device (default: 1 per GPU; on CPU one per core, at most 4)."),
        retries: int = typer.Option(0, help="Retry a failed cell this many times."),
        fail_fast: bool = typer.Option(False, help="Stop scheduling after the first failure."),
        track: bool = typer.Option(True, help="Log to MLflow."),
        out: Path = typer.Option(Path("results"), parser=out_folder, help="Where the tables are written."),
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
    """Run every cell of a table that is not done yet (cached cells cost nothing), then report.

    Extra arguments are config overrides for every cell, e.g. `solver.max_iter=500`: they enter each
    cell's config and key (a run with them is other cells than one without).
    """
    from bench.runner import RunOptions, run_table

    outcome = run_table(table, RunOptions(
        seeds=seeds, preset=preset, ratios=ratios, overrides=list(ctx.args), devices=devices,
        slots_per_device=slots_per_device, retries=retries, fail_fast=fail_fast, track=track, out=out,
        executor=executor_name, gpus_per_cell=gpus_per_cell, partition=partition, time_limit=time_limit,
        cpus_per_cell=cpus_per_cell, array_parallelism=array_parallelism, slurm_folder=slurm_folder, home=home))
    if outcome["failed"] or outcome["skipped"]:
        raise typer.Exit(1)


@app.command("report", context_settings=EXTRA)
def report_cmd(ctx: typer.Context, table: Optional[str] = typer.Argument(None, help=TABLE_HELP + " Optional with --all."),
               seeds: int = SEEDS_OPT, preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
               err: str = typer.Option("std", help="std or sem."),
               out: Path = typer.Option(Path("results"), parser=out_folder, help="Where the tables are written."),
               all_: bool = typer.Option(False, "--all", help="Rebuild OUT/index.html: every table and figure in OUT "
                                         "with its command, preset, commit and date (after TABLE, if given)."),
               home: Optional[Path] = HOME_OPT):
    """Build the table (md, csv, tex, html, and the forest plot of its LSM − baseline pairs) from
    whatever cells are done; runs nothing. --all: the results folder's index page."""
    from bench.runner import report_table

    report_table(table, seeds, preset, ratios, list(ctx.args), err, out, all_, home)


@app.command("export", context_settings=EXTRA)
def export_cmd(ctx: typer.Context, table: str = TABLE_ARG,
               out: Path = typer.Option(..., parser=out_file, help="The archive to write (.tar.gz)."),
               seeds: int = SEEDS_OPT, preset: Optional[str] = TABLE_PRESET_OPT, ratios: Optional[str] = RATIOS_OPT,
               home: Optional[Path] = HOME_OPT):
    """Pack a table's done cells (configs, results, training logs; no weights) into an archive that
    `bench import` merges into another store: a table run in parts on several machines or sessions."""
    from bench.runner import export_table

    export_table(table, out, seeds, preset, ratios, list(ctx.args), home)


@app.command("import")
def import_cmd(archive: Path = typer.Argument(..., help="An archive written by `bench export`."),
               home: Optional[Path] = HOME_OPT):
    """Merge the cells of an exported archive into this store; cells it already has are kept as they are."""
    import_archive(archive, home)


@app.command("sync")
def sync_cmd(home: Optional[Path] = HOME_OPT):
    """Log to MLflow the done cells whose runs are missing (after a tracking outage)."""
    from bench.sync import sync_runs

    report = sync_runs(resolve_home(home))
    console.print(report.summary(), *(f"skipped: {s}" for s in report.skipped), sep="\n", markup=False, highlight=False)


@app.command()
def status(fmt: str = FORMAT_OPT, home: Optional[Path] = HOME_OPT):
    """Every run directory under BENCH_HOME: method, setting, status (done / corrupt / failed / partial /
    running); unreadable result.json and config.yaml files are named."""
    show_status(home, fmt)


@app.command()
def clean(failed: bool = typer.Option(False, "--failed", help="Remove failed cells (they rerun)."),
          corrupt: bool = typer.Option(False, "--corrupt", help="Remove cells whose result.json or config.yaml "
                                       "cannot be read (`bench status` lists them; they rerun)."),
          all_: bool = typer.Option(False, "--all", help="Remove every run directory (results too)."),
          home: Optional[Path] = HOME_OPT):
    """Remove failed or corrupt run directories, or all of them."""
    clean_runs(home, failed=failed, corrupt=corrupt, all_=all_)


@app.command("eval")
def eval_cmd(
    run: str = typer.Argument(..., help="A run directory or cell key (prefix) under BENCH_HOME/runs."),
    backend: str = typer.Option("faster", help="faster (faster-coco-eval) or pycocotools."),
    home: Optional[Path] = HOME_OPT,
):
    """Evaluate a finished run's final weights on its validation set."""
    evaluate_run(run, backend, home)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory (new, or one without this split's annotation file)."),
    images: int = typer.Option(600, min=1, help="Number of images."),
    seed: int = typer.Option(0, min=0, help="Generator seed."),
    image_size: int = typer.Option(160, min=32, max=4096, help="Image side in pixels."),
    split: str = typer.Option("train", help="Split name (file and folder names)."),
):
    """Generate the synthetic detection data set (COCO JSON + PNG), deterministic from the seed."""
    import re

    from core.data import synth

    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise BenchError(f"--split {split!r}: use letters, digits, '_' and '-' (it names a file and a folder)")
    if out.exists() and not out.is_dir():
        raise BenchError(f"--out {out} is a file; give a directory for the data set")
    if (ann := out / "annotations" / f"instances_{split}.json").exists():
        raise BenchError(f"{ann} exists; choose another --out or --split, or delete it first")
    console.print(f"wrote {synth.generate(out, images, seed, image_size=image_size, split_name=split)}",
                  markup=False, highlight=False)


@data_app.command("split")
def data_split(
    dataset: str = typer.Option("synthetic", help="synthetic, coco, voc or forest."),
    ratio: float = typer.Option(10.0, help="Percent labeled."),
    fold: int = typer.Option(1, help="Fold (split seed), 1-5 in the paper's protocol."),
    root: Optional[Path] = typer.Option(None, help="Data set root (coco/voc)."),
    import_ubteacher: Optional[Path] = typer.Option(None, help="Unbiased Teacher COCO_supervision.txt to import."),
    import_stac: Optional[Path] = typer.Option(None, help="STAC/mmdet instances_train2017.{fold}@{pct}.json to import."),
    out: Optional[Path] = typer.Option(None, help="Manifest path (default: BENCH_HOME/splits/...)."),
    nested: bool = typer.Option(False, help="Nested draws: a fold's larger ratios keep its smaller ones' "
                                            "labeled images (data.nested_splits)."),
    home: Optional[Path] = HOME_OPT,
):
    """Write a split manifest: labeled / unlabeled image ids and a sha256."""
    make_split(dataset, ratio, fold, root, import_ubteacher, import_stac, out, home, nested)


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
    fetch_data(name, wheel, force, home)


@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="A COCO JSON file, a COCO root (annotations/instances_*.json) "
                                           "or a VOC root."),
               image_dir: Optional[Path] = typer.Option(None, help="Image directory (COCO) if not next to the JSON."),
               area_scale: float = typer.Option(1.0, min=1e-3, help="Scale of COCO's 32 and 96 px size bounds, as a "
                                                "preset's eval.area_scale (the demo's 128 px images: 0.2).")):
    """Validate a data set and print a summary (boxes per class, size fractions, problems); exit 2 if
    it lists problems (missing or undecodable images, size mismatches, classes without boxes)."""
    check_data(path, image_dir, area_scale)


@config_app.command("show")
def config_show(preset: str = typer.Option("demo", help="Preset name."),
                method: str = typer.Option("supervised", help="Method whose protocol (the preset's "
                                           "method_defaults) is shown."),
                overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides.")):
    """Print the validated configuration of a preset for one method (with overrides)."""
    show_config(preset, method, overrides or [])


app.add_typer(study_app, name="study")
app.command(context_settings=EXTRA)(figure)
app.command("ui")(ui)


@app.command()
def serve(service: str = typer.Argument(..., help="mlflow or optuna."),
          backend_store: Optional[str] = typer.Option(
              None, help="mlflow: the runs' database (default sqlite BENCH_HOME/mlflow.db; "
              "postgresql+psycopg://... for a project); optuna: the studies' storage (default the journal file; "
              "postgresql+psycopg://...)."),
          host: str = typer.Option("127.0.0.1", help="Address to listen on; anything but loopback is reachable by "
                                   "whoever reaches this machine."),
          port: Optional[int] = typer.Option(None, min=1, max=65535, help="Port (default 5000 for mlflow, 8080 for optuna)."),
          dashboard: bool = typer.Option(True, help="optuna: serve optuna-dashboard over the storage (the "
                                         "`dashboard` extra); --no-dashboard only checks the storage."),
          home: Optional[Path] = HOME_OPT):
    """A project's tracking service for many workers (docs/cluster.md); Ctrl-C stops it.

    mlflow: `mlflow server` over BENCH_HOME's store (or --backend-store), artifacts served from
    BENCH_HOME/mlartifacts; prints the MLFLOW_TRACKING_URI line for the workers.

    optuna: connects to the studies' storage (creating its tables), prints the --storage value for
    `bench study ...`, then serves optuna-dashboard over it.
    """
    from bench.serve import serve as serve_service
    from studies.ui import serve_optuna

    serve_service(service, home, backend_store, host, port, dashboard, serve_optuna=serve_optuna)


def main() -> None:
    run_app(app)


if __name__ == "__main__":
    main()
