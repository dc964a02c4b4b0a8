"""Which methods exist, as plain data: planning a table needs it without importing torch.

A method module registers its Adapter class on import (adapters/base.py `register`); this table
says which module that is, and what the planner may assume about the method.
"""

# name -> module implementing it
METHOD_MODULES = {
    "supervised": "adapters.supervised",
    "ubteacher": "adapters.ubteacher",
    "softteacher": "adapters.softteacher",
    "pseco": "adapters.pseco",
    "stac": "adapters.stac",
    "ddetr": "adapters.ddetr",
}
# Methods of the paper's tables whose adapters come in later issues.
PLANNED_METHODS: tuple[str, ...] = ()
# Methods whose first `semi.burn_in` iterations are supervised and independent of the
# semi-supervised settings, so their cells share a burn-in cell (bench/burn_in.py).
SHARES_BURN_IN = frozenset({"ubteacher", "softteacher", "pseco"})
# Methods whose teacher is the `supervised` cell of the same split and seed (STAC's stage 1).
# Deformable DETR's stac / pretrain_finetune strategies read STAC's very pseudo-label file (paper:
# the COCO-ImageNet pseudo-labels come from a Faster R-CNN).
TEACHER_IS_SUPERVISED_CELL = frozenset({"stac", "ddetr"})
# Methods whose `solver` section is their own detector's (ddetr: AdamW), not the Faster R-CNN
# teacher's: their teacher cell trains with the preset's solver (bench/teacher.py).
OWN_SOLVER = frozenset({"ddetr"})
