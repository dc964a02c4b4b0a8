"""Faults together, as a table meets them: a cell killed while its last checkpoint was written, a
truncated result.json, and a tracking store that breaks between two runs. The rerun of the same
table finishes, and its table equals the one of a run that met none of them."""

import json

import pytest

from bench.executors.local import LocalExecutor
from bench.runner import report, run_cells
from bench.worker import run_cell
from tests.test_runner import _plan
from tests.test_worker import StopAfter


def _table(home, spec, cells):
    paths = report(spec, cells, home, home / "results", "demo", "bench run mini", tracker=None)
    csv = next(p for p in paths if p.suffix == ".csv")
    return [line for line in csv.read_text().splitlines() if not line.startswith("#")]


def test_a_table_survives_a_killed_checkpoint_a_corrupt_result_and_a_broken_tracking_store(tmp_path, tiny):
    from adapters.engine.trainer import StopTraining

    extra = ["solver.checkpoint_period=2"]
    clean = tmp_path / "clean"
    spec, cells, _ = _plan(clean, tiny, extra)
    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=False), clean)
    assert not outcome["failed"]
    expected = _table(clean, spec, cells)

    home = tmp_path / "faulty"
    spec, cells, _ = _plan(home, tiny, extra)
    by_row = {(c.row_id, c.column_id): c for c in cells}
    for c in cells:
        if c.is_burn_in:
            run_cell(c.config, home, track=True, progress=False)
    # UBT 1 %: done, then its result.json is cut in half (a crash while the disk filled up)
    ubt = by_row[("ubteacher", "coco_standard_1")]
    run_cell(ubt.config, home, start_from=ubt.start_from(home), track=True, progress=False)
    result = ubt.directory(home) / "result.json"
    result.write_text(result.read_text()[: len(result.read_text()) // 2])
    # UBT + LSM 1 %: killed after iteration 5, its last checkpoint truncated as if killed while writing
    lsm = by_row[("ubteacher_lsm", "coco_standard_1")]
    with pytest.raises(StopTraining):
        run_cell(lsm.config, home, start_from=lsm.start_from(home), track=True, progress=False,
                 extra_hooks=[StopAfter(5)])
    last = sorted(lsm.directory(home).glob("checkpoints/iter_*.pth"))[-1]
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    # the tracking store is overwritten with garbage: every MLflow call of the rerun fails
    (home / "mlflow.db").write_bytes(b"not a database" * 100)

    outcome = run_cells(cells, LocalExecutor(["cpu"], slots_per_device=2, track=True), home)
    assert not outcome["failed"], [json.loads((c.directory(home) / "failed.json").read_text())["error"]
                                   for c in outcome["failed"]]
    assert all(c.status(home) == "done" for c in cells)
    assert _table(home, spec, cells) == expected
