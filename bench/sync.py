"""Bring the tracking store up to date with the cell store (`bench sync`, and the end of `bench run`).

A cell never fails because MLflow does (bench/tracking.py): during an outage it trains on and
keeps what it would have logged in its run directory (config.yaml, metrics.jsonl, result.json).
`sync_runs` logs such cells afterwards as the worker would have: same run name, tags and params,
the metric history at its steps, the two files as artifacts, status FINISHED. The new run's id goes
into the cell's `mlflow_run_id` file, never into result.json (a cell's result is immutable), so
the file is where a cell's run id is read first (`recorded_run_id`).
"""

from __future__ import annotations

import fcntl
import re
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

from bench import tracking
from core.errors import BenchError
from core.paths import CorruptFile, read_metrics, read_result

_RUN_ID = re.compile(r"[0-9a-f]{1,64}")  # what MLflow's ids look like; anything else names no run


@dataclass
class SyncReport:
    """What a sync did, run directory by run directory (`bench sync` prints it)."""

    logged: list[Path] = field(default_factory=list)  # run directories whose run was logged now
    present: list[Path] = field(default_factory=list)  # run directories whose run the store has
    skipped: list[str] = field(default_factory=list)  # unreadable files, each as "PATH (why)"

    def summary(self) -> str:
        return f"{len(self.logged)} runs logged, {len(self.present)} already there"


class TrackingDown(BenchError):
    """The tracking store cannot be read or written: the missed runs stay missed, for now."""


def recorded_run_id(rdir: Path, result: dict) -> str | None:
    """A done cell's MLflow run id: its `mlflow_run_id` file (written by the worker, or by a sync
    after an outage), else result.json's (None when tracking was down)."""
    try:
        return (Path(rdir) / "mlflow_run_id").read_text().strip() or result.get("mlflow_run_id")
    except OSError:
        return result.get("mlflow_run_id")


def sync_runs(home: Path, run_dirs: list[Path] | None = None, parent_run_id: str | None = None) -> SyncReport:
    """Log every done cell of `run_dirs` (default: all of BENCH_HOME/runs) whose run the store lacks.

    Failed and unfinished cells are left out; unreadable files are skipped and named in the report.
    Costs one query when nothing is missing; raises `TrackingDown` when the store cannot be used."""
    home = Path(home)
    report = SyncReport()
    done = []
    for rdir in sorted(home.glob("runs/*/*")) if run_dirs is None else run_dirs:
        if (rdir / "failed.json").exists() or not (rdir / "result.json").exists():
            continue
        try:
            done.append((rdir, recorded_run_id(rdir, read_result(rdir / "result.json"))))
        except CorruptFile as err:
            report.skipped.append(str(err))
    if not done:
        return report
    try:
        tracker = tracking.Tracker(home, strict=True)
        ids = [i for _, i in done if i and _RUN_ID.fullmatch(i)]
        have = tracker.existing_runs(ids) if ids else set()
        for rdir, run_id in done:
            if run_id in have:
                report.present.append(rdir)
                continue
            outcome = _log_cell(tracker, home, rdir, run_id, parent_run_id)
            if outcome == "logged":
                report.logged.append(rdir)
            elif outcome == "present":
                report.present.append(rdir)
            else:
                report.skipped.append(outcome)
    except tracking.StoreError as err:  # sqlite (read-only, locked), HTTP, MLflow's own errors
        raise TrackingDown(f"the MLflow tracking store {tracking.tracking_uri(home)} cannot be used ({err}); "
                           "make it writable (or start the server MLFLOW_TRACKING_URI names), then rerun "
                           "`bench sync`") from None
    return report


def _log_cell(tracker: tracking.Tracker, home: Path, rdir: Path, seen: str | None, parent_run_id: str | None) -> str:
    """Log one cell's run under the cell's lock (two syncs at once log it once): "logged", "present"
    (another sync logged it meanwhile) or "PATH ... (why)" for a file it cannot read or write."""
    import yaml

    from core.config import RunConfig

    try:
        lock = (rdir / "lock").open("a")  # the worker's lock
    except OSError as err:
        return f"{rdir / 'lock'} cannot be opened ({err.strerror})"
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        path = rdir / "result.json"
        try:
            result = read_result(path)
            if recorded_run_id(rdir, result) != seen:
                return "present"
            path = rdir / "config.yaml"
            cfg = RunConfig.model_validate(yaml.safe_load(path.read_text()))
            path = rdir / "metrics.jsonl"
            rows = read_metrics(path)
        except Exception as err:  # a truncated, hand-edited or outdated file
            return f"{path} is unreadable ({type(err).__name__})"
        tags = tracking.run_tags(cfg, rdir.name, _split_sha256(cfg, rdir.name, home))
        if "world_size" in result:
            tags["world_size"] = str(result["world_size"])
        tags["synced"] = "true"  # logged after the fact: git_sha and versions are those of the sync
        tracker.start(tracking.run_name(cfg), tags, tracking.flatten(cfg.model_dump(mode="json")),
                      parent_run_id=parent_run_id)
        try:
            tracker.log_history(rows)
            tracker.log_artifact(rdir / "result.json")
            tracker.log_artifact(rdir / "config.yaml")
            tracker.end("FINISHED")
            (rdir / "mlflow_run_id").write_text(tracker.run_id)
        except (tracking.StoreError, OSError) as err:
            tracker.discard()  # a half-logged or unrecorded run would stay beside the next sync's whole one
            if isinstance(err, OSError):
                return f"{rdir / 'mlflow_run_id'} cannot be written ({err.strerror})"
            raise
    return "logged"


def _split_sha256(cfg, key: str, home: Path) -> str:
    """The cell's split manifest sha256 (a run tag): the stored manifest whose hashes give the cell's
    key, without loading the data set; "unknown" for settings whose split is not stored."""
    from bench.keys import cell_key
    from core.data.sources import manifest_name
    from core.data.splits import SplitManifest

    d = cfg.data
    files = [Path(d.split_file)] if d.split_file else (home / "splits").glob(manifest_name("*", d, "*"))
    for f in files:
        try:
            manifest = SplitManifest.load(f)
        except Exception:
            continue
        if cell_key(cfg, SimpleNamespace(manifest=manifest)) == key:
            return manifest.sha256
    return "unknown"
