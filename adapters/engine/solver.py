"""SGD with linear warm-up and step decay (detectron2's WarmupMultiStepLR)."""

from __future__ import annotations

import bisect

import torch


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    return torch.optim.SGD(
        [p for p in params if p.requires_grad],
        lr=cfg.base_lr,
        momentum=cfg.momentum,
        weight_decay=cfg.weight_decay,
    )


def lr_factor(iteration: int, cfg) -> float:
    """Multiplier of base_lr at `iteration`: linear warm-up from warmup_factor, x gamma at each step."""
    factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.steps), iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
