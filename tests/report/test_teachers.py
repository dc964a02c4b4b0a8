"""The burn-in teachers' page of a table: the cover and precision above each row's t, read from the
burn-in cells' result.json, averaged over seeds by hand, and written next to the table by `report`."""

import json

from bench.report.teachers import burn_in_teachers, render_md
from bench.runner import report
from tests.report.fake_cells import MINI, mark_done, plan


def _burn_in_done(cells, home, seed_values):
    """seed -> (AP, cover at 0.7, precision at 0.7) of that seed's burn-in at 1 % labels."""
    for c in cells:
        if c.is_burn_in and c.column_id == "coco_standard_1" and c.seed in seed_values:
            ap, cover, precision = seed_values[c.seed]
            d = c.directory(home)
            d.mkdir(parents=True, exist_ok=True)
            (d / "result.json").write_text(json.dumps({
                "key": c.key, "method": c.config.method, "stage": "burn_in", "seed": c.seed,
                "burn_in_teacher": {"AP": ap, "cover_0.7": cover, "precision_0.7": precision,
                                    "cover_0.5": 0.9, "precision_0.5": 0.1}}))


def test_burn_in_teachers_by_hand_and_written_with_the_table(tmp_path):
    home = tmp_path / "home"
    spec, cells, _ = plan(MINI, home, seeds=2)
    assert {c.config.semi.t for c in cells if c.starts_after_burn_in} == {0.7}
    _burn_in_done(cells, home, {1: (20.0, 0.30, 0.80), 2: (24.0, 0.40, 0.60)})
    frame = burn_in_teachers(cells, home, spec)
    # UBT and UBT + LSM share each seed's burn-in (and t): one row per burn-in, the 5 % ones not done
    assert frame[["method", "column", "t", "seed", "AP", "cover", "precision"]].values.tolist() == [
        ["ubteacher", "1%", 0.7, 1, 20.0, 0.30, 0.80], ["ubteacher", "1%", 0.7, 2, 24.0, 0.40, 0.60]]
    md = render_md(frame, "mini: the burn-in teachers")
    assert "| ubteacher | 1% | 0.7 | 2 | 22.0 | 0.35 (0.30, 0.40) | 0.70 (0.80, 0.60) |" in md

    mark_done(cells, home, {("ubteacher", "coco_standard_1", 1): {"AP": 25.0}})
    paths = report(spec, cells, home, tmp_path / "out", "demo", "bench run mini")
    written = {p.name for p in paths}
    assert {"mini_teachers.md", "mini_teachers.csv"} <= written
    csv = (tmp_path / "out" / "mini_teachers.csv").read_text()
    assert "# command: bench run mini" in csv and "ubteacher,1%,0.7,2,24.0,0.4,0.6" in csv
