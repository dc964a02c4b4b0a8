"""The Adapter interface and the registry of adapter classes.

An adapter is one SSOD method: it owns its models (student, and teacher where the method has one)
and its `training_step`, which returns the named, already-weighted loss terms of the method's
equations. The engine sums them and steps; everything else is hooks.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from core.errors import BenchError
from core.methods import import_adapter_module

ADAPTERS: dict[str, type["Adapter"]] = {}


def register(name: str):
    def deco(cls):
        cls.name = name
        ADAPTERS[name] = cls
        return cls

    return deco


def get_adapter(name: str) -> type["Adapter"]:
    import_adapter_module(name)  # unknown names: a BenchError listing the known ones
    return ADAPTERS[name]


@dataclass
class StepOutput:
    losses: dict[str, Tensor]  # named, weighted loss terms: the trainer sums them
    metrics: dict[str, float] = field(default_factory=dict)  # logged, not optimised


def batch_to_device(items: list[dict], view: str, device: torch.device) -> tuple[list[Tensor], list[dict]]:
    """Images and {"boxes","labels"} targets of one view of a batch, on `device`."""
    images, targets = [], []
    for item in items:
        v = item["views"][view]
        images.append(v.image.to(device, non_blocking=True))
        targets.append({"boxes": v.boxes.to(device), "labels": v.labels.to(device)})
    return images, targets


def teacher_rpn_settings(semi) -> str:
    """The RPN top-n settings of a mean teacher's pseudo-labelling pass (`semi.teacher_proposals`)."""
    return {"train": "training", "test": "testing"}[semi.teacher_proposals]


class Adapter(ABC):
    name: ClassVar[str] = ""
    labeled_views: ClassVar[tuple[str, ...]] = ("weak",)
    unlabeled_views: ClassVar[tuple[str, ...]] = ()  # empty: the method uses no unlabeled data

    def __init__(self, cfg, num_classes: int, device: torch.device):
        from adapters.models.faster_rcnn import build_faster_rcnn

        self.cfg = cfg
        self.device = device
        self.num_classes = num_classes
        self.student: nn.Module = build_faster_rcnn(cfg.model, num_classes, self.roi_classifier(cfg)).to(device)

    def roi_classifier(self, cfg):
        """PseCo's RoI classifier for the detector (adapters/models/faster_rcnn.py `SigmoidFocal`), or
        None: the one of `model.cls_loss`."""
        return None

    @abstractmethod
    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        """The method's losses for one iteration; `batch` has "labeled" (and "unlabeled") items."""

    def eval_models(self) -> dict[str, nn.Module]:
        """Models to evaluate, the one the tables report first."""
        return {"student": self.student}

    def hooks(self) -> list:
        return []

    def param_groups(self) -> list:
        """What the optimizer trains: the student's parameters, or groups with their own lr
        (Deformable DETR: trunk and sampling offsets at 0.1x)."""
        return list(self.student.parameters())

    def unlabeled_start(self) -> int:
        """First iteration that reads unlabeled images (none are loaded before: burn-in is cheaper)."""
        return 0

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])


class MeanTeacherAdapter(Adapter):
    """A student, its teacher (an exact copy at `semi.burn_in`, an EMA after), supervised burn-in
    first; with `lsm.enabled`, LSM's F_aux on the student and the PIM/SD losses (adapters/lsm.py).
    Subclasses write `training_step`, `hooks` (their teacher update) and `eval_models`."""

    def __init__(self, cfg, num_classes: int, device: torch.device):
        import copy

        from adapters.lsm import PIM, attach_aux_classifier

        super().__init__(cfg, num_classes, device)
        if cfg.semi.burn_in >= cfg.solver.max_iter:
            raise BenchError(f"semi.burn_in ({cfg.semi.burn_in}) must be below solver.max_iter "
                             f"({cfg.solver.max_iter}); lower burn_in or train longer")
        self.lsm = cfg.lsm
        self.pim = None
        if cfg.lsm.enabled:
            attach_aux_classifier(self.student)
            self.pim = PIM(cfg.lsm, cfg.semi.t, cfg.model)
        self.teacher = copy.deepcopy(self.student)
        self.teacher.requires_grad_(False)

    def on_teacher_copy(self):
        """What the teacher hook calls when it copies the student (LSM: F_aux <- the main classifier)."""
        from adapters.lsm import init_aux_from_main

        return (lambda: init_aux_from_main(self.student)) if self.pim else None

    def unlabeled_start(self) -> int:
        return self.cfg.semi.burn_in

    def burn_in_teacher(self) -> tuple[str, torch.nn.Module]:
        """The model a burn-in hands over as the first teacher, with its name: the student, which the
        teacher copies at `semi.burn_in`."""
        return "student", self.student

    def supervised_terms(self, batch: dict):
        """The student's losses on the labeled weak views (keys `<loss>_sup`), its forward and the
        targets: the first part of every step, and all of a burn-in step (Soft Teacher, PseCo)."""
        self.student.train()
        images_l, targets_l = batch_to_device(batch["labeled"], "weak", self.device)
        fwd_l = self.student.train_forward(images_l, targets_l)
        return {f"{k}_sup": v for k, v in fwd_l.losses.items()}, fwd_l, targets_l

    def state_dict(self) -> dict:
        return {"student": self.student.state_dict(), "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.teacher.load_state_dict(state["teacher"])
