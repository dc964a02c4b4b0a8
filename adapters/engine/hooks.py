"""Hooks: each concern of training (checkpoints, evaluation, metrics, progress) in one place.

Every hook sees the trainer as `self.trainer`. `before_step`/`after_step` run around every
iteration with `trainer.iter` the index of the iteration being run (0-based); `after_train` runs
also when training stops with an exception.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable


class HookBase:
    trainer = None

    def before_train(self) -> None: ...

    def before_step(self) -> None: ...

    def after_step(self) -> None: ...

    def after_train(self) -> None: ...

    def _is_period(self, period: int) -> bool:
        done = self.trainer.iter + 1
        return period > 0 and (done % period == 0 or done == self.trainer.max_iter)


class PeriodicCheckpointer(HookBase):
    """Saves the full training state every `period` iterations and at the end."""

    def __init__(self, checkpointer, period: int):
        self.checkpointer = checkpointer
        self.period = period

    def after_step(self) -> None:
        if self._is_period(self.period):
            self.checkpointer.save(self.trainer.iter, self.trainer.state_dict())


class EvalHook(HookBase):
    """Calls `evaluate(iteration) -> {name: value}` every `period` iterations (0: never here)."""

    def __init__(self, period: int, evaluate: Callable[[int], dict], on_result: Callable[[int, dict], None]):
        self.period = period
        self.evaluate = evaluate
        self.on_result = on_result

    def after_step(self) -> None:
        done = self.trainer.iter + 1
        if self.period > 0 and done % self.period == 0 and done < self.trainer.max_iter:
            self.on_result(done, self.evaluate(done))


class MetricsWriter(HookBase):
    """Appends the step scalars to metrics.jsonl and the tracker every `period` iterations."""

    def __init__(self, path: Path, tracker, period: int):
        self.path = Path(path)
        self.tracker = tracker
        self.period = period
        self._t0 = 0.0
        self._n = 0

    def before_train(self) -> None:
        self._t0, self._n = time.perf_counter(), 0

    def after_step(self) -> None:
        self._n += 1
        if not self._is_period(self.period):
            return
        row = dict(self.trainer.latest)
        row["throughput_it_s"] = self._n / max(time.perf_counter() - self._t0, 1e-9)
        self._t0, self._n = time.perf_counter(), 0
        step = self.trainer.iter + 1
        with self.path.open("a") as f:
            f.write(json.dumps({"iteration": step, **row}) + "\n")
        self.tracker.log_metrics(row, step=step)


class ProgressHook(HookBase):
    """A rich progress bar: iterations, it/s, current loss, ETA."""

    def __init__(self, description: str, enabled: bool = True):
        self.description = description
        self.enabled = enabled
        self._progress = None

    def before_train(self) -> None:
        if not self.enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[speed]:.2f} it/s"), TextColumn("loss {task.fields[loss]:.3f}"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), transient=False,
        )
        self._progress.start()
        t = self.trainer
        self._task = self._progress.add_task(self.description, total=t.max_iter, completed=t.start_iter,
                                             speed=0.0, loss=float("nan"))
        self._t0 = time.perf_counter()

    def after_step(self) -> None:
        if self._progress is None:
            return
        t = self.trainer
        speed = (t.iter + 1 - t.start_iter) / max(time.perf_counter() - self._t0, 1e-9)
        self._progress.update(self._task, completed=t.iter + 1, speed=speed,
                              loss=t.latest.get("total_loss", float("nan")))

    def after_train(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
