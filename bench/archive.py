"""Finished cells as a small, portable archive: a table computed in parts on machines that do not
share BENCH_HOME (or whose store is wiped between sessions) is carried in git or a mail attachment
and merged into another store, whose `plan`, `run` and `report` then count those cells as done.

An archive holds each done cell's `config.yaml`, `result.json` and `metrics.jsonl` under
`runs/<shard>/<key>/`, the store's own layout, and no weights: a cell imported without its burn-in
checkpoint trains its dependants from scratch (bench/worker.py), which gives the same result; a
STAC teacher cell imported without its weights cannot make pseudo-labels for a new dependant (the
worker says so and names the directory to delete so that it is trained again).
Importing never replaces a cell the store already has.
"""

from __future__ import annotations

import gzip
import io
import json
import tarfile
import zlib
from pathlib import Path, PurePosixPath

from core.errors import BenchError

FILES = ("config.yaml", "result.json", "metrics.jsonl")
MANIFEST = "lsm-bench-cells.json"


def _is_key(name: str) -> bool:
    """A cell key is a hex digest (bench/keys.py): nothing that could climb out of runs/."""
    return len(name) >= 8 and all(c in "0123456789abcdef" for c in name)


def export_cells(directories: list[Path], home: Path, out: Path, note: dict) -> int:
    """Write the done cells among `directories` (run directories under `home`) to `out` (.tar.gz);
    returns how many. `note` (the command, the git sha) goes into the archive's manifest."""
    done = [d for d in directories if (d / "result.json").exists()]
    if not done:
        raise BenchError("no done cells to export; run the table first (`bench plan` shows what is done)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        manifest = json.dumps({**note, "cells": [d.name for d in done]}, indent=1).encode()
        info = tarfile.TarInfo(MANIFEST)
        info.size = len(manifest)
        tar.addfile(info, io.BytesIO(manifest))
        for d in done:
            for name in FILES:
                if (d / name).exists():
                    tar.add(d / name, arcname=str(d.relative_to(home) / name), recursive=False)
    tmp.replace(out)  # a half-written archive never takes the name
    return len(done)


def _damaged(archive: Path, exc: Exception) -> BenchError:
    return BenchError(f"{archive} is truncated or damaged ({exc}); copy it again, or export it again from its store")


def _read(archive: Path, read):
    """`read()`, with a truncated or damaged archive (found only as it is read) as a one-line error."""
    try:
        return read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        raise _damaged(archive, exc) from None


def _read_to_end(archive: Path) -> None:
    """Decompress the whole file, which checks the gzip CRC and length at its end."""
    with gzip.open(archive) as stream:
        while stream.read(1 << 20):
            pass


def import_cells(archive: Path, home: Path) -> tuple[int, int]:
    """Merge `archive` into `home`'s runs/; returns (cells added, cells the store already had)."""
    if not archive.is_file():
        raise BenchError(f"{archive} does not exist; give the .tar.gz written by `bench export`")
    try:
        tar = tarfile.open(archive, "r:gz")
    except (EOFError, zlib.error) as exc:  # a gzip stream cut short
        raise _damaged(archive, exc) from None
    except (tarfile.TarError, OSError) as exc:
        raise BenchError(f"{archive} is not a gzipped tar archive ({exc}); give the file `bench export` wrote") from None
    with tar:
        # the whole gzip stream first: tarfile stops at the end-of-archive blocks and never reaches
        # the gzip CRC, so a damaged byte would otherwise be imported as a changed result
        _read(archive, lambda: _read_to_end(archive))
        members = _read(archive, tar.getmembers)
        if MANIFEST not in {m.name for m in members}:
            raise BenchError(f"{archive} has no {MANIFEST}: it was not written by `bench export`")
        cells: dict[str, list[tarfile.TarInfo]] = {}
        for m in members:
            if m.name == MANIFEST:
                continue
            parts = PurePosixPath(m.name).parts
            if not m.isfile() or len(parts) != 4 or parts[0] != "runs" or parts[3] not in FILES \
                    or parts[2][:2] != parts[1] or not _is_key(parts[2]):
                raise BenchError(f"{archive}: unexpected member '{m.name}'; only runs/<shard>/<key>/"
                                 f"{{{','.join(FILES)}}} belong in a cell archive")
            cells.setdefault(parts[2], []).append(m)
        added = kept = 0
        for key, files in sorted(cells.items()):
            rdir = home / "runs" / key[:2] / key
            if (rdir / "result.json").exists():
                kept += 1
                continue
            if "result.json" not in {PurePosixPath(m.name).name for m in files}:
                raise BenchError(f"{archive}: cell {key[:12]} has no result.json; export it again from its store")
            rdir.mkdir(parents=True, exist_ok=True)
            # result.json last: the cell counts as done only once its other files are in place
            for m in sorted(files, key=lambda m: m.name.endswith("result.json")):
                target = rdir / PurePosixPath(m.name).name
                tmp = target.with_name(target.name + ".tmp")
                tmp.write_bytes(_read(archive, lambda: tar.extractfile(m).read()))
                tmp.replace(target)
            added += 1
    return added, kept
