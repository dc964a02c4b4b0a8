"""What the `bench` commands share: the --home and --format options, the command line written into
outputs, the checks of command-line values made before anything runs or is written, the listings of
`plan` and `status` (table, csv, json), weights loaded for `eval` and `figure fig1`, and `run_app`:
errors as one line and exit codes (2 bad input, 1 failed work, 130 interrupted)."""

from __future__ import annotations

import csv
import json
import math
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from core.errors import BenchError, first_line


def _home_path(value: str) -> Path:
    """--home's parser: an empty value would silently mean the current directory."""
    if not str(value).strip():
        raise BenchError("--home '' is empty; give the store's folder (e.g. --home .bench) or leave --home out")
    return Path(value)


HOME_OPT = typer.Option(None, "--home", parser=_home_path, help="Working store (default: $BENCH_HOME or ./.bench).")


def _writable(path: Path, option: str, value: Path) -> None:
    """`path`, or the nearest folder above it that exists, takes new files; else one line for `option`."""
    existing = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not existing.is_dir():
        raise BenchError(f"{option} {value}: {existing} is a file; give a folder you can write to")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise BenchError(f"{option} {value}: {existing} is not writable; give a folder you can write to")


def out_folder(value: str) -> Path:
    """--out of tables and figures: checked when the command starts, not when its work is done."""
    path = Path(value)
    _writable(path, "--out", path)
    return path


def out_file(value: str) -> Path:
    """--out of an archive: its folder is checked when the command starts."""
    path = Path(value)
    _writable(path.parent, "--out", path)
    return path


FORMATS = ("table", "csv", "json")
FORMAT_OPT = typer.Option("table", "--format", help="table, csv or json (csv and json: every field, names and "
                          "keys in full; notes on stderr).")
console = Console()
err_console = Console(stderr=True)


def resolve_home(home: Optional[Path]) -> Path:
    from core.paths import bench_home

    return home.resolve() if home else bench_home()


def invocation() -> str:
    """The command as typed (tables and figures record it so that anyone can regenerate them)."""
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])


# -- values checked at the edge ---------------------------------------------------------------------
# Seed i trains on split fold i; planning makes one split per seed and ratio, so the count is bounded.
MAX_SEEDS = 100
# A learning rate above this diverges at the first step for every optimizer the suite has.
MAX_LR = 10.0
_DEVICE = re.compile(r"cpu|cuda(:\d+)?")


def check_seeds(seeds: int) -> int:
    if not 1 <= seeds <= MAX_SEEDS:
        raise BenchError(f"--seeds {seeds}: give 1 to {MAX_SEEDS} (seed i trains on split fold i; the paper uses 5)")
    return seeds


def parse_ratios(text: Optional[str]) -> Optional[list[float]]:
    """--ratios '1,10' -> [1.0, 10.0]; every entry a percent in (0, 100]."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        try:
            r = float(part)
        except ValueError:
            raise BenchError(f"--ratios {text!r}: {part.strip()!r} is not a number; give percents separated by "
                             "commas, e.g. --ratios 1,10") from None
        if not (math.isfinite(r) and 0 < r <= 100):
            raise BenchError(f"--ratios {text}: {part.strip()} is not a percent in (0, 100]; e.g. --ratios 1,10")
        out.append(r)
    return out


def check_device(name: str, option: str = "--device") -> str:
    """auto, cpu, cuda or cuda:N (a GPU that is missing is refused where the cell runs, by its worker)."""
    if name != "auto" and not _DEVICE.fullmatch(name):
        raise BenchError(f"{option} {name!r}: unknown device; use auto, cpu, cuda or cuda:N")
    return name


def check_devices(text: str) -> list[str]:
    """--devices 'cpu' or 'cuda:0,cuda:1': known names, and GPUs this machine has, before any cell starts."""
    devices = text.split(",")
    for d in devices:
        if not _DEVICE.fullmatch(d):
            raise BenchError(f"--devices {text!r}: unknown device {d!r}; use cpu, or cuda:N entries separated by "
                             "commas (e.g. cuda:0,cuda:1)")
    gpus = [d for d in devices if d.startswith("cuda")]
    if gpus:
        import torch

        n = torch.cuda.device_count()
        if n == 0:
            raise BenchError(f"--devices {text}: no CUDA GPU is visible on this machine; use --devices cpu")
        bad = [d for d in gpus if int(d.partition(":")[2] or 0) >= n]
        if bad:
            raise BenchError(f"--devices {text}: {', '.join(bad)} does not exist ({n} GPU(s) visible: "
                             f"{', '.join(f'cuda:{i}' for i in range(n))})")
    return devices


# Keys a command sets itself: as overrides they would be silently ignored or change a cell's key
# behind its label. value: the option to use instead.
_TRAIN_RESERVED = {"method": "--method", "preset": "--preset", "stage": "a table's plan (burn-ins are planned)"}
_TABLE_RESERVED = {"method": "a spec row's `method`", "preset": "--preset",
                   "stage": "the plan (burn-ins are planned)", "seed": "--seeds", "data.fold": "--seeds"}


def check_overrides(args: list[str], table: bool = False) -> list[str]:
    reserved = _TABLE_RESERVED if table else _TRAIN_RESERVED
    for a in args:
        key = a.split("=", 1)[0].strip()
        if key in reserved:
            raise BenchError(f"override {a!r}: {key} is not an override here; set it with {reserved[key]}")
    return args


def check_config(cfg) -> None:
    """What pydantic lets through but training cannot use: non-finite numbers, a negative seed, an
    unknown device, a learning rate that diverges at the first step, a mean-teacher run that ends
    inside its burn-in."""
    check_device(cfg.device, "device")
    if not 0 <= cfg.seed < 2 ** 32:
        raise BenchError(f"seed {cfg.seed}: must be in 0 .. 2^32-1 (numpy's and torch's seed range)")

    def walk(node, prefix=""):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            elif isinstance(v, float) and not math.isfinite(v):
                raise BenchError(f"{prefix}{k}={v}: must be a finite number")

    walk(cfg.model_dump())
    from core.methods import upstream

    if upstream(cfg) == "burn_in" and cfg.semi.burn_in >= cfg.solver.max_iter:
        raise BenchError(f"semi.burn_in={cfg.semi.burn_in} is not below solver.max_iter={cfg.solver.max_iter}: "
                         f"{cfg.method} would train only its supervised burn-in and report Supervised's result "
                         "under its name; lower semi.burn_in or raise solver.max_iter")
    lr = cfg.solver.base_lr
    if lr > MAX_LR:
        raise BenchError(f"solver.base_lr={lr:g}: a learning rate above {MAX_LR:g} diverges at once; "
                         "use the preset's (e.g. 0.01) or a value in (0, 10]")


# -- listings: `bench plan`, `bench status` ------------------------------------------------------------
def print_rows(fmt: str, rows: list[dict], title: str, headers: list[str],
               cells: Callable[[dict, bool], list[str]], fields: tuple[str, ...] = ()) -> Console:
    """Rows as a rich table (`cells(row, cut)` gives a row's texts; `cut`: a terminal, where keys may
    be shortened), or as csv or json with every field in full (`fields`: the csv header when there
    is no row). Nothing is truncated when stdout is not a terminal. Returns the console for the
    lines that follow (stderr for csv and json)."""
    if fmt not in FORMATS:
        raise BenchError(f"--format {fmt}: use table, csv or json")
    if fmt == "json":
        clean = [{k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in r.items()} for r in rows]
        console.file.write(json.dumps(clean, indent=2) + "\n")
        return err_console
    if fmt == "csv":
        writer = csv.writer(console.file, lineterminator="\n")
        writer.writerow(list(rows[0]) if rows else list(fields))
        for r in rows:
            writer.writerow(["" if v is None else str(v).lower() if isinstance(v, bool)
                             else "; ".join(map(str, v)) if isinstance(v, list) else v for v in r.values()])
        return err_console
    t = Table(title=title)
    for h in headers:
        t.add_column(h, overflow="fold")
    terminal = console.is_terminal
    for r in rows:
        t.add_row(*cells(r, terminal))
    # a pipe or a file: as wide as the table needs (rich would otherwise cut names at 80 columns)
    out = console if terminal else Console(file=console.file, width=100_000, force_terminal=False)
    out.print(t)
    return console


def show_status(home: Optional[Path], fmt: str) -> None:
    """`bench status`: every run directory with a config.yaml, its status and AP; unreadable
    result.json and config.yaml files named."""
    from core.paths import RunDir, run_dirs

    home = resolve_home(home)
    rows = [d.summary() for d in run_dirs(home) if d.config_file.exists()]

    def cells(r: dict, cut: bool) -> list[str]:
        fields = ["?"] * 5 if r["method"] is None else [
            r["method"], str(r["lsm"]).lower(), r["preset"], f"{r['ratio']:g}", str(r["seed"])]
        return [r["key"][:12] if cut else r["key"], *fields, r["status"],
                "" if r["AP"] is None else f"{r['AP']:.2f}"]

    out = print_rows(fmt, rows, f"runs in {home / 'runs'}",
                     ["key", "method", "lsm", "preset", "ratio", "seed", "status", "AP (reported)"], cells,
                     RunDir.SUMMARY_FIELDS)
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    out.print(", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no runs yet")
    for line in (p for r in rows for p in r["problems"]):
        out.print(f"[red]corrupt[/red] {escape(line)}", highlight=False, soft_wrap=True)


# -- finished cells: their weights loaded --------------------------------------------------------------
def load_trained(cfg, data, weights: Path):
    """(adapter, device): the method's models for `cfg` with the final weights of a finished run."""
    import torch

    from adapters.base import get_adapter
    from bench.worker import resolve_device

    device = resolve_device(cfg.device)
    adapter = get_adapter(cfg.method)(cfg, data.num_classes, device)
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        for name, model in adapter.eval_models().items():
            model.load_state_dict(state[name])
    except Exception as err:  # zip, pickle, key or shape errors: a damaged or foreign file
        first = first_line(err, 200)
        raise BenchError(f"{weights} cannot be read as this run's final weights ({type(err).__name__}: {first}); "
                         f"delete {weights.parent} and train the cell again") from None
    return adapter, device


def evaluate_run(run: str, backend: str, home: Optional[Path]) -> None:
    """`bench eval`: a finished run's final weights evaluated on its validation set, printed."""
    from core.config import RunConfig
    from core.data.sources import prepare_data
    from core.paths import RunDir, find_run_dir
    from bench.worker import evaluate_models

    rdir = RunDir(find_run_dir(run, resolve_home(home)))
    cfg = RunConfig.model_validate(rdir.config())
    cfg = cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"backend": backend})})
    data = prepare_data(cfg.data, resolve_home(home))
    adapter, device = load_trained(cfg, data, rdir / "model_final.pth")
    for name, stats in evaluate_models(adapter, data, cfg, device).items():
        console.print(f"[bold]{escape(name)}[/bold]\n{escape(str(stats.get('summary', stats)))}")


def make_split(dataset: str, ratio: float, fold: int, root: Optional[Path], import_ubteacher: Optional[Path],
               import_stac: Optional[Path], out: Optional[Path], home: Optional[Path], nested: bool = False) -> None:
    """`bench data split`: a split manifest (made or imported), saved to `out` if given, summarised."""
    from pydantic import ValidationError

    from core.config import DataConfig, format_validation_error
    from core.data import splits
    from core.data.sources import prepare_data

    if dataset == "voc":
        raise BenchError("VOC's split is fixed (07 trainval labeled, 12 trainval unlabeled); nothing to generate")
    try:
        cfg = DataConfig(dataset=dataset, ratio=ratio, fold=fold, root=str(root) if root else None, nested_splits=nested)
    except ValidationError as err:  # --ratio 0, --fold 0, an unknown --dataset
        raise BenchError(format_validation_error(err, "bench data split")) from None
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


def clean_runs(home: Optional[Path], failed: bool, corrupt: bool, all_: bool) -> None:
    """`bench clean`: failed or corrupt run directories removed, or all of them."""
    from core.paths import remove_runs

    home = resolve_home(home)
    removed = remove_runs(home, failed=failed, corrupt=corrupt, all_=all_)
    console.print(f"removed {removed} run directories under {home / 'runs'}", markup=False, highlight=False)


def import_archive(archive: Path, home: Optional[Path]) -> None:
    """`bench import`: an exported archive's cells merged into this store (cells it has are kept)."""
    from bench.archive import import_cells

    home = resolve_home(home)
    added, kept = import_cells(archive, home)
    console.print(f"{added} cells added to {home / 'runs'}; {kept} already there, kept", markup=False, highlight=False)


def show_config(preset: str, method: str, overrides: list[str]) -> None:
    """`bench config show`: the validated configuration of a preset for one method."""
    from core.config import dump_config, load_config
    from core.methods import method_spec

    method_spec(method)  # an unknown name: one line listing the known ones
    console.print(dump_config(load_config(preset, overrides, method=method)), markup=False, highlight=False)


def fetch_data(name: str, wheel: Optional[Path], force: bool, home: Optional[Path]) -> None:
    """`bench data fetch`: a real data set downloaded into the store and prepared (forest only)."""
    if name != "forest":
        raise BenchError(f"unknown data set '{name}' to fetch; known: forest (the synthetic set is generated on "
                         "first use; for COCO and VOC pass data.root)")
    from core.data import forest

    forest.fetch_forest(resolve_home(home), wheel, force, log=lambda s: console.print(s, markup=False, highlight=False))


def check_data(path: Path, image_dir: Optional[Path], area_scale: float) -> None:
    """`bench data check`: each data set's summary printed; one line (exit 2) if any lists problems."""
    from core.data.check import check_path, format_summary

    summaries = check_path(path, image_dir=image_dir, area_scale=area_scale)
    for summary in summaries:
        console.print(format_summary(summary), markup=False, highlight=False)
    bad = [s for s in summaries if s["problems"]]
    if bad:
        n = sum(len(s["problems"]) for s in bad)
        raise BenchError(f"{', '.join(s['path'] for s in bad)}: {n} problem(s) listed above; fix them before "
                         "training on it")


# -- the entry point's error handling ------------------------------------------------------------------
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


def run_app(app: typer.Typer) -> None:
    """Run the CLI: BenchError as `error: ...` on one line with exit 2, usage errors 2, failed work 1,
    Ctrl-C 130 and SIGTERM 143 with the resume hint, a bug as one line naming --debug."""
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
    except aborts as exc:
        # click turns an EOFError into Abort (Ctrl-D at a prompt; this CLI has none): here it is a
        # truncated file read by a command, which must be reported, not end the command silently
        if isinstance(exc.__cause__, EOFError):
            if debug:
                raise exc.__cause__ from None
            _report_bug(exc.__cause__)
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
        _report_bug(err)
        sys.exit(1)


def _report_bug(err: BaseException) -> None:
    """An unexpected exception as one line naming --debug."""
    first = first_line(err)
    print(f"error: internal error ({type(err).__name__}: {first}); rerun with --debug (or BENCH_DEBUG=1) for "
          "the traceback and report it", file=sys.stderr)
