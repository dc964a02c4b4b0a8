"""Soft Teacher (Xu et al., ICCV 2021; original mmdet 2.x code), with the LSM toggle.

Per iteration after burn-in (the original has burn_in 0):
- the teacher detects on the unlabeled teacher view (resize + flip); detections with score >
  `initial_score_thr` (0.5) are pseudo-boxes, each with a box-jitter uncertainty (10 jittered
  copies refined by the teacher's RoI head; mean over the 4 coordinates of std / box side);
- the pseudo-boxes are mapped into the independently augmented student view with
  M = T_student @ inv(T_teacher) (the views' recorded matrices) and clipped to it;
- three pseudo-box sets: RPN (score > `rpn_thr` 0.9), RoI classification (score > `semi.t`, 0.9 in
  the original), RoI regression (uncertainty < `reg_unc_thr` 0.02, after the 0.5 pre-filter);
- soft teacher: the student's sampled RoIs are mapped back into the teacher view (inv(M)); the
  teacher's background probability on them is the weight of every RoI assigned to background
  (foreground RoIs weigh 1), and loss_cls = sum_i w_i CE_i / max(sum_i w_i, 1);
- the regression loss comes from a second RoI sampling against the regression set;
- the teacher is an EMA of the student's *parameters* (buffers untouched) with momentum
  min(keep, 1 - (1 + w) / (t + 1 + w)), w = `ema_warm_up` (0), t counted from the copy.

Read off `unlabeled_step`, the step after burn-in (LSM paper Eq. 3 with Soft Teacher's unsupervised terms):
    L = L_sup + lambda_u * (L_rpn + L_cls^soft + L_reg + pim_weight * L_pim + sd_weight * L_sd)
With LSM, the RoIs of pseudo-boxes scored in (alpha, t] weigh 0 in L_cls^soft (`lsm.ignore_uncertain`).

The data pipeline's views share one geometry (bench/worker.py builds `weak` and a photometric
`strong` copy of it), so the student view is drawn by the adapter (adapters/student_view.py, shared
with PseCo) from the original image: its own resize + flip, one geometric op (translate / rotate /
shear, recorded in its matrix) and the strong photometric recipe of core/data/transforms.py.
docs/softteacher.md lists every difference.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from adapters.base import StepOutput, register, teacher_rpn_settings
from adapters.engine.mean_teacher import filter_pseudo_labels, pixel_scales, pseudo_label_metrics
from adapters.lsm import alpha_set, lowest_threshold, uncertain_marks, uncertain_rois
from adapters.models.faster_rcnn import FasterRCNN, TrainForward
from adapters.student_view import (StudentViewAdapter, clip_boxes, map_boxes, map_pseudo_labels, select,
                                   teacher_and_student_views, teacher_pass)
from core.streams import SOFTTEACHER_STUDENT_VIEW


# ----------------------------------------------------------------------------- Soft Teacher's pseudo-box sets
def split_pseudo_labels(pseudo: list[dict], initial_thr: float, rpn_thr: float, cls_thr: float,
                        reg_unc_thr: float) -> dict[str, list[dict]]:
    """The three pseudo-box sets of Soft Teacher (not one thresholded set): RPN by score, RoI classification by
    score, RoI regression by box uncertainty among the boxes above the initial score threshold."""
    return {
        "rpn": select(pseudo, [p["scores"] > rpn_thr for p in pseudo]),
        "cls": select(pseudo, [p["scores"] > cls_thr for p in pseudo]),
        "reg": select(pseudo, [(p["scores"] > initial_thr) & (p["unc"] < reg_unc_thr) for p in pseudo]),
    }


# ----------------------------------------------------------------------------- the soft teacher's pieces
def jitter_boxes(boxes: Tensor, times: int, scale: float, generator: torch.Generator | None = None) -> Tensor:
    """(times, N, 4) copies of `boxes` with offsets ~ N(0, (scale * side)^2): width for x1, x2 and
    height for y1, y2, sides clamped >= 1 (the original's aug_box)."""
    wh = (boxes[:, 2:] - boxes[:, :2]).clamp(min=1)
    sigma = (wh.repeat(1, 2) * scale)[None]  # (1, N, 4): w, h, w, h
    noise = torch.randn((times, len(boxes), 4), generator=generator, device=boxes.device, dtype=boxes.dtype)
    return boxes[None] + noise * sigma


def relative_uncertainty(refined: Tensor) -> Tensor:
    """(times, N, 4) refined boxes -> (N,) mean over coordinates of std / side of the mean box
    (std over the jitter copies, unbiased as torch.std; sides clamped >= 1)."""
    if refined.shape[1] == 0:
        return refined.new_zeros(0)
    std = refined.std(dim=0)
    mean = refined.mean(dim=0)
    wh = (mean[:, 2:] - mean[:, :2]).clamp(min=1.0)
    return (std / wh.repeat(1, 2)).mean(dim=-1)


def soft_weights(labels: Tensor, bg_prob: Tensor, num_classes: int) -> Tensor:
    """RoI weights of the soft teacher: foreground 1, background = teacher's background probability."""
    fg = labels < num_classes
    return torch.where(fg, torch.ones_like(bg_prob), bg_prob).detach()


def soft_cls_loss(logits: Tensor, labels: Tensor, weights: Tensor) -> Tensor:
    """sum_i w_i CE_i / max(sum_i w_i, 1): the original code normalises fg and bg jointly."""
    if labels.numel() == 0:
        return logits.sum() * 0
    ce = F.cross_entropy(logits, labels, reduction="none")
    return (weights * ce).sum() / weights.sum().clamp(min=1.0)


@dataclass
class TeacherOutput:
    image_sizes: list[tuple[int, int]]
    features: dict  # the teacher's pyramid on its view (reused for the soft background weights)
    detections: list[dict]  # boxes, labels, scores, unc in teacher-view coordinates


# ----------------------------------------------------------------------------- the adapter
@register("softteacher")
class SoftTeacher(StudentViewAdapter):
    section = "softteacher"
    view_stream = SOFTTEACHER_STUDENT_VIEW

    def __init__(self, cfg, num_classes: int, device: torch.device):
        super().__init__(cfg, num_classes, device)
        self.st = cfg.softteacher

    def eval_models(self) -> dict:
        # The original evaluates the student (inference_on="student"), and the paper's SoftTeacher
        # row is the Soft Teacher paper's numbers; the teacher is logged beside it.
        return {"student": self.student, "teacher": self.teacher}

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_label(self, images: list[Tensor]) -> TeacherOutput:
        """Teacher detections on its view (test settings: score 0.05, NMS 0.5, top 100) above the
        lowest threshold in use, each with its box-jitter uncertainty (inf below initial_score_thr)."""
        teacher = self.teacher
        out = teacher_pass(teacher, images, teacher_rpn_settings(self.cfg.semi),
                           lowest_threshold(self.st.initial_score_thr, self.lsm))
        image_list, features, dets = out.image_list, out.features, out.detections
        sure = [d["scores"] > self.st.initial_score_thr for d in dets]
        unc = self.jitter_uncertainty(teacher, features, image_list.image_sizes,
                                      [d["boxes"][s] for d, s in zip(dets, sure)],
                                      [d["labels"][s] for d, s in zip(dets, sure)])
        for d, s, u in zip(dets, sure, unc):
            d["unc"] = torch.full_like(d["scores"], float("inf"))
            d["unc"][s] = u
        return TeacherOutput(image_list.image_sizes, features, dets)

    @torch.no_grad()
    def jitter_uncertainty(self, teacher: FasterRCNN, features, image_sizes, boxes: list[Tensor],
                           labels: list[Tensor]) -> list[Tensor]:
        """Jittered copies refined by the teacher's RoI head (class of the pseudo-label, no NMS,
        clipped to the image), then their relative spread (the original's compute_uncertainty_with_aug)."""
        if sum(len(b) for b in boxes) == 0:
            return [b.new_zeros(0) for b in boxes]
        times = self.st.jitter_times
        jittered = [jitter_boxes(b, times, self.st.jitter_scale).reshape(-1, 4) for b in boxes]
        heads = teacher.roi_heads
        _, deltas = heads.box_predictor(heads.box_features(features, jittered))
        decoded = heads.box_coder.decode(deltas, jittered).reshape(len(deltas), heads.num_classes, 4)
        out, start = [], 0
        for b, lab, size in zip(boxes, labels, image_sizes):
            n = times * len(b)
            refined = decoded[start:start + n][torch.arange(n, device=decoded.device), lab.repeat(times)]
            out.append(relative_uncertainty(clip_boxes(refined, size).reshape(times, len(b), 4)))
            start += n
        return out

    @torch.no_grad()
    def teacher_background(self, teacher_out: TeacherOutput, rois: list[Tensor],
                           to_teacher: list[np.ndarray]) -> Tensor:
        """The teacher's background probability on the student's RoIs mapped into its view."""
        mapped = [map_boxes(r, m, size) for r, m, size in zip(rois, to_teacher, teacher_out.image_sizes)]
        heads = self.teacher.roi_heads
        logits = heads.box_predictor.cls_score(heads.box_features(teacher_out.features, mapped))
        return F.softmax(logits, dim=-1)[:, -1]

    def student_unsup(self, images: list[Tensor], rpn_set: list[dict], cls_set: list[dict], reg_set: list[dict],
                      teacher_out: TeacherOutput, to_teacher: list[np.ndarray],
                      candidates: list[dict] | None = None) -> tuple[dict, TrainForward, Tensor, Tensor]:
        """Unweighted unsupervised losses on the student view: RPN (rpn set), soft-teacher RoI
        classification (cls set), RoI regression from its own sampling (reg set). With LSM's
        ignore-region `candidates` (adapters/lsm.py) the uncertain RoIs weigh 0 in the classification.
        Returns the losses, the forward, the RoI weights and the ignored-RoI mask."""
        model, heads = self.student, self.student.roi_heads
        image_list, features = model.extract(images)
        proposals, rpn_losses = model.rpn(image_list, features, [{"boxes": t["boxes"]} for t in rpn_set])
        samples = heads.sample(proposals, cls_set)
        box_feats = heads.box_features(features, samples.proposals)
        logits, deltas = heads.box_predictor(box_feats)
        weights = soft_weights(samples.labels, self.teacher_background(teacher_out, samples.proposals, to_teacher),
                               heads.num_classes)
        ignored = torch.zeros_like(samples.labels, dtype=torch.bool)
        if candidates is not None:
            ignored = uncertain_rois(samples.proposals, candidates)
            weights = torch.where(ignored, torch.zeros_like(weights), weights)
        if any(len(t["boxes"]) for t in reg_set):
            reg = heads.sample(proposals, reg_set)
            _, reg_deltas = heads.box_predictor(heads.box_features(features, reg.proposals))
            loss_reg = heads.box_regression_loss(reg_deltas, reg.labels, reg.regression_targets)
        else:  # every sampled RoI would be background: the loss is exactly 0
            loss_reg = deltas.sum() * 0
        losses = {
            "loss_rpn_cls": rpn_losses["loss_objectness"],
            "loss_rpn_loc": rpn_losses["loss_rpn_box_reg"],
            "loss_cls": soft_cls_loss(logits, samples.labels, weights),
            "loss_box_reg": loss_reg,
        }
        fwd = TrainForward(losses, image_list, features, proposals, samples, box_feats, logits, deltas)
        return losses, fwd, weights, ignored

    def unlabeled_step(self, iteration: int, items: list[dict], losses: dict, fwd_l, targets_l) -> StepOutput:
        semi, st, lsm = self.cfg.semi, self.st, self.lsm
        images_t, hidden_gt, images_s, to_student = teacher_and_student_views(self, items, iteration)
        to_teacher = [np.linalg.inv(m) for m in to_student]

        teacher_out = self.pseudo_label(images_t)
        pseudo = map_pseudo_labels(teacher_out.detections, to_student, [tuple(img.shape[-2:]) for img in images_s])
        sets = split_pseudo_labels(pseudo, st.initial_score_thr, st.rpn_thr, semi.t, st.reg_unc_thr)
        pseudo_pim = alpha_set(pseudo, lsm.alpha) if self.pim is not None else None
        # LSM's ignore region: the RoIs of pseudo-boxes scored in (alpha, t] (adapters/lsm.py)
        candidates = uncertain_marks(pseudo_pim, semi.t) if self.pim is not None and lsm.ignore_uncertain else None
        unsup, fwd_u, weights, ignored = self.student_unsup(images_s, sets["rpn"], sets["cls"], sets["reg"],
                                                            teacher_out, to_teacher, candidates)
        losses.update({f"{k}_unsup": semi.lambda_u * v for k, v in unsup.items()})

        metrics = self._metrics(items, teacher_out, hidden_gt, fwd_u, weights, ignored)
        if candidates is not None:
            metrics["lsm_ignored_rois_per_img"] = int(ignored.sum()) / max(len(items), 1)
        if self.pim is not None:
            losses.update(self.pim.weighted_terms(self.student, fwd_u, pseudo_pim, fwd_l, targets_l, semi.lambda_u))
        return StepOutput(losses, metrics)

    def _metrics(self, items, teacher_out: TeacherOutput, hidden_gt, fwd_u: TrainForward, weights: Tensor,
                 ignored: Tensor) -> dict:
        """Pseudo-label quality (teacher view, against the hidden labels) of the cls, reg and alpha
        sets, mean box uncertainty, mean soft background weight (of the RoIs not ignored)."""
        dets, st = teacher_out.detections, self.st
        reg = split_pseudo_labels(dets, st.initial_score_thr, st.rpn_thr, self.cfg.semi.t, st.reg_unc_thr)["reg"]
        kept = self.pim is not None or self.lsm.alpha >= st.initial_score_thr  # detections kept above alpha
        metrics = pseudo_label_metrics(hidden_gt, pixel_scales([it["views"]["weak"].matrix for it in items]),
                                       self.cfg.eval.area_scale, pl=filter_pseudo_labels(dets, self.cfg.semi.t),
                                       pl_reg=reg, pl_alpha=alpha_set(dets, self.lsm.alpha) if kept else None)
        unc = torch.cat([d["unc"][torch.isfinite(d["unc"])] for d in dets])
        if len(unc):
            metrics["pl_box_unc_mean"] = float(unc.mean())
        bg = (fwd_u.samples.labels == self.num_classes) & ~ignored
        if bg.any():
            metrics["soft_bg_weight_mean"] = float(weights[bg].mean())
        return metrics
