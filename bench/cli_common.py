"""What every `bench` command shares: the --home option and the command line written into outputs."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer

HOME_OPT = typer.Option(None, "--home", help="Working store (default: $BENCH_HOME or ./.bench).")


def resolve_home(home: Optional[Path]) -> Path:
    from bench.paths import bench_home

    return home.resolve() if home else bench_home()


def invocation() -> str:
    """The command as typed (tables and figures record it so that anyone can regenerate them)."""
    return "bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
