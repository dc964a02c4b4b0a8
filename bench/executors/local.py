"""Local executor: one worker subprocess per slot, slots spread over devices.

Each slot owns a device: on GPUs the worker sees only its card through CUDA_VISIBLE_DEVICES (a
user's own CUDA_VISIBLE_DEVICES list is honoured: slots index into it); on CPU the cores are shared
and each worker gets cores / slots threads.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass
class Job:
    cell: object
    slot: int
    process: subprocess.Popen
    log: Path
    attempts: int = 1


@dataclass
class LocalExecutor:
    devices: list[str]
    slots_per_device: int = 1
    track: bool = True
    jobs: dict[int, Job] = field(default_factory=dict)

    @property
    def slots(self) -> int:
        return len(self.devices) * self.slots_per_device

    def free_slot(self) -> int | None:
        for s in range(self.slots):
            if s not in self.jobs:
                return s
        return None

    def _env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        device = self.devices[slot // self.slots_per_device]
        if device.startswith("cuda"):
            visible = os.environ.get("CUDA_VISIBLE_DEVICES")
            index = device.split(":")[1] if ":" in device else "0"
            if visible:  # slots index into the user's own list
                index = visible.split(",")[int(index)]
            env["CUDA_VISIBLE_DEVICES"] = index
        else:
            threads = max(1, (os.cpu_count() or 1) // self.slots)
            env["OMP_NUM_THREADS"] = str(threads)
        return env

    def submit(self, cell, home: Path, parent_run_id: str | None, attempts: int = 1) -> Job:
        slot = self.free_slot()
        assert slot is not None, "submit called without a free slot"
        rdir = cell.directory(home)
        rdir.mkdir(parents=True, exist_ok=True)
        device = "cuda" if self.devices[slot // self.slots_per_device].startswith("cuda") else "cpu"
        cfg = cell.config.model_copy(update={"device": device})
        (rdir / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        cmd = [sys.executable, "-m", "bench.worker", str(rdir / "config.yaml"), "--home", str(home)]
        if parent_run_id:
            cmd += ["--parent-run-id", parent_run_id]
        if not self.track:
            cmd.append("--no-track")
        log = rdir / "worker.log"
        with log.open("a") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=self._env(slot),
                                    start_new_session=True)  # Ctrl-C reaches the orchestrator only
        job = Job(cell, slot, proc, log, attempts)
        self.jobs[slot] = job
        return job

    def poll(self) -> list[tuple[Job, int]]:
        """Jobs that ended since the last call, with their exit codes."""
        ended = []
        for slot, job in list(self.jobs.items()):
            rc = job.process.poll()
            if rc is not None:
                ended.append((job, rc))
                del self.jobs[slot]
        return ended

    def cancel(self) -> None:
        """Stop every running worker (they resume from their checkpoints next time)."""
        for job in self.jobs.values():
            job.process.terminate()
        for job in self.jobs.values():
            try:
                job.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                job.process.kill()
        self.jobs.clear()
