"""MLflow tracking: where runs go and what every run records.

Tracking URI: `MLFLOW_TRACKING_URI` if set, else `sqlite:///<BENCH_HOME>/mlflow.db`. Each training
run logs params = the flattened config, tags (method, lsm, preset, dataset, ratio, seed, git sha,
package versions), metrics per step and per evaluation, and artifacts (config.yaml, result.json).
"""

from __future__ import annotations

import os
import subprocess
from importlib import metadata
from pathlib import Path

from core.errors import first_line

EXPERIMENT = "lsm-bench"


def tracking_uri(home: Path) -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path(home).resolve() / 'mlflow.db'}"


def git_sha() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).parent, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for pkg in ("torch", "torchvision", "lsm-bench", "faster-coco-eval", "mlflow"):
        try:
            out[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[f"version.{pkg}"] = "not installed"
    return out


def cell_label(cfg) -> str:
    """ubteacher+lsm, supervised, ubteacher:burn-in ..."""
    return cfg.method + ("+lsm" if cfg.lsm.enabled else "") + (":burn-in" if cfg.stage == "burn_in" else "")


def run_name(cfg) -> str:
    """A cell's run name (`bench run` renames it after the table's row label)."""
    return f"{cell_label(cfg)} {cfg.data.ratio:g}% seed {cfg.seed}"


def run_tags(cfg, key: str, split_sha256: str) -> dict[str, str]:
    """A cell run's tags; here, not in the worker, because `bench sync` logs missed runs with the same."""
    return {
        "method": cfg.method, "stage": cfg.stage, "lsm": str(cfg.lsm.enabled).lower(), "preset": cfg.preset,
        "dataset": cfg.data.dataset, "setting": cfg.data.setting, "ratio": f"{cfg.data.ratio:g}",
        "fold": str(cfg.data.fold), "seed": str(cfg.seed), "cell_key": key, "git_sha": git_sha(),
        "split_sha256": split_sha256, **package_versions(),
    }


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = str(v)
    return out


_warned = False


def _warn_once(err: BaseException) -> None:
    """The first tracking failure of a process, as one line on stderr (a cell's log); later ones are silent."""
    global _warned
    if not _warned:
        import sys

        first = first_line(err)
        print(f"warning: MLflow tracking failed ({type(err).__name__}: {first}); training goes on without it, "
              "its metrics stay in the cell's metrics.jsonl", file=sys.stderr, flush=True)
        _warned = True


class StoreError(Exception):
    """An MLflow error of a strict Tracker, as one line (its type and first line)."""


def _tolerant(method):
    """A Tracker method that never fails its caller: an MLflow error turns the tracker off (warned once)."""
    import functools

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return method(self, *args, **kwargs)
        except Exception as err:  # sqlite (read-only, deleted, locked), HTTP, MLflow's own errors
            self.enabled = False
            if self.strict:  # `bench sync`: the store being down is what it reports
                first = first_line(err)
                raise StoreError(f"{type(err).__name__}: {first}") from err
            _warn_once(err)
            return None

    return wrapper


class Tracker:
    """One MLflow run. Methods are no-ops when `enabled` is False (tests, dry runs), and turn it off
    on an MLflow error: a cell's result never depends on the tracking store (docs/errors.md).
    A `strict` tracker raises MLflow's errors instead (bench/sync.py reports them)."""

    def __init__(self, home: Path, enabled: bool = True, strict: bool = False):
        self.enabled = enabled
        self.strict = strict
        self.home = Path(home)
        self.run_id: str | None = None
        self._client = None
        self.experiment_id: str | None = None
        self._connect()

    @_tolerant
    def _connect(self) -> None:
        import logging

        import mlflow

        for name in ("mlflow", "alembic"):  # schema-creation chatter on a new database
            logging.getLogger(name).setLevel(logging.WARNING)
        uri = tracking_uri(self.home)
        # The first use of a sqlite store creates and migrates its schema: two processes doing that at
        # once collide (`duplicate column name`), so the first use is serialised by a file lock.
        with _store_lock(uri):
            self._client = mlflow.MlflowClient(tracking_uri=uri)
            exp = self._client.get_experiment_by_name(EXPERIMENT)
            if exp is None:  # artifacts beside the database, not in the current directory
                artifacts = (self.home / "mlartifacts").resolve().as_uri()
                self.experiment_id = self._client.create_experiment(EXPERIMENT, artifact_location=artifacts)
            else:
                self.experiment_id = exp.experiment_id

    @_tolerant
    def start(self, run_name: str, tags: dict[str, str], params: dict[str, str],
              parent_run_id: str | None = None, run_id: str | None = None) -> str | None:
        """Start a run, or continue `run_id` (a resumed cell keeps its MLflow run)."""
        if run_id is not None:
            self.run_id = run_id
            self._client.update_run(run_id, status="RUNNING")
            return run_id
        tags = dict(tags)
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self._client.create_run(self.experiment_id, run_name=run_name, tags=tags)
        self.run_id = run.info.run_id
        from mlflow.entities import Param

        items = [Param(k, v[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self._client.log_batch(self.run_id, params=items[i:i + 100])
        return self.run_id

    @_tolerant
    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if self.run_id is None:
            return
        import time as _time

        from mlflow.entities import Metric

        ts = int(_time.time() * 1000)
        items = [Metric(k.replace("/", "."), float(v), ts, step) for k, v in metrics.items()
                 if isinstance(v, (int, float))]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i:i + 500])

    @_tolerant
    def log_history(self, rows: list[dict]) -> None:
        """metrics.jsonl's rows (`iteration` + scalars) at their steps, in few batches (bench/sync.py)."""
        import time as _time

        from mlflow.entities import Metric

        ts = int(_time.time() * 1000)
        items = [Metric(k.replace("/", "."), float(v), ts, int(row["iteration"])) for row in rows
                 for k, v in row.items() if k != "iteration" and isinstance(v, (int, float))]
        for i in range(0, len(items), 500):
            self._client.log_batch(self.run_id, metrics=items[i:i + 500])

    @_tolerant
    def existing_runs(self, run_ids: list[str]) -> set[str]:
        """Which of `run_ids` this store has (deleted ones too): one query per 500 ids."""
        from mlflow.entities import ViewType

        found = set()
        for i in range(0, len(run_ids), 500):
            chunk = run_ids[i:i + 500]
            runs = self._client.search_runs([self.experiment_id], "attributes.run_id IN ("
                                            + ",".join(f"'{r}'" for r in chunk) + ")",
                                            run_view_type=ViewType.ALL, max_results=len(chunk))
            found.update(r.info.run_id for r in runs)
        return found

    @_tolerant
    def set_tags(self, tags: dict[str, str]) -> None:
        if self.enabled and self.run_id:
            for k, v in tags.items():
                self._client.set_tag(self.run_id, k, v)

    @_tolerant
    def rename_run(self, run_id: str, name: str) -> bool:
        """Rename another run of this store (a table's child cell); False when the store has no such
        run (a cell imported with `bench import` was tracked elsewhere)."""
        from mlflow.exceptions import MlflowException

        try:
            self._client.get_run(run_id)
        except MlflowException:
            return False
        self._client.set_tag(run_id, "mlflow.runName", name)
        return True

    @_tolerant
    def log_artifact(self, path: Path) -> None:
        if self.enabled and self.run_id:
            self._client.log_artifact(self.run_id, str(path))

    @_tolerant
    def end(self, status: str = "FINISHED") -> None:
        if self.enabled and self.run_id:
            self._client.set_terminated(self.run_id, status=status)

    def discard(self) -> None:
        """Delete the current run, if the store still answers (a half-logged run is worse than none)."""
        import contextlib

        with contextlib.suppress(Exception):
            self._client.delete_run(self.run_id)


def _store_lock(uri: str):
    """An exclusive lock beside a sqlite store (mlflow.db.lock) while it is opened; nothing for servers."""
    import contextlib

    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def locked():
        import fcntl

        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        with open(db.with_name(db.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    return locked()


# SQLite serialises writers; beyond this many worker processes logging at once, `bench run` puts
# an `mlflow server` in front of the same database (one writer, workers talk HTTP to it).
SQLITE_MAX_WORKERS = 4


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_mlflow_server(home: Path, port: int, log: Path, *, host: str = "127.0.0.1", backend_store: str | None = None,
                        serve_artifacts: bool = False) -> subprocess.Popen:
    """`mlflow server` on host:port (loopback unless the caller says otherwise) over BENCH_HOME's
    sqlite store or `backend_store`, in its own process group (stop it with os.killpg: its uvicorn
    workers go with it).

    Artifacts live under BENCH_HOME/mlartifacts either way; with `serve_artifacts` the server also
    proxies them (clients without the shared filesystem upload and download over HTTP)."""
    import sys

    home = Path(home).resolve()
    artifacts = (home / "mlartifacts").as_uri()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", host, "--port", str(port),
           "--backend-store-uri", backend_store or f"sqlite:///{home / 'mlflow.db'}", "--workers", "1"]
    if serve_artifacts:
        cmd += ["--serve-artifacts", "--artifacts-destination", artifacts]
    else:
        cmd += ["--default-artifact-root", artifacts]
    if host not in ("127.0.0.1", "localhost", "::1"):
        # MLflow's security middleware answers only Host headers it knows (localhost, private IPs):
        # add this machine's names, as the workers will write them in MLFLOW_TRACKING_URI
        import socket

        from mlflow.server.security_utils import get_default_allowed_hosts

        names = sorted({host, socket.gethostname(), socket.getfqdn()} - {"0.0.0.0", "::"})
        cmd += ["--allowed-hosts", ",".join(get_default_allowed_hosts() + names + [f"{n}:*" for n in names])]
    # the server's job runner (a pool of huey consumers, for GenAI jobs) is not needed to log runs
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with Path(log).open("a") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


class LocalServer:
    """`mlflow server` on 127.0.0.1 over BENCH_HOME's store, for the duration of a `with` block.

    Inside the block MLFLOW_TRACKING_URI points at it, so worker subprocesses (which inherit the
    environment) log through it; afterwards the variable is restored and the server stopped.
    """

    def __init__(self, home: Path, port: int | None = None, timeout: float = 60.0):
        self.home = Path(home).resolve()
        self.port = port or free_port()
        self.timeout = timeout
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None
        self._previous: str | None = None

    def __enter__(self) -> "LocalServer":
        import time
        import urllib.request

        self.home.mkdir(parents=True, exist_ok=True)
        self._process = spawn_mlflow_server(self.home, self.port, self.home / "mlflow-server.log")
        deadline = time.time() + self.timeout
        while time.time() < deadline:
            if self._process.poll() is not None:
                raise RuntimeError(f"mlflow server exited with code {self._process.returncode}; "
                                   f"see {self.home / 'mlflow-server.log'}")
            try:
                urllib.request.urlopen(f"{self.url}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        else:
            self.__exit__(None, None, None)
            raise RuntimeError(f"mlflow server did not answer on {self.url} within {self.timeout:.0f} s")
        self._previous = os.environ.get("MLFLOW_TRACKING_URI")
        os.environ["MLFLOW_TRACKING_URI"] = self.url
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = self._previous
        if self._process is not None and self._process.poll() is None:
            import signal

            os.killpg(self._process.pid, signal.SIGTERM)  # mlflow server runs gunicorn/uvicorn children
            try:
                self._process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self._process.pid, signal.SIGKILL)
