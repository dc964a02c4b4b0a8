"""Studies on tiny cells: grid resumption after a kill, journal sharing, pruning, MLflow runs, tables."""

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from core.errors import BenchError
from core.paths import run_dir
from studies.definitions import figure5_defs, table5_def, tune_def
from studies.mlflow_callback import MLflowStudyCallback
from studies.objective import WORKER_ATTR, objective
from studies.run import load_study, open_study, recover, run_study, settled
from studies.storage import open_storage

ROOT = Path(__file__).parents[2]


def _curve(tiny, curve="ubteacher", grid=(0.5, 0.8), seeds=1, extra=()):
    defs, _ = figure5_defs("demo", tiny + list(extra), seeds, list(grid))
    return next(d for d in defs if d.curve == curve)


def _points(study):
    return sorted((t.params["t"], t.params["seed"]) for t in study.get_trials(states=(TrialState.COMPLETE,)))


def test_figure5_defs_share_cells_with_the_spec_and_drop_alpha_above_t(tiny):
    defs, notes = figure5_defs("demo", tiny, 2, [0.5, 0.8])
    by_curve = {d.curve: d for d in defs}
    assert by_curve["ubteacher"].search_space() == {"t": [0.5, 0.8], "seed": [1, 2]}
    assert by_curve["ubteacher_lsm"].search_space() == {"alpha": [0.5], "seed": [1, 2]}
    assert notes == ["ubteacher_lsm: alpha 0.8 left out (alpha must not exceed t = 0.7)"]
    # the grid point 0.5 / seed 2 is the cell `bench run figure5` plans for (thr_0.5, seed 2)
    from core.config import load_config
    from bench.specs import load_spec
    from studies.definitions import figure5_config

    spec = load_spec("figure5")
    args = tiny + spec.cell_override_args("ubteacher_lsm", "thr_0.5") + ["data.fold=2", "seed=2"]
    assert figure5_config("demo", tiny, "ubteacher_lsm", 0.5, 2) == load_config("demo", args)
    assert figure5_config("demo", tiny, "ubteacher", 0.8, 1).semi.t == 0.8


def test_study_ratio_moves_to_the_smallest_split_with_two_labels_per_class(tmp_path):
    from studies.definitions import figure5_config, study_ratio

    small = ["data.synth.train_images=200", "data.synth.val_images=4", "data.synth.image_size=32"]
    # 6 classes: 1% / 2% / 5% of 200 images are 2 / 4 / 10 labeled images, 10% is the first with 12+
    ratio, notes = study_ratio("demo", small, tmp_path, None)
    assert ratio == 10
    assert notes and "1% labels is 2 images for 6 classes" in notes[0] and "--ratio" in notes[0]
    assert study_ratio("demo", small, tmp_path, 5.0) == (5.0, [])  # asked for by name: kept
    with pytest.raises(BenchError, match="--ratio"):
        study_ratio("demo", small, tmp_path, 0.0)
    with pytest.raises(BenchError, match="too few images for a study"):  # 50% of 20: 10 for 6 classes
        study_ratio("demo", ["data.synth.train_images=20", "data.synth.image_size=32"], tmp_path, None)
    # the ratio wins over the spec's 1% column, and is part of the study's identity
    assert figure5_config("demo", small, "ubteacher", 0.5, 1, ratio).data.ratio == 10
    assert figure5_config("demo", small, "ubteacher", 0.5, 1).data.ratio == 1
    defs, _ = figure5_defs("demo", small, 1, [0.5], ratio=10)
    assert defs[0].identity() != figure5_defs("demo", small, 1, [0.5])[0][0].identity()


STUDY_SCRIPT = """
import sys
from pathlib import Path
from studies.definitions import figure5_defs
from studies.run import run_study
from tests.conftest import TINY
defs, _ = figure5_defs("demo", TINY, 1, [0.5, 0.8])
run_study(next(d for d in defs if d.curve == "ubteacher"), Path(sys.argv[1]), track=False)
"""


def _results(home, stage="full"):
    """result.json files of the cells of one stage (trials also train shared burn-in cells)."""
    return [p for p in Path(home).glob("runs/*/*/result.json") if json.loads(p.read_text())["stage"] == stage]


def test_killed_study_rerun_finishes_only_the_remaining_trials(tmp_path, tiny):
    """Acceptance 1: SIGKILL the study mid-way; the rerun runs the rest, nothing done twice."""
    script = tmp_path / "study.py"
    script.write_text(STUDY_SCRIPT)
    home = tmp_path / "home"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, str(script), str(home)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and len(_results(home)) < 1:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    first = {p: p.stat().st_mtime_ns for p in _results(home)}
    assert len(first) == 1
    defn = _curve(tiny, grid=(0.5, 0.8))
    before = open_study(defn, home)
    done_before = {t.number for t in before.get_trials(states=(TrialState.COMPLETE,))}
    study = run_study(defn, home, track=False, log=lambda *_: None)
    assert _points(study) == [(0.5, 1), (0.8, 1)]
    complete = study.get_trials(states=(TrialState.COMPLETE,))
    assert len(complete) == 2  # no grid point run twice
    assert done_before <= {t.number for t in complete}
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # done cells untouched
    assert len(_results(home)) == 2 and len(_results(home, "burn_in")) == 1  # one seed: one burn-in
    # a trial that was running when the process died is failed and retried, not left RUNNING
    assert not study.get_trials(states=(TrialState.RUNNING, TrialState.WAITING))
    # (one killed before the grid sampler gave it a point has nothing to retry: a fresh trial takes that point)
    for t in study.get_trials(states=(TrialState.FAIL,)):
        retried = any(t.number in u.system_attrs.get("retry_history", []) for u in complete)
        assert retried == ("grid_id" in t.system_attrs)
    # a third run has nothing to do
    again = run_study(defn, home, track=False, log=lambda *_: None)
    assert len(again.get_trials()) == len(study.get_trials())


def test_recover_fails_a_dead_workers_trial_and_queues_its_grid_point(tmp_path, tiny):
    defn = _curve(tiny)
    study = open_study(defn, tmp_path)
    trial = study.ask()  # GridSampler assigns grid point 0 in before_trial
    trial.suggest_float("t", 0.5, 0.8)
    trial.suggest_int("seed", 1, 1)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    from studies.objective import process_token

    token = process_token().rsplit(":", 2)[0] + f":{dead.pid}:1"
    study._storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, token)
    live = study.ask()
    study._storage.set_trial_system_attr(live._trial_id, WORKER_ATTR, process_token())  # this process: alive
    # killed between its creation and the sampler's before_trial: half its grid attributes, no point
    unplaced = study._storage.create_new_trial(study._study_id)
    study._storage.set_trial_system_attr(unplaced, "search_space", defn.search_space())
    study._storage.set_trial_system_attr(unplaced, WORKER_ATTR, token)
    notes = recover(study, defn, MLflowStudyCallback(tmp_path, enabled=False))
    states = {t.number: t.state for t in study.get_trials()}
    assert states[trial.number] == TrialState.FAIL and states[live.number] == TrialState.RUNNING
    assert study._storage.get_trial(unplaced).state == TrialState.FAIL  # failed, and not queued again
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].params == {"t": trial.params["t"], "seed": 1}
    assert waiting[0].system_attrs["grid_id"] == study.get_trials()[trial.number].system_attrs["grid_id"]
    assert waiting[0].system_attrs["retry_history"] == [trial.number]
    assert len(notes) == 1 and f"trial {trial.number}" in notes[0]
    assert recover(study, defn, MLflowStudyCallback(tmp_path, enabled=False)) == []  # idempotent


WORKER_SCRIPT = """
import sys
import optuna
from studies.storage import open_storage
optuna.logging.set_verbosity(optuna.logging.WARNING)
study = optuna.load_study(study_name="shared", storage=open_storage(sys.argv[1]),
                          sampler=optuna.samplers.TPESampler(seed=int(sys.argv[2]), n_startup_trials=5))
study.optimize(lambda t: (t.suggest_float("x", -5, 5) - 1) ** 2 + t.number * 0, n_trials=int(sys.argv[3]))
"""


def test_two_processes_on_one_journal_lose_no_trial(tmp_path):
    """Acceptance 2 (journal): two processes, 25 trials each, one study: all 50 complete, numbered 0-49."""
    script = tmp_path / "w.py"
    script.write_text(WORKER_SCRIPT)
    optuna.create_study(study_name="shared", storage=open_storage(tmp_path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, str(script), str(tmp_path), str(i), "25"], env=env) for i in range(2)]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    study = optuna.load_study(study_name="shared", storage=open_storage(tmp_path))
    trials = study.get_trials()
    assert len(trials) == 50 and {t.state for t in trials} == {TrialState.COMPLETE}
    assert sorted(t.number for t in trials) == list(range(50))


def test_study_with_two_worker_processes_covers_the_grid_once(tmp_path, tiny):
    """`--workers 2`: two processes share the grid; every cell trained once, every point complete."""
    defn = _curve(tiny, grid=(0.5, 0.8), seeds=2)
    study = run_study(defn, tmp_path, workers=2, track=False, log=lambda *_: None)
    assert _points(study) == [(0.5, 1), (0.5, 2), (0.8, 1), (0.8, 2)]
    assert not study.get_trials(states=(TrialState.FAIL, TrialState.RUNNING))
    results = _results(tmp_path)
    assert len(results) == 4 and len(_results(tmp_path, "burn_in")) == 2  # a burn-in per seed, shared
    logs = list((tmp_path / "optuna" / "logs").glob("*.log"))
    assert len(logs) == 2  # both workers ran
    keys = [t.user_attrs["cell_key"] for t in study.get_trials(states=(TrialState.COMPLETE,))]
    assert sorted(set(keys)) == sorted(p.parent.name for p in results)


def test_study_workers_refuse_a_bad_thread_count_before_starting(tmp_path, tiny, monkeypatch):
    """`--workers N` reads OMP_NUM_THREADS as `bench run` does: a bad value stops the study, no worker runs."""
    monkeypatch.setenv("OMP_NUM_THREADS", "two")
    defn = _curve(tiny, grid=(0.5,), seeds=1)
    with pytest.raises(BenchError, match="OMP_NUM_THREADS='two' is not a positive integer"):
        run_study(defn, tmp_path, workers=2, track=False, log=lambda *_: None)
    assert not list((tmp_path / "optuna" / "logs").glob("*.log"))
    assert not _results(tmp_path)


def test_mlflow_study_trial_and_cell_runs(tmp_path, tiny, monkeypatch):
    """Acceptance 4: study run -> trial runs (params, state, value, cell key) -> cell runs; one best."""
    import mlflow

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    defn = _curve(tiny)
    study = run_study(defn, tmp_path, track=True, command="bench study figure5 (test)", log=lambda *_: None)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["lsm-bench"])
    parent = runs[runs["tags.kind"] == "study"]
    assert len(parent) == 1 and parent.iloc[0]["tags.study"] == defn.name
    assert parent.iloc[0]["status"] == "FINISHED"
    assert parent.iloc[0]["tags.mlflow.runName"] == defn.name
    assert study.user_attrs["mlflow_parent_run_id"] == parent.iloc[0]["run_id"]
    trials = runs[runs["tags.kind"] == "trial"]
    assert len(trials) == 2 and set(trials["tags.mlflow.parentRunId"]) == {parent.iloc[0]["run_id"]}
    assert set(trials["tags.state"]) == {"COMPLETE"} and set(trials["status"]) == {"FINISHED"}
    assert sorted(trials["params.t"]) == ["0.5", "0.8"] and set(trials["params.seed"]) == {"1"}
    by_number = {t.number: t for t in study.trials}
    burn_ins = 0
    for r in trials.to_dict("records"):
        t = by_number[int(r["tags.trial"])]
        assert r["tags.cell_key"] == t.user_attrs["cell_key"]
        assert r["metrics.value"] == pytest.approx(t.value)
        children = runs[runs["tags.mlflow.parentRunId"] == r["run_id"]]
        burn_ins += int((children["tags.stage"] == "burn_in").sum())
        cell = children[children["tags.stage"] == "full"]
        assert len(cell) == 1 and cell.iloc[0]["tags.cell_key"] == t.user_attrs["cell_key"]
        assert cell.iloc[0]["run_id"] == t.user_attrs["cell_run_id"]
    assert burn_ins == 1  # both thresholds start from one burn-in, trained under the first trial
    best = trials[trials["tags.best"] == "true"]
    assert len(best) == 1 and best.iloc[0]["tags.trial"] == str(study.best_trial.number)
    assert parent.iloc[0]["tags.best_trial"] == str(study.best_trial.number)


def test_pruned_trial_stops_its_cell_cleanly(tmp_path, tiny, monkeypatch):
    """Median pruning's mechanism: the periodic AP is reported, the pruner stops training at once."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    defn = tune_def("demo", tiny + ["solver.max_iter=6", "solver.eval_period=2"], "ubteacher", True, trials=1)
    study = optuna.create_study(study_name=defn.name, storage=open_storage(tmp_path), direction="maximize",
                                pruner=optuna.pruners.ThresholdPruner(lower=1e9), sampler=defn.sampler())
    cb = MLflowStudyCallback(tmp_path)
    cb.ensure_parent(study, {}, {})
    study.optimize(lambda t: objective(t, defn, tmp_path, cb), n_trials=1, callbacks=[cb])
    t = study.trials[0]
    # the cell starts after its shared burn-in (iteration 2): its first evaluation is at iteration 4
    assert t.state == TrialState.PRUNED and t.user_attrs["pruned_at"] == 4
    assert list(t.intermediate_values) == [4]
    rdir = run_dir(tmp_path, t.user_attrs["cell_key"])
    assert not (rdir / "result.json").exists() and not (rdir / "failed.json").exists()
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trial_run = client.get_run(t.user_attrs["mlflow_run_id"])
    assert trial_run.info.status == "KILLED" and trial_run.data.tags["state"] == "PRUNED"
    assert [m.step for m in client.get_metric_history(trial_run.info.run_id, "intermediate_value")] == [4]
    cell_run = client.get_run((rdir / "mlflow_run_id").read_text().strip())
    assert cell_run.info.status == "KILLED" and cell_run.data.tags["pruned_at"] == "4"
    assert t.params["alpha"] <= t.params["t"]


def test_tune_counts_trials_over_reruns(tmp_path, tiny):
    defn = tune_def("demo", tiny + ["solver.max_iter=4"], "ubteacher", False, trials=2)
    assert any(o.startswith("solver.eval_period=") for o in defn.overrides)  # added for pruning
    study = run_study(defn, tmp_path, track=False, log=lambda *_: None)
    assert settled(study) == 2 and len(study.trials) == 2
    more = tune_def("demo", tiny + ["solver.max_iter=4"], "ubteacher", False, trials=3)
    study = run_study(more, tmp_path, track=False, log=lambda *_: None)
    assert len(study.trials) == 3 and settled(study) == 3
    _, loaded = load_study(defn.name, tmp_path)
    assert loaded.trials == 3


def test_continuing_a_study_with_other_settings_is_refused(tmp_path, tiny):
    open_study(_curve(tiny), tmp_path)
    open_study(_curve(tiny, grid=(0.5, 0.6, 0.8), seeds=2), tmp_path)  # a grown grid continues it
    with pytest.raises(BenchError, match="exists with other settings .*overrides.*--name"):
        open_study(_curve(tiny, extra=["solver.max_iter=7"]), tmp_path)
    with pytest.raises(BenchError, match="no study 'nope'.*figure5-demo-ubteacher"):
        load_study("nope", tmp_path)
    with pytest.raises(BenchError, match="SQLite is not safe"):
        open_storage(tmp_path, "sqlite:///x.db")


def test_table5_study_writes_table5(tmp_path, tiny):
    from bench.report.tables import FORMATS
    from studies.cli import write_table5

    defn = table5_def("demo", tiny, 1, ["baseline", "pim_p3p4"])
    study = run_study(defn, tmp_path, track=False, log=lambda *_: None)
    assert sorted(t.params["row"] for t in study.get_trials(states=(TrialState.COMPLETE,))) == ["baseline", "pim_p3p4"]
    configs = {t.params["row"]: json.loads((tmp_path / "runs" / t.user_attrs["cell_key"][:2] / t.user_attrs["cell_key"]
                                            / "result.json").read_text()) for t in study.trials}
    assert configs["pim_p3p4"]["lsm"] is True and configs["baseline"]["lsm"] is False
    paths = write_table5(study, defn, "demo", tmp_path / "results", "bench study table5 (test)")
    assert [p.suffix[1:] for p in paths] == list(FORMATS)
    md = paths[0].read_text()
    assert "bench study table5 (test)" in md and "PIM P3d P4d" in md and "paper 23.24" in md
    assert md.count("(1)") >= 2 * 4  # AP, APs, APm, APl of both rows, one seed each
    # a study at another ratio than the paper's 1% says so in its title, not only in its column
    md5 = write_table5(study, dataclasses.replace(defn, ratio=5.0), "demo", tmp_path / "r5", "t")[0].read_text()
    assert "at 5% labels (the paper: 1% COCO-standard)" in md5 and "| 5% |" in md5


def test_trial_killed_before_its_first_line_is_recovered_once_its_workers_are_gone(tmp_path, tiny):
    """A worker killed between Optuna creating the trial and the objective recording the worker's
    token leaves a RUNNING trial with no token: failed and queued again only when every worker
    that ever ran this study is gone."""
    import socket

    from studies.objective import process_token
    from studies.run import WORKER_PREFIX

    defn = _curve(tiny, grid=(0.5, 0.8))
    study = open_study(defn, tmp_path)
    study.ask()  # a RUNNING trial without a worker token
    study.set_user_attr(f"{WORKER_PREFIX}{process_token()}", True)  # a live worker: cannot tell yet
    recover(study, defn, MLflowStudyCallback(tmp_path, enabled=False))
    assert len(study.get_trials(states=(TrialState.RUNNING,))) == 1

    study = open_study(_curve(tiny, grid=(0.5, 0.8)), tmp_path / "other")
    study.ask()
    dead = f"{socket.gethostname()}:{2 ** 22 + 99991}:1"  # a pid above Linux's pid_max: never alive
    study.set_user_attr(f"{WORKER_PREFIX}{dead}", True)
    notes = recover(study, defn, MLflowStudyCallback(tmp_path / "other", enabled=False))
    assert not study.get_trials(states=(TrialState.RUNNING,))
    assert len(study.get_trials(states=(TrialState.WAITING,))) == 1 and "queued again" in notes[0]


def test_a_damaged_journal_is_one_line_naming_it_and_is_left_as_it_is(tmp_path, monkeypatch, capsys):
    """A journal line that is not JSON (an edit, a write cut short by a full disk and appended to)
    made the replay fail deep in optuna as an internal error."""
    from studies.storage import journal_path
    from tests.test_errors import cli, one_line

    for name in ("first", "second"):  # a healthy journal opens
        optuna.create_study(study_name=name, storage=open_storage(tmp_path))
    journal = journal_path(tmp_path)
    damaged = b'garbage{"op_code":' + journal.read_bytes()
    journal.write_bytes(damaged)
    with pytest.raises(BenchError, match=rf"Optuna journal {journal} cannot be read \(JSONDecodeError"):
        open_storage(tmp_path)
    code, _, err = cli(monkeypatch, capsys, "study", "figure5", "--grid", "0.5", "--seeds", "1", "--no-track",
                       home=tmp_path)
    assert code == 2 and one_line(err) and f"mv {journal} {journal}.damaged" in err, err
    assert journal.read_bytes() == damaged
