"""`bench ui`: the MLflow UI and optuna-dashboard on 127.0.0.1, pointed at the suite's stores.

MLflow runs as `mlflow server` with the absolute sqlite path of BENCH_HOME (never a database in
the current directory) and the home's artifact folder; optuna-dashboard (the `dashboard` extra)
serves the journal file or RDB URL of the studies. Both are child processes of `bench ui`; starting,
waiting for and stopping them is bench/serve.py's. `serve_optuna` is `bench serve optuna`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional

from rich.console import Console

from bench import tracking
from bench.serve import HOST, Service, check_port, hide_password, spawn, stop, wait
from core.errors import BenchError
from studies.storage import default_url

console = Console()


def dashboard_available() -> bool:
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        return False
    return True


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
            check_port(port, "MLflow", "--port")
            services.append(Service("MLflow", f"http://{HOST}:{port}",
                                    tracking.spawn_mlflow_server(home, port, log_dir / "mlflow.log")))
        if dashboard:
            if not dashboard_available():
                raise BenchError("optuna-dashboard is not installed; pip install 'lsm-bench[dashboard]' "
                                 "or pass --no-dashboard")
            check_port(dashboard_port, "optuna-dashboard", "--dashboard-port")
            cmd = [sys.executable, "-m", "studies.ui", "--storage", storage_url or default_url(home),
                   "--home", str(home), "--port", str(dashboard_port)]
            services.append(Service("optuna-dashboard", f"http://{HOST}:{dashboard_port}",
                                    spawn(cmd, log_dir / "optuna-dashboard.log")))
        deadline = time.time() + timeout
        for s in services:
            wait(s, deadline, log_dir)
    except BaseException:
        stop(services)
        raise
    return services


def run_dashboard(storage, host: str, port: int) -> None:
    """optuna-dashboard's WSGI app on wsgiref until SIGINT or SIGTERM. Not its `run_server`: wsgiref's
    request handler catches everything, KeyboardInterrupt included, so a Ctrl-C that lands while a
    request is being finished was swallowed and the server kept running. Here the signal only asks
    the serving loop to stop, from another thread, and it stops within its poll interval."""
    import signal
    import threading
    from wsgiref.simple_server import WSGIRequestHandler, make_server

    from optuna_dashboard import wsgi

    class QuietHandler(WSGIRequestHandler):
        def log_message(self, *args):  # no line per request on the terminal
            pass

    with make_server(host, port, wsgi(storage), handler_class=QuietHandler) as server:
        def stop(signum, frame):
            threading.Thread(target=server.shutdown, daemon=True).start()

        previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)


def _serve_dashboard(argv: list[str] | None = None) -> None:
    """Child process: optuna-dashboard on the suite's storage (journal files need the Python API)."""
    import argparse

    from studies.storage import open_storage

    ap = argparse.ArgumentParser(prog="studies.ui")
    ap.add_argument("--storage", required=True)
    ap.add_argument("--home", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    run_dashboard(open_storage(args.home, args.storage), HOST, args.port)


def serve_optuna(home: Path, backend_store: Optional[str], host: str, public: str, port: int,
                 dashboard: bool) -> None:
    """`bench serve optuna`: connect to the studies' storage (creating its tables), print the --storage
    value for `bench study ...`, then serve optuna-dashboard over it until Ctrl-C."""
    from studies.storage import is_rdb, open_storage

    url = backend_store or default_url(home)
    storage = open_storage(home, url)  # a BenchError naming the fix if the database is not reachable
    shown = hide_password(url)
    console.print(f"Optuna storage: {shown} ({len(storage.get_all_studies())} studies)", markup=False, highlight=False)
    if not is_rdb(url):
        console.print("[dim]a journal file: every worker must see it on the shared filesystem; for workers on "
                      "several nodes a PostgreSQL URL (--backend-store postgresql+psycopg://...) adds "
                      "heartbeats[/dim]")
    console.print("studies use it with:")
    console.print(f"bench study figure5 --storage '{shown}'", markup=False, highlight=False, soft_wrap=True)
    if not dashboard:
        return
    if not dashboard_available():
        raise BenchError("optuna-dashboard is not installed; pip install 'lsm-bench[dashboard]' or pass --no-dashboard")
    console.print(f"optuna-dashboard: http://{public}:{port}  (Ctrl-C stops it)", markup=False, highlight=False)
    run_dashboard(storage, host, port)


if __name__ == "__main__":
    _serve_dashboard()
