"""Slurm executor: pending cells go to Slurm as submitit job arrays, one array per resource profile.

Same interface as `LocalExecutor` (`jobs`, `slots`, `free_slot`, `submit`, `poll`, `cancel`) plus
`submit_many`, which the runner uses to hand over every ready cell at once so that they become
arrays (`--array-parallelism` caps how many of one array run at a time, Slurm's `%K`).

- Each array element runs `CellTask`: `bench.worker.main([config.yaml, --home, ...])`, the cell's
  config and arguments (`--start-from` the directory of the cell it starts from) made exactly as
  the local executor makes them (`bench.executors.worker_argv`).
- Preemption / timeout: `CellTask` is a `submitit.helpers.Checkpointable`, so on Slurm's warning
  signal submitit requeues the same call; the worker then resumes from the cell's newest checkpoint
  (what is lost is the work since it, at most `solver.checkpoint_period` iterations).
- Polling is one `squeue` call for all jobs, at most every `poll_interval` seconds (the runner asks
  every 0.5 s). squeue rather than submitit's sacct watcher: sacct needs the accounting database,
  which small clusters (and the test cluster) do not run. A job that is no longer active ended;
  its exit code comes from submitit's result pickle.
- Logs: submitit's folder (BENCH_HOME/slurm/<date>-<time>-<id>/ per submission, on the shared
  filesystem) holds each job's stdout+stderr; the cell's `slurm.log` links to its file (the runner
  shows its tail on failure).
- `gpus_per_cell > 1`: one task per GPU on one node; each task exports RANK, WORLD_SIZE,
  LOCAL_RANK, MASTER_ADDR, MASTER_PORT (torch.distributed's env:// variables) before the worker.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import pickle
import re
import shutil
import subprocess
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from core.errors import BenchError
from bench.executors import worker_argv

# squeue states of a job that has not ended (a requeued job passes through REQUEUED/PREEMPTED)
ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED",
          "RESIZING", "SUSPENDED", "PREEMPTED", "STAGE_OUT", "SIGNALING", "RESV_DEL_HOLD", "STOPPED"}


def parse_time(value: str | int) -> int:
    """Slurm's --time formats (M, M:S, H:M:S, D-H, D-H:M, D-H:M:S) -> whole minutes."""
    text = str(value).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text)
    if not m:
        raise BenchError(f"--time '{value}' is not a Slurm time; use e.g. 48:00:00, 2-00:00:00 or 90 (minutes)")
    days, a, b, c = (int(g) if g is not None else None for g in m.groups())
    if days is not None:  # D-H[:M[:S]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise BenchError(f"--time '{value}' is zero; give the time limit of one cell, e.g. 48:00:00")
    return math.ceil(seconds / 60)


def check_slurm() -> None:
    """submitit installed and sbatch on PATH, else a one-line BenchError saying how to get there."""
    try:
        import submitit  # noqa: F401
    except ImportError:
        raise BenchError("--executor slurm needs submitit: pip install 'lsm-bench[slurm]'") from None
    for tool in ("sbatch", "squeue", "scancel", "srun"):
        if shutil.which(tool) is None:
            raise BenchError(f"--executor slurm: '{tool}' is not on PATH; run on a Slurm login node "
                             "(or start the test cluster: sudo .ci/slurm_cluster.sh start), or use --executor local")


def ddp_env(global_rank: int, local_rank: int, world_size: int, hostnames: list[str], job_id: str) -> dict[str, str]:
    """torch.distributed's env:// variables for one task of a multi-GPU cell.

    Rank 0's host is the rendezvous; the port is derived from the Slurm job id so every task of
    the job picks the same one and two jobs sharing a node rarely collide."""
    digits = re.sub(r"\D", "", str(job_id)) or "0"
    return {"RANK": str(global_rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(local_rank),
            "MASTER_ADDR": hostnames[0], "MASTER_PORT": str(20000 + int(digits) % 20000)}


try:
    from submitit.helpers import Checkpointable as _Checkpointable
except ImportError:  # the executor refuses to start without submitit (check_slurm); the module still imports
    _Checkpointable = object


class CellTask(_Checkpointable):
    """What one Slurm task runs: the worker on the cell's config. Checkpointable: on timeout or
    preemption submitit requeues this same call, and the worker resumes from the cell's checkpoint."""

    def __init__(self, argv: list[str]):
        self.argv = list(argv)

    def __call__(self) -> int:
        import submitit

        job = submitit.JobEnvironment()
        if job.num_tasks > 1:
            os.environ.update(ddp_env(job.global_rank, job.local_rank, job.num_tasks, job.hostnames, job.raw_job_id))
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:  # torch is imported after this: it takes the hint
            os.environ["OMP_NUM_THREADS"] = cpus
        from bench.worker import main

        return main(self.argv)

    def checkpoint(self, *args, **kwargs):
        """Requeue the same call: the worker resumes from the cell's newest checkpoint."""
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)


@dataclass(frozen=True)
class Resources:
    """One resource profile = one job array."""
    partition: str | None
    gpus: int
    cpus_per_task: int | None
    time_min: int

    @property
    def tasks(self) -> int:
        return max(1, self.gpus)


@dataclass
class Job:
    cell: object
    job_id: str  # "<array id>_<index>"
    log: Path  # the cell's slurm.log, a link to submitit's stdout+stderr file
    attempts: int = 1
    slurm_job: object = None  # submitit.SlurmJob


@dataclass
class SlurmExecutor:
    partition: str | None = None
    gpus_per_cell: int = 1
    cpus_per_cell: int | None = None  # None: the partition's default
    time: str = "48:00:00"  # limit of one full cell; shorter cells (burn-ins, cells after one) get their share
    array_parallelism: int = 256
    folder: Path | None = None  # where submitit's folders go, one per submission; default BENCH_HOME/slurm
    track: bool = True
    max_jobs: int = 10000  # jobs in flight at once (the runner keeps the rest queued)
    poll_interval: float = 3.0  # seconds between squeue calls
    additional: dict = field(default_factory=dict)  # extra sbatch options, e.g. {"account": "proj"}
    jobs: dict[str, Job] = field(default_factory=dict)

    def __post_init__(self):
        check_slurm()
        if self.gpus_per_cell < 0:
            raise BenchError(f"--gpus-per-cell {self.gpus_per_cell}: give 0 (CPU cells) or more")
        if self.array_parallelism < 1:
            raise BenchError(f"--array-parallelism {self.array_parallelism}: give 1 or more")
        self.time_min = parse_time(self.time)
        self._last_poll = float("-inf")
        self.submitted: list[str] = []  # job ids in submission order (tests, benchmarks)

    @property
    def slots(self) -> int:
        return self.max_jobs

    def free_slot(self) -> int | None:
        return len(self.jobs) if len(self.jobs) < self.max_jobs else None

    def resources(self, cell) -> Resources:
        """The cell's profile: the executor's options, with the time limit scaled by the share of
        the schedule the cell trains (a burn-in or a cell resuming after one needs less; shorter
        limits backfill sooner), rounded up to 10 minutes so that profiles stay few."""
        share = cell.work / max(1, cell.config.solver.max_iter)
        minutes = min(self.time_min, max(10, math.ceil(self.time_min * share / 10) * 10))
        cpus = self.cpus_per_cell
        if cpus is not None and self.gpus_per_cell > 1:
            cpus = max(1, cpus // self.gpus_per_cell)  # per task: one task per GPU
        return Resources(self.partition, self.gpus_per_cell, cpus, minutes)

    def _parameters(self, res: Resources) -> dict:
        params = {"time": res.time_min, "nodes": 1, "ntasks_per_node": res.tasks,
                  "array_parallelism": self.array_parallelism, "stderr_to_stdout": True,
                  "job_name": "bench-cell", "signal_delay_s": 120}
        if res.partition:
            params["partition"] = res.partition
        if res.gpus:
            params["gpus_per_node"] = res.gpus
        if res.cpus_per_task:
            params["cpus_per_task"] = res.cpus_per_task
        if self.additional:
            params["additional_parameters"] = dict(self.additional)
        return params

    def submit(self, cell, home: Path, parent_run_id: str | None, attempts: int = 1) -> Job:
        return self.submit_many([(cell, attempts)], home, parent_run_id)[0]

    def submit_many(self, items: list[tuple[object, int]], home: Path, parent_run_id: str | None) -> list[Job]:
        """Submit (cell, attempt) pairs: one job array per resource profile."""
        import submitit

        home = Path(home).resolve()
        # one new folder per submission, made before sbatch: Slurm opens a job's log as soon as it
        # starts, which can be before submitit would create a per-job "%j" folder (the job then
        # dies with "Could not open stdout file"); and job ids restart on a reset cluster, so
        # unique folders keep an old job's result file from being read as a new one's
        folder = (Path(self.folder) if self.folder else home / "slurm") / \
            f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
        folder.mkdir(parents=True, exist_ok=True)
        groups: dict[Resources, list[tuple[object, int]]] = defaultdict(list)
        for cell, attempts in items:
            groups[self.resources(cell)].append((cell, attempts))
        out = []
        for res, group in groups.items():
            ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=3)
            ex.update_parameters(**self._parameters(res))
            device = "cuda" if res.gpus else "cpu"
            tasks = [CellTask(worker_argv(c, home, device, parent_run_id, self.track))
                     for c, _ in group]
            refused = io.StringIO()  # submitit prints sbatch's stderr itself; it goes into the one-line error
            try:
                with contextlib.redirect_stderr(refused), ex.batch():
                    sjobs = [ex.submit(t) for t in tasks]
            except submitit.core.utils.FailedJobError as err:
                why = (str(err).strip() or refused.getvalue().strip() or "no reason given").splitlines()[-1]
                raise BenchError(f"sbatch refused the cells ({why}); check --partition, --gpus-per-cell, --time "
                                 "and --cpus-per-cell") from None
            for (cell, attempts), sjob in zip(group, sjobs):
                log = cell.directory(home) / "slurm.log"
                log.unlink(missing_ok=True)
                log.symlink_to(Path(sjob.paths.stdout).resolve())
                job = Job(cell, sjob.job_id, log, attempts, sjob)
                self.jobs[sjob.job_id] = job
                self.submitted.append(sjob.job_id)
                out.append(job)
        return out

    def _states(self) -> dict[str, str] | None:
        """{job id: state} from one squeue call; None if squeue failed (slurmctld busy or restarting)."""
        arrays = sorted({j.split("_")[0] for j in self.jobs})
        try:
            out = subprocess.run(["squeue", "-h", "-r", "-t", "all", "-o", "%i|%T", "-j", ",".join(arrays)],
                                 capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        if out.returncode != 0:
            # squeue exits 1 with "Invalid job id" when every listed job has left slurmctld's memory
            return {} if "Invalid job id" in out.stderr else None
        states = {}
        for line in out.stdout.splitlines():
            jid, _, state = line.strip().partition("|")
            states[jid] = state.split()[0] if state else ""
        return states

    @staticmethod
    def _exit_code(job: Job) -> int:
        """0 if submitit recorded the worker's return value 0, else non-zero."""
        try:
            with open(job.slurm_job.paths.result_pickle, "rb") as f:
                outcome, value = pickle.load(f)
            return 0 if outcome == "success" and not value else 1
        except (OSError, EOFError, ValueError, pickle.UnpicklingError):
            return 1

    def poll(self) -> list[tuple[Job, int]]:
        """Jobs that ended since the last call, with exit codes (one squeue call per poll_interval)."""
        now = time.monotonic()
        if not self.jobs or now - self._last_poll < self.poll_interval:
            return []
        self._last_poll = now
        states = self._states()
        if states is None:
            return []
        ended = []
        for jid, job in list(self.jobs.items()):
            state = states.get(jid)
            if state in ACTIVE:
                continue
            rc = self._exit_code(job)
            if rc:
                with open(job.log, "a") as f:  # the runner's failure record shows the log's tail
                    f.write(f"\nbench: Slurm job {jid} ended {state or 'and left the queue'} without a result\n")
            ended.append((job, rc))
            del self.jobs[jid]
        return ended

    def cancel(self) -> None:
        """scancel every job in flight (the cells keep their checkpoints; a rerun resumes them)."""
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True, timeout=60)
        self.jobs.clear()
