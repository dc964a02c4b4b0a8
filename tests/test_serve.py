"""`bench serve mlflow|optuna`: a project's tracking services, on loopback unless told otherwise."""

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.studies.test_storage_postgres import postgres_url  # noqa: F401  (a fixture)


def _env(home):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return {**env, "BENCH_HOME": str(home), "COLUMNS": "200"}


def _bench(*args, home, timeout=120):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          env=_env(home), timeout=timeout)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4 addresses with a listening socket on `port` (from /proc/net/tcp)."""
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        local, state = line.split()[1], line.split()[3]
        addr, p = local.split(":")
        if int(p, 16) == port and state == "0A":
            found.add(socket.inet_ntoa(bytes.fromhex(addr)[::-1]))
    return found


def _start(args, home, until: str, timeout=120):
    """`bench serve ...` in the background; returns (process, stdout so far) once `until` is printed."""
    import threading

    proc = subprocess.Popen([sys.executable, "-m", "bench.cli", "serve", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(home))
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    deadline = time.time() + timeout
    while until not in "".join(lines):
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"bench serve did not print {until!r}: {''.join(lines)}{proc.stderr.read()}")
        time.sleep(0.2)
    return proc, "".join(lines)


def _interrupt(proc) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:  # never leave a server behind
        proc.kill()
        raise


def test_serve_mlflow_on_loopback_logs_runs_and_serves_artifacts(tmp_path):
    import mlflow

    port = _free_port()
    proc, out = _start(["mlflow", "--port", str(port), "--home", str(tmp_path)], tmp_path, "Ctrl-C stops it")
    try:
        url = f"http://127.0.0.1:{port}"
        assert f"export MLFLOW_TRACKING_URI={url}" in out
        assert _listening_addresses(port) == {"127.0.0.1"}  # never 0.0.0.0 by default
        client = mlflow.MlflowClient(tracking_uri=url)
        exp = client.create_experiment("served")
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "AP", 1.25)
        note = tmp_path / "note.txt"
        note.write_text("through the server")
        client.log_artifact(run.info.run_id, str(note))  # uploaded over HTTP (served artifacts)
        client.set_terminated(run.info.run_id)
    finally:
        assert _interrupt(proc) == 0
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0  # stopped with bench serve
    stored = mlflow.MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert stored.get_metric_history(run.info.run_id, "AP")[0].value == 1.25
    assert [p.read_text() for p in (tmp_path / "mlartifacts").rglob("note.txt")] == ["through the server"]


def test_serve_mlflow_on_postgresql(tmp_path, postgres_url):  # noqa: F811
    import mlflow

    port = _free_port()
    args = ["mlflow", "--port", str(port), "--backend-store", postgres_url, "--home", str(tmp_path)]
    proc, out = _start(args, tmp_path, "Ctrl-C stops it", timeout=180)
    try:
        client = mlflow.MlflowClient(tracking_uri=f"http://127.0.0.1:{port}")
        run = client.create_run(client.create_experiment("pg"))
        client.log_metric(run.info.run_id, "AP", 2.5)
    finally:
        assert _interrupt(proc) == 0
    assert not (tmp_path / "mlflow.db").exists()  # the runs went to PostgreSQL
    direct = mlflow.MlflowClient(tracking_uri=postgres_url)
    assert direct.get_metric_history(run.info.run_id, "AP")[0].value == 2.5


def test_serve_optuna_checks_the_storage_and_prints_how_to_use_it(tmp_path, postgres_url):  # noqa: F811
    out = _bench("serve", "optuna", "--backend-store", postgres_url, "--no-dashboard", home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Optuna storage: postgresql+psycopg://bench@127.0.0.1" in out.stdout and "(0 studies)" in out.stdout
    assert f"--storage '{postgres_url}'" in out.stdout


def test_serve_optuna_dashboard_on_the_journal(tmp_path):
    pytest.importorskip("optuna_dashboard", reason="the dashboard extra is not installed")
    import urllib.request

    port = _free_port()
    proc, out = _start(["optuna", "--port", str(port), "--home", str(tmp_path)], tmp_path, "optuna-dashboard:")
    try:
        assert str((tmp_path / "optuna" / "journal.log").resolve()) in out
        deadline = time.time() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    assert r.status == 200
                    break
            except OSError:
                assert time.time() < deadline, "optuna-dashboard did not answer"
                time.sleep(0.3)
        assert _listening_addresses(port) == {"127.0.0.1"}
    finally:
        assert _interrupt(proc) == 0


@pytest.mark.parametrize("args, message", [
    (["serve", "tensorboard"], "unknown service 'tensorboard'; use `bench serve mlflow` or `bench serve optuna`"),
    (["serve", "optuna", "--backend-store", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--no-dashboard"],
     "storage postgresql+psycopg://nobody@127.0.0.1:1/none: cannot connect"),
    (["serve", "mlflow", "--backend-store", "postgresql+psycopg://nobody:secret@127.0.0.1:1/none"],
     "--backend-store postgresql+psycopg://nobody:***@127.0.0.1:1/none: cannot connect"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    import importlib.util

    if "postgresql" in " ".join(args) and importlib.util.find_spec("psycopg") is None:
        # an install without the `postgres` extra: the same one-line refusal names the missing driver
        message = message.split(": cannot connect")[0] + ": the database driver is missing"
    out = _bench(*args, home=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "secret" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr


def test_a_public_host_is_warned_about_and_a_busy_port_refused(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = _bench("serve", "mlflow", "--host", "0.0.0.0", "--port", str(port), home=tmp_path)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert re.search(r"warning: listening on 0\.0\.0\.0", lines[0]) and "access control" in out.stderr
    assert f"cannot listen on 0.0.0.0:{port}" in lines[-1] and "another --port" in lines[-1]
