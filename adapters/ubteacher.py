"""Unbiased Teacher (Liu et al., ICLR 2021), with the LSM toggle (Liu et al., IJCAI 2023).

Per iteration (the official `run_step_full_semisup`):
- burn-in (iteration < burn_in): supervised loss on the labeled strong + weak views;
- at burn_in the teacher becomes a copy of the student, then EMA (keep 0.9996, buffers included)
  before every step (MeanTeacherHook);
- the teacher detects on the unlabeled weak views; pseudo-labels = detections with score > t;
- the student learns from the labeled batch (both views) and from the unlabeled strong views with
  the pseudo-labels, where only RPN objectness and RoI classification count (box losses x 0).

Eq. 3 of the LSM paper, read off `training_step`:
    L = L_sup + lambda_u * (L_unsup_main + pim_weight * L_pim + sd_weight * L_sd)
With LSM, L_unsup_main's RoI classification leaves out the RoIs of pseudo-boxes scored in (alpha, t]
(`lsm.ignore_uncertain`, adapters/lsm.py).
With `mlc.enabled` (Table 4), lambda_u * mlc.weight * the same two terms on a 0.5x view (adapters/mlc.py).
"""

from __future__ import annotations

import torch

from adapters import mlc
from adapters.base import MeanTeacherAdapter, StepOutput, batch_to_device, register, teacher_rpn_settings
from adapters.engine.mean_teacher import MeanTeacherHook, filter_pseudo_labels, pixel_scales, pseudo_label_metrics
from adapters.lsm import alpha_set, main_cls_loss, uncertain_marks, uncertain_rois


@register("ubteacher")
class UnbiasedTeacher(MeanTeacherAdapter):
    labeled_views = ("weak", "strong")
    unlabeled_views = ("weak", "strong")

    def hooks(self) -> list:
        return [MeanTeacherHook(self.teacher, self.student, self.cfg.semi.burn_in, self.cfg.semi.ema_keep_rate,
                                include_buffers=True, on_copy=self.on_teacher_copy())]

    def eval_models(self) -> dict:
        models = {"teacher": self.teacher}  # the paper reports the teacher
        if self.cfg.eval.evaluate_student:
            models["student"] = self.student
        return models

    # ------------------------------------------------------------------------------------------
    def _labeled(self, batch: dict):
        """Labeled strong + weak views concatenated (UBT trains on both)."""
        img_s, tgt_s = batch_to_device(batch["labeled"], "strong", self.device)
        img_w, tgt_w = batch_to_device(batch["labeled"], "weak", self.device)
        return img_s + img_w, tgt_s + tgt_w

    @torch.no_grad()
    def pseudo_label(self, images_weak: list) -> list[dict]:
        self.teacher.eval()  # RoI head in inference mode; the RPN's counts per `semi.teacher_proposals`
        return self.teacher.detect(images_weak, rpn_settings=teacher_rpn_settings(self.cfg.semi))

    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        self.student.train()
        images_l, targets_l = self._labeled(batch)
        if iteration < self.cfg.semi.burn_in:
            sup = self.student.train_forward(images_l, targets_l).losses
            return StepOutput({f"{k}_sup": v for k, v in sup.items()})

        semi, lsm = self.cfg.semi, self.lsm
        images_uw, hidden_gt = batch_to_device(batch["unlabeled"], "weak", self.device)
        images_us, _ = batch_to_device(batch["unlabeled"], "strong", self.device)
        detections = self.pseudo_label(images_uw)
        # view pixels -> original-image pixels (COCO's size bins and the naive 96^2 are defined there)
        scale = pixel_scales([it["views"]["weak"].matrix for it in batch["unlabeled"]])
        if lsm.naive_large_area:  # Table 5 row 2: large low-score boxes go straight to the main branch
            pseudo_main = filter_pseudo_labels(detections, lsm.alpha, min_area=lsm.naive_min_area, high=semi.t,
                                               pixel_scale=scale)
        else:
            pseudo_main = filter_pseudo_labels(detections, semi.t)

        fwd_l = self.student.train_forward(images_l, targets_l)
        fwd_u = self.student.train_forward(images_us, pseudo_main)
        losses = {f"{k}_sup": v for k, v in fwd_l.losses.items()}
        pseudo_alpha = alpha_set(detections, lsm.alpha)  # PIM's set; logged for every run
        metrics = pseudo_label_metrics(hidden_gt, scale, self.cfg.eval.area_scale, pl=pseudo_main, pl_alpha=pseudo_alpha)
        loss_cls_u = fwd_u.losses["loss_cls"]
        if self.pim is not None and lsm.ignore_uncertain:
            # LSM's ignore region: the RoIs of pseudo-boxes scored in (alpha, t] (adapters/lsm.py)
            ignore = uncertain_rois(fwd_u.samples.proposals, uncertain_marks(pseudo_alpha, semi.t))
            loss_cls_u = main_cls_loss(self.student.roi_heads, fwd_u.logits, fwd_u.samples.labels, ignore)
            metrics["lsm_ignored_rois_per_img"] = int(ignore.sum()) / max(len(images_us), 1)
        # Unbiased Teacher: pseudo-boxes supervise objectness and classification only.
        losses["loss_rpn_cls_unsup"] = semi.lambda_u * fwd_u.losses["loss_rpn_cls"]
        losses["loss_cls_unsup"] = semi.lambda_u * loss_cls_u
        losses.update(mlc.weighted_terms(self.student, images_us, pseudo_main, self.cfg.mlc, semi.lambda_u,
                                         terms=("loss_rpn_cls", "loss_cls")))  # Table 4's UBT + MLC
        if self.pim is not None:
            losses.update(self.pim.weighted_terms(self.student, fwd_u, pseudo_alpha, fwd_l, targets_l, semi.lambda_u))
        return StepOutput(losses, metrics)
