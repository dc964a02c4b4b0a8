"""End-to-end cells on the tiny configuration: resume equality, failure isolation, tracking."""

import json

import pytest
import torch

from adapters.engine.hooks import HookBase
from adapters.engine.trainer import StopTraining
from core.config import load_config
from bench.worker import run_cell


class StopAfter(HookBase):
    """Simulates a killed run: stops once `n` iterations are done (after their checkpoint)."""

    def __init__(self, n):
        self.n = n

    def after_step(self):
        if self.trainer.iter + 1 == self.n:
            raise StopTraining()


def _final_state(home, result):
    return torch.load(home / "runs" / result["key"][:2] / result["key"] / "model_final.pth", weights_only=True)


def _assert_same_states(a, b):
    for model in a:
        for k in a[model]:
            assert torch.equal(a[model][k], b[model][k]), (model, k)


@pytest.mark.parametrize("method, lsm, stop_at", [("supervised", False, 3), ("ubteacher", False, 4),
                                                  ("ubteacher", True, 4)])
def test_resumed_run_equals_uninterrupted_run(tmp_path, tiny, method, lsm, stop_at):
    """Killed after burn-in (mean-teacher methods: iteration 4 > burn_in 2), then rerun."""
    overrides = tiny + ["solver.checkpoint_period=2"] if method == "ubteacher" else tiny
    cfg = load_config("demo", overrides + [f"lsm.enabled={str(lsm).lower()}"], method=method)
    full = run_cell(cfg, tmp_path / "a", track=False, progress=False)

    with pytest.raises(StopTraining):
        run_cell(cfg, tmp_path / "b", track=False, progress=False, extra_hooks=[StopAfter(stop_at)])
    resumed = run_cell(cfg, tmp_path / "b", track=False, progress=False)

    assert resumed["key"] == full["key"]
    _assert_same_states(_final_state(tmp_path / "a", full), _final_state(tmp_path / "b", resumed))
    # same metrics (compared as JSON text: NaN, e.g. APl without large objects, equals itself there)
    assert json.dumps(resumed["metrics"], sort_keys=True) == json.dumps(full["metrics"], sort_keys=True)
    # a finished cell is returned from its result.json, not recomputed
    cached = run_cell(cfg, tmp_path / "b", track=False, progress=False)
    assert json.dumps(cached, sort_keys=True) == json.dumps(resumed, sort_keys=True)


def test_failing_cell_writes_failed_json_and_keeps_no_result(tmp_path, tiny):
    cfg = load_config("demo", tiny + ["solver.base_lr=1e30"])
    with pytest.raises(FloatingPointError, match="loss became"):
        run_cell(cfg, tmp_path, track=False, progress=False)
    runs = list((tmp_path / "runs").glob("*/*"))
    assert len(runs) == 1
    failed = json.loads((runs[0] / "failed.json").read_text())
    assert "FloatingPointError" in failed["error"] and "Traceback" in failed["traceback"]
    assert not (runs[0] / "result.json").exists()


def test_run_is_tracked_in_mlflow(tmp_path, tiny, monkeypatch):
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = load_config("demo", tiny + ["solver.max_iter=2", "solver.checkpoint_period=2"], seed=3)
    result = run_cell(cfg, tmp_path, track=True, progress=False)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lsm-bench"])
    assert len(runs) == 1
    row = runs.iloc[0]
    assert row["tags.method"] == "supervised" and row["tags.seed"] == "3" and row["tags.lsm"] == "false"
    assert row["tags.cell_key"] == result["key"] and row["tags.preset"] == "demo"
    assert row["params.solver.max_iter"] == "2" and row["params.model.arch"] == "tiny"
    assert row["metrics.eval.student.AP"] == pytest.approx(result["metrics"]["student"]["AP"])
    # teacher diagnostics beside AP, at the preset's t and alpha even for a supervised cell
    student = result["metrics"]["student"]
    for k in ("cover_t", "cover_alpha", "precision_t", "dets_per_img_t", "cover_t_small", "precision_t_large"):
        assert k in student, k
    assert 0 <= student["cover_t"] <= student["cover_alpha"] <= 1
    assert row["metrics.eval.student.cover_alpha"] == pytest.approx(student["cover_alpha"])
    assert row["metrics.eval.student.dets_per_img_t"] == pytest.approx(student["dets_per_img_t"])
    assert "metrics.loss_cls_sup" in runs.columns and "metrics.lr" in runs.columns
    assert row["status"] == "FINISHED"
