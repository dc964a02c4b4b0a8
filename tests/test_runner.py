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
