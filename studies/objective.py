"""A trial is a cell: the objective runs the trial's configuration through the worker and its cache.

A trial whose cell is already done returns the cached AP at once; a cell that a killed trial left
half-trained resumes from its checkpoint. Pruning reads the periodic evaluations the worker writes
to the cell's metrics.jsonl and stops training with `StopTraining` (the cell keeps its checkpoint
and writes no failed.json, so a later trial or `bench run` with the same configuration resumes it).
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import optuna

from adapters.engine.hooks import HookBase
from adapters.engine.trainer import StopTraining
from core.data.sources import prepare_data
from core.paths import run_dir
from bench.keys import cell_key
from bench.runner import run_with_start
from bench.sync import recorded_run_id

REPORTED = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR100")
WORKER_ATTR = "bench_worker"  # system attr: host:pid:start of the process running the trial


class PruneOnEval(HookBase):
    """After each periodic evaluation: report the reported model's AP, stop if the pruner says so.

    Registered after the worker's EvalHook, so the evaluation of this iteration is already in
    metrics.jsonl when it runs (the EvalHook's own condition decides when there is one).
    """

    def __init__(self, trial: optuna.Trial, metrics_path: Path, period: int, on_report=None):
        self.trial = trial
        self.metrics_path = Path(metrics_path)
        self.period = period
        self.on_report = on_report
        self.pruned_at: int | None = None

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if not (self.period > 0 and done % self.period == 0 and done < self.trainer.max_iter):
            return
        ap = latest_eval_ap(self.metrics_path, done)
        if ap is None:
            return
        self.trial.report(ap, done)
        if self.on_report is not None:
            self.on_report(ap, done)
        if self.trial.should_prune():
            self.pruned_at = done
            raise StopTraining(f"pruned at iteration {done} (AP {ap:.2f})")


def latest_eval_ap(path: Path, iteration: int) -> float | None:
    """AP of the first evaluated model (the reported one) logged at `iteration`, if any."""
    if not path.exists():
        return None
    for line in reversed(path.read_text().splitlines()):
        row = json.loads(line)
        if row.get("iteration") != iteration:
            continue
        for k, v in row.items():
            parts = k.split(".")
            if len(parts) == 3 and parts[0] == "eval" and parts[2] == "AP":
                return float(v)
    return None


def process_token() -> str:
    """host:pid:start-time; the start time tells a live worker from a reused pid."""
    start = ""
    try:
        start = Path(f"/proc/{os.getpid()}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        pass
    return f"{socket.gethostname()}:{os.getpid()}:{start}"


def token_alive(token: str) -> bool | None:
    """True/False for a process of this host; None when it ran elsewhere (cannot tell)."""
    try:
        host, pid, start = token.rsplit(":", 2)
    except ValueError:
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if start:
        try:
            now = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
        except (OSError, IndexError):
            return False
        return now == start
    return True


def objective(trial: optuna.Trial, defn, home: Path, mlflow_cb) -> float:
    """Train (or look up) the trial's cell; its reported model's final AP is the value."""
    trial.storage.set_trial_system_attr(trial._trial_id, WORKER_ATTR, process_token())
    try:
        cfg = defn.config_for(trial)
        data = prepare_data(cfg.data, home)
        key = cell_key(cfg, data)
        rdir = run_dir(home, key)
        cached = (rdir / "result.json").exists()
        trial.set_user_attr("cell_key", key)
        parent = mlflow_cb.start_trial(trial, {"cell_key": key, "cached": str(cached).lower(), "kind_study": defn.kind,
                                               "preset": defn.preset, "method": cfg.method,
                                               "lsm": str(cfg.lsm.enabled).lower(), "seed": str(cfg.seed)})
        hook = None
        hooks = []
        if defn.prunes:
            hook = PruneOnEval(trial, rdir / "metrics.jsonl", cfg.solver.eval_period,
                               on_report=lambda v, s: mlflow_cb.report(trial, v, s))
            hooks.append(hook)
        try:  # after its burn-in or teacher, which trials of one seed share
            result = run_with_start(cfg, home, track=mlflow_cb.enabled, progress=False, parent_run_id=parent,
                                    extra_hooks=hooks)
        except StopTraining:
            if hook is None or hook.pruned_at is None:
                raise
            trial.set_user_attr("pruned_at", hook.pruned_at)
            _mark_cell_run_pruned(rdir, mlflow_cb, hook.pruned_at)
            raise optuna.TrialPruned(f"pruned at iteration {hook.pruned_at}") from None
        stats = result["metrics"][result["primary_model"]]
        for k in REPORTED:
            if k in stats:
                trial.set_user_attr(k, float(stats[k]))
        trial.set_user_attr("reported_model", result["primary_model"])
        if run_id := recorded_run_id(rdir, result):  # a cell cached from an outage: the run a sync logged
            trial.set_user_attr("cell_run_id", run_id)
            mlflow_cb.set_trial_tags(trial, {"cell_run_id": run_id})
        return float(stats["AP"])
    except KeyboardInterrupt:
        trial.set_user_attr("interrupted", True)  # a rerun retries it (see studies.run.recover)
        raise
    except optuna.TrialPruned:
        raise
    except Exception as exc:
        trial.set_user_attr("fail_reason", f"{type(exc).__name__}: {exc}"[:2000])
        raise


def _mark_cell_run_pruned(rdir: Path, mlflow_cb, iteration: int) -> None:
    """Tag the cell's run (the worker ended it as KILLED) with where it was pruned."""
    id_file = rdir / "mlflow_run_id"
    if mlflow_cb.enabled and id_file.exists():
        mlflow_cb.client.set_tag(id_file.read_text().strip(), "pruned_at", str(iteration))
