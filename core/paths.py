"""The working store (BENCH_HOME, default ./.bench): mlflow.db, runs/, splits/, data/.

`run_dir(home, key)` is a cell's directory under runs/; `RunDir` owns one: its files, its status
(what `bench plan` and `bench status` show) and its config writer."""

from __future__ import annotations

import json
import os
from pathlib import Path

from core.errors import BenchError


def bench_home() -> Path:
    value = os.environ.get("BENCH_HOME", ".bench")
    if not value.strip():  # an empty value would silently mean the current directory
        raise BenchError("BENCH_HOME is set but empty; set it to the store's folder or unset it (default ./.bench)")
    return Path(value).resolve()


def run_dir(home: Path, key: str) -> Path:
    """One directory per cell, sharded by the first two hex digits of its key."""
    return Path(home) / "runs" / key[:2] / key


def find_run_dir(run: str, home: Path) -> Path:
    """A finished run directory from a path or a key prefix under HOME/runs."""
    rdir = Path(run)
    if not rdir.is_dir():
        matches = sorted((home / "runs").glob(f"*/{run}*"))
        if len(matches) != 1:
            raise BenchError(f"run '{run}' matches {len(matches)} run directories; give a longer key or a path")
        rdir = matches[0]
    weights = rdir / "model_final.pth"
    if not weights.exists():
        raise BenchError(f"{weights} does not exist; the run has not finished (rerun `bench train` to resume it)")
    return rdir


def read_metrics(path: Path) -> list[dict]:
    """A done cell's metrics.jsonl as records (none if it has no log); blank lines are skipped, and a
    line that is not a record is a one-line error naming the file and the line."""
    path = Path(path)
    records = []
    for number, line in enumerate(path.read_text().splitlines() if path.exists() else [], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as err:
            rec = err.msg
        if not isinstance(rec, dict) or not isinstance(rec.get("iteration"), int):
            raise BenchError(f"{path}: line {number} is not a training-log record ({rec!r:.60}); the log is "
                             f"damaged: delete {path.parent} and train the cell again")
        records.append(rec)
    return records


class CorruptFile(BenchError):
    """A store file that exists but cannot be read (truncated, not JSON, missing keys)."""


def _result_problem(r) -> str | None:
    if not isinstance(r, dict):
        return "not a JSON object"
    if r.get("stage") == "burn_in" or "burn_in_teacher" in r:  # a burn-in has its teacher's numbers, no metrics
        return None
    metrics, primary = r.get("metrics"), r.get("primary_model")
    if not isinstance(metrics, dict) or not isinstance(primary, str) or not isinstance(metrics.get(primary), dict):
        return "no metrics of its primary model"
    return None


def read_result(path: Path) -> dict:
    """A cell's result.json; `CorruptFile` naming the file and the fix if it cannot be used."""
    path = Path(path)
    try:
        r = json.loads(path.read_text())
        problem = _result_problem(r)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        problem = f"{type(e).__name__}: {e}"
    if problem is not None:
        raise CorruptFile(f"{path} is unreadable ({problem}); the cell counts as not done and reruns "
                          "(`bench clean --corrupt` removes it)")
    return r


def done_result(path: Path) -> dict | None:
    """The result of a done cell, or None when `path` is missing or unreadable (not done)."""
    try:
        return read_result(path)
    except CorruptFile:
        return None


def result_ok(path: Path) -> bool:
    """A readable result.json: the cell is done."""
    return done_result(path) is not None


def run_dirs(home: Path) -> list["RunDir"]:
    """Every run directory under HOME/runs, in key order."""
    return [RunDir(d) for d in sorted((Path(home) / "runs").glob("*/*"))]


class RunDir:
    """One cell's run directory: its files (config.yaml, result.json, failed.json, lock, checkpoints/,
    mlflow_run_id), its status and its config writer. Path-like: `os.fspath`, `str` and `/` give
    what the directory's Path gives."""

    SUMMARY_FIELDS = ("key", "method", "lsm", "preset", "ratio", "seed", "status", "AP", "problems")

    def __init__(self, path: Path | str):
        self.path = Path(path)

    @classmethod
    def of(cls, home: Path, key: str) -> "RunDir":
        return cls(run_dir(home, key))

    def __fspath__(self) -> str:
        return str(self.path)

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    def __str__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __eq__(self, other) -> bool:
        return isinstance(other, RunDir) and other.path == self.path

    def __hash__(self) -> int:
        return hash(self.path)

    @property
    def key(self) -> str:
        return self.path.name

    config_file = property(lambda self: self.path / "config.yaml")
    result_file = property(lambda self: self.path / "result.json")
    failed_file = property(lambda self: self.path / "failed.json")
    lock_file = property(lambda self: self.path / "lock")
    checkpoints = property(lambda self: self.path / "checkpoints")
    mlflow_run_id_file = property(lambda self: self.path / "mlflow_run_id")

    def status(self) -> str:
        """done | corrupt (a result.json that cannot be read: not done) | failed | running (a worker
        holds the cell's lock) | partial (a checkpoint to resume from) | pending."""
        import fcntl

        if self.result_file.exists():
            return "done" if result_ok(self.result_file) else "corrupt"
        if self.failed_file.exists():
            return "failed"
        if self.lock_file.exists():
            with self.lock_file.open("a") as lock:
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    fcntl.flock(lock, fcntl.LOCK_UN)
                except BlockingIOError:
                    return "running"
        if (self.checkpoints / "last_checkpoint").exists():
            return "partial"
        return "pending"

    def result(self) -> dict:
        """result.json; `CorruptFile` if it cannot be used."""
        return read_result(self.result_file)

    def done_result(self) -> dict | None:
        return done_result(self.result_file)

    def error(self) -> str:
        """The error failed.json records."""
        return json.loads(self.failed_file.read_text())["error"]

    def record_failure(self, error: str, traceback: str = "") -> None:
        """failed.json, unless the cell already has one or is done."""
        if not self.failed_file.exists() and not self.result_file.exists():
            self.path.mkdir(parents=True, exist_ok=True)
            self.failed_file.write_text(json.dumps({"error": error, "traceback": traceback}))

    def config(self) -> dict:
        """config.yaml as written (yaml's errors, or whatever a hand edit left, pass up to the caller)."""
        import yaml

        return yaml.safe_load(self.config_file.read_text())

    def write_config(self, cfg) -> Path:
        """The cell's config.yaml (a RunConfig, dumped as `core.config.dump_config` writes it)."""
        from core.config import dump_config

        self.path.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(dump_config(cfg))
        return self.config_file

    def unreadable(self) -> bool:
        """A result.json or config.yaml that cannot be read (`bench clean --corrupt` removes the directory)."""
        if self.status() == "corrupt":
            return True
        try:
            return self.config_file.exists() and not isinstance(self.config(), dict)
        except Exception:
            return True

    def summary(self) -> dict:
        """What `bench status` lists: key, method, lsm, preset, ratio, seed, status, AP of the reported
        model (None if none), and `problems`: why the directory counts as corrupt."""
        state, ap, problems = self.status(), None, []
        try:
            cfg = self.config()
            row = {"method": cfg["method"] + (":burn-in" if cfg.get("stage") == "burn_in" else ""),
                   "lsm": bool(cfg["lsm"]["enabled"]), "preset": cfg["preset"], "ratio": cfg["data"]["ratio"],
                   "seed": cfg["seed"]}
        except Exception as err:  # a truncated or hand-edited config.yaml: named, the other runs still listed
            state, row = "corrupt", dict.fromkeys(("method", "lsm", "preset", "ratio", "seed"))
            problems.append(f"{self.config_file} is unreadable ({type(err).__name__}); `bench clean --corrupt` "
                            "removes the run directory")
        if self.result_file.exists():
            try:
                r = self.result()
            except CorruptFile as err:
                problems.append(str(err))
            else:
                if state == "done" and "metrics" in r:  # a burn-in cell has a checkpoint, no metrics
                    ap = r["metrics"][r["primary_model"]].get("AP", float("nan"))
        return {"key": self.key, **row, "status": state, "AP": ap, "problems": problems}


def remove_runs(home: Path, *, failed: bool = False, corrupt: bool = False, all_: bool = False) -> int:
    """Remove the failed run directories, the unreadable ones, or all; returns how many went."""
    import shutil

    if not (failed or corrupt or all_):
        raise BenchError("say what to remove: --failed, --corrupt or --all")
    removed = 0
    for d in run_dirs(home):
        if all_ or (failed and d.failed_file.exists()) or (corrupt and d.unreadable()):
            shutil.rmtree(d.path)
            removed += 1
    return removed
