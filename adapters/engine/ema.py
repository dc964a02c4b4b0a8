"""Exponential moving average of a student into a teacher (the mean teacher)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float, include_buffers: bool = True) -> None:
    """teacher <- keep_rate * teacher + (1 - keep_rate) * student.

    Unbiased Teacher averages every state_dict entry, buffers included (BN statistics follow the
    student); Soft Teacher/PseCo average parameters only (pitfall 5 of ssod_methods.md), so the
    choice is explicit. Integer buffers (e.g. BN's num_batches_tracked) are copied.
    """
    s_state = student.state_dict()
    if include_buffers:
        items = teacher.state_dict().items()
    else:
        items = ((name, p) for name, p in teacher.named_parameters())
    for name, t in items:
        s = s_state[name].detach()
        if t.dtype.is_floating_point:
            t.mul_(keep_rate).add_(s, alpha=1 - keep_rate)
        else:
            t.copy_(s)
