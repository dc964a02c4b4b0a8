"""The runner on tiny cells: plan -> worker subprocesses -> cache -> tables; failures isolated."""

import json
from pathlib import Path

from bench.executors.local import LocalExecutor
from bench.plan import build_plan
from bench.runner import collect, report, run_cells
from bench.specs import load_spec_file

MINI = Path(__file__).parent / "report" / "mini.yaml"


def _plan(home, tiny, extra=()):
    spec = load_spec_file(MINI)
    cells, notes = build_plan(spec, "demo", seeds=1, home=home, overrides=tiny + list(extra))
    return spec, cells, notes


def test_plan_lists_implemented_cells_with_stable_keys(tmp_path, tiny):
    spec, cells, notes = _plan(tmp_path, tiny)
    assert [(c.row_id, c.column_id, c.seed) for c in cells] == [
        ("ubteacher", "coco_standard_1", 1), ("ubteacher", "coco_standard_5", 1),
        ("ubteacher_lsm", "coco_standard_1", 1), ("ubteacher_lsm", "coco_standard_5", 1)]
    assert any("csd" in n for n in notes)  # paper-only row named
    assert len({c.key for c in cells}) == 4 and all(c.status(tmp_path) == "pending" for c in cells)
    assert [c.key for c in _plan(tmp_path, tiny)[1]] == [c.key for c in cells]
    assert cells[2].config.lsm.enabled and cells[1].config.data.ratio == 5 and cells[0].config.data.fold == 1


def test_run_caches_reports_and_isolates_a_failing_cell(tmp_path, tiny):
    spec, cells, _ = _plan(tmp_path, tiny)
    # the LSM cells fail: a learning rate that turns the loss into NaN
    bad = [c for c in _plan(tmp_path, tiny, ["solver.base_lr=1e30"])[1] if c.row_id == "ubteacher_lsm"]
    cells = [c for c in cells if c.row_id == "ubteacher"] + bad
    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=False), tmp_path)
    assert {c.row_id for c in outcome["done"]} == {"ubteacher"} and len(outcome["failed"]) == 2
    for c in bad:
        failed = json.loads((c.directory(tmp_path) / "failed.json").read_text())
        assert "loss became" in failed["error"]
    results, failed = collect(cells, tmp_path, ["AP"])
    assert len(results) == 2 and sorted(failed) == [("ubteacher_lsm", "coco_standard_1", 1),
                                                   ("ubteacher_lsm", "coco_standard_5", 1)]
    paths = report(spec, cells, tmp_path, tmp_path / "results", "demo", "bench run mini", tracker=None)
    md = paths[0].read_text()
    assert "bench run mini" in md and "failed" in md and "paper 20.75" in md
    # a rerun submits nothing for done cells
    again = run_cells([c for c in cells if c.row_id == "ubteacher"], LocalExecutor(["cpu"], track=False), tmp_path)
    assert len(again["done"]) == 2 and not again["failed"]


def test_concurrent_workers_lose_nothing_in_mlflow(tmp_path, tiny, monkeypatch):
    """Two worker processes log to the same sqlite store at once; every run and metric arrives."""
    import mlflow

    from bench.runner import start_parent_run

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec, cells, _ = _plan(tmp_path, tiny, ["solver.log_period=1"])
    tracker, parent = start_parent_run(tmp_path, "mini", "demo", 1, "bench run mini")
    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=True), tmp_path,
                        parent_run_id=parent)
    tracker.end("FINISHED")
    assert len(outcome["done"]) == 4
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lsm-bench"])
    children = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert len(children) == 4 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.cell_key"]) == {c.key for c in cells}
    client = mlflow.MlflowClient()
    for run_id in children["run_id"]:  # one loss value per iteration, none dropped
        assert len(client.get_metric_history(run_id, "total_loss")) == cells[0].config.solver.max_iter


ORCHESTRATOR = """
import sys
from pathlib import Path
from bench.executors.local import LocalExecutor
from bench.plan import build_plan
from bench.runner import run_cells
from bench.specs import load_spec_file
from tests.conftest import TINY
cells, _ = build_plan(load_spec_file(Path(sys.argv[1])), "demo", 1, Path(sys.argv[2]), overrides=TINY)
run_cells(cells, LocalExecutor(["cpu"], slots_per_device=1, track=False), Path(sys.argv[2]))
"""


def test_sigkilled_orchestrator_rerun_recomputes_nothing_and_matches(tmp_path, tiny):
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "orchestrate.py"
    script.write_text(ORCHESTRATOR)
    home, reference_home = tmp_path / "killed", tmp_path / "reference"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    proc = subprocess.Popen([sys.executable, str(script), str(MINI), str(home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not list(home.glob("runs/*/*/result.json")) and time.time() < deadline:
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.stat().st_mtime_ns for p in home.glob("runs/*/*/result.json")}
    assert 1 <= len(first) < 4
    subprocess.run([sys.executable, str(script), str(MINI), str(home)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # done cells untouched
    subprocess.run([sys.executable, str(script), str(MINI), str(reference_home)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    spec = load_spec_file(MINI)
    killed = collect(build_plan(spec, "demo", 1, home, overrides=tiny)[0], home, ["AP"])[0]
    reference = collect(build_plan(spec, "demo", 1, reference_home, overrides=tiny)[0], reference_home, ["AP"])[0]
    assert len(killed) == 4 and killed.equals(reference)
