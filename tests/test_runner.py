"""The runner on tiny cells: plan -> worker subprocesses -> cache -> tables; failures isolated."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from bench.executors.local import LocalExecutor
from bench.plan import build_plan
from bench.runner import collect, report, run_cells
from bench.specs import load_spec_file
from core.errors import BenchError

MINI = Path(__file__).parent / "report" / "mini.yaml"
RATIOS = [1.0, 5.0]  # named, so that the tiny data's 1-image splits are planned

def _plan(home, tiny, extra=()):
    spec = load_spec_file(MINI)
    cells, notes = build_plan(spec, "demo", seeds=1, home=home, ratios=RATIOS, overrides=tiny + list(extra))
    return spec, cells, notes


def test_plan_lists_implemented_cells_with_stable_keys(tmp_path, tiny):
    spec, cells, notes = _plan(tmp_path, tiny)
    assert [(c.row_id, c.column_id, c.seed) for c in cells] == [
        ("burn-in", "coco_standard_1", 1), ("burn-in", "coco_standard_5", 1),
        ("ubteacher", "coco_standard_1", 1), ("ubteacher", "coco_standard_5", 1),
        ("ubteacher_lsm", "coco_standard_1", 1), ("ubteacher_lsm", "coco_standard_5", 1)]
    assert any("csd" in n for n in notes)  # paper-only row named
    assert len({c.key for c in cells}) == 6 and all(c.status(tmp_path) == "pending" for c in cells)
    assert [c.key for c in _plan(tmp_path, tiny)[1]] == [c.key for c in cells]
    burn_1, burn_5, ubt_1, ubt_5, lsm_1, lsm_5 = cells
    # UBT and UBT+LSM of one split and seed start from one burn-in
    assert ubt_1.depends_on == lsm_1.depends_on == burn_1.key and ubt_5.depends_on == lsm_5.depends_on == burn_5.key
    assert burn_1.is_burn_in and burn_1.iterations == tiny_burn_in(tiny) and burn_1.depends_on is None
    assert lsm_1.config.lsm.enabled and ubt_5.config.data.ratio == 5 and ubt_1.config.data.fold == 1


def test_progress_counts_only_the_complete_lines_of_a_metrics_file_being_written(tmp_path, tiny):
    """The live display read a worker's half-written last line and stopped `bench run` (JSONDecodeError)."""
    from bench.runner import _iterations_done

    cell = _plan(tmp_path, tiny)[1][2]
    cell.directory(tmp_path).mkdir(parents=True)
    rows = [json.dumps({"iteration": i, "total_loss": 1.0}) + "\n" for i in (10, 20)]
    cut = json.dumps({"iteration": 30, "total_loss": 0.5})[:-4]  # a line cut mid-write
    (cell.directory(tmp_path) / "metrics.jsonl").write_text("".join(rows) + cut)
    assert _iterations_done(cell, tmp_path) == 21


def test_plan_leaves_out_columns_with_too_few_labeled_images_unless_named(tmp_path, tiny):
    spec = load_spec_file(MINI)
    cells, notes = build_plan(spec, "demo_long", 1, tmp_path, overrides=tiny + ["data.synth.train_images=400"])
    # 1% of 400 = 4 labeled images for 6 classes: left out, with the way to force it; 5% = 20 stays
    assert {c.column_id for c in cells} == {"coco_standard_5"}
    assert any("coco_standard_1: 4 labeled images for 6 classes" in n and "--ratios 1" in n for n in notes)
    cells, _ = build_plan(spec, "demo_long", 1, tmp_path, [1.0], overrides=tiny + ["data.synth.train_images=400"])
    assert {c.column_id for c in cells} == {"coco_standard_1"}


def test_plan_runs_the_presets_table_ratios_unless_others_are_named(tmp_path, tiny):
    spec = load_spec_file(MINI)
    tiny = tiny + ["data.synth.train_images=400"]
    cells, notes = build_plan(spec, "demo", 1, tmp_path, overrides=tiny)  # demo: table_ratios [5, 10]
    assert {c.column_id for c in cells} == {"coco_standard_5"}
    assert any("coco_standard_1: not among preset demo's table ratios (5, 10)" in n and "--ratios 1" in n
               for n in notes)
    cells, _ = build_plan(spec, "demo", 1, tmp_path, [1.0], overrides=tiny)
    assert {c.column_id for c in cells} == {"coco_standard_1"}


def tiny_burn_in(tiny):
    return int(next(o for o in tiny if o.startswith("semi.burn_in=")).split("=")[1])


def test_run_caches_reports_and_isolates_a_failing_cell(tmp_path, tiny):
    # the LSM cells fail after their (shared, healthy) burn-in: an infinite unlabeled loss weight
    spec, cells, _ = _plan(tmp_path, tiny)
    bad = [c for c in _plan(tmp_path, tiny, ["semi.lambda_u=1e39"])[1] if c.row_id == "ubteacher_lsm"]
    assert {c.depends_on for c in bad} == {c.key for c in cells if c.is_burn_in}
    cells = [c for c in cells if c.row_id != "ubteacher_lsm"] + bad
    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=False), tmp_path)
    assert {c.row_id for c in outcome["done"]} == {"burn-in", "ubteacher"} and len(outcome["failed"]) == 2
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
    again = run_cells([c for c in cells if c.row_id != "ubteacher_lsm"], LocalExecutor(["cpu"], track=False), tmp_path)
    assert len(again["done"]) == 4 and not again["failed"]


def test_a_failed_burn_in_fails_its_cells_with_the_reason(tmp_path, tiny):
    spec, cells, _ = _plan(tmp_path, tiny, ["solver.base_lr=1e30"])
    cells = [c for c in cells if c.column_id == "coco_standard_1"]
    log = io.StringIO()  # not a terminal: one plain line per finished cell instead of the live table
    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=False), tmp_path,
                        console=Console(file=log, width=200))
    assert len(outcome["failed"]) == 3 and not outcome["done"]
    lines = [ln for ln in log.getvalue().splitlines() if ln.startswith("[")]
    assert [ln.split(" (")[0] for ln in lines] == [
        "[1/3] failed burn-in coco_standard_1 seed 1",
        "[2/3] failed ubteacher coco_standard_1 seed 1",
        "[3/3] failed ubteacher_lsm coco_standard_1 seed 1"], lines
    burn = cells[0]
    assert "loss became" in json.loads((burn.directory(tmp_path) / "failed.json").read_text())["error"]
    for c in cells[1:]:
        error = json.loads((c.directory(tmp_path) / "failed.json").read_text())["error"]
        assert error == f"the cell it starts from ({burn.key[:12]}) failed"


@pytest.mark.parametrize("store", ["sqlite", "server"])
def test_concurrent_workers_lose_nothing_in_mlflow(tmp_path, tiny, monkeypatch, store):
    """Two worker processes log at once, straight to the sqlite store or through the `mlflow server`
    that `bench run` starts for many workers; every run and metric arrives."""
    import contextlib
    import socket

    import mlflow

    from bench.runner import start_parent_run
    from bench.tracking import LocalServer

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    spec, cells, _ = _plan(tmp_path, tiny, ["solver.log_period=1"])
    with LocalServer(tmp_path) if store == "server" else contextlib.nullcontext() as server:
        tracker, parent = start_parent_run(tmp_path, "mini", "demo", 1, "bench run mini")
        outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=True), tmp_path,
                            parent_run_id=parent)
        tracker.end("FINISHED")
    if server is not None:  # stopped, and the environment restored
        assert "MLFLOW_TRACKING_URI" not in os.environ
        with socket.socket() as sock:
            assert sock.connect_ex(("127.0.0.1", server.port)) != 0
    assert len(outcome["done"]) == 6
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lsm-bench"])
    children = runs[runs["tags.mlflow.parentRunId"] == parent]
    assert len(children) == 6 and set(children["status"]) == {"FINISHED"}
    assert set(children["tags.cell_key"]) == {c.key for c in cells}
    client = mlflow.MlflowClient()
    iterations = {c.key: c.work for c in cells}
    for run_id, key in zip(children["run_id"], children["tags.cell_key"]):  # one loss per iteration, none dropped
        assert len(client.get_metric_history(run_id, "total_loss")) == iterations[key]


ORCHESTRATOR = """
import sys
from pathlib import Path
from bench.executors.local import LocalExecutor
from bench.plan import build_plan
from bench.runner import run_cells
from bench.specs import load_spec_file
from tests.conftest import TINY
if __name__ == "__main__":  # worker processes import the main module (multiprocessing's rule)
    cells, _ = build_plan(load_spec_file(Path(sys.argv[1])), "demo", 1, Path(sys.argv[2]), [1.0, 5.0], overrides=TINY)
    run_cells(cells, LocalExecutor(["cpu"], slots_per_device=1, track=False), Path(sys.argv[2]))
"""


def test_sigkilled_orchestrator_rerun_recomputes_nothing_and_matches(tmp_path, tiny):
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
    assert 1 <= len(first) < 6  # 2 burn-ins + 4 cells
    subprocess.run([sys.executable, str(script), str(MINI), str(home)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # done cells untouched
    subprocess.run([sys.executable, str(script), str(MINI), str(reference_home)], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    spec = load_spec_file(MINI)
    killed = collect(build_plan(spec, "demo", 1, home, RATIOS, overrides=tiny)[0], home, ["AP"])[0]
    reference = collect(build_plan(spec, "demo", 1, reference_home, RATIOS, overrides=tiny)[0], reference_home, ["AP"])[0]
    assert len(killed) == 4 and killed.equals(reference)
    # a burn-in whose cells are all done is not planned again, even if its directory is gone
    for c in build_plan(spec, "demo", 1, home, RATIOS, overrides=tiny)[0]:
        if c.is_burn_in:
            shutil.rmtree(c.directory(home))
    assert [c.row_id for c in build_plan(spec, "demo", 1, home, RATIOS, overrides=tiny)[0]].count("burn-in") == 0


def test_reference_timings_of_a_preset_estimate_a_fresh_store(monkeypatch):
    import bench.plan as plan

    timings = {"supervised": 0.1, "ubteacher+lsm": 0.5, "ubteacher:burn_in": 0.12}
    monkeypatch.setattr(plan, "preset_planning", lambda preset, key: timings if preset == "demo" else None)
    ref = plan.reference_seconds_per_iteration("demo")
    assert ref == {("demo", "supervised", False, "full"): 0.1, ("demo", "ubteacher", True, "full"): 0.5,
                   ("demo", "ubteacher", False, "burn_in"): 0.12}
    assert plan.reference_seconds_per_iteration("coco") == {}


def test_cpu_slots_take_the_users_thread_count_where_it_is_set(monkeypatch):
    """Two runs side by side must be able to share the cores: OMP_NUM_THREADS overrides cores / slots."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    ex = LocalExecutor(["cpu"], slots_per_device=1, track=False, prestart=False)
    assert ex._env(0) == ({"OMP_NUM_THREADS": str(os.cpu_count() or 1)}, os.cpu_count() or 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert ex._env(0) == ({"OMP_NUM_THREADS": "1"}, 1)
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    with pytest.raises(BenchError, match="OMP_NUM_THREADS='two' is not a positive integer"):
        LocalExecutor(["cpu"], track=False, prestart=False)
