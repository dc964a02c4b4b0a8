"""SGD or AdamW with linear warm-up and step decay (detectron2's WarmupMultiStepLR)."""

from __future__ import annotations

import bisect

import torch


def build_optimizer(params, cfg) -> torch.optim.Optimizer:
    """`params`: tensors, or parameter groups (dicts with "params" and their own "lr", e.g.
    Deformable DETR's trunk at 0.1x); `cfg.optimizer` picks momentum SGD or AdamW."""
    params = list(params)
    if params and isinstance(params[0], dict):
        params = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in params if g["params"]]
    else:
        params = [p for p in params if p.requires_grad]
    if getattr(cfg, "optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(params, lr=cfg.base_lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def lr_factor(iteration: int, cfg) -> float:
    """Multiplier of base_lr at `iteration`: linear warm-up from warmup_factor, x gamma at each step."""
    factor = cfg.gamma ** bisect.bisect_right(sorted(cfg.steps), iteration)
    if iteration < cfg.warmup_iters:
        alpha = iteration / cfg.warmup_iters
        factor *= cfg.warmup_factor * (1 - alpha) + alpha
    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda it: lr_factor(it, cfg))
