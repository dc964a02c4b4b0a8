"""`bench`: the command line. Verbs: train, eval, data (synth | split | check), config.

Bad input raises BenchError, printed as one line on stderr with exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from bench.errors import BenchError

app = typer.Typer(help="lsm-bench: semi-supervised object detection benchmark (LSM, IJCAI 2023).",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
data_app = typer.Typer(help="Data sets: generate the synthetic set, make split manifests, validate.",
                       no_args_is_help=True)
config_app = typer.Typer(help="Inspect configurations.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(config_app, name="config")
console = Console()
err_console = Console(stderr=True)


def _home(home: Optional[Path]) -> Path:
    from bench.paths import bench_home

    return home.resolve() if home else bench_home()


HOME_OPT = typer.Option(None, "--home", help="Working store (default: $BENCH_HOME or ./.bench).")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    method: str = typer.Option("supervised", help="Method: supervised, ubteacher."),
    preset: str = typer.Option("demo", help="Preset in bench/presets (demo, coco, coco_additional, voc, coco_imagenet)."),
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
    from bench.config import load_config
    from bench.worker import run_cell

    overrides = list(ctx.args)
    if ratio is not None:
        overrides.append(f"data.ratio={ratio}")
    if data_root is not None:
        overrides.append(f"data.root={data_root}")
    if lsm:
        overrides.append("lsm.enabled=true")
    cfg = load_config(preset, overrides, method=method, seed=seed, device=device)
    result = run_cell(cfg, _home(home), track=track)
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
    from bench.config import RunConfig
    from bench.data.sources import prepare_data
    from bench.worker import evaluate_models, resolve_device

    rdir = Path(run)
    if not rdir.is_dir():
        matches = sorted((_home(home) / "runs").glob(f"*/{run}*"))
        if len(matches) != 1:
            raise BenchError(f"run '{run}' matches {len(matches)} run directories; give a longer key or a path")
        rdir = matches[0]
    weights = rdir / "model_final.pth"
    if not weights.exists():
        raise BenchError(f"{weights} does not exist; the run has not finished (rerun `bench train` to resume it)")
    cfg = RunConfig.model_validate(yaml.safe_load((rdir / "config.yaml").read_text()))
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    data = prepare_data(cfg.data, _home(home))
    device = resolve_device(cfg.device)
    adapter = get_adapter(cfg.method)(cfg, data.num_classes, device)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    for name, model in adapter.eval_models().items():
        model.load_state_dict(state[name])
    for name, stats in evaluate_models(adapter, data, cfg, device).items():
        console.print(f"[bold]{name}[/bold]\n{stats.get('summary', stats)}")


@data_app.command("synth")
def data_synth(
    out: Path = typer.Option(..., help="Output directory."),
    images: int = typer.Option(600, help="Number of images."),
    seed: int = typer.Option(0, help="Generator seed."),
    image_size: int = typer.Option(160, help="Image side in pixels."),
    split: str = typer.Option("train", help="Split name (file and folder names)."),
):
    """Generate the synthetic detection data set (COCO JSON + PNG), deterministic from the seed."""
    from bench.data import synth

    path = synth.generate(out, images, seed, image_size=image_size, split_name=split)
    console.print(f"wrote {path}")


@data_app.command("split")
def data_split(
    dataset: str = typer.Option("synthetic", help="synthetic, coco or voc."),
    ratio: float = typer.Option(10.0, help="Percent labeled."),
    fold: int = typer.Option(1, help="Fold (split seed), 1-5 in the paper's protocol."),
    root: Optional[Path] = typer.Option(None, help="Data set root (coco/voc)."),
    import_ubteacher: Optional[Path] = typer.Option(None, help="Unbiased Teacher COCO_supervision.txt to import."),
    import_stac: Optional[Path] = typer.Option(None, help="STAC/mmdet instances_train2017.{fold}@{pct}.json to import."),
    out: Optional[Path] = typer.Option(None, help="Manifest path (default: BENCH_HOME/splits/...)."),
    home: Optional[Path] = HOME_OPT,
):
    """Write a split manifest: labeled / unlabeled image ids and a sha256."""
    from bench.config import DataConfig
    from bench.data import splits
    from bench.data.sources import prepare_data

    if dataset == "voc":
        raise BenchError("VOC's split is fixed (07 trainval labeled, 12 trainval unlabeled); nothing to generate")
    cfg = DataConfig(dataset=dataset, ratio=ratio, fold=fold, root=str(root) if root else None)
    data = prepare_data(cfg, _home(home))
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
                  f"sha256 {manifest.sha256[:16]}" + (f" -> {out}" if out else ""))


@data_app.command("check")
def data_check(path: Path = typer.Argument(..., help="A COCO JSON file or a VOC root."),
               image_dir: Optional[Path] = typer.Option(None, help="Image directory (COCO) if not next to the JSON.")):
    """Validate a data set and print a summary (boxes per class, sizes, problems)."""
    from bench.data.check import check_dataset, format_summary

    summary = check_dataset(path, image_dir=image_dir)
    console.print(format_summary(summary))


@config_app.command("show")
def config_show(preset: str = typer.Option("demo", help="Preset name."),
                overrides: Optional[list[str]] = typer.Argument(None, help="key=value overrides.")):
    """Print the validated configuration of a preset (with overrides)."""
    from bench.config import dump_config, load_config

    console.print(dump_config(load_config(preset, overrides or [])), markup=False, highlight=False)


def main() -> None:
    import click

    try:
        app(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        sys.exit(1)
    except BenchError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; rerun the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
