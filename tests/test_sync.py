"""`bench sync` (bench/sync.py): the done cells whose MLflow runs an outage cost are logged later, as
the worker would have logged them, once; and the end of `bench run` does it by itself."""

import json
import shutil
import sqlite3

import mlflow
import pytest

from bench import tracking
from bench.sync import TrackingDown, sync_runs
from core.config import dump_config
from tests.report.fake_cells import MINI, mark_done, plan
from tests.test_errors import cli, one_line


@pytest.fixture(scope="module")
def blank_db(tmp_path_factory):
    """An MLflow database with its schema and no experiment: creating one takes seconds, copying it none."""
    db = tmp_path_factory.mktemp("blank") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{db}").search_experiments()
    return db


@pytest.fixture
def home(tmp_path, blank_db, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(blank_db, home / "mlflow.db")
    return home


def client(home):
    return mlflow.MlflowClient(tracking.tracking_uri(home))


def history(c, run_id) -> dict[str, list[tuple[int, float]]]:
    keys = c.get_run(run_id).data.metrics
    return {k: sorted((m.step, m.value) for m in c.get_metric_history(run_id, k)) for k in keys}


def fake_cells(home, run_ids=None):
    """The four table cells of tests/report/mini.yaml done without training (config.yaml, result.json
    and two metrics.jsonl lines each, as a cell that trained through an outage leaves them)."""
    spec, cells, _ = plan(MINI, home, seeds=1)
    cells = [c for c in cells if not c.is_start]
    values = {(c.row_id, c.column_id, c.seed): {"AP": 20.0 + i} for i, c in enumerate(cells)}
    mark_done(cells, home, values, run_ids)
    for i, c in enumerate(cells):
        d = c.directory(home)
        (d / "config.yaml").write_text(dump_config(c.config))
        (d / "metrics.jsonl").write_text(json.dumps({"iteration": 2, "total_loss": 1.5 + i, "loss/cls": 0.5}) + "\n"
                                         + json.dumps({"iteration": 6, "eval.teacher.AP": 20.0 + i}) + "\n")
    return spec, cells


def test_a_run_lost_in_an_outage_is_logged_as_the_worker_logged_it(home, tiny, blank_db):
    """A tracked cell, then its store lost (mlflow.db deleted): the run is missing; `sync_runs` logs it
    again with the worker's name, tags, params, metric history and artifacts, once."""
    from core.config import load_config
    from core.paths import read_result
    from bench.worker import run_cell

    cfg = load_config("demo", tiny, method="supervised")
    run_cell(cfg, home, track=True, progress=False)
    rdir = next(home.glob("runs/*/*"))
    result_bytes = (rdir / "result.json").read_bytes()
    old = (rdir / "mlflow_run_id").read_text()
    c = client(home)
    before = c.get_run(old)
    old_history = history(c, old)
    assert len(old_history["total_loss"]) == cfg.solver.max_iter // cfg.solver.log_period

    shutil.copy(blank_db, home / "mlflow.db")  # the outage: the store lost, a new empty one in its place
    assert tracking.Tracker(home).existing_runs([old]) == set()

    report = sync_runs(home)
    assert (report.logged, report.present, report.skipped) == ([rdir], [], [])
    new = (rdir / "mlflow_run_id").read_text()
    assert new != old and (rdir / "result.json").read_bytes() == result_bytes  # the result is not rewritten
    c = client(home)
    after = c.get_run(new)
    assert after.info.run_name == before.info.run_name == "supervised 25% seed 1"
    assert after.info.status == "FINISHED"
    user_tags = {k: v for k, v in before.data.tags.items() if not k.startswith("mlflow.")}
    assert {k: v for k, v in after.data.tags.items() if not k.startswith("mlflow.")} == {**user_tags, "synced": "true"}
    assert after.data.params == before.data.params
    assert json.dumps(history(c, new), sort_keys=True) == json.dumps(old_history, sort_keys=True)  # NaN too
    assert sorted(a.path for a in c.list_artifacts(new)) == ["config.yaml", "result.json"]
    assert read_result(rdir / "result.json")["mlflow_run_id"] == old

    again = sync_runs(home)
    assert (again.logged, again.present) == ([], [rdir])
    assert len(c.search_runs([after.info.experiment_id])) == 1


def test_sync_logs_exactly_the_missing_runs(home):
    """Four done cells: one with its run in the store, one whose id names no run of the store, two
    from an outage (no id); a failed cell beside them. Three runs are logged, with the worker's tags
    and params and metrics.jsonl's values at their steps; a second sync logs nothing."""
    from core.data.sources import prepare_data

    tracker = tracking.Tracker(home)
    live = tracker.start("already logged", {}, {})
    spec, cells = fake_cells(home)
    first, foreign = cells[0].directory(home), cells[1].directory(home)
    (first / "mlflow_run_id").write_text(live)
    (foreign / "mlflow_run_id").write_text("0123456789abcdef0123456789abcdef")  # another store's run
    failed = home / "runs" / "ff" / ("f" * 64)
    failed.mkdir(parents=True)
    (failed / "config.yaml").write_text(dump_config(cells[0].config))
    (failed / "failed.json").write_text('{"error": "boom"}')

    report = sync_runs(home)
    assert sorted(report.logged) == sorted(c.directory(home) for c in cells[1:])
    assert report.present == [first] and report.skipped == []
    assert (first / "mlflow_run_id").read_text() == live and not (failed / "mlflow_run_id").exists()
    c = client(home)
    for i, cell in enumerate(cells[1:], 1):
        run = c.get_run((cell.directory(home) / "mlflow_run_id").read_text())
        split = prepare_data(cell.config.data, home).manifest.sha256
        assert {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")} == {
            **tracking.run_tags(cell.config, cell.key, split), "synced": "true"}
        assert run.data.tags["mlflow.runName"] == tracking.run_name(cell.config)
        assert run.data.params == tracking.flatten(cell.config.model_dump(mode="json"))
        assert history(c, run.info.run_id) == {"total_loss": [(2, 1.5 + i)], "loss.cls": [(2, 0.5)],
                                               "eval.teacher.AP": [(6, 20.0 + i)]}
        assert run.info.status == "FINISHED"
    again = sync_runs(home)
    assert again.logged == [] and len(again.present) == 4
    assert len(c.search_runs([tracker.experiment_id])) == 4


def test_unreadable_files_are_skipped_and_named(home):
    spec, cells = fake_cells(home)
    truncated = cells[0].directory(home) / "result.json"
    truncated.write_text(truncated.read_text()[:40])
    bad_metrics = cells[1].directory(home) / "metrics.jsonl"
    bad_metrics.write_text('{"iteration": 2, "total_lo')
    report = sync_runs(home)
    assert len(report.logged) == 2 and report.present == []
    assert len(report.skipped) == 2
    assert str(truncated) in report.skipped[0] and "unreadable" in report.skipped[0]
    assert report.skipped[1].startswith(f"{bad_metrics} is unreadable")
    assert not (cells[1].directory(home) / "mlflow_run_id").exists()


def test_a_store_still_down_is_one_line_and_logs_nothing(home, monkeypatch, capsys):
    spec, cells = fake_cells(home)

    def refuses(self, *a, **k):
        raise sqlite3.OperationalError("attempt to write a readonly database")

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", refuses)
    with pytest.raises(TrackingDown, match="attempt to write a readonly database"):
        sync_runs(home)
    assert not list(home.glob("runs/*/*/mlflow_run_id"))
    code, out, err = cli(monkeypatch, capsys, "sync", home=home)
    assert code == 2 and one_line(err)
    assert tracking.tracking_uri(home) in err and "rerun `bench sync`" in err


def test_cli_sync_prints_the_counts(home, monkeypatch, capsys):
    spec, cells = fake_cells(home)
    truncated = cells[0].directory(home) / "result.json"
    truncated.write_text("{")
    code, out, err = cli(monkeypatch, capsys, "sync", home=home)
    assert code == 0, err
    assert out.splitlines()[0] == "3 runs logged, 0 already there"
    assert out.splitlines()[1].startswith(f"skipped: {truncated} is unreadable")
    code, out, _ = cli(monkeypatch, capsys, "sync", "--home", home, home=home)
    assert code == 0 and out.splitlines()[0] == "0 runs logged, 3 already there"


def test_the_end_of_bench_run_heals_the_store(home):
    """`bench run` reports with its parent run: the cells an outage left without a run are logged as
    its children and named after the table's rows, like the others."""
    from bench.runner import child_run_name, report, start_parent_run

    spec, cells = fake_cells(home)
    tracker, parent = start_parent_run(home, spec.name, "demo", 1, "bench run mini.yaml")
    report(spec, cells, home, home / "results", "demo", "bench run mini.yaml", tracker=tracker)
    tracker.end("FINISHED")
    c = client(home)
    children = c.search_runs([tracker.experiment_id], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_id for r in children) == sorted(
        (cell.directory(home) / "mlflow_run_id").read_text() for cell in cells)
    assert sorted(r.info.run_name for r in children) == sorted(child_run_name(spec, cell) for cell in cells)
