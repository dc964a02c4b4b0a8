"""Messages with square brackets print as written: rich reads `[dashboard]` or `[p3,p4]` as a style
tag and drops it unless the text is escaped or printed without markup (issue #22 item 2)."""

import io
import os
import subprocess
import sys
from types import SimpleNamespace

from rich.console import Console

from studies import cli as study_cli


def _capture(monkeypatch) -> io.StringIO:
    buf = io.StringIO()
    monkeypatch.setattr(study_cli, "console", Console(file=buf, width=300, force_terminal=False))
    return buf


def _bench(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "300", "OMP_NUM_THREADS": "1"}, cwd=cwd)


def test_ui_install_hint_keeps_the_extra(monkeypatch, tmp_path):
    from studies import ui

    buf = _capture(monkeypatch)
    done = SimpleNamespace(poll=lambda: 0)  # the server "exits" at once: ui returns
    monkeypatch.setattr(ui, "dashboard_available", lambda: False)
    monkeypatch.setattr(ui, "start", lambda *a, **k: [SimpleNamespace(name="mlflow ui", url="http://127.0.0.1:5000",
                                                                       process=done)])
    monkeypatch.setattr(ui, "stop", lambda services: None)
    study_cli.ui(port=5000, dashboard_port=8080, dashboard=True, storage=None, home=tmp_path)
    assert "optuna-dashboard is not installed (pip install 'lsm-bench[dashboard]'); starting MLflow only" in buf.getvalue()


def test_study_notes_and_results_keep_their_brackets(monkeypatch):
    """`bench study` prints the studies' notes (trial params such as pim_levels=[p3,p4]) through `say`,
    and the plan's notes through an escaped [dim] tag."""
    buf = _capture(monkeypatch)
    study_cli.say("trial 3 (pim_levels=[p3,p4], pim_weight=0.5) did not finish; queued again")
    study_cli.say("best trial 2: AP 12.30 with pim_levels=[p3], semi.t=0.7")
    from rich.markup import escape

    study_cli.console.print(f"[dim]{escape('column x: run it with data.aug.short_sizes=[a,b]')}[/dim]")
    out = buf.getvalue()
    assert "(pim_levels=[p3,p4], pim_weight=0.5)" in out and "pim_levels=[p3], semi.t=0.7" in out
    assert "data.aug.short_sizes=[a,b]" in out


def test_cli_paths_with_brackets_survive(tmp_path):
    """`bench report --all --out DIR` prints the index's path; a folder named with brackets stays whole."""
    out = tmp_path / "results[dashboard]"
    out.mkdir()
    (out / "notes[p3,p4].txt").write_text("x\n")
    proc = _bench("report", "--all", "--out", str(out), "--home", str(tmp_path / "home"))
    assert proc.returncode == 0, proc.stderr
    assert f"index: {out / 'index.html'}" in proc.stdout
    assert "notes[p3,p4].txt" in (out / "index.html").read_text()


def test_a_failed_cells_error_keeps_its_brackets(monkeypatch):
    """`bench run` names each failed cell with its error: the error text is escaped."""
    import bench.cli as cli

    buf = io.StringIO()
    monkeypatch.setattr(cli, "console", Console(file=buf, width=300, force_terminal=False))
    err = "ValueError: lsm.pim_levels=[p3,p4] names a level [p6] the FPN lacks"
    from rich.markup import escape

    cli.console.print(f"[red]failed[/red] ubteacher coco_standard_1 seed 1: {escape(err)} ({escape('/runs/[x]')})")
    assert f"failed ubteacher coco_standard_1 seed 1: {err} (/runs/[x])" in buf.getvalue()
    import bench.runner

    source = open(bench.runner.__file__).read()  # the line `bench run` prints (bench.runner.run_table) is the escaped one
    assert "{escape(err)}" in source and "{escape(str(c.directory(home)))}" in source
