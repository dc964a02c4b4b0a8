"""Helpers shared by the benchmark scripts (not a test: they print measured numbers)."""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

# The repository these scripts belong to, unless a caller points them at another checkout (the
# paired speed script runs the same setup code against an older worktree).
sys.path.insert(0, os.environ.get("BENCH_CODE_ROOT") or str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

# The table rows' own settings (bench/specs/table1.yaml), so each method runs as on Table 1.
ROW_OVERRIDES = {"softteacher": ["semi.t=0.9", "model.cls_loss=ce"], "pseco": ["semi.t=0.5", "semi.lambda_u=2.0"],
                 "ddetr": ["ddetr.strategy=stac"]}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, warmup: int, repeats: int, clock: str = "wall") -> list[float]:
    """Time of `fn()` per call, after `warmup` calls. `clock="cpu"`: this process's CPU time
    (all its threads), which other jobs on a shared machine do not inflate as they do wall time."""
    now = time.process_time if clock == "cpu" else time.perf_counter
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = now()
        fn()
        sync(device)
        times.append(now() - t0)
    return times


def summary(times: list[float]) -> str:
    return f"median {statistics.median(times) * 1000:.1f} ms (min {min(times) * 1000:.1f}, n={len(times)})"


def build(method: str, preset: str, lsm: bool, device: str, home: Path, overrides: list[str]):
    """(config, adapter at the start of its semi-supervised phase, one batch of that iteration, that
    iteration). Mean-teacher methods start from their trained burn-in cell (student and teacher),
    STAC and Deformable DETR (strategy stac) from the trained supervised teacher's pseudo-labels;
    those cells are trained once into `home` and reused."""
    from adapters.base import get_adapter
    from bench import burn_in
    from bench.plan import Cell, start_cell
    from bench.teacher import attach_pseudo_labels
    from bench.worker import batch_stream, run_cell, seed_everything
    from core.config import load_config
    from core.data.sources import prepare_data
    from core.paths import run_dir

    extra = ["lsm.alpha=0.3"] if method == "pseco" else []
    cfg = load_config(preset, overrides + ROW_OVERRIDES.get(method, []) + extra +
                      [f"device={device}", f"lsm.enabled={str(lsm).lower()}"], method=method)
    data = prepare_data(cfg.data, home)
    dev = torch.device(device)
    seed_everything(cfg.seed)
    adapter = get_adapter(method)(cfg, data.num_classes, dev)
    start = 0
    if (first := start_cell(cfg, data)) is not None:  # its burn-in or teacher cell, trained once into home
        run_cell(first.config, home, track=False, progress=False)
    if first is not None and first.row_id == Cell.BURN_IN_ROW:
        state = torch.load(run_dir(home, first.key) / burn_in.CHECKPOINT, map_location="cpu", weights_only=False)
        adapter.student.load_state_dict(state["model"], strict=False)  # F_aux is not in a burn-in
        adapter.teacher.load_state_dict(adapter.student.state_dict())
        if (copy_hook := adapter.on_teacher_copy()) is not None:
            copy_hook()
        start = cfg.semi.burn_in
    elif first is not None:
        attach_pseudo_labels(adapter, run_dir(home, first.key), data, dev)
    batch = next(batch_stream(cfg, adapter, data, start))
    return cfg, adapter, batch, start


class _HookTrainer:
    """What a hook reads of the trainer in `before_step`: the iteration about to run."""

    def __init__(self, iteration: int):
        self.iter = iteration


def make_step(cfg, adapter, batch, start: int, device: torch.device, ema: bool = False, phases=None):
    """One training step on a fixed batch: the method's losses, backward, an SGD step (lr 1e-5, so
    that repeated steps stay near the starting point) and, with `ema`, the hooks' teacher update
    of an iteration after burn-in (Unbiased Teacher's EMA). `phases` (a context-manager factory
    taking a phase name) times the backward, optimizer and EMA parts."""
    from contextlib import nullcontext

    opt = torch.optim.SGD(adapter.student.parameters(), lr=1e-5)
    amp = cfg.solver.amp and device.type == "cuda"  # as the Trainer: fp16 autocast + loss scaling
    scaler = torch.amp.GradScaler("cuda", enabled=amp)
    hooks = adapter.hooks() if ema else []
    for h in hooks:
        h.trainer = _HookTrainer(start + 1)
    phase = phases or (lambda name: nullcontext())

    def step():
        with phase("ema"):
            for h in hooks:
                h.before_step()
        with torch.autocast("cuda", dtype=torch.float16, enabled=amp):
            out = adapter.training_step(start, batch)
        total = sum(out.losses.values())
        with phase("backward"):
            opt.zero_grad()
            scaler.scale(total).backward()
        with phase("optimizer"):
            scaler.step(opt)
            scaler.update()
        return out

    return step
