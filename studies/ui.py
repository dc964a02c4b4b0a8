"""`bench ui`: the MLflow UI and optuna-dashboard on 127.0.0.1, pointed at the suite's stores.

MLflow runs as `mlflow server` with the absolute sqlite path of BENCH_HOME (never a database in
the current directory) and the home's artifact folder; optuna-dashboard (the `dashboard` extra)
serves the journal file or RDB URL of the studies. Both are child processes of `bench ui`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from bench import tracking
from core.errors import BenchError
from studies.storage import default_url

HOST = "127.0.0.1"


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen | None  # None: an MLflow server the environment already points at


def dashboard_available() -> bool:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return False
    return True


def _check_port(port: int, what: str, option: str) -> None:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
        try:
            s.bind((HOST, port))
        except OSError:
            raise BenchError(f"port {port} on {HOST} is in use; pass another {option} for {what}") from None


def start(home: Path, storage_url: str | None = None, port: int = 5000, dashboard_port: int = 8080,
          dashboard: bool = True, timeout: float = 90.0, log_dir: Path | None = None) -> list[Service]:
    """Start the servers, wait until they answer HTTP, return them (callers stop them with `stop`)."""
    home = Path(home).resolve()
    uri = tracking.tracking_uri(home)
    log_dir = Path(log_dir or home / "ui")
    log_dir.mkdir(parents=True, exist_ok=True)
    services: list[Service] = []
    try:
        if uri.startswith("http"):
            services.append(Service("MLflow", uri, None))
        else:
            _check_port(port, "MLflow", "--port")
            services.append(Service("MLflow", f"http://{HOST}:{port}",
                                    tracking.spawn_mlflow_server(home, port, log_dir / "mlflow.log")))
        if dashboard:
            if not dashboard_available():
                raise BenchError("optuna-dashboard is not installed; pip install 'lsm-bench[dashboard]' "
                                 "or pass --no-dashboard")
            _check_port(dashboard_port, "optuna-dashboard", "--dashboard-port")
            cmd = [sys.executable, "-m", "studies.ui", "--storage", storage_url or default_url(home),
                   "--home", str(home), "--port", str(dashboard_port)]
            services.append(Service("optuna-dashboard", f"http://{HOST}:{dashboard_port}",
                                    _spawn(cmd, log_dir / "optuna-dashboard.log")))
        deadline = time.time() + timeout
        for s in services:
            _wait(s, deadline, log_dir)
    except BaseException:
        stop(services)
        raise
    return services


def stop(services: list[Service]) -> None:
    """SIGTERM to each server's own process group (mlflow server's workers included), then wait."""
    import os
    import signal

    for s in services:
        if s.process is not None and s.process.poll() is None:
            os.killpg(s.process.pid, signal.SIGTERM)
    for s in services:
        if s.process is not None:
            try:
                s.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(s.process.pid, signal.SIGKILL)
                s.process.wait()


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as f:
        # its own process group: the mlflow server's uvicorn workers stop with it
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _wait(s: Service, deadline: float, log_dir: Path) -> None:
    while time.time() < deadline:
        if s.process is not None and s.process.poll() is not None:
            raise BenchError(f"{s.name} exited at start (code {s.process.returncode}); see {log_dir}")
        try:
            with urllib.request.urlopen(s.url, timeout=2) as r:
                if r.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise BenchError(f"{s.name} did not answer on {s.url} in time; see {log_dir}")


def _serve_dashboard(argv: list[str] | None = None) -> None:
    """Child process: optuna-dashboard on the suite's storage (journal files need the Python API)."""
    import argparse

    from optuna_dashboard import run_server

    from studies.storage import open_storage

    ap = argparse.ArgumentParser(prog="studies.ui")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    run_server(open_storage(args.home, args.storage), host=HOST, port=args.port)


if __name__ == "__main__":
    _serve_dashboard()
