"""Our MLflow callback for Optuna studies (not optuna-integration's, which is deprecated and loses
the parent run: optuna/optuna#5148).

Run hierarchy, three levels, all in the suite's experiment:

    study run  (tags kind=study, study=<name>; best_trial / best_value once known)
      trial run  (one per trial: params, tags study, trial, state, value, cell_key, best)
        cell run  (the worker's training run: every loss, every evaluation, result.json)

The trial run is opened before the cell trains and passed to `run_cell` as its parent, so the
cell's curves sit under the trial. A trial whose cell was already done (a cache hit) gets no new
cell run: its trial run carries `cell_key`, `cell_run_id` and `cached=true` pointing at the cell
run that trained it, wherever that lives. Trial states map as MLflow's own Optuna storage does:
COMPLETE -> FINISHED, PRUNED -> KILLED, FAIL -> FAILED.

The study run is created once by the orchestrator (`bench study ...`) before any worker starts
(concurrent creation races in MLflow: mlflow/mlflow#4123) and its id kept in the study's user
attrs, so every worker process and every rerun logs under the same parent.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import optuna
from optuna.trial import FrozenTrial, TrialState

from bench import tracking

STATUS = {TrialState.COMPLETE: "FINISHED", TrialState.PRUNED: "KILLED", TrialState.FAIL: "FAILED"}
PARENT_ATTR = "mlflow_parent_run_id"
RUN_ATTR = "mlflow_run_id"


class MLflowStudyCallback:
    """`callbacks=[cb]` for `study.optimize`; `cb.start_trial(trial, ...)` inside the objective."""

    def __init__(self, home: Path, enabled: bool = True):
        self.home = Path(home)
        self.enabled = enabled
        self._tracker = tracking.Tracker(home, enabled=enabled)  # creates the experiment if needed
        if enabled:
            import mlflow

            logging.getLogger("mlflow").setLevel(logging.WARNING)
            self.client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri(home))
            self.experiment_id = self._tracker.experiment_id

    # -- study run --------------------------------------------------------------------------------
    def ensure_parent(self, study: optuna.Study, tags: dict[str, str], params: dict[str, str]) -> str | None:
        """The study's run, created on first use and set RUNNING again on a rerun."""
        if not self.enabled:
            return None
        run_id = study.user_attrs.get(PARENT_ATTR)
        if run_id:
            try:
                self.client.update_run(run_id, status="RUNNING")
                return run_id
            except Exception:  # the MLflow store was wiped while the study survived: start afresh
                pass
        tracker = tracking.Tracker(self.home)
        run_id = tracker.start(study.study_name, {"kind": "study", "study": study.study_name, **tags}, params)
        study.set_user_attr(PARENT_ATTR, run_id)
        return run_id

    def end_parent(self, study: optuna.Study, status: str = "FINISHED") -> None:
        """Tag the best trial (workers race on it while running), then close the study run."""
        if not self.enabled or not study.user_attrs.get(PARENT_ATTR):
            return
        self._tag_best(study)
        states = [t.state for t in study.get_trials(deepcopy=False)]
        parent = study.user_attrs[PARENT_ATTR]
        self._metrics(parent, {f"trials_{s.name.lower()}": float(states.count(s)) for s in STATUS}, step=0)
        self.client.set_terminated(parent, status=status)

    # -- trial runs -------------------------------------------------------------------------------
    def start_trial(self, trial: optuna.Trial, tags: dict[str, str]) -> str | None:
        """Open the trial's run (child of the study run); its id goes to the trial's user attrs."""
        if not self.enabled:
            return None
        parent = trial.study.user_attrs.get(PARENT_ATTR)
        run_tags = {"kind": "trial", "study": trial.study.study_name, "trial": str(trial.number),
                    "state": "RUNNING", "best": "false", **tags}
        tracker = tracking.Tracker(self.home)
        run_id = tracker.start(f"{trial.study.study_name}/trial-{trial.number}", run_tags,
                               {k: str(v) for k, v in trial.params.items()}, parent_run_id=parent)
        trial.set_user_attr(RUN_ATTR, run_id)
        return run_id

    def set_trial_tags(self, trial: optuna.Trial, tags: dict[str, str]) -> None:
        run_id = trial.user_attrs.get(RUN_ATTR) if self.enabled else None
        if run_id:
            for k, v in tags.items():
                self.client.set_tag(run_id, k, v)

    def report(self, trial: optuna.Trial, value: float, step: int) -> None:
        """An intermediate value (periodic evaluation), as the pruner saw it."""
        run_id = trial.user_attrs.get(RUN_ATTR) if self.enabled else None
        if run_id:
            self._metrics(run_id, {"intermediate_value": value}, step)

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """After each trial (Optuna calls it in the worker that ran the trial)."""
        if not self.enabled:
            return
        run_id = trial.user_attrs.get(RUN_ATTR)
        if run_id is None:  # the objective failed before the run was opened
            run_id = tracking.Tracker(self.home).start(
                f"{study.study_name}/trial-{trial.number}",
                {"kind": "trial", "study": study.study_name, "trial": str(trial.number)},
                {k: str(v) for k, v in trial.params.items()}, parent_run_id=study.user_attrs.get(PARENT_ATTR))
        self.finish_trial_run(run_id, trial)
        self._tag_best(study)

    def finish_trial_run(self, run_id: str, trial: FrozenTrial, state: TrialState | None = None) -> None:
        state = state or trial.state
        tags = {"state": state.name}
        if trial.value is not None:
            tags["value"] = f"{trial.value:.6g}"
            self._metrics(run_id, {"value": trial.value}, step=0)
        for k in ("pruned_at", "fail_reason"):
            if k in trial.user_attrs:
                tags[k] = str(trial.user_attrs[k])[:5000]
        for k, v in tags.items():
            self.client.set_tag(run_id, k, v)
        self.client.set_terminated(run_id, status=STATUS.get(state, "FAILED"))

    def _tag_best(self, study: optuna.Study) -> None:
        parent = study.user_attrs.get(PARENT_ATTR)
        complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if not parent or not complete:
            return
        best = study.best_trial
        prev = self.client.get_run(parent).data.tags.get("best_trial")
        if prev == str(best.number):
            return
        if prev is not None and prev.isdigit():
            old = next((t for t in study.get_trials(deepcopy=False) if t.number == int(prev)), None)
            if old is not None and RUN_ATTR in old.user_attrs:
                self.client.set_tag(old.user_attrs[RUN_ATTR], "best", "false")
        if RUN_ATTR in best.user_attrs:
            self.client.set_tag(best.user_attrs[RUN_ATTR], "best", "true")
        self.client.set_tag(parent, "best_trial", str(best.number))
        self.client.set_tag(parent, "best_value", f"{best.value:.6g}")
        self.client.set_tag(parent, "best_params", ", ".join(f"{k}={v}" for k, v in best.params.items()))
        self._metrics(parent, {"best_value": best.value}, step=len(complete))

    def _metrics(self, run_id: str, values: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), ts, step) for k, v in values.items()])
