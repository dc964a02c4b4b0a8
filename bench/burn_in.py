"""Shared burn-in: the cells of one split and seed that differ only after burn-in start from one
burn-in checkpoint, itself a cached cell.

A mean-teacher method's first `semi.burn_in` iterations are supervised training that none of the
semi-supervised settings (t, lambda_u, EMA rate, LSM) touch, so UBT, UBT+LSM and every threshold of
a sweep repeat the same computation there. The burn-in cell's config is the cell's config with
those settings reset and `stage: burn_in`; it trains to `semi.burn_in` and saves the weights and
the optimizer state by parameter name (LSM's extra classifier is absent from it), and the teacher:
where it averages the student from iteration 0 (`ema_from_start`), the EMA rate is kept in the
burn-in's config too. A cell that finds
its burn-in done starts at iteration `burn_in` from it; the result is the one it would reach
training alone (tests/test_burn_in.py), because F_aux is initialised outside the global RNG stream
and the batch of an iteration depends on (seed, iteration) only.
"""

from __future__ import annotations

from pathlib import Path

from core.config import EvalConfig, LSMConfig, MLCConfig, RunConfig, SemiConfig
from core.methods import method_sections, method_spec, upstream

CHECKPOINT = "burn_in.pth"
# Parameters a cell may add on top of the burn-in model (LSM's F_aux).
NEW_PARAMETER_PREFIXES = ("roi_heads.aux_cls_score.",)


def burn_in_config(cfg: RunConfig) -> RunConfig | None:
    """The burn-in cell `cfg` starts from, or None when its method has no shareable burn-in."""
    if upstream(cfg) != "burn_in" or cfg.semi.burn_in == 0:
        return None
    dump = cfg.model_dump()
    dump["solver"]["eval_period"] = 0  # evaluating changes no weights: burn-ins are shared across it too
    sections = {s: {} for s in method_sections()}  # method settings back to their defaults...
    semi = {"burn_in": cfg.semi.burn_in}
    if (own := method_spec(cfg.method)).section:  # ...but those that shape supervised training
        sections[own.section] = {k: dump[own.section][k] for k in own.burn_in_keeps}
        if "ema_from_start" in dump[own.section]:  # whether the burn-in trains the teacher too...
            sections[own.section]["ema_from_start"] = dump[own.section]["ema_from_start"]
            if dump[own.section]["ema_from_start"]:  # ...and then how it averages
                sections[own.section]["ema_warm_up"] = dump[own.section]["ema_warm_up"]
                semi["ema_keep_rate"] = cfg.semi.ema_keep_rate
    return RunConfig.model_validate({
        **dump, "stage": "burn_in", "lsm": LSMConfig().model_dump(), "mlc": MLCConfig().model_dump(),
        "semi": SemiConfig(**semi).model_dump(),
        # the data's size bins stay (the burn-in's own evaluation uses them); the rest trains nothing
        "eval": EvalConfig(area_scale=cfg.eval.area_scale).model_dump(),
        **sections,
    })


def save(path: Path, trainer, iteration: int) -> None:
    import torch

    from adapters.engine.checkpoint import named_training_state, rng_state

    state = named_training_state(trainer.adapter.student, trainer.optimizer, trainer.scheduler, trainer.scaler)
    teacher = getattr(trainer.adapter, "teacher", None)  # an EMA from iteration 0 is part of the burn-in
    tmp = path.with_suffix(".tmp")
    torch.save({"iteration": iteration, "rng": rng_state(), **state,
                **({"teacher": teacher.state_dict()} if teacher is not None else {})}, tmp)
    tmp.replace(path)


def load(path: Path, trainer) -> int:
    """Put the burn-in state into `trainer`; returns the iteration to continue from."""
    import torch

    from adapters.engine.checkpoint import load_named_training_state, set_rng_state

    state = torch.load(path, map_location="cpu", weights_only=False)  # our own file: it holds RNG states
    load_named_training_state(state, trainer.adapter.student, trainer.optimizer, trainer.scheduler, trainer.scaler,
                              new_prefixes=NEW_PARAMETER_PREFIXES)
    if "teacher" in state and getattr(trainer.adapter, "teacher", None) is not None:
        missing, unexpected = trainer.adapter.teacher.load_state_dict(state["teacher"], strict=False)
        if unexpected or any(not k.startswith(NEW_PARAMETER_PREFIXES) for k in missing):
            raise KeyError(f"burn-in teacher does not match the cell's: missing {missing}, unexpected {unexpected}")
    set_rng_state(state["rng"])
    return state["iteration"] + 1
