"""Create or continue a study, recover what a killed run left, run its trials in 1..N processes.

Rerunning the same command continues the study (`load_if_exists`): done trials stay, a trial whose
worker died (SIGKILL, power loss: still RUNNING, its process gone) or was interrupted is failed and
queued again with the same parameters, and a grid study retries grid points that only failed.
Only the remaining trials run; their cells resume from their checkpoints.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
from pathlib import Path

import optuna
from optuna.trial import TrialState

from bench.executors.local import threads_per_worker
from core.errors import BenchError
from studies.definitions import StudyDef
from studies.mlflow_callback import RUN_ATTR, MLflowStudyCallback
from studies.objective import WORKER_ATTR, objective, process_token, token_alive
from studies.storage import default_url, open_storage

DEF_ATTR = "bench_definition"
ID_ATTR = "bench_identity"
WORKER_PREFIX = "bench_worker:"  # study user attrs: one per worker process that ever ran trials

optuna.logging.set_verbosity(optuna.logging.WARNING)


def open_study(defn: StudyDef, home: Path, storage_url: str | None = None, worker_index: int = 0) -> optuna.Study:
    """Create or load `defn.name`, refusing to continue a study made with other settings."""
    storage = open_storage(home, storage_url)
    study = optuna.create_study(study_name=defn.name, storage=storage, sampler=defn.sampler(worker_index),
                                pruner=defn.pruner(), direction="maximize", load_if_exists=True)
    old = study.user_attrs.get(ID_ATTR)
    if old is not None and old != defn.identity():
        before = StudyDef.from_dict(study.user_attrs[DEF_ATTR])
        diff = [k for k, v in defn.to_dict().items() if k not in ("trials", "seeds", "grid", "rows")
                and before.to_dict().get(k) != v]
        raise BenchError(f"study '{defn.name}' exists with other settings ({', '.join(diff)} differ); "
                         f"pass --name to start a new study or use the original settings to continue it")
    if study.user_attrs.get(DEF_ATTR) != defn.to_dict():
        study.set_user_attr(DEF_ATTR, defn.to_dict())
        study.set_user_attr(ID_ATTR, defn.identity())
    return study


def load_study(name: str, home: Path, storage_url: str | None = None, worker_index: int = 0) -> tuple[optuna.Study, StudyDef]:
    """An existing study and its definition (what worker processes and reports start from)."""
    storage = open_storage(home, storage_url)
    try:
        summary = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        known = ", ".join(s.study_name for s in optuna.get_all_study_summaries(storage)) or "none"
        raise BenchError(f"no study '{name}' in {storage_url or default_url(home)}; studies there: {known}") from None
    if DEF_ATTR not in summary.user_attrs:
        raise BenchError(f"study '{name}' was not made by bench study (no definition stored); give another --name")
    defn = StudyDef.from_dict(summary.user_attrs[DEF_ATTR])
    study = optuna.load_study(study_name=name, storage=storage, sampler=defn.sampler(worker_index),
                              pruner=defn.pruner())
    return study, defn


def retried_numbers(trials: list) -> set[int]:
    out = set()
    for t in trials:
        out.update(t.system_attrs.get("retry_history", []))
    return out


def settled(study: optuna.Study) -> int:
    """Trials that count towards --trials: complete, pruned, or failed and not queued again."""
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    return sum(1 for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or (t.state == TrialState.FAIL and t.number not in retried))


def recover(study: optuna.Study, defn: StudyDef, mlflow_cb: MLflowStudyCallback) -> list[str]:
    """Fail the trials of dead local workers and queue again what must be retried; notes."""
    notes = []
    storage = study._storage
    workers = [k[len(WORKER_PREFIX):] for k in study.user_attrs if k.startswith(WORKER_PREFIX)]
    all_workers_dead = bool(workers) and all(token_alive(w) is False for w in workers)
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        token = t.system_attrs.get(WORKER_ATTR)
        if token is None and not all_workers_dead:
            continue  # killed between its creation and its first line, or still starting: cannot tell yet
        if token is not None and token_alive(token) is not False:
            continue  # alive, or on another host (an RDB storage's heartbeat handles those)
        storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        if RUN_ATTR in t.user_attrs and mlflow_cb.enabled:
            mlflow_cb.finish_trial_run(t.user_attrs[RUN_ATTR], t, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried = retried_numbers(trials)
    space = defn.search_space() if defn.is_grid else None
    same = [t for t in trials if space is None or t.system_attrs.get("search_space") == space]
    covered = {t.system_attrs.get("grid_id") for t in same
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)}
    for t in same:
        if t.state != TrialState.FAIL or t.number in retried:
            continue
        if defn.is_grid:  # a grid point that only failed is run again (as `bench run` retries cells)
            grid_id = t.system_attrs.get("grid_id")
            if grid_id is None or grid_id in covered:
                continue  # None: killed before the sampler gave it a point; the sampler still has that point
            covered.add(grid_id)
        elif not (t.user_attrs.get("interrupted") or "fail_reason" not in t.user_attrs):
            continue  # tune: a trial that failed by itself counts; one that was killed is retried
        _requeue(study, t)
        notes.append(f"trial {t.number} ({_params(t)}) did not finish; queued again")
    return notes


def _requeue(study: optuna.Study, t) -> None:
    """A WAITING copy with the same parameters (and grid point); lineage as Optuna's retry callback."""
    history = list(t.system_attrs.get("retry_history", [])) + [t.number]
    system_attrs = {"failed_trial": t.system_attrs.get("failed_trial", t.number), "retry_history": history}
    for k in ("grid_id", "search_space"):
        if k in t.system_attrs:
            system_attrs[k] = t.system_attrs[k]
    study.add_trial(optuna.create_trial(state=TrialState.WAITING, params=t.params, distributions=t.distributions,
                                        system_attrs=system_attrs))


def _params(t) -> str:
    return ", ".join(f"{k}={v}" for k, v in t.params.items())


def work(study: optuna.Study, defn: StudyDef, home: Path, mlflow_cb: MLflowStudyCallback) -> None:
    """One worker's loop: trials until the grid is covered or --trials are settled."""
    callbacks = [mlflow_cb]
    waiting = study.get_trials(deepcopy=False, states=(TrialState.WAITING,))
    if defn.is_grid:
        if study.sampler.is_exhausted(study) and not waiting:
            return
        n_trials = None
        space = defn.search_space()
        n_points = math.prod(len(v) for v in space.values())

        def stop_when_grid_started(st: optuna.Study, _trial) -> None:
            """Stop once every point is done or taken by another worker (GridSampler alone would
            re-run a point that another worker is still training)."""
            trials = st.get_trials(deepcopy=False)
            if any(t.state == TrialState.WAITING for t in trials):
                return
            taken = {t.system_attrs.get("grid_id") for t in trials
                     if t.state != TrialState.WAITING and t.system_attrs.get("search_space") == space}
            if len(taken & set(range(n_points))) == n_points:
                st.stop()

        callbacks.append(stop_when_grid_started)
    else:
        left = defn.trials - settled(study)
        if left <= 0:
            return
        n_trials = left

        def stop_when_settled(st: optuna.Study, _trial) -> None:
            if settled(st) >= defn.trials:
                st.stop()

        callbacks.append(stop_when_settled)
    # registered before the first trial: a trial killed before it records its own worker token is
    # still known to come from one of the study's workers (see `recover`)
    study.set_user_attr(f"{WORKER_PREFIX}{process_token()}", True)
    study.optimize(lambda trial: objective(trial, defn, home, mlflow_cb), n_trials=n_trials,
                   callbacks=callbacks, catch=(Exception,), gc_after_trial=False)


def run_study(defn: StudyDef, home: Path, storage_url: str | None = None, workers: int = 1, track: bool = True,
              command: str = "", log=print) -> optuna.Study:
    """Create/continue the study, recover, run `workers` processes (1: this one), close its MLflow run."""
    home = Path(home).resolve()
    if workers < 1:
        raise BenchError(f"--workers must be at least 1, got {workers}")
    study = open_study(defn, home, storage_url)
    mlflow_cb = MLflowStudyCallback(home, enabled=track)
    mlflow_cb.ensure_parent(study, {"study_kind": defn.kind, "preset": defn.preset, "command": command,
                                    "storage": storage_url or default_url(home)},
                            {k: str(v) for k, v in defn.to_dict().items()})
    for note in recover(study, defn, mlflow_cb):
        log(note)
    status = "KILLED"
    try:
        if workers == 1:
            work(study, defn, home, mlflow_cb)
        else:
            _run_processes(defn, home, storage_url, workers, track, log)
        status = "FINISHED"
    finally:
        mlflow_cb.end_parent(study, status)
    return study


def _run_processes(defn: StudyDef, home: Path, storage_url: str | None, workers: int, track: bool, log) -> None:
    """N worker processes on one study; Ctrl-C stops them (their trials are retried on rerun)."""
    logs = home / "optuna" / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = str(threads_per_worker(workers))  # N workers share the cores (a bad value fails here)
    procs = []
    for i in range(workers):
        cmd = [sys.executable, "-m", "studies.worker", "--study", defn.name, "--home", str(home), "--index", str(i)]
        if storage_url:
            cmd += ["--storage", storage_url]
        if not track:
            cmd.append("--no-track")
        log_path = logs / f"{defn.name}-w{i}.log"
        with log_path.open("a") as f:
            procs.append((subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env), log_path))
    try:
        while any(p.poll() is None for p, _ in procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        for p, _ in procs:
            p.terminate()
        for p, _ in procs:
            p.wait()
        raise
    bad = [(p.returncode, path) for p, path in procs if p.returncode != 0]
    if bad:
        raise BenchError(f"{len(bad)} study worker(s) exited with an error; see {bad[0][1]}")
