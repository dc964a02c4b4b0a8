"""STAC's teacher is the supervised cell of its split: planned once, trained first, its pseudo-label
file a cached artifact in that cell's folder; MLC and method sections and the cell key."""

import json

import pytest

from bench.burn_in import burn_in_config
from core.config import load_config
from core.data.sources import prepare_data
from bench.keys import cell_key
from core.paths import run_dir
from bench.plan import build_plan
from bench.specs import load_spec_file
from bench.teacher import teacher_config

SPEC = """
name: stac_mini
title: STAC against its teacher
paper_table: table1
metrics: [AP]
columns:
  - {id: r25, setting: coco_standard_5, label: "25%", overrides: {data.ratio: 25}}
rows:
  - {id: supervised, label: Supervised, method: supervised, lsm: false}
  - {id: stac, label: STAC, method: stac, lsm: false, overrides: {lsm.enabled: false}}
  - {id: stac_pim, label: STAC + PIM, method: stac, lsm: true, variant: pim_only,
     overrides: {lsm.enabled: true, lsm.sd: false}}
"""


def _spec(tmp_path, rows=None):
    text = SPEC if rows is None else SPEC.split("rows:")[0] + "rows:\n" + rows
    path = tmp_path / "stac_mini.yaml"
    path.write_text(text)
    return load_spec_file(path)


def test_stac_teacher_is_the_supervised_cell_of_the_table(tmp_path, tiny):
    """With the same detector settings (here every row's RoI loss set to STAC's cross-entropy) the
    Supervised row's cell is STAC's teacher."""
    cells, _ = build_plan(_spec(tmp_path), "demo", 1, tmp_path / "home", ratios=[25.0],
                          overrides=tiny + ["model.cls_loss=ce"])
    by_row = {c.row_id: c for c in cells}
    assert set(by_row) == {"supervised", "stac", "stac_pim"}  # no second copy of the teacher
    assert by_row["stac"].depends_on == by_row["stac_pim"].depends_on == by_row["supervised"].key
    assert by_row["stac"].work == by_row["stac"].iterations  # STAC trains all its iterations itself
    # LSM on the student leaves the teacher alone
    assert teacher_config(by_row["stac_pim"].config) == by_row["supervised"].config


def test_stacs_teacher_trains_with_stacs_own_rpn_and_roi_settings(tmp_path, tiny):
    """STAC's original trains its teacher with its own detector (softmax CE): on the demo the
    Supervised row keeps the preset's focal loss, so the teacher is a cell of its own."""
    cells, _ = build_plan(_spec(tmp_path), "demo", 1, tmp_path / "home", ratios=[25.0], overrides=tiny)
    by_row = {c.row_id: c for c in cells}
    assert set(by_row) == {"teacher", "supervised", "stac", "stac_pim"}
    assert by_row["supervised"].config.model.cls_loss == "focal"
    assert by_row["teacher"].config.model.cls_loss == by_row["stac"].config.model.cls_loss == "ce"
    assert by_row["stac"].depends_on == by_row["stac_pim"].depends_on == by_row["teacher"].key


def test_a_table_without_a_supervised_row_plans_the_teacher_cell(tmp_path, tiny):
    rows = "  - {id: stac, label: STAC, method: stac, lsm: false, overrides: {lsm.enabled: false}}\n"
    cells, _ = build_plan(_spec(tmp_path, rows), "demo", 1, tmp_path / "home", ratios=[25.0], overrides=tiny)
    teacher, stac = cells
    assert teacher.row_id == "teacher" and teacher.config.method == "supervised"
    assert stac.depends_on == teacher.key and teacher_config(teacher.config) is None


def test_the_table_leaves_out_a_teacher_cell_that_is_no_row(tmp_path, tiny):
    """Table 4 has STAC rows and no supervised one: its teachers are planned, not reported."""
    from bench.runner import collect

    rows = "  - {id: stac, label: STAC, method: stac, lsm: false, overrides: {lsm.enabled: false}}\n"
    home = tmp_path / "home"
    cells, _ = build_plan(_spec(tmp_path, rows), "demo", 1, home, ratios=[25.0], overrides=tiny)
    for ap, c in zip((7.0, 2.0), cells):  # both done
        c.directory(home).mkdir(parents=True)
        (c.directory(home) / "result.json").write_text(json.dumps({"primary_model": "student",
                                                                    "metrics": {"student": {"AP": ap}}}))
    results, failed = collect(cells, home, ["AP"])
    assert results.to_dict("records") == [{"row_id": "stac", "column_id": "r25", "seed": 1, "AP": 2.0}] and not failed


def test_method_sections_and_disabled_mlc_stay_out_of_other_cells_keys(tiny):
    ubt = load_config("demo", tiny, method="ubteacher")
    for other in (["softteacher.rpn_thr=0.5"], ["stac.tau=0.5"], ["pseco.pla_candidate_topk=3"], ["mlc.weight=2"]):
        assert load_config("demo", tiny + other, method="ubteacher").key() == ubt.key(), other
    assert load_config("demo", tiny + ["mlc.enabled=true"], method="ubteacher").key() != ubt.key()
    st = load_config("demo", tiny, method="softteacher")
    assert load_config("demo", tiny + ["softteacher.rpn_thr=0.5"], method="softteacher").key() != st.key()
    # a burn-in ignores the settings that act after it, and keeps PseCo's supervised loss
    ps = load_config("demo", tiny + ["pseco.pla_candidate_topk=3", "mlc.enabled=true"], method="pseco")
    assert burn_in_config(ps) == burn_in_config(load_config("demo", tiny, method="pseco"))
    assert burn_in_config(load_config("demo", tiny + ["pseco.focal_gamma=1"], method="pseco")) != burn_in_config(ps)


def _stac(tiny, *extra):
    return load_config("demo", tiny + ["data.ratio=25", "solver.max_iter=3", "stac.tau=0.05", *extra], method="stac")


@pytest.mark.slow
def test_stac_cell_trains_its_teacher_then_reuses_its_pseudo_labels(tmp_path, tiny):
    from bench.runner import run_with_start
    from bench.worker import run_cell

    home = tmp_path / "home"
    cfg = _stac(tiny)
    result = run_with_start(cfg, home, track=False, progress=False)  # what `bench train --method stac` does
    data = prepare_data(cfg.data, home)
    tdir = run_dir(home, cell_key(teacher_config(cfg), data))
    assert (tdir / "result.json").exists() and result["method"] == "stac"
    coco = json.loads((tdir / "pseudo_labels.json").read_text())
    assert {im["id"] for im in coco["images"]} == {r.id for r in data.unlabeled.records}
    # a second STAC cell (another lambda_u) reads the same file: it is not regenerated
    mtime = (tdir / "pseudo_labels.json").stat().st_mtime_ns
    run_cell(_stac(tiny, "stac.lambda_u=1"), home, start_from=tdir, track=False, progress=False)
    assert (tdir / "pseudo_labels.json").stat().st_mtime_ns == mtime
    # the file alone serves a new dependant (the weights are not read again) ...
    (tdir / "model_final.pth").unlink()
    run_cell(_stac(tiny, "stac.lambda_u=3"), home, start_from=tdir, track=False, progress=False)
    # ... and a teacher imported from an archive (neither file nor weights) is named, with the fix
    (tdir / "pseudo_labels.json").unlink()
    from core.errors import BenchError

    with pytest.raises(BenchError, match=f"teacher cell {tdir} has neither its weights nor its pseudo-label file"):
        run_cell(_stac(tiny, "stac.lambda_u=4"), home, start_from=tdir, track=False, progress=False)


def test_the_worker_never_trains_a_stac_cells_teacher(tmp_path, tiny):
    """A teacher that is not done is a one-line error naming its directory; nothing trains it."""
    import re

    from bench.worker import run_cell
    from core.errors import BenchError

    home = tmp_path / "home"
    cfg = _stac(tiny)
    tdir = run_dir(home, cell_key(teacher_config(cfg), prepare_data(cfg.data, home)))
    with pytest.raises(BenchError, match=re.escape(f"teacher cell {tdir} is pending, not done")) as err:
        run_cell(cfg, home, start_from=tdir, track=False, progress=False)
    assert "\n" not in str(err.value)
    with pytest.raises(BenchError, match="needs its teacher cell's directory"):  # no directory: no guess
        run_cell(cfg, home, track=False, progress=False)
    assert not tdir.exists() and not list(home.glob("runs/*/*/result.json"))


def test_start_cell_is_the_plans_depends_on(tmp_path, tiny):
    """One place says which cell a cell starts from: the plan's `depends_on` and start cells are its."""
    from bench.plan import start_cell
    from tests.test_runner import MINI, RATIOS

    home = tmp_path / "home"
    plans = [build_plan(_spec(tmp_path), "demo", 2, home, ratios=[25.0], overrides=tiny)[0],
             build_plan(load_spec_file(MINI), "demo", 2, home, RATIOS, overrides=tiny)[0]]
    for cells in plans:
        by_key = {c.key: c for c in cells}
        for c in cells:
            start = start_cell(c.config, prepare_data(c.config.data, home))
            assert (start and start.key) == c.depends_on, c.row_id
            if start is not None:  # planned as a cell of its own, or as a row of the table (Supervised)
                planned = by_key[start.key]
                assert planned.config == start.config and (planned.row_id == start.row_id or not planned.is_start)
        assert any(c.depends_on for c in cells)


@pytest.mark.slow
def test_bench_train_of_a_stac_cell_equals_the_runners(tmp_path, tiny, monkeypatch):
    """`bench train --method stac` trains the teacher first, then the cell from it: the same two
    cells, with the same results, as `bench run` through the plan and the worker processes."""
    import torch

    from bench.executors.local import LocalExecutor, threads_per_worker
    from bench.runner import run_cells, train_cell

    overrides = tiny + ["solver.max_iter=3", "stac.tau=0.05"]
    rows = "  - {id: stac, label: STAC, method: stac, lsm: false, overrides: {lsm.enabled: false}}\n"
    cells, _ = build_plan(_spec(tmp_path, rows), "demo", 1, tmp_path / "run", ratios=[25.0], overrides=overrides)
    outcome = run_cells(cells, LocalExecutor(["cpu"], track=False), tmp_path / "run")
    assert len(outcome["done"]) == 2
    teacher, stac = cells

    threads = torch.get_num_threads()  # the worker's own (one slot's): the same floating-point sums
    torch.set_num_threads(threads_per_worker(1))
    try:
        result = train_cell("stac", "demo", overrides + ["data.ratio=25", "data.fold=1", "lsm.enabled=false"],
                            seed=1, track=False, home=tmp_path / "train")
    finally:
        torch.set_num_threads(threads)
    assert result["key"] == stac.key
    for c in (teacher, stac):
        ran = json.loads((c.directory(tmp_path / "run") / "result.json").read_text())
        trained = json.loads((c.directory(tmp_path / "train") / "result.json").read_text())
        assert json.dumps(trained["metrics"], sort_keys=True) == json.dumps(ran["metrics"], sort_keys=True), c.row_id
        a, b = (torch.load(c.directory(h) / "model_final.pth", weights_only=True)
                for h in (tmp_path / "run", tmp_path / "train"))
        assert all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m]), c.row_id
    assert (stac.start_from(tmp_path / "train") / "pseudo_labels.json").read_text() == \
        (stac.start_from(tmp_path / "run") / "pseudo_labels.json").read_text()
