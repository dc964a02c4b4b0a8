"""Local executor: one worker process per running cell, slots spread over devices.

Each slot owns a device: on GPUs the worker sees only its card through CUDA_VISIBLE_DEVICES (a
user's own CUDA_VISIBLE_DEVICES list is honoured: slots index into it); on CPU the cores are shared
and each worker gets cores / slots threads, or the user's OMP_NUM_THREADS where it is set (two
runs side by side on one machine would otherwise each assume they own every core).

Workers are forked from a multiprocessing fork server that has imported torch, torchvision,
mlflow and the worker code once: a fresh interpreter would spend seconds importing them for
every cell. Each cell still runs in a process of its own (a crash, NaN or kill stays there), in
its own session (Ctrl-C reaches the orchestrator only), with its output in the cell's worker.log.
As with any multiprocessing program, a script that calls the runner must guard its entry point
with `if __name__ == "__main__":` (the workers import the main module); `bench` does.

With `gpus_per_cell` N > 1 a slot is N devices (on CPU: N processes on the shared cores) and a
cell is one DDP job: N worker processes with torchrun's variables (RANK, LOCAL_RANK, WORLD_SIZE,
MASTER_ADDR=127.0.0.1, a free MASTER_PORT). The job ends when all N have exited; its exit code is
that of the first rank to fail, whose siblings are then stopped (they would otherwise wait in a
collective). Rank 0 logs to worker.log, rank r > 0 to worker.rank<r>.log.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BenchError
from bench.executors import worker_argv

_CONTEXT = None


def _context():
    global _CONTEXT
    if _CONTEXT is None:
        _CONTEXT = multiprocessing.get_context("forkserver")
        # mlflow's SQL store is imported lazily by each run's first call: 1.7 s a cell, once here
        _CONTEXT.set_forkserver_preload(["bench.worker", "mlflow", "mlflow.store.tracking.sqlalchemy_store"])
    return _CONTEXT


def user_threads() -> int | None:
    """The user's OMP_NUM_THREADS as a positive count; None where unset (a bad value is an error)."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        raise BenchError(f"OMP_NUM_THREADS={value!r} is not a positive integer; set it to the threads per worker "
                         "(e.g. 1) or unset it")
    return int(value)


def threads_per_worker(workers: int) -> int:
    """Threads each of `workers` processes on this machine takes: the user's OMP_NUM_THREADS where set,
    else the cores shared out (N workers each taking every core run ~3x slower on 2 cores)."""
    return user_threads() or max(1, (os.cpu_count() or 1) // workers)


def _worker(argv: list[str], log: str, env: dict[str, str | None], threads: int | None) -> None:
    """Body of a worker process: its own session and log, the slot's device, then `bench.worker`.
    `env`: variables to set, or to unset where None."""
    os.setsid()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    for name, value in env.items():  # CUDA_VISIBLE_DEVICES is read when CUDA initialises, after this
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    if threads:
        import torch

        torch.set_num_threads(threads)
    from bench.worker import main

    raise SystemExit(main(argv))


@dataclass
class Job:
    cell: object
    slot: int
    process: multiprocessing.process.BaseProcess  # rank 0's under DDP
    log: Path  # under DDP, set to the log of the first rank that failed
    attempts: int = 1
    processes: list = field(default_factory=list)  # every rank's, rank order (DDP); empty: `process` only
    failure: int | None = None  # exit code of the first rank that failed

    def exitcode(self) -> int | None:
        """None while a rank runs; else 0, or the first failing rank's code."""
        procs = self.processes or [self.process]
        for r, p in enumerate(procs):
            if p.exitcode not in (None, 0) and self.failure is None:
                self.failure = p.exitcode
                if self.processes:
                    self.log = self.log.with_name("worker.log" if r == 0 else f"worker.rank{r}.log")
                for q in procs:  # its siblings would wait in a collective until the timeout
                    if q.exitcode is None:
                        q.terminate()
        if any(p.exitcode is None for p in procs):
            return None
        return self.failure if self.failure is not None else 0


@dataclass
class LocalExecutor:
    devices: list[str]
    slots_per_device: int = 1
    track: bool = True
    prestart: bool = True  # False when nothing will run (a cached table): no fork server at all
    gpus_per_cell: int = 1  # > 1: each cell is a DDP job over that many devices (CPU: processes)
    jobs: dict[int, Job] = field(default_factory=dict)

    def __post_init__(self):
        self._groups = self._device_groups()
        user_threads()  # a bad OMP_NUM_THREADS fails here, before any cell starts
        if self.prestart:  # its imports then overlap with planning instead of delaying the first cell
            _context()
            multiprocessing.forkserver.ensure_running()

    def _device_groups(self) -> list[list[str]]:
        """The devices of each cell: one each; with gpus_per_cell N, consecutive N-tuples of GPUs,
        and each CPU entry hosts N processes."""
        n = self.gpus_per_cell
        if n < 1:
            raise BenchError(f"--gpus-per-cell {n} must be >= 1")
        if n == 1:
            return [[d] for d in self.devices]
        gpus = [d for d in self.devices if d.startswith("cuda")]
        if len(gpus) % n:
            raise BenchError(f"--gpus-per-cell {n} needs the GPUs in groups of {n}, got {len(gpus)} "
                             f"({','.join(gpus)}); list a multiple of {n} devices with --devices")
        return [[d] for d in self.devices if not d.startswith("cuda")] + [gpus[i:i + n] for i in range(0, len(gpus), n)]

    @property
    def slots(self) -> int:
        return len(self._groups) * self.slots_per_device

    def free_slot(self) -> int | None:
        for s in range(self.slots):
            if s not in self.jobs:
                return s
        return None

    def _ddp_env(self, slot: int, port: int) -> tuple[list[dict[str, str]], int | None]:
        """(environment of each rank, CPU threads per rank) of a DDP slot."""
        group = self._groups[slot // self.slots_per_device]
        n = self.gpus_per_cell
        env = {"WORLD_SIZE": str(n), "LOCAL_WORLD_SIZE": str(n), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        threads = max(1, (os.cpu_count() or 1) // (self.slots * n))
        env["OMP_NUM_THREADS"] = str(threads)
        if group[0].startswith("cuda"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            indices = [d.split(":")[1] if ":" in d else "0" for d in group]
            if visible:  # slots index into the user's own list
                indices = [visible.split(",")[int(i)] for i in indices]
            env["CUDA_VISIBLE_DEVICES"] = ",".join(indices)  # rank r trains on cuda:LOCAL_RANK = its r-th
        return [{**env, "RANK": str(r), "LOCAL_RANK": str(r)} for r in range(n)], threads

    def _env(self, slot: int) -> tuple[dict[str, str], int | None]:
        """(environment updates, CPU threads) of a slot's worker."""
        device = self._groups[slot // self.slots_per_device][0]
        if device.startswith("cuda"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = device.split(":")[1] if ":" in device else "0"
            if visible:  # slots index into the user's own list
                index = visible.split(",")[int(index)]
            return {"CUDA_VISIBLE_DEVICES": index}, None
        threads = threads_per_worker(self.slots)
        return {"OMP_NUM_THREADS": str(threads)}, threads

    def submit(self, cell, home: Path, parent_run_id: str | None, attempts: int = 1) -> Job:
        slot = self.free_slot()
        assert slot is not None, "submit called without a free slot"
        device = "cuda" if self._groups[slot // self.slots_per_device][0].startswith("cuda") else "cpu"
        argv = worker_argv(cell, home, device, parent_run_id, self.track)
        rdir = cell.directory(home)
        log = rdir / "worker.log"
        # The fork server's environment is the one it started with; where the runs go is the
        # orchestrator's now (`bench run` may have started an MLflow server since).
        tracking = {"MLFLOW_TRACKING_URI": os.environ.get("MLFLOW_TRACKING_URI")}
        if self.gpus_per_cell > 1:
            from bench.tracking import free_port

            envs, threads = self._ddp_env(slot, free_port())
            procs = [_context().Process(target=_worker, daemon=False,
                                        args=(argv, str(log if r == 0 else rdir / f"worker.rank{r}.log"),
                                              {**env, **tracking}, threads))
                     for r, env in enumerate(envs)]
            for p in procs:
                p.start()
            job = Job(cell, slot, procs[0], log, attempts, processes=procs)
        else:
            env, threads = self._env(slot)
            proc = _context().Process(target=_worker, args=(argv, str(log), {**env, **tracking}, threads), daemon=False)
            proc.start()
            job = Job(cell, slot, proc, log, attempts)
        self.jobs[slot] = job
        return job

    def poll(self) -> list[tuple[Job, int]]:
        """Jobs that ended since the last call, with their exit codes."""
        ended = []
        for slot, job in list(self.jobs.items()):
            rc = job.exitcode()
            if rc is not None:
                ended.append((job, rc))
                del self.jobs[slot]
        return ended

    def cancel(self) -> None:
        """Stop every running worker (they resume from their checkpoints next time)."""
        procs = [p for job in self.jobs.values() for p in (job.processes or [job.process])]
        for p in procs:
            p.terminate()
        for p in procs:
            p.join(timeout=30)
            if p.exitcode is None:
                p.kill()
        self.jobs.clear()
