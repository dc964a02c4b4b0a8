"""Mean-teacher pieces: the burn-in/EMA hooks, pseudo-label filtering and their quality statistics."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from torch import Tensor, nn
from torchvision.ops import box_iou

from adapters.engine.ema import ema_update
from adapters.engine.hooks import HookBase

# COCO's small/medium/large boundaries (areas in original-image pixels); presets on small
# synthetic images scale the sides by `eval.area_scale`.
AREA_BOUNDS = (32.0, 96.0)


@dataclass(eq=False, repr=False)  # no field-wise == or repr: the fields hold the two models
class MeanTeacherHook(HookBase):
    """Before iteration `burn_in`: teacher <- exact copy of the student (and `on_copy()`, e.g. LSM
    initialises F_aux there); before every later iteration: teacher <- EMA(teacher, student)."""

    teacher: nn.Module
    student: nn.Module
    burn_in: int
    keep_rate: float
    include_buffers: bool = True
    on_copy: Callable[[], None] | None = None

    def before_step(self) -> None:
        it = self.trainer.iter
        if it == self.burn_in:
            if self.on_copy is not None:
                self.on_copy()
            self.teacher.load_state_dict(self.student.state_dict())
        elif it > self.burn_in:
            ema_update(self.teacher, self.student, self.keep_rate, self.include_buffers)


def ema_momentum(step: int, keep_rate: float, warm_up: int = 0) -> float:
    """Keep rate of the teacher at `step` steps after its copy: fast averaging early, then `keep_rate`."""
    return min(keep_rate, 1.0 - (1.0 + warm_up) / (step + 1.0 + warm_up))


class SoftTeacherEMAHook(MeanTeacherHook):
    """Soft Teacher's and PseCo's teacher: EMA of the parameters only (not the buffers) with the
    warm-up momentum `ema_momentum`, counted from iteration 0 where `from_start` (the originals: their
    momentum 0 at iteration 0 is the clone), else from a full copy of the student before iteration
    `start`. `on_copy` is called before iteration `start` either way."""

    def __init__(self, teacher, student, start: int, keep_rate: float, warm_up: int = 0, on_copy=None,
                 from_start: bool = False):
        super().__init__(teacher, student, start, keep_rate, include_buffers=False, on_copy=on_copy)
        self.warm_up = warm_up
        self.from_start = from_start

    def before_step(self) -> None:
        it = self.trainer.iter
        if self.from_start:
            if it == self.burn_in and self.on_copy is not None:
                self.on_copy()
            ema_update(self.teacher, self.student, ema_momentum(it, self.keep_rate, self.warm_up), include_buffers=False)
            return
        if it <= self.burn_in:
            super().before_step()  # the copy at `start` (buffers included: they are equal in the original)
            return
        m = ema_momentum(it - self.burn_in, self.keep_rate, self.warm_up)
        ema_update(self.teacher, self.student, m, include_buffers=False)


def filter_pseudo_labels(detections: list[dict], threshold: float, min_area: float | None = None,
                         high: float | None = None, pixel_scale: list[float] | None = None) -> list[dict]:
    """Teacher detections with score > threshold, as targets {boxes, labels, scores}.

    With `min_area` and `high` (the naive large-area variant, Table 5 row 2): keep boxes with score
    > high, plus boxes with score > threshold whose area exceeds min_area. The area is compared in
    original-image pixels, where COCO's 96^2 is defined: `pixel_scale[i]` converts image i's
    view-pixel areas (1 when not given).
    """
    if not detections:
        return []
    # one pass over the concatenated detections: two host syncs whatever the number of images
    counts = [len(d["scores"]) for d in detections]
    scores = torch.cat([d["scores"] for d in detections])
    boxes = torch.cat([d["boxes"] for d in detections])
    labels = torch.cat([d["labels"] for d in detections])
    image = torch.repeat_interleave(torch.arange(len(counts), device=scores.device),
                                    torch.tensor(counts, device=scores.device), output_size=len(scores))
    keep = scores > threshold
    if min_area is not None and high is not None:
        scale = torch.tensor([1.0] * len(counts) if pixel_scale is None else list(pixel_scale),
                             dtype=torch.float32, device=scores.device)[image]
        keep = (scores > high) | (keep & (_area(boxes) * scale > min_area))
    idx = torch.nonzero(keep).squeeze(1)
    per_image = torch.bincount(image[idx], minlength=len(counts)).tolist()
    return [{"boxes": b, "labels": l, "scores": s} for b, l, s in
            zip(boxes[idx].detach().split(per_image), labels[idx].detach().split(per_image),
                scores[idx].detach().split(per_image))]


def pixel_scales(matrices) -> list[float]:
    """Per view, the factor from a view-pixel area to an original-image area (1 / |det| of the linear
    part of its original -> view matrix): COCO's size bins and the naive 96^2 are defined there."""
    return [1.0 / abs(np.linalg.det(m[:2, :2])) for m in matrices]


def pseudo_label_metrics(hidden_gt: list[dict], pixel_scale: list[float], area_scale: float,
                         **sets: list[dict] | None) -> dict[str, float]:
    """`pseudo_label_stats` of each named pseudo-label set against the hidden labels, its name the
    prefix (`pl=main_set, pl_alpha=alpha_set`); a set given as None is not logged."""
    metrics: dict[str, float] = {}
    for prefix, pseudo in sets.items():
        if pseudo is not None:
            metrics.update(pseudo_label_stats(pseudo, hidden_gt, pixel_scale, area_scale, prefix=prefix))
    return metrics


def _size_bin(area: Tensor, scale: float) -> Tensor:
    lo, hi = (AREA_BOUNDS[0] * scale) ** 2, (AREA_BOUNDS[1] * scale) ** 2
    return (area >= lo).long() + (area >= hi).long()  # 0 small, 1 medium, 2 large


@torch.no_grad()
def pseudo_label_stats(pseudo: list[dict], hidden_gt: list[dict], pixel_scale: list[float],
                       area_scale: float = 1.0, prefix: str = "pl") -> dict[str, float]:
    """Count, mean score, and precision / recall at IoU 0.5 (same class), overall and by size.

    `hidden_gt` are the unlabeled images' true boxes (never used for training); `pixel_scale[i]`
    converts a view-pixel area to an original-image area (COCO size bins are defined there).
    Precision is binned by the pseudo box's area, recall by the true box's area.
    """
    n = sum(len(p["boxes"]) for p in pseudo)
    stats = {f"{prefix}_count_per_img": n / max(len(pseudo), 1)}
    if n:
        stats[f"{prefix}_mean_score"] = float(torch.cat([p["scores"] for p in pseudo]).mean())
    if not any(len(g["boxes"]) for g in hidden_gt):
        return stats
    pbs, poks, gbs, goks = [], [], [], []
    for p, g, s in zip(pseudo, hidden_gt, pixel_scale):
        pb = _size_bin(_area(p["boxes"]) * s, area_scale)
        gb = _size_bin(_area(g["boxes"]) * s, area_scale).to(pb.device)
        if len(p["boxes"]) and len(g["boxes"]):
            same = p["labels"][:, None] == g["labels"][None, :].to(p["labels"].device)
            match = (box_iou(p["boxes"], g["boxes"].to(p["boxes"])) >= 0.5) & same
            p_ok, g_ok = match.any(1), match.any(0)
        else:
            p_ok = torch.zeros(len(p["boxes"]), dtype=torch.bool, device=pb.device)
            g_ok = torch.zeros(len(g["boxes"]), dtype=torch.bool, device=pb.device)
        pbs.append(pb)
        poks.append(p_ok)
        gbs.append(gb)
        goks.append(g_ok)
    pb, p_ok, gb, g_ok = (torch.cat(x) for x in (pbs, poks, gbs, goks))
    # counts by size bin on the device, read back in one host sync
    npred, tp, ngt, hit = np.array(torch.stack([
        torch.bincount(pb, minlength=3).double(), torch.bincount(pb, weights=p_ok.double(), minlength=3),
        torch.bincount(gb, minlength=3).double(), torch.bincount(gb, weights=g_ok.double(), minlength=3)]).tolist())
    if npred.sum():
        stats[f"{prefix}_precision"] = tp.sum() / npred.sum()
    stats[f"{prefix}_recall"] = hit.sum() / max(ngt.sum(), 1)
    for b, name in enumerate(("small", "medium", "large")):
        if npred[b]:
            stats[f"{prefix}_precision_{name}"] = tp[b] / npred[b]
        if ngt[b]:
            stats[f"{prefix}_recall_{name}"] = hit[b] / ngt[b]
    return stats


def _area(boxes: Tensor) -> Tensor:
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=0)
    return (wh[:, 0] * wh[:, 1]).float()
