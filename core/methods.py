"""What the harness knows about each method, as plain data: one `MethodSpec` per method.

This table is the only place the planner, the cell keys, the config and the worker learn about a
method; the method's code is its adapter module, imported only when a cell trains. Planning a
table therefore needs neither torch nor the adapters. Adding a method is one adapter file, one
`register_method(MethodSpec(...))` entry and its tests (docs/adding-a-method.md).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal

from core.errors import BenchError

Upstream = Literal["none", "burn_in", "supervised_teacher"]


@dataclass(frozen=True)
class MethodSpec:
    name: str
    # module whose import registers the method's Adapter class (adapters/base.py `register`)
    module: str
    # Bump when a code change alters the method's results: its cells then get new keys.
    code_version: int = 1
    # the RunConfig section holding the method's own settings; only its own cells' keys contain it
    section: str | None = None
    # where a cell starts from: nothing; a shared supervised burn-in cell (mean-teacher methods,
    # whose first `semi.burn_in` iterations no semi-supervised setting touches); or the `supervised`
    # cell of the same split and seed, whose pseudo-labels it reads (STAC's stage 1)
    upstream: Upstream = "none"
    # (setting, value) pairs under which the method has no upstream after all
    no_upstream_when: tuple[tuple[str, object], ...] = ()
    # settings of `section` that shape the supervised burn-in, so a burn-in cell keeps them
    burn_in_keeps: tuple[str, ...] = ()
    # the method's `solver` section is its own detector's (ddetr: AdamW), not the Faster R-CNN
    # teacher's: its teacher cell trains with STAC's solver of the preset
    own_solver: bool = False
    # Table 5's naive large-area variant is defined for this method
    naive_large_area: bool = False


METHODS: dict[str, MethodSpec] = {}


def register_method(spec: MethodSpec) -> MethodSpec:
    if spec.name in METHODS and METHODS[spec.name] != spec:
        raise BenchError(f"method '{spec.name}' is registered twice with different specs; pick another name")
    METHODS[spec.name] = spec
    return spec


def method_spec(name: str) -> MethodSpec:
    try:
        return METHODS[name]
    except KeyError:
        raise BenchError(f"unknown method '{name}'; known methods: {', '.join(METHODS)}") from None


def method_sections() -> set[str]:
    return {s.section for s in METHODS.values() if s.section}


def upstream(cfg) -> Upstream:
    """What the cell of RunConfig `cfg` starts from (a burn-in cell, a supervised teacher cell or
    nothing); only full cells have one."""
    spec = METHODS.get(cfg.method)
    if spec is None or cfg.stage != "full":
        return "none"
    for setting, value in spec.no_upstream_when:
        section, _, field = setting.partition(".")
        if getattr(getattr(cfg, section), field) == value:
            return "none"
    return spec.upstream


def import_adapter_module(name: str) -> None:
    """Import the module that registers `name`'s Adapter (torch is imported here, not before)."""
    importlib.import_module(method_spec(name).module)


# Code versions: supervised 1. ubteacher 2: F_aux no longer draws from the global RNG; 3 (with
# softteacher 2 and pseco 2): the teacher proposes with the RPN's train-time top-n
# (`semi.teacher_proposals`), as the originals. stac 2: STAC's own strong augmentation instead of
# Unbiased Teacher's. ddetr 2: the box head's w/h bias starts at -2 (the official initialisation).
register_method(MethodSpec("supervised", "adapters.supervised"))
register_method(MethodSpec("ubteacher", "adapters.ubteacher", code_version=3, upstream="burn_in",
                           naive_large_area=True))
register_method(MethodSpec("softteacher", "adapters.softteacher", code_version=2, section="softteacher",
                           upstream="burn_in"))
register_method(MethodSpec("pseco", "adapters.pseco", code_version=2, section="pseco", upstream="burn_in",
                           # the RoI classifier's loss changes its supervised training too
                           burn_in_keeps=("sigmoid_focal", "focal_gamma", "focal_alpha", "cls_loss_weight")))
register_method(MethodSpec("stac", "adapters.stac", code_version=2, section="stac", upstream="supervised_teacher"))
# Deformable DETR's stac / pretrain_finetune strategies read STAC's very pseudo-label file (the
# paper's COCO-ImageNet pseudo-labels come from a Faster R-CNN).
register_method(MethodSpec("ddetr", "adapters.ddetr", code_version=2, section="ddetr",
                           upstream="supervised_teacher", own_solver=True,
                           no_upstream_when=(("ddetr.strategy", "supervised"),)))  # Table 3's Omega row
