"""What every `bench` command shares: the --home option, the command line written into outputs,
and the checks of command-line values made before anything runs or is written."""

from __future__ import annotations

import math
import re
import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

from core.errors import BenchError


def _home_path(value: str) -> Path:
    """--home's parser: an empty value would silently mean the current directory."""
    if not str(value).strip():
        raise BenchError("--home '' is empty; give the store's folder (e.g. --home .bench) or leave --home out")
    return Path(value)


HOME_OPT = typer.Option(None, "--home", parser=_home_path, help="Working store (default: $BENCH_HOME or ./.bench).")


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
    unknown device, a learning rate that diverges at the first step."""
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
    lr = cfg.solver.base_lr
    if lr > MAX_LR:
        raise BenchError(f"solver.base_lr={lr:g}: a learning rate above {MAX_LR:g} diverges at once; "
                         "use the preset's (e.g. 0.01) or a value in (0, 10]")
