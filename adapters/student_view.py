"""The two views of Soft Teacher and PseCo, the box mapping between them, the teacher's pass and
the adapter base class of the two methods (`StudentViewAdapter`).

The teacher sees the loader's `weak` view (resize + flip); the student sees a view of the same
image drawn independently (`student_view`): its own resize + flip, one geometric op (translate /
rotate / shear, recorded in its matrix) and the strong photometric recipe of
core/data/transforms.py. Pseudo-boxes go from the teacher's view into the student's through the
views' matrices (`map_boxes`, `map_pseudo_labels`). `teacher_pass` is the teacher's detection pass
on its view, the first step of both methods after burn-in.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from torch import Tensor
from torchvision.ops import boxes as box_ops

from adapters.base import MeanTeacherAdapter, StepOutput, batch_to_device
from adapters.engine.mean_teacher import SoftTeacherEMAHook
from core.data.coco import load_image
from core.data.transforms import (ViewSettings, HorizontalFlip, ResizeShortestEdge, View, random_geometric,
                                   relative_matrix, strong_photometric, transform_boxes)


# ----------------------------------------------------------------------------- the student view
def student_view(record, aug, rng: np.random.Generator, translate: float, rotate: float, shear: float,
                 geometric: bool = True, photometric: bool = True) -> View:
    """The student's view of an unlabeled image, drawn independently of the teacher's: resize
    (short side from `aug.short_sizes`) + flip, then (with `geometric`) one geometric op drawn
    uniformly from the ranges `translate` (fraction of the side), `rotate` and `shear` (degrees),
    then the strong photometric recipe (colour jitter, grayscale, blur, erasing). `matrix` maps
    original -> view coordinates."""
    image = load_image(record.file)
    img, m = ResizeShortestEdge(tuple(aug.short_sizes), aug.max_size)(image, rng)
    img, f = HorizontalFlip(aug.flip_prob)(img, rng)
    m = f @ m
    if geometric:
        img, g = random_geometric(img, rng, translate, rotate, shear)
        m = g @ m
    pixels = TF.pil_to_tensor(img).float().div_(255.0)
    if photometric:
        pixels = strong_photometric(pixels, rng, ViewSettings())
    keep = ~record.iscrowd
    boxes = clip_boxes(torch.from_numpy(transform_boxes(record.boxes[keep].astype(np.float64), m)).float(),
                       (img.size[1], img.size[0]))
    ok = nondegenerate(boxes)
    return View(image=pixels, boxes=boxes[ok], labels=torch.from_numpy(record.labels[keep])[ok], matrix=m,
                dropped_crowd=int(record.iscrowd.sum()), dropped_degenerate=int((~ok).sum()))


def student_views(items: list[dict], aug, geometry, seed: int, salt: int, iteration: int) -> list[View]:
    """`student_view` of each item, with the ranges of `geometry` (a method section with `geometric`,
    `translate`, `rotate`, `shear`: softteacher's or pseco's). Image j of iteration i draws from the
    stream [seed, salt, i, j], so the views are a pure function of the step and a resume redraws them."""
    return [student_view(it["record"], aug, np.random.default_rng([seed, salt, iteration, j]), geometry.translate,
                         geometry.rotate, geometry.shear, geometry.geometric)
            for j, it in enumerate(items)]


def teacher_and_student_views(adapter, items: list[dict], iteration: int):
    """(teacher images = the loader's weak views, their hidden labels (statistics only), the images
    of `adapter.student_views`, the weak -> student matrices): Soft Teacher's and PseCo's setup."""
    images_t, hidden_gt = batch_to_device(items, "weak", adapter.device)
    views = adapter.student_views(items, iteration)
    to_student = [relative_matrix(it["views"]["weak"], v) for it, v in zip(items, views)]
    return images_t, hidden_gt, [v.image.to(adapter.device) for v in views], to_student


# ----------------------------------------------------------------------------- box geometry
def clip_boxes(boxes: Tensor, size: tuple[int, int]) -> Tensor:
    """Clip xyxy boxes to an image of size (h, w)."""
    return box_ops.clip_boxes_to_image(boxes, size)


def nondegenerate(boxes: Tensor) -> Tensor:
    """Boxes with positive width and height (the original's filter_invalid with min_size 0)."""
    return ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)


def map_boxes(boxes: Tensor, matrix: np.ndarray, size: tuple[int, int]) -> Tensor:
    """Boxes of one view into another through `matrix`: bounding box of the 4 mapped corners,
    clipped to the target image (h, w), as the original's Transform2D.transform_bboxes."""
    if len(boxes) == 0:
        return boxes
    return clip_boxes(transform_boxes(boxes, matrix), size)


def map_pseudo_labels(pseudo: list[dict], matrices: list[np.ndarray], sizes: list[tuple[int, int]]) -> list[dict]:
    """Teacher-view pseudo-labels (boxes + per-box fields) into the student views; boxes that
    collapse at the image border are dropped with all their fields."""
    out = []
    for p, m, size in zip(pseudo, matrices, sizes):
        boxes = map_boxes(p["boxes"], m, size)
        ok = nondegenerate(boxes)
        out.append({k: (boxes if k == "boxes" else v)[ok] for k, v in p.items()})
    return out


def select(pseudo: list[dict], masks: list[Tensor]) -> list[dict]:
    """Each image's pseudo-labels (every per-box field) where its mask is true."""
    return [{k: v[m] for k, v in p.items()} for p, m in zip(pseudo, masks)]


# ----------------------------------------------------------------------------- the teacher's pass
@dataclass
class TeacherPass:
    image_list: object  # the teacher's padded batch (image_sizes: the view sizes)
    features: dict  # its pyramid on its view
    proposals: list[Tensor]  # RPN proposals per image
    logits: Tensor  # RoI head outputs on the concatenated proposals
    deltas: Tensor
    detections: list[dict]  # boxes, labels, scores (test-time post-processing) with score > floor


@torch.no_grad()
def teacher_pass(teacher, images: list[Tensor], rpn_settings: str, floor: float) -> TeacherPass:
    """The teacher in eval mode on its view: RPN proposals with the top-n settings `rpn_settings`
    (adapters/base.py `teacher_rpn_settings`), its RoI head on them, and the detections of the
    test-time post-processing (score 0.05, NMS 0.5, top 100) that score above `floor`, the lowest
    threshold the method uses."""
    teacher.eval()
    image_list, features = teacher.extract(images)
    proposals, _ = teacher.rpn(image_list, features, settings=rpn_settings)
    heads = teacher.roi_heads
    logits, deltas = heads.box_predictor(heads.box_features(features, proposals))
    dets = heads.postprocess(logits, deltas, proposals, image_list.image_sizes)
    dets = [{k: v[d["scores"] > floor] for k, v in d.items()} for d in dets]
    return TeacherPass(image_list, features, proposals, logits, deltas, dets)


# ----------------------------------------------------------------------------- the adapters' common part
class StudentViewAdapter(MeanTeacherAdapter):
    """A mean teacher whose student learns on its own view of each unlabeled image (Soft Teacher,
    PseCo): the loader makes the weak view only (the teacher's, and the labeled images'), the student
    view is drawn here; the teacher is a copy of the student at burn-in, then an EMA of its
    parameters with Soft Teacher's warm-up momentum."""

    labeled_views = ("weak",)  # resize + flip (the originals add one colour op)
    unlabeled_views = ("weak",)  # the teacher view; the student view is drawn by `student_views`
    section: ClassVar[str]  # the method's config section: the student view's geometry, ema_warm_up
    view_stream: ClassVar[int]  # the student views' random stream (core/streams.py)

    def hooks(self) -> list:
        own = getattr(self.cfg, self.section)
        return [SoftTeacherEMAHook(self.teacher, self.student, self.cfg.semi.burn_in, self.cfg.semi.ema_keep_rate,
                                   own.ema_warm_up, on_copy=self.on_teacher_copy(), from_start=own.ema_from_start)]

    def burn_in_teacher(self) -> tuple[str, torch.nn.Module]:
        own = getattr(self.cfg, self.section)
        return ("teacher", self.teacher) if own.ema_from_start else super().burn_in_teacher()

    def student_views(self, items: list[dict], iteration: int) -> list[View]:
        """Independent student views; a pure function of (seed, iteration, position), so resumable."""
        return student_views(items, self.cfg.data.aug, getattr(self.cfg, self.section), self.cfg.seed,
                             self.view_stream, iteration)

    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        """The supervised terms; after burn-in, the method's unsupervised terms are added to them
        (`unlabeled_step`, on the two views of the unlabeled images)."""
        losses, fwd_l, targets_l = self.supervised_terms(batch)
        if iteration < self.cfg.semi.burn_in:
            return StepOutput(losses)
        return self.unlabeled_step(iteration, batch["unlabeled"], losses, fwd_l, targets_l)

    @abstractmethod
    def unlabeled_step(self, iteration: int, items: list[dict], losses: dict, fwd_l, targets_l) -> StepOutput:
        """The step after burn-in: `losses` (the supervised terms, of forward `fwd_l` on `targets_l`)
        plus the unsupervised terms on the unlabeled `items`, and the step's metrics."""
