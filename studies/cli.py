"""`bench study figure5 | table5 | tune`, `bench figure NAME`, `bench ui` (bench/cli.py mounts them).

Studies run their trials as cells through the worker (cached cells cost nothing) and are resumable:
rerunning the same command continues the study. `figure` only reads what is done (or trains the
missing cells with --train); `ui` serves MLflow and optuna-dashboard on 127.0.0.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bench.cli_common import HOME_OPT, invocation, out_folder, resolve_home
from core.errors import BenchError

study_app = typer.Typer(help="Optuna studies: Figure 5 thresholds, Table 5 PIM levels, joint tuning.",
                        no_args_is_help=True)
console = Console()


def say(text: str) -> None:
    """Print text that holds values (paths, overrides such as pim_levels=[p3,p4], URLs) as it is:
    rich would read `[p3,p4]` or `[dashboard]` as a style tag and drop it."""
    console.print(text, markup=False, highlight=False)


def percent_option(value: Optional[float]) -> Optional[float]:
    """--ratio: a percent of labeled images, 0 excluded (a falsy 0 would silently mean the default)."""
    if value is not None and not 0 < value <= 100:
        raise typer.BadParameter(f"{value:g} is not a percent in (0, 100]; e.g. --ratio 5")
    return value


STORAGE_OPT = typer.Option(None, "--storage", help="Optuna storage: a journal file (default "
                           "BENCH_HOME/optuna/journal.log) or an RDB URL (postgresql+psycopg://...).")
WORKERS_OPT = typer.Option(1, "--workers", help="Trial processes at once on this machine.")
TRACK_OPT = typer.Option(True, help="Log the study, its trials and cells to MLflow.")
OUT_OPT = typer.Option(Path("results"), parser=out_folder, help="Where figures and tables are written.")
NAME_OPT = typer.Option(None, "--name", help="Study name (default: from the command and preset).")
RATIO_OPT = typer.Option(None, "--ratio", callback=percent_option, help="Labeled % (default: the paper's 1%, or on a preset where 1% "
                         "gives fewer than 2 labeled images per class, the smallest of 2, 5, 10, ... that does).")
PRESET_OPT = typer.Option("demo", help="Preset.")
EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}


def _floats(text: Optional[str], option: str) -> Optional[list[float]]:
    if text is None:
        return None
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise BenchError(f"{option} takes numbers separated by commas, e.g. 0.3,0.5,0.7; got '{text}'") from None


def _summary(study, defn) -> str:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    counts = {s.name.lower(): states.count(s) for s in TrialState if states.count(s)}
    return f"study {defn.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items())


def _run(defn, home: Path, storage: Optional[str], workers: int, track: bool, command: str):
    """A study run (or continued) to its end, its trial counts said."""
    from studies.run import run_study

    study = run_study(defn, home, storage, workers, track, command, log=say)
    say(_summary(study, defn))
    return study


def _notes(notes: list[str]) -> None:
    for n in notes:
        console.print(f"[dim]{escape(n)}[/dim]")


# -- bench study figure5 | table5 -----------------------------------------------------------------
# Both are grid studies over seeds: one signature, registered twice; only the subset option differs.
GRID_STUDIES = {
    "figure5": ("--grid", "Thresholds, e.g. 0.3,0.5,0.7 (default 0.3 ... 0.9).",
                """Figure 5: AP against t (UBteacher) and alpha (UBteacher + LSM), a grid study per curve.

    Extra arguments are config overrides (e.g. solver.max_iter=500). Writes OUT/figure5.png and
    OUT/figure5_data.csv.
    """),
    "table5": ("--rows", "Only these Table 5 rows, e.g. baseline,pim_p3p4.",
               """Table 5: baseline, naive large-area and the PIM level subsets as a categorical grid study.

    Extra arguments are config overrides. Writes OUT/table5.{md,csv,tex,html} through the same
    renderer as `bench report table5`.
    """),
}


def _grid_study(kind: str):
    flag, subset_help, doc = GRID_STUDIES[kind]

    def command(ctx: typer.Context,
                seeds: int = typer.Option(3, help="Seeds per grid point (seed i trains on split fold i)."),
                preset: str = PRESET_OPT,
                subset: Optional[str] = typer.Option(None, flag, help=subset_help),
                ratio: Optional[float] = RATIO_OPT,
                workers: int = WORKERS_OPT, storage: Optional[str] = STORAGE_OPT, name: Optional[str] = NAME_OPT,
                track: bool = TRACK_OPT, out: Path = OUT_OPT, home: Optional[Path] = HOME_OPT):
        from studies.definitions import figure5_defs, study_ratio, table5_def

        home = resolve_home(home)
        ratio, notes = study_ratio(preset, list(ctx.args), home, ratio)
        command = invocation()
        if kind == "figure5":
            defs, grid_notes = figure5_defs(preset, list(ctx.args), seeds, _floats(subset, flag), name, ratio)
            _notes(notes + grid_notes)
            done = [(_run(d, home, storage, workers, track, command), d) for d in defs]
            png, csv = write_figure5(done, preset, out, command)
            say(f"figure: {png}  data: {csv}")
            return
        _notes(notes)
        d = table5_def(preset, list(ctx.args), seeds, subset.split(",") if subset else None, name, ratio)
        paths = write_table5(_run(d, home, storage, workers, track, command), d, preset, out, command)
        console.print(paths[0].read_text(), markup=False, highlight=False)

    command.__name__, command.__doc__ = kind, doc
    return study_app.command(kind, context_settings=EXTRA)(command)


figure5 = _grid_study("figure5")
table5 = _grid_study("table5")


def write_figure5(studies, preset: str, out: Path, command: str) -> tuple[Path, Path]:
    from bench.paper import paper_value
    from bench.report.figures import plot_threshold_curves, save
    from studies.results import figure5_points

    points = figure5_points(studies)
    paper = None
    if preset == "coco":  # the paper's only number; other presets are on another scale
        value = paper_value("figure5", "coco_standard_1", "ubteacher", True, "alpha=0.5", "AP")
        paper = (0.5, value[0]) if value else None
    ratio = studies[0][1].ratio or 1
    fig = plot_threshold_curves(points, paper, title=f"Filtering threshold, {ratio:g}% labels, preset {preset} (Figure 5)")
    table = Table(title="AP by threshold (mean ± std over seeds)")
    for col in ("curve", "threshold", "AP", "seeds"):
        table.add_column(col)
    for (curve, thr), g in points.groupby(["curve", "threshold"]):
        std = g["AP"].std()
        table.add_row(curve, f"{thr:g}", f"{g['AP'].mean():.2f}" + (f" ± {std:.2f}" if std == std else ""), str(len(g)))
    console.print(table)
    return save(fig, points, Path(out) / "figure5.png", command, header={"preset": preset})


def write_table5(study, defn, preset: str, out: Path, command: str) -> list[Path]:
    from datetime import datetime, timezone

    from bench import tracking
    from bench.report.tables import write_all
    from bench.specs import load_spec
    from studies.results import table5_results

    spec = load_spec("table5")
    if defn.ratio is not None:  # the column and title say what the cells trained on, not the paper's 1%
        column = spec.columns[0].model_copy(update={"label": f"{defn.ratio:g}%"})
        title = spec.title.replace("on 1% COCO-standard", f"at {defn.ratio:g}% labels (the paper: 1% COCO-standard)")
        spec = spec.model_copy(update={"columns": [column], "title": title})
    results, failed = table5_results(study, defn, list(spec.metrics))
    header = {"command": command, "git_sha": tracking.git_sha(), "preset": preset, "study": defn.name,
              "timestamp": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return write_all(spec, results, failed, out, header=header)


# -- bench study tune ------------------------------------------------------------------------------
@study_app.command("tune", context_settings=EXTRA)
def tune(ctx: typer.Context,
         method: str = typer.Option("ubteacher", help="Method (a mean-teacher method for t/alpha)."),
         lsm: bool = typer.Option(False, "--lsm", help="Also tune LSM: alpha, pim_levels, pim_weight, sd_weight."),
         trials: int = typer.Option(20, help="Trials to finish (complete, pruned or failed), over all reruns."),
         seed: int = typer.Option(1, help="Training seed and split fold of every trial."),
         sampler_seed: int = typer.Option(0, help="TPE seed (worker i uses seed + i)."),
         preset: str = PRESET_OPT,
         workers: int = WORKERS_OPT, storage: Optional[str] = STORAGE_OPT, name: Optional[str] = NAME_OPT,
         track: bool = TRACK_OPT, out: Path = OUT_OPT, home: Optional[Path] = HOME_OPT):
    """Joint TPE search with median pruning on the periodic evaluation AP.

    Without solver.eval_period in the preset, four evaluations per run are added for pruning.
    Writes OUT/<study>_trials.csv.
    """
    from studies.definitions import tune_def

    home = resolve_home(home)
    d = tune_def(preset, list(ctx.args), method, lsm, trials, seed, sampler_seed, name)
    study = _run(d, home, storage, workers, track, invocation())
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{d.name}_trials.csv"
    study.trials_dataframe(attrs=("number", "value", "state", "params", "user_attrs", "duration")).to_csv(path, index=False)
    from optuna.trial import TrialState

    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        say(f"best trial {best.number}: AP {best.value:.2f} with "
                      + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items()))
    say(f"trials: {path}")


# -- bench figure ----------------------------------------------------------------------------------
FIGURES = ("fig1", "fig4", "pl-quality", "figure5", "deltas", "samples")


def figure(ctx: typer.Context,
           name: str = typer.Argument(..., help="fig1, fig4, pl-quality, figure5, samples, or deltas TABLE "
                                      "(the table's LSM − baseline pairs as a forest plot)."),
           preset: str = PRESET_OPT,
           seeds: int = typer.Option(3, help="fig4 / pl-quality: seeds of each method."),
           ratio: Optional[float] = typer.Option(None, callback=percent_option,
                                                help="Label ratio (fig1 default 100, fig4 default 5)."),
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
    if name not in FIGURES:
        raise BenchError(f"unknown figure '{name}'; figures: {', '.join(FIGURES)}")
    home = resolve_home(home)
    overrides = list(ctx.args)
    command = invocation()
    if name == "samples":
        if overrides:
            raise BenchError(f"figure samples takes no config overrides (got {' '.join(overrides)}); "
                             "choose the cell with --run")
        from bench.report.samples import samples_figure

        png, csv = samples_figure(home, preset, run, images, 0.1 if score_thresh is None else score_thresh, out,
                                  command)
    elif name == "deltas":
        png, csv = _deltas(ctx, overrides, preset, seeds, ratio, home, out, command)
    elif name == "figure5":
        from studies.definitions import FIGURE5_CURVES
        from studies.run import load_study

        base = study_name or f"figure5-{preset}"
        studies = [load_study(f"{base}-{c}", home, storage) for c in FIGURE5_CURVES
                   if _study_exists(f"{base}-{c}", home, storage)]
        if not studies:
            raise BenchError(f"no study {base}-* yet; run `bench study figure5 --preset {preset}` first")
        png, csv = write_figure5(studies, preset, out, command)
    elif name == "fig1":
        png, csv = _fig1(preset, overrides, ratio or 100.0, score_thresh, train, home, out, command)
    else:
        png, csv = _fig4(name, preset, overrides, seeds, ratio or 5.0, train, home, out, command)
    say(f"figure: {png}  data: {csv}")


def _deltas(ctx, args, preset, seeds, ratio, home, out, command):
    """`bench figure deltas TABLE`: the cells of `bench report TABLE` (same --preset default: the
    spec's own, else demo; --seeds default 5 as there), their paired deltas drawn."""
    from bench.plan import build_plan
    from bench.report.deltas import write_deltas_figure
    from bench.runner import collect, planned_columns, table_header
    from bench.specs import load_spec

    if not args or "=" in args[0]:
        raise BenchError("figure deltas needs the table: `bench figure deltas table1` (or a spec .yaml file)")
    table, overrides = args[0], args[1:]
    spec = load_spec(table)
    if not spec.baseline_pairs:
        raise BenchError(f"{spec.name} pairs no LSM row with a baseline (its spec has no baseline_pairs)")
    if _defaulted(ctx, "preset"):
        preset = spec.preset or "demo"
    if _defaulted(ctx, "seeds"):
        seeds = 5
    cells, notes = build_plan(spec, preset, seeds, home, [ratio] if ratio is not None else None, overrides)
    results, _ = collect(cells, home, spec.all_metrics)
    paths = write_deltas_figure(spec, results, out, command, table_header(command, preset, notes),
                                planned_columns(cells))
    if paths is None:
        raise BenchError(f"no LSM − baseline pair of {spec.name} has a seed done in both rows on preset {preset} "
                         f"(seeds 1-{seeds}); run `bench run {table} --preset {preset}` first, with the same "
                         "--seeds and overrides")
    return paths


def _defaulted(ctx, name: str) -> bool:
    """The option was not given (click's or typer's vendored ParameterSource: compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is None or getattr(source, "name", "") in ("DEFAULT", "DEFAULT_MAP")


def _study_exists(name: str, home: Path, storage: Optional[str]) -> bool:
    import optuna

    from studies.storage import open_storage

    return name in {s.study_name for s in optuna.get_all_study_summaries(open_storage(home, storage))}


PL_SETS = {"ubteacher": "UBteacher, score > t", "ubteacher_lsm": "UBteacher + LSM, score > t",
           "alpha": "UBteacher + LSM, score > α"}


def _fig4(name, preset, overrides, seeds, ratio, train, home, out, command):
    import pandas as pd

    from bench.plan import build_plan
    from bench.report.figures import (eval_curves, plot_pseudo_label_quality, plot_training_curves,
                                      pseudo_label_curves, save)
    from bench.runner import run_with_start
    from bench.specs import load_spec

    spec = load_spec("table1")
    cells, _ = build_plan(spec, preset, seeds, home, [ratio], overrides)
    cells = [c for c in cells if c.row_id in ("ubteacher", "ubteacher_lsm") and c.column_id.startswith("coco_standard")]
    if not cells:
        raise BenchError(f"table1 has no COCO-standard column at ratio {ratio:g}; use --ratio 1, 2, 5 or 10")
    labels = {"ubteacher": "UBteacher (threshold t)", "ubteacher_lsm": "UBteacher + LSM (threshold α)"}
    frames = []
    for c in cells:
        if c.status(home) != "done":
            if not train:
                raise BenchError(f"cell {c.row_id} seed {c.seed} ({c.key[:12]}) is {c.status(home)}; pass --train or "
                                 f"run `bench run table1 --preset {preset} --ratios {ratio:g} --seeds {seeds}` with the same overrides")
            run_with_start(c.config, home)
        path = c.directory(home) / "metrics.jsonl"
        if name == "fig4":
            frames.append(eval_curves(path).assign(method=labels[c.row_id], seed=c.seed, cell_key=c.key))
            continue
        # the sets each row trains on: above t (main branch), and with LSM also above alpha (PIM / SD)
        sets = [("pl", PL_SETS[c.row_id])] + ([("pl_alpha", PL_SETS["alpha"])] if c.row_id == "ubteacher_lsm" else [])
        for prefix, label in sets:
            frames.append(pseudo_label_curves(path, prefix).assign(method=label, seed=c.seed, cell_key=c.key))
    data = pd.concat(frames, ignore_index=True)
    if name == "fig4":
        if data["iteration"].nunique() < 2:
            console.print("[yellow]only the final evaluation is logged: add solver.eval_period=N for curves[/yellow]")
        fig = plot_training_curves(data, title=f"Recall and AP over training, {ratio:g}% labels, preset {preset} (Figure 4)")
        return save(fig, data, Path(out) / "figure4.png", command, header={"preset": preset})
    fig = plot_pseudo_label_quality(data)
    return save(fig, data, Path(out) / "pseudo_label_quality.png", command, header={"preset": preset})


def _fig1(preset, overrides, ratio, score_thresh, train, home, out, command):
    """Paper Figure 1: a supervised detector on all labels; its confident detections on val."""
    from bench.cli_common import load_trained
    from core.config import load_config
    from core.data.sources import prepare_data
    from core.paths import run_dir
    from bench.report.figures import iou_vs_area, plot_iou_vs_area, save
    from bench.keys import cell_key
    from core.data.transforms import view_settings
    from bench.worker import run_cell
    from adapters.engine.inference import run_inference

    cfg = load_config(preset, overrides + [f"data.ratio={ratio:g}"], method="supervised", seed=1)
    data = prepare_data(cfg.data, home)
    rdir = run_dir(home, cell_key(cfg, data))
    if not (rdir / "model_final.pth").exists():
        if not train:
            raise BenchError(f"the supervised cell at {ratio:g}% labels is not trained; pass --train or run "
                             f"`bench train --method supervised --preset {preset} --ratio {ratio:g}`")
        run_cell(cfg, home)
    adapter, device = load_trained(cfg, data, rdir / "model_final.pth")
    model = next(iter(adapter.eval_models().values()))
    dets = run_inference(model, data.val, view_settings(cfg.data.aug, False), device)
    thresh = cfg.semi.t if score_thresh is None else score_thresh
    df = iou_vs_area(dets, data.val, thresh, cfg.eval.area_scale)
    fig = plot_iou_vs_area(df, thresh)
    return save(fig, df, Path(out) / "figure1.png", command, header={"preset": preset})


# -- bench ui --------------------------------------------------------------------------------------
def ui(port: int = typer.Option(5000, "--port", min=1, max=65535, help="MLflow UI port on 127.0.0.1."),
       dashboard_port: int = typer.Option(8080, "--dashboard-port", min=1, max=65535, help="optuna-dashboard port on 127.0.0.1."),
       dashboard: bool = typer.Option(True, help="Also start optuna-dashboard (the `dashboard` extra)."),
       storage: Optional[str] = STORAGE_OPT, home: Optional[Path] = HOME_OPT):
    """Start the MLflow UI and optuna-dashboard on the suite's stores; Ctrl-C stops both."""
    import time

    from studies import ui as ui_mod

    home = resolve_home(home)
    if dashboard and not ui_mod.dashboard_available():
        # the extra's brackets are escaped: rich would read [dashboard] as a style tag and drop it
        console.print("[yellow]optuna-dashboard is not installed (pip install 'lsm-bench\\[dashboard]'); "
                      "starting MLflow only[/yellow]")
        dashboard = False
    services = ui_mod.start(home, storage, port, dashboard_port, dashboard)
    try:  # from here on an interrupt (Ctrl-C, SIGINT, SIGTERM: bench.cli.main) stops the servers
        for s in services:
            say(f"{s.name}: {s.url}")
        console.print("Ctrl-C stops the servers")
        while all(s.process is None or s.process.poll() is None for s in services):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        ui_mod.stop(services)
