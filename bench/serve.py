"""Services: server processes started, waited for and stopped (`bench ui`, `bench serve`), and
`bench serve mlflow`, a project's tracking server for many workers (docs/cluster.md).

The Optuna side (its storage, optuna-dashboard) is in studies/ui.py, which uses the pieces here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from rich.console import Console
from rich.markup import escape

from bench import tracking
from core.errors import BenchError

HOST = "127.0.0.1"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
PORTS = {"mlflow": 5000, "optuna": 8080}
console = Console()
err_console = Console(stderr=True)


@dataclass
class Service:
    name: str
    url: str
    process: subprocess.Popen | None  # None: an MLflow server the environment already points at


def _bind_error(host: str, port: int) -> OSError | None:
    """Why a server could not listen on (host, port), or None when it can."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers do: TIME_WAIT is free
        try:
            s.bind((host, port))
        except OSError as err:
            return err
    return None


def check_port(port: int, what: str, option: str) -> None:
    """A port on 127.0.0.1 that a server can take; else one line naming the option to change."""
    if _bind_error(HOST, port) is not None:
        raise BenchError(f"port {port} on {HOST} is in use; pass another {option} for {what}")


def stop(services: list[Service]) -> None:
    """SIGTERM to each server's own process group (mlflow server's workers included), then wait."""
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


def spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    """A server process with the project importable, its output in `log`."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    with log.open("w") as f:
        # its own process group: the mlflow server's uvicorn workers stop with it
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def wait(s: Service, deadline: float, log_dir: Path) -> None:
    """Until the server answers HTTP on its URL; one line naming the logs if it exits or times out."""
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


def hide_password(url: str) -> str:
    """A database URL as printed: user and host, never the password."""
    if "://" not in url or url.startswith("sqlite"):
        return url
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def check_database(url: str, option: str) -> None:
    """Connect once, so that a wrong URL is one line here rather than a server that dies at start."""
    import sqlalchemy

    try:
        sqlalchemy.create_engine(url).connect().close()
    except ImportError as err:
        raise BenchError(f"{option} {hide_password(url)}: the database driver is missing ({err.name}); "
                         "pip install 'psycopg[binary]' for postgresql+psycopg:// URLs") from None
    except Exception as err:  # sqlalchemy's OperationalError, ArgumentError: a server that is not there, a bad URL
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BenchError(f"{option} {hide_password(url)}: cannot connect ({first}); check the URL and that "
                         "the server runs") from None


def listen_check(host: str, port: int) -> str:
    """Warn about an address other than loopback, refuse a port that is taken; returns the name that
    clients use (this machine's name where HOST listens on every address)."""
    if host not in LOOPBACK:
        err_console.print(f"[yellow]warning: listening on {escape(host)}: anyone who reaches this machine's port {port} can "
                          "read and write this project's runs; keep it behind the cluster's access control[/yellow]")
    if (err := _bind_error(host, port)) is not None:
        raise BenchError(f"cannot listen on {host}:{port} ({err.strerror}); pass another --port or --host")
    return socket.getfqdn() if host in ("0.0.0.0", "::") else host


def serve(service: str, home: Optional[Path], backend_store: Optional[str], host: str, port: Optional[int],
          dashboard: bool, serve_optuna: Callable[..., None]) -> None:
    """`bench serve SERVICE`: mlflow here; optuna through `serve_optuna` (studies/ui.py: it needs the
    studies' storage), called as serve_optuna(home, backend_store, host, public, port, dashboard)."""
    from bench.cli_common import resolve_home

    # Ctrl-C (SIGINT) stops the service even where it was started in the background by a shell,
    # which leaves SIGINT ignored (`nohup bench serve mlflow &`, then `kill -INT`)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if service not in PORTS:
        raise BenchError(f"unknown service '{service}'; use `bench serve mlflow` or `bench serve optuna`")
    home = resolve_home(home)
    port = port or PORTS[service]
    public = listen_check(host, port)
    if service == "mlflow":
        serve_mlflow(home, backend_store, host, public, port)
    else:
        serve_optuna(home, backend_store, host, public, port, dashboard)


def serve_mlflow(home: Path, backend_store: Optional[str], host: str, public: str, port: int) -> None:
    """`mlflow server` over the home's store (or `backend_store`), artifacts served, until Ctrl-C."""
    if backend_store and not backend_store.startswith("sqlite"):
        check_database(backend_store, "--backend-store")
    log_dir = home / "serve"
    log_dir.mkdir(parents=True, exist_ok=True)
    url = f"http://{public}:{port}"
    service = Service("mlflow server", url, tracking.spawn_mlflow_server(
        home, port, log_dir / "mlflow.log", host=host, backend_store=backend_store, serve_artifacts=True))
    try:
        wait(Service(service.name, f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}/health",
                     service.process), time.time() + 90, log_dir)
        store = backend_store or f"sqlite:///{home / 'mlflow.db'}"
        console.print(f"MLflow: {url}  (runs: {hide_password(store)}; artifacts: {home / 'mlartifacts'}; "
                      f"log: {log_dir / 'mlflow.log'})", markup=False, highlight=False)
        console.print("workers and `bench run` log through it after:")
        console.print(f"export MLFLOW_TRACKING_URI={url}", markup=False, highlight=False, soft_wrap=True)
        console.print("Ctrl-C stops it")
        while service.process.poll() is None:
            time.sleep(0.5)
        raise BenchError(f"mlflow server exited with code {service.process.returncode}; see {log_dir / 'mlflow.log'}")
    except KeyboardInterrupt:
        pass
    finally:
        stop([service])
