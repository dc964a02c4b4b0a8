"""A two-stage method's teacher is a cell of its own: STAC's stage 1 is the `supervised` cell of
the same split, seed and training settings, so a table with a Supervised row trains it once for
both rows, and its pseudo-label file (adapters/stac.py) is a cached artifact in that cell's folder.

Kept free of torch: planning a table needs `teacher_config` only.
"""

from __future__ import annotations

from pathlib import Path

from adapters import registry
from bench.config import RunConfig, load_config


def teacher_config(cfg: RunConfig) -> RunConfig | None:
    """The supervised cell `cfg` takes its teacher from, or None for a method without one.

    Everything that shapes supervised training (data, model, solver, seed) is the cell's own; the
    LSM and MLC sections (STAC+PIM, STAC+MLC rows) are the preset's, as on a Supervised row.
    """
    if cfg.method not in registry.TEACHER_IS_SUPERVISED_CELL or cfg.stage != "full":
        return None
    if cfg.method == "ddetr" and cfg.ddetr.strategy == "supervised":
        return None  # Table 3's Omega row learns no pseudo-labels
    preset = load_config(cfg.preset, [], method="supervised")
    # a method with its own solver (ddetr's AdamW) shares the teacher of STAC: STAC's solver on the
    # preset (its method_defaults); its model section is STAC's there too (the presets say so)
    solver = load_config(cfg.preset, [], method="stac").solver if cfg.method in registry.OWN_SOLVER else cfg.solver
    return RunConfig.model_validate({**cfg.model_dump(), "method": "supervised", "solver": solver.model_dump(),
                                     "lsm": preset.lsm.model_dump(), "mlc": preset.mlc.model_dump()})


def attach_pseudo_labels(adapter, cfg: RunConfig, home: Path, data, device, *, track: bool = True,
                         progress: bool = True, parent_run_id: str | None = None) -> None:
    """STAC's stages 1 and 2 for `adapter`: train the teacher cell if it is not done (the runner
    schedules it first; `bench train --method stac` trains it here), then read its pseudo-label
    file, made from the teacher's final weights on first use."""
    import torch

    from adapters import stac
    from adapters.base import get_adapter
    from bench.keys import cell_key
    from bench.paths import run_dir
    from bench.worker import aug_config, run_cell

    tcfg = teacher_config(cfg)
    tdir = run_dir(home, cell_key(tcfg, data))
    if not (tdir / "result.json").exists():
        run_cell(tcfg, home, track=track, progress=progress, parent_run_id=parent_run_id)
    teacher = get_adapter("supervised")(tcfg, data.num_classes, device).student
    teacher.load_state_dict(torch.load(tdir / "model_final.pth", map_location="cpu", weights_only=True)["student"])
    adapter.attach_pseudo_labels(stac.ensure_pseudo_labels(tdir / stac.PSEUDO_LABEL_FILE, teacher, data.unlabeled,
                                                           aug_config(tcfg, strong=False), device))
