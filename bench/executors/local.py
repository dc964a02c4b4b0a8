"""Local executor: one worker process per running cell, slots spread over devices.

Each slot owns a device: on GPUs the worker sees only its card through CUDA_VISIBLE_DEVICES (a
user's own CUDA_VISIBLE_DEVICES list is honoured: slots index into it); on CPU the cores are shared
and each worker gets cores / slots threads.

Workers are forked from a multiprocessing fork server that has imported torch, torchvision,
mlflow and the worker code once: a fresh interpreter would spend seconds importing them for
every cell. Each cell still runs in a process of its own (a crash, NaN or kill stays there), in
its own session (Ctrl-C reaches the orchestrator only), with its output in the cell's worker.log.
As with any multiprocessing program, a script that calls the runner must guard its entry point
with `if __name__ == "__main__":` (the workers import the main module); `bench` does.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # mlflow's SQL store is imported lazily by each run's first call: 1.7 s a cell, once here
        _CONTEXT.set_forkserver_preload(["bench.worker", "mlflow", "mlflow.store.tracking.sqlalchemy_store"])
    return _CONTEXT


def _worker(argv: list[str], log: str, env: dict[str, str], threads: int | None) -> None:
    """Body of a worker process: its own session and log, the slot's device, then `bench.worker`."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.update(env)  # CUDA_VISIBLE_DEVICES is read when CUDA initialises, after this
    if threads:
        import torch

        torch.set_num_threads(threads)
    from bench.worker import main

    raise SystemExit(main(argv))


@dataclass
class Job:
    cell: object
    slot: int
    process: multiprocessing.process.BaseProcess
    log: Path
    attempts: int = 1


@dataclass
class LocalExecutor:
    devices: list[str]
    slots_per_device: int = 1
    track: bool = True
    prestart: bool = True  # False when nothing will run (a cached table): no fork server at all
    jobs: dict[int, Job] = field(default_factory=dict)

    def __post_init__(self):
        if self.prestart:  # its imports then overlap with planning instead of delaying the first cell
            _context()
            multiprocessing.forkserver.ensure_running()

    @property
    def slots(self) -> int:
        return len(self.devices) * self.slots_per_device

    def free_slot(self) -> int | None:
        for s in range(self.slots):
            if s not in self.jobs:
                return s
        return None

    def _env(self, slot: int) -> tuple[dict[str, str], int | None]:
        """(environment updates, CPU threads) of a slot's worker."""
        device = self.devices[slot // self.slots_per_device]
        if device.startswith("cuda"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = device.split(":")[1] if ":" in device else "0"
            if visible:  # slots index into the user's own list
                index = visible.split(",")[int(index)]
            return {"CUDA_VISIBLE_DEVICES": index}, None
        threads = max(1, (os.cpu_count() or 1) // self.slots)
        return {"OMP_NUM_THREADS": str(threads)}, threads

    def submit(self, cell, home: Path, parent_run_id: str | None, attempts: int = 1) -> Job:
        slot = self.free_slot()
        assert slot is not None, "submit called without a free slot"
        rdir = cell.directory(home)
        rdir.mkdir(parents=True, exist_ok=True)
        device = "cuda" if self.devices[slot // self.slots_per_device].startswith("cuda") else "cpu"
        cfg = cell.config.model_copy(update={"device": device})
        (rdir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        argv = [str(rdir / "config.yaml"), "--home", str(home)]
        if parent_run_id:
            argv += ["--parent-run-id", parent_run_id]
        if not self.track:
            argv.append("--no-track")
        log = rdir / "worker.log"
        env, threads = self._env(slot)
        proc = _context().Process(target=_worker, args=(argv, str(log), env, threads), daemon=False)
        proc.start()
        job = Job(cell, slot, proc, log, attempts)
        self.jobs[slot] = job
        return job

    def poll(self) -> list[tuple[Job, int]]:
        """Jobs that ended since the last call, with their exit codes."""
        ended = []
        for slot, job in list(self.jobs.items()):
            rc = job.process.exitcode
            if rc is not None:
                ended.append((job, rc))
                del self.jobs[slot]
        return ended

    def cancel(self) -> None:
        """Stop every running worker (they resume from their checkpoints next time)."""
        for job in self.jobs.values():
            job.process.terminate()
        for job in self.jobs.values():
            job.process.join(timeout=30)
            if job.process.exitcode is None:
                job.process.kill()
        self.jobs.clear()
