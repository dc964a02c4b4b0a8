"""Acceptance 5: `bench ui` on a store with a small table run and a small study, driven by a browser.

Playwright (Python) drives Debian's Chromium (/usr/bin/chromium, headless, no browser download).
Screenshots go to $BENCH_TEST_ARTIFACTS (default: the test's tmp dir). Skipped with the reason
where Chromium, Playwright or optuna-dashboard is missing; .ci/run installs them.
"""

import os
import re
import socket
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def browser():
    if not CHROMIUM.exists():
        pytest.skip("no browser at /usr/bin/chromium: apt-get install chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed: pip install playwright")
    pytest.importorskip("optuna_dashboard", reason="optuna-dashboard is not installed: pip install 'lsm-bench[dashboard]'")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def test_ui_shows_table_run_with_cells_and_the_study(tmp_path, tiny, browser, monkeypatch):
    from bench.plan import build_plan
    from bench.runner import report, start_parent_run
    from bench.specs import load_spec_file
    from bench.worker import run_cell
    from studies import ui
    from studies.definitions import figure5_defs
    from studies.run import run_study

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    shots = Path(os.environ.get("BENCH_TEST_ARTIFACTS", tmp_path))
    shots.mkdir(parents=True, exist_ok=True)
    home = tmp_path / "home"
    # a small table run: two cells under a parent run with the aggregated metrics
    spec = load_spec_file(Path(__file__).parents[1] / "report" / "mini.yaml")
    # ratios named: tiny's 24 images give too few labels per class for the plan's default
    cells, _ = build_plan(spec, "demo", 1, home, ratios=[1.0, 5.0], overrides=tiny)
    # UBteacher at both ratios and UBteacher + LSM at 1%: one seed's pair to compare side by side
    cells = [c for c in cells if c.row_id == "ubteacher" or (c.row_id == "ubteacher_lsm" and c.config.data.ratio == 1)]
    assert len(cells) == 3
    tracker, parent = start_parent_run(home, spec.name, "demo", 1, "bench run mini (test)")
    for c in cells:
        run_cell(c.config, home, progress=False, parent_run_id=parent)
    report(spec, cells, home, tmp_path / "results", "demo", "bench run mini (test)", tracker=tracker)
    tracker.end("FINISHED")
    # a small study
    defs, _ = figure5_defs("demo", tiny, 1, [0.5])
    study_def = next(d for d in defs if d.curve == "ubteacher")
    run_study(study_def, home, track=True, log=lambda *_: None)

    services = ui.start(home, port=_free_port(), dashboard_port=_free_port())
    try:
        mlflow_url, dash_url = services[0].url, services[1].url
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        exp_id = tracker.experiment_id
        # the table's parent run: its aggregated metrics (Overview tab, metrics table)
        page.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs/{parent}")
        page.get_by_text("mini-demo").first.wait_for(timeout=120_000)
        page.screenshot(path=str(shots / "ui-mlflow-parent-run-loading.png"), full_page=True)
        page.get_by_text("ubteacher.coco_standard_1.AP.mean").first.wait_for(timeout=120_000)
        names = ["UBteacher + LSM 1% seed 1", "UBteacher 1% seed 1", "UBteacher 5% seed 1"]  # `<row> <ratio>% seed <s>`
        for child in names:  # listed under "Child runs"
            page.get_by_text(child).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "ui-mlflow-parent-run.png"), full_page=True)
        # each child cell names the table run as its parent
        import mlflow

        client = mlflow.MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
        children = client.search_runs([exp_id], f"tags.mlflow.parentRunId = '{parent}'")
        assert sorted(r.info.run_name for r in children) == names
        assert "mini_means.png" in {a.path for a in client.list_artifacts(parent)}  # the chart of the row means
        for i, child in enumerate(children):
            page.goto(f"{mlflow_url}/#/experiments/{exp_id}/runs/{child.info.run_id}")
            page.get_by_text(child.info.run_name).first.wait_for(timeout=120_000)
            page.get_by_text("Parent run").first.wait_for(timeout=60_000)
            page.get_by_text("mini-demo").first.wait_for(timeout=60_000)
            page.screenshot(path=str(shots / f"ui-mlflow-child-cell-{i}.png"), full_page=True)
        # UBteacher and UBteacher + LSM of seed 1 side by side (docs/figures.md): the UI's Compare page
        pair = {r.info.run_name: r.info.run_id for r in children if r.info.run_name.endswith(" 1% seed 1")}
        ids = ",".join(f'"{pair[n]}"' for n in ("UBteacher 1% seed 1", "UBteacher + LSM 1% seed 1"))
        page.goto(f'{mlflow_url}/#/compare-runs?runs=[{ids}]&experiments=["{exp_id}"]')
        page.get_by_text("UBteacher + LSM 1% seed 1").first.wait_for(timeout=120_000)
        page.get_by_text("lsm.enabled").first.wait_for(timeout=60_000)  # the parameter that tells them apart
        page.screenshot(path=str(shots / "ui-mlflow-compare-ubt-lsm.png"), full_page=True)
        # optuna-dashboard: the study list, then the study's page
        page.goto(f"{dash_url}/dashboard")
        page.get_by_text(study_def.name).first.click(timeout=120_000)
        page.wait_for_url(re.compile(r".*/dashboard/studies/\d+"), timeout=30_000)
        page.get_by_text(study_def.name).first.wait_for(timeout=30_000)
        page.screenshot(path=str(shots / "ui-optuna-dashboard-study.png"), full_page=True)
    finally:
        ui.stop(services)
    assert all(s.process.poll() is not None for s in services)
    assert {p.name for p in shots.glob("ui-*.png")} >= {"ui-mlflow-parent-run.png", "ui-mlflow-child-cell-0.png",
                                                        "ui-mlflow-compare-ubt-lsm.png", "ui-optuna-dashboard-study.png"}
