"""Tracking and processes (issue 19, items 6, 7, 12): MLflow never fails a cell, two first uses of a
store do not collide, `bench ui` stops its servers on SIGTERM and SIGINT, --debug shows tracebacks."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


# -- item 7: MLflow errors never fail a cell -----------------------------------------------------------
@pytest.mark.parametrize("broken", ["create_run", "log_batch"])
def test_a_tracking_outage_does_not_fail_the_cell(tmp_path, tiny, monkeypatch, capfd, broken):
    """The store refuses writes (read-only or deleted mlflow.db) at the run's start or mid-run: the
    cell trains to the same result as untracked, with one warning, its losses in metrics.jsonl."""
    import sqlite3

    import mlflow

    import bench.tracking
    from core.config import load_config
    from bench.worker import run_cell

    cfg = load_config("demo", tiny, method="supervised")
    reference = run_cell(cfg, tmp_path / "untracked", track=False, progress=False)

    real = getattr(mlflow.MlflowClient, broken)
    calls = []

    def fails(self, *a, **k):  # the first call works (params), then the database is gone
        calls.append(1)
        if broken == "create_run" or len(calls) > 1:
            raise sqlite3.OperationalError("attempt to write a readonly database")
        return real(self, *a, **k)

    monkeypatch.setattr(mlflow.MlflowClient, broken, fails)
    monkeypatch.setattr(bench.tracking, "_warned", False)
    capfd.readouterr()
    result = run_cell(cfg, tmp_path / "tracked", track=True, progress=False)
    err = capfd.readouterr().err
    assert err.count("warning: MLflow tracking failed (OperationalError: attempt to write a readonly database)") == 1
    assert json.dumps(result["metrics"], sort_keys=True) == json.dumps(reference["metrics"], sort_keys=True)
    rdir = next((tmp_path / "tracked").glob("runs/*/*"))
    losses = [json.loads(line) for line in (rdir / "metrics.jsonl").read_text().splitlines() if "total_loss" in line]
    assert len(losses) == cfg.solver.max_iter // cfg.solver.log_period


# -- item 6: two first uses of a fresh store at once -----------------------------------------------------
RACE = """
import sys, time
from pathlib import Path
import mlflow.store.tracking.sqlalchemy_store  # imported before the start line
from bench import tracking
home, start = Path(sys.argv[1]), float(sys.argv[2])
while time.time() < start:
    time.sleep(0.001)
t = tracking.Tracker(home)
print("ok" if t.enabled and t.start("r", {}, {}) else "disabled")
"""


def test_concurrent_first_uses_of_a_fresh_store_all_work(tmp_path):
    """Four processes open a fresh store at the same instant (two `bench run` on a new BENCH_HOME):
    the schema is created once, under a lock, and each process logs (no `duplicate column name`)."""
    script = tmp_path / "race.py"
    script.write_text(RACE)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    start = time.time() + 20  # after every interpreter has imported mlflow
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path / "home"), str(start)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [o.strip().splitlines()[-1] if o.strip() else e[-500:] for o, e in outs] == ["ok"] * 4
    assert "warning" not in "".join(e for _, e in outs)


# -- item 12: `bench ui` stops its servers on SIGTERM, and on SIGINT when started in the background ------
UI = """
import subprocess, sys
from pathlib import Path
import studies.ui as ui
import bench.cli

PID_FILE, HOME = sys.argv[1], sys.argv[2]


def start(home, *args, **kwargs):  # a server in its own process group, as the real ones
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    Path(PID_FILE).write_text(str(proc.pid))
    return [ui.Service("MLflow", "http://127.0.0.1:1", proc)]

ui.start = start
sys.argv = ["bench", "ui", "--no-dashboard", "--home", HOME]
bench.cli.main()
"""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:  # a zombie (exited, not reaped by its parent yet) is gone
        return f.read().split()[2] != "Z"


# Ctrl-C is how `bench ui` is meant to end (exit 0); SIGTERM ends it as terminated (143)
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 0)])
def test_ui_stops_its_servers_on_sigterm_and_a_background_sigint(tmp_path, sig, code):
    script = tmp_path / "ui.py"
    script.write_text(UI)
    pid_file = tmp_path / "server.pid"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    # started as a shell starts a background job: SIGINT ignored
    proc = subprocess.Popen([sys.executable, str(script), str(pid_file), str(tmp_path / "home")], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:
            if "Ctrl-C stops the servers" in line:
                break
        else:
            pytest.fail(proc.stderr.read())
        server = int(pid_file.read_text())
        assert _alive(server)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == code, err
        assert "Traceback" not in err
        deadline = time.time() + 20
        while _alive(server) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(server)
    finally:  # nothing of a failed test left running
        if proc.poll() is None:
            proc.kill()
        if pid_file.exists() and _alive(int(pid_file.read_text())):
            os.killpg(int(pid_file.read_text()), signal.SIGKILL)


# -- --debug / BENCH_DEBUG=1 ---------------------------------------------------------------------------
def test_tracebacks_only_with_debug(tmp_path, monkeypatch, capsys):
    from tests.test_errors import cli

    code, _, err = cli(monkeypatch, capsys, "plan", "nope", home=tmp_path)
    assert code == 2 and err.strip() == "error: unknown table 'nope'; known tables: " + err.split("known tables: ")[1].strip()
    code, _, err = cli(monkeypatch, capsys, "plan", "nope", "--debug", home=tmp_path)
    assert code == 2 and "Traceback" in err and "BenchError: unknown table 'nope'" in err
    monkeypatch.setenv("BENCH_DEBUG", "1")
    code, _, err = cli(monkeypatch, capsys, "plan", "nope", home=tmp_path)
    assert code == 2 and "Traceback" in err
    monkeypatch.delenv("BENCH_DEBUG")

    def bug(*_, **__):
        raise ZeroDivisionError("division by zero")

    monkeypatch.setattr("bench.specs.load_spec", bug)
    code, _, err = cli(monkeypatch, capsys, "plan", "table1", home=tmp_path)
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "internal error (ZeroDivisionError: division by zero); rerun with --debug" in err
    with pytest.raises(ZeroDivisionError):
        cli(monkeypatch, capsys, "plan", "table1", "--debug", home=tmp_path)

    # click turns an EOFError into a silent Abort (exit 1, no message): it is reported like any bug
    def cut_short(*_, **__):
        raise EOFError("Ran out of input")

    monkeypatch.setattr("bench.specs.load_spec", cut_short)
    code, _, err = cli(monkeypatch, capsys, "plan", "table1", home=tmp_path)
    assert code == 1 and err.strip() == ("error: internal error (EOFError: Ran out of input); rerun with --debug "
                                         "(or BENCH_DEBUG=1) for the traceback and report it")
    with pytest.raises(EOFError):
        cli(monkeypatch, capsys, "plan", "table1", "--debug", home=tmp_path)
