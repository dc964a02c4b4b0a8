"""A two-stage method's teacher is a cell of its own: STAC's stage 1 is the `supervised` cell of
the same split, seed and training settings, so a table with a Supervised row trains it once for
both rows, and its pseudo-label file (adapters/stac.py) is a cached artifact in that cell's folder.

Kept free of torch: planning a table needs `teacher_config` only.
"""

from __future__ import annotations

from pathlib import Path

from core.config import RunConfig, load_config
from core.errors import BenchError
from core.paths import RunDir
from core.methods import method_spec, upstream


def teacher_config(cfg: RunConfig) -> RunConfig | None:
    """The supervised cell `cfg` takes its teacher from, or None for a method without one.

    Everything that shapes supervised training (data, model, solver, seed) is the cell's own; the
    LSM and MLC sections (STAC+PIM, STAC+MLC rows) are the preset's, as on a Supervised row.
    """
    if upstream(cfg) != "supervised_teacher":
        return None
    preset = load_config(cfg.preset, [], method="supervised")
    # a method with its own solver (ddetr's AdamW) shares the teacher of STAC: STAC's solver on the
    # preset (its method_defaults); its model section is STAC's there too (the presets say so)
    solver = load_config(cfg.preset, [], method="stac").solver if method_spec(cfg.method).own_solver \
        else cfg.solver
    return RunConfig.model_validate({**cfg.model_dump(), "method": "supervised", "solver": solver.model_dump(),
                                     "lsm": preset.lsm.model_dump(), "mlc": preset.mlc.model_dump()})


def attach_pseudo_labels(adapter, tdir: Path, data, device) -> None:
    """STAC's stage 2 for `adapter`: read the pseudo-label file of the teacher cell in `tdir`, made
    from the teacher's final weights on first use. The teacher is trained by the worker's caller
    (`bench run`, `bench train`), never here: a teacher that is not done is a one-line error."""
    import torch

    from adapters import stac
    from adapters.base import get_adapter
    from core.data.transforms import view_settings

    teacher_dir = RunDir(tdir)
    if (status := teacher_dir.status()) != "done":
        raise BenchError(f"teacher cell {tdir} is {status}, not done: train it first (`bench run` and `bench train` "
                         "train a STAC cell's teacher before it), or delete that directory to train it again")
    path, weights, teacher, test_view = tdir / stac.PSEUDO_LABEL_FILE, tdir / "model_final.pth", None, None
    if not path.exists():  # first use: the teacher's final weights make the file
        if not weights.exists():
            raise BenchError(f"teacher cell {tdir} has neither its weights nor its pseudo-label file (a cell "
                             "imported from an archive carries neither); delete that directory to train it again")
        tcfg = RunConfig.model_validate(teacher_dir.config())  # the teacher's own detector and test view
        teacher = get_adapter("supervised")(tcfg, data.num_classes, device).student
        teacher.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True)["student"])
        test_view = view_settings(tcfg.data.aug, False)
    adapter.attach_pseudo_labels(stac.ensure_pseudo_labels(path, teacher, data.unlabeled, test_view, device))
