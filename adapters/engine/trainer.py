"""The iteration loop. Everything that is not "compute the losses and step" is a hook.

Loop per iteration: hooks.before_step -> adapter.training_step (named, already weighted loss
terms) -> sum -> backward -> optimizer/scheduler step -> hooks.after_step. The adapter owns the
algorithm (what the losses are); the trainer owns the mechanics (AMP, NaN check, LR schedule).

With `distributed=True` (a cell trained by N processes, adapters/engine/distributed.py) the
gradients are averaged over the ranks after backward, and the logged scalars are the ranks' mean,
so every rank sees the same total loss and a NaN on one rank stops them all at the same step.
"""

from __future__ import annotations

import math
import time
from contextlib import nullcontext
from typing import Iterator

import torch

from adapters.engine import distributed as ddp
from adapters.engine.hooks import HookBase


class StopTraining(Exception):
    """Raised by a hook to stop the loop early (tests use it to simulate a killed run)."""


class Trainer:
    def __init__(self, adapter, optimizer, scheduler, data: Iterator, start_iter: int, max_iter: int,
                 device: torch.device, amp: bool = False, clip_grad_norm: float | None = None,
                 distributed: bool = False):
        self.adapter = adapter
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.data = data
        self.start_iter = start_iter
        self.max_iter = max_iter
        self.iter = start_iter
        self.device = device
        self.amp = amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.clip_grad_norm = clip_grad_norm
        self.distributed = distributed
        self.hooks: list[HookBase] = []
        self.latest: dict[str, float] = {}  # scalars of the last step, read by the writer hooks

    def register_hooks(self, hooks: list[HookBase]) -> None:
        for h in hooks:
            h.trainer = self
        self.hooks.extend(hooks)

    def train(self) -> None:
        for h in self.hooks:
            h.before_train()
        try:
            for self.iter in range(self.start_iter, self.max_iter):
                for h in self.hooks:
                    h.before_step()
                self.run_step()
                for h in self.hooks:
                    h.after_step()
            self.iter = self.max_iter
        finally:
            for h in self.hooks:
                h.after_train()

    def run_step(self) -> None:
        t0 = time.perf_counter()
        batch = next(self.data)
        t_data = time.perf_counter() - t0
        ctx = torch.autocast("cuda", dtype=torch.float16) if self.amp else nullcontext()
        with ctx:
            out = self.adapter.training_step(self.iter, batch)
        total = sum(out.losses.values())
        losses = {"total_loss": float(total.detach()), **{k: float(v.detach()) for k, v in out.losses.items()}}
        metrics = out.metrics
        if self.distributed:  # the global batch's values, identical on every rank (one collective)
            both = ddp.mean_scalars({**{f"l/{k}": v for k, v in losses.items()},
                                     **{f"m/{k}": v for k, v in metrics.items()}})
            losses = {k[2:]: v for k, v in both.items() if k.startswith("l/")}
            metrics = {k[2:]: v for k, v in both.items() if k.startswith("m/")}
        total_value = losses["total_loss"]
        if not math.isfinite(total_value):
            detail = ", ".join(f"{k}={losses[k]:.4g}" for k in out.losses)
            raise FloatingPointError(f"loss became {total_value} at iteration {self.iter}: {detail}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        if self.distributed:  # before unscaling: an inf on one rank reaches all, so all skip the step
            ddp.all_reduce_gradients(p for g in self.optimizer.param_groups for p in g["params"])
        if self.clip_grad_norm:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.adapter.student.parameters(), self.clip_grad_norm)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.distributed:  # BatchNorm statistics of each rank's half batch -> the same on all ranks
            ddp.average_buffers(self.adapter.student)
        lr = self.optimizer.param_groups[0]["lr"]
        self.scheduler.step()
        self.latest = {
            **losses,
            **metrics,
            "lr": lr,
            "time": time.perf_counter() - t0,
            "data_time": t_data,
        }

    def state_dict(self) -> dict:
        return {
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "adapter": self.adapter.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.adapter.load_state_dict(state["adapter"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
