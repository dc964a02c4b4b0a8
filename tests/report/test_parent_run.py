"""A table's MLflow parent run: the per-row means (and paired deltas) as metrics, a chart of them and
the forest plot as artifacts, its child runs named `<row> <ratio>% seed <s>`; on a temporary store."""

import json
import math
import statistics
from pathlib import Path

import pytest
from PIL import Image

from bench import tracking
from bench.runner import report, start_parent_run
from tests.report.fake_cells import mark_done, mini_by_size, plan

# (row, column, seed) -> AP; APs/APm/APl follow from it
AP = {("ubteacher", "coco_standard_1", 1): 20.0, ("ubteacher", "coco_standard_1", 2): 21.0,
      ("ubteacher_lsm", "coco_standard_1", 1): 22.0, ("ubteacher_lsm", "coco_standard_1", 2): 24.0,
      ("ubteacher", "coco_standard_5", 1): 28.0, ("ubteacher_lsm", "coco_standard_5", 1): 29.5}


def _metrics(ap: float) -> dict:
    return {"AP": ap, "APs": ap / 4, "APm": ap / 2, "APl": ap * 1.5}


@pytest.fixture
def table_run(tmp_path, monkeypatch):
    """A parent run, a child run per done cell as the worker starts it, and the table reported."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    spec, cells, _ = plan(mini_by_size(tmp_path), home, seeds=2)
    tracker, parent = start_parent_run(home, spec.name, "demo", 2, "bench run mini.yaml --seeds 2")
    run_ids = {}
    for c in cells:
        key = (c.row_id, c.column_id, c.seed)
        if key in AP:  # as bench.worker names a cell's run when it starts it
            from bench.worker import cell_label

            child = tracking.Tracker(home)
            run_ids[key] = child.start(f"{cell_label(c.config)} {c.config.data.ratio:g}% seed {c.seed}",
                                       {"method": c.config.method}, {}, parent_run_id=parent)
            child.end("FINISHED")
    mark_done(cells, home, {k: _metrics(v) for k, v in AP.items()}, run_ids)
    paths = report(spec, cells, home, tmp_path / "results", "demo", "bench run mini.yaml --seeds 2", tracker=tracker)
    tracker.end("FINISHED")
    import mlflow

    client = mlflow.MlflowClient(tracking.tracking_uri(home))
    return client, tracker.experiment_id, parent, run_ids, paths, tmp_path


def test_parent_run_carries_the_row_means_and_deltas(table_run):
    client, _, parent, _, _, _ = table_run
    m = client.get_run(parent).data.metrics
    ubt_1 = [20.0, 21.0]
    assert m["ubteacher.coco_standard_1.AP.mean"] == pytest.approx(statistics.mean(ubt_1))
    assert m["ubteacher.coco_standard_1.AP.std"] == pytest.approx(statistics.stdev(ubt_1))
    assert m["ubteacher.coco_standard_1.AP.n"] == 2
    assert m["ubteacher_lsm.coco_standard_5.AP.mean"] == pytest.approx(29.5) and "ubteacher_lsm.coco_standard_5.AP.std" not in m
    # paired deltas at 1%: 2 and 3 points; 95% CI with t(0.975, 1) = 12.706
    d = [2.0, 3.0]
    half = 12.706204736174707 * statistics.stdev(d) / math.sqrt(2)
    assert m["delta.ubteacher_lsm.coco_standard_1.AP.mean"] == pytest.approx(2.5)
    assert m["delta.ubteacher_lsm.coco_standard_1.AP.ci_low"] == pytest.approx(2.5 - half)
    assert m["delta.ubteacher_lsm.coco_standard_1.AP.ci_high"] == pytest.approx(2.5 + half)
    assert m["delta.ubteacher_lsm.coco_standard_1.APs.mean"] == pytest.approx(2.5 / 4)
    assert m["delta.ubteacher_lsm.coco_standard_5.AP.n"] == 1 and "delta.ubteacher_lsm.coco_standard_5.AP.ci_low" not in m


def test_parent_run_carries_a_chart_of_the_means(table_run):
    client, _, parent, _, paths, tmp_path = table_run
    names = {a.path for a in client.list_artifacts(parent)}
    assert names >= {"mini.md", "mini.csv", "mini.tex", "mini.html", "mini_deltas.png", "mini_deltas_data.csv",
                     "mini_means.png"}
    chart = Path(client.download_artifacts(parent, "mini_means.png", str(tmp_path)))
    assert Image.open(chart).size[0] > 600
    assert not (tmp_path / "results" / "mini_means.png").exists()  # the run's, not a published figure


def test_child_runs_are_named_row_ratio_seed(table_run):
    client, exp, parent, run_ids, _, _ = table_run
    children = client.search_runs([exp], f"tags.mlflow.parentRunId = '{parent}'")
    assert sorted(r.info.run_name for r in children) == [
        "UBteacher + LSM 1% seed 1", "UBteacher + LSM 1% seed 2", "UBteacher + LSM 5% seed 1",
        "UBteacher 1% seed 1", "UBteacher 1% seed 2", "UBteacher 5% seed 1"]
    # one seed's UBT and UBT + LSM cells found by name, as in the UI's search box
    pair = client.search_runs([exp], "attributes.run_name LIKE '% 1% seed 2'")
    assert sorted(r.info.run_id for r in pair) == sorted([run_ids[("ubteacher", "coco_standard_1", 2)],
                                                         run_ids[("ubteacher_lsm", "coco_standard_1", 2)]])


def test_a_cell_whose_run_is_in_another_store_is_left_alone(tmp_path, monkeypatch):
    """Imported cells (`bench import`) carry another store's run id: reporting still works."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    home = tmp_path / "home"
    spec, cells, _ = plan(mini_by_size(tmp_path), home, seeds=1)
    mark_done(cells, home, {k: _metrics(v) for k, v in AP.items() if k[2] == 1},
              {k: "0123456789abcdef0123456789abcdef" for k in AP})
    tracker, parent = start_parent_run(home, spec.name, "demo", 1, "bench run mini.yaml")
    report(spec, cells, home, tmp_path / "results", "demo", "bench run mini.yaml", tracker=tracker)
    tracker.end("FINISHED")
    assert json.loads((cells[-1].directory(home) / "result.json").read_text())["mlflow_run_id"]


def test_renaming_a_run_of_another_store_is_refused_quietly(tmp_path):
    """A cell imported with `bench import` carries a run id of the store it was trained in."""
    from bench.tracking import Tracker

    tracker = Tracker(tmp_path)
    own = tracker.start("cell", tags={}, params={})
    assert tracker.rename_run("0" * 32, "UBteacher 5% seed 1") is False
    assert tracker.enabled  # a missing run does not turn tracking off
    assert tracker.rename_run(own, "UBteacher 5% seed 1") is True
    assert tracker._client.get_run(own).info.run_name == "UBteacher 5% seed 1"
