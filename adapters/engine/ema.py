"""Exponential moving average of a student into a teacher (the mean teacher)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, keep_rate: float, include_buffers: bool = True) -> None:
    """teacher <- keep_rate * teacher + (1 - keep_rate) * student.

    Unbiased Teacher averages every state_dict entry, buffers included (BN statistics follow the
    student); Soft Teacher/PseCo average parameters only (as their official code does), so the
    choice is explicit. Integer buffers (e.g. BN's num_batches_tracked) are copied.
    The floating-point entries are updated by two multi-tensor calls (the same arithmetic as
    `t.mul_(keep_rate).add_(s, alpha=1 - keep_rate)` per tensor, without ~600 Python-level ops).
    """
    s_state = student.state_dict(keep_vars=True)
    if include_buffers:
        items = teacher.state_dict(keep_vars=True).items()
    else:
        items = teacher.named_parameters()
    floats: dict[tuple, tuple[list, list]] = {}
    for name, t in items:
        s = s_state[name].detach()
        if t.dtype.is_floating_point:
            group = floats.setdefault((t.device, t.dtype, s.dtype), ([], []))
            group[0].append(t.detach())
            group[1].append(s)
        else:
            t.copy_(s)
    for ts, ss in floats.values():
        torch._foreach_mul_(ts, keep_rate)
        torch._foreach_add_(ts, ss, alpha=1 - keep_rate)
