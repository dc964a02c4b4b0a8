"""Deformable DETR for SSOD (paper section 3, "LSM for Deformable-DETR"; Tables 3 and 6).

Three strategies (`ddetr.strategy`), the last two with the LSM toggle:
- supervised: labeled images only (Table 3's Omega row);
- stac: STAC's offline pseudo-labels (the Faster R-CNN `supervised` cell of the split is the
  teacher, its stage-2 file is the very file STAC reads: bench/teacher.py, adapters/stac.py), then
  DDETR on labeled + pseudo-labeled images: L = L_sup + lambda_u * L_unsup;
- pretrain_finetune: the first `pretrain_fraction` of the iterations learn the pseudo-labeled
  unlabeled images only (L_unsup, + LSM), the rest the labeled images only (L_sup) (Phi).
The main branch learns pseudo-boxes with score >= t (`semi.t`).

LSM (`lsm.enabled`), read off `unlabeled_terms`:
    L_unsup + pim_weight * L_pim + sd_weight * L_sd      (x lambda_u in stac; + pim_weight * L_pim^labeled)
- one Hungarian matching per decoder layer between the main branch's predictions and every
  pseudo-box with score > alpha; the main branch learns the matched boxes with score >= t and
  ignores queries matched to a box in (alpha, t) (neither object nor background);
- PIM: the 0.5x image's multi-scale features go through the encoder and decoder as a second stack
  (same weights, same queries); F_aux (`aux_class_embed`) and the shared box head learn every box
  with score > alpha on the SAME indices object (no second matching);
- SD: KL(p_aux || p_main) on the last layer's queries matched to boxes with score in (alpha, t),
  neither side detached (adapters/lsm.py `kl_aux_to_main`, `sd_mask`).
docs/ddetr.md lists every choice the paper leaves open.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.base import Adapter, StepOutput, batch_to_device, register
from adapters.engine.mean_teacher import pixel_scales, pseudo_label_metrics
from adapters.lsm import alpha_set, downsample, kl_aux_to_main, lowest_threshold, sd_mask
from adapters.models.deformable_detr import (
    DeformableDETR,
    DetrOutputs,
    Indices,
    LossWeights,
    SetCriterion,
    build_deformable_detr,
    normalize_targets,
    param_groups,
)
from adapters.stac import PseudoLabels, boxes_into_view
from core.errors import BenchError


def attach_aux_classifier(model: DeformableDETR) -> None:
    """LSM's F_aux for DETR: a second K-way sigmoid classifier on the decoder states, starting as a
    copy of the main one (both fresh: the pseudo-labels are there from iteration 0)."""
    aux = nn.Linear(model.class_embed.in_features, model.num_classes)
    aux.load_state_dict(model.class_embed.state_dict())
    model.aux_class_embed = aux.to(model.class_embed.weight.device)


@dataclass
class Branch:
    """One main-branch forward: outputs, its padded input (PIM reuses it), normalised targets and
    the per-layer matching indices."""

    outs: DetrOutputs
    pixel_values: Tensor
    pixel_mask: Tensor
    targets: list[dict]
    indices: list[Indices]


@register("ddetr")
class DeformableDetrAdapter(Adapter):
    labeled_views = ("weak",)

    def __init__(self, cfg, num_classes: int, device: torch.device):
        d, lsm = cfg.ddetr, cfg.lsm
        if cfg.solver.optimizer != "adamw":
            raise BenchError("ddetr trains with AdamW: set solver.optimizer=adamw (presets set it, with lr 2e-4 and "
                             "clip 0.1, under method_defaults.ddetr)")
        if lsm.enabled and d.strategy == "supervised":
            raise BenchError("LSM learns pseudo-labels, which ddetr.strategy=supervised has none of; use "
                             "ddetr.strategy=stac or pretrain_finetune, or lsm.enabled=false")
        # not Adapter.__init__: the student is a Deformable DETR, not the Faster R-CNN
        self.cfg, self.device, self.num_classes = cfg, device, num_classes
        self.ddetr, self.lsm = d, lsm
        self.t = cfg.semi.t
        self.student = build_deformable_detr(d, num_classes).to(device)
        cost, weight = d.matcher_cost, d.loss_weight
        self.criterion = SetCriterion(LossWeights(
            class_cost=cost.cls, bbox_cost=cost.bbox, giou_cost=cost.giou, cls=weight.cls, bbox=weight.bbox,
            giou=weight.giou, focal_alpha=d.focal_alpha))
        self.unlabeled_views = () if d.strategy == "supervised" else ("weak",)
        self.pretrain_iters = round(d.pretrain_fraction * cfg.solver.max_iter) if d.strategy == "pretrain_finetune" else 0
        self.pseudo_labels: PseudoLabels | None = None
        if lsm.enabled:
            attach_aux_classifier(self.student)

    # -- plumbing -----------------------------------------------------------------------------------
    def param_groups(self) -> list[dict]:
        return param_groups(self.student, self.cfg.solver.base_lr, self.ddetr.lr_backbone_mult,
                            self.ddetr.lr_linear_proj_mult)

    def attach_pseudo_labels(self, pseudo: PseudoLabels) -> None:
        """STAC's stage-2 file (called by the worker, bench/teacher.py); a supervised DDETR ignores it."""
        pseudo.check_covers(lowest_threshold(self.t, self.lsm), "semi.t / lsm.alpha")
        self.pseudo_labels = pseudo

    def unlabeled_start(self) -> int:
        return 0  # offline pseudo-labels: from the first iteration

    def pretraining(self, iteration: int) -> bool:
        return iteration < self.pretrain_iters

    # -- the main branch ----------------------------------------------------------------------------
    def main_branch(self, images: list[Tensor], targets: list[dict], positive: list[Tensor] | None = None):
        """Forward, match every decoder layer (the only Hungarian calls of a step), losses."""
        outs, pixel_values, pixel_mask, sizes = self.student.forward_train(images)
        tn = normalize_targets(targets, sizes)
        indices = self.criterion.match_layers(outs.logits, outs.boxes, tn)
        losses = self.criterion.losses(outs.logits, outs.boxes, tn, indices, positive)
        return Branch(outs, pixel_values, pixel_mask, tn, indices), losses

    # -- LSM ----------------------------------------------------------------------------------------
    def pim_branch(self, br: Branch) -> DetrOutputs:
        """The 0.5x stack: the main branch's padded batch downsampled, through trunk, encoder and
        decoder; F_aux classifies, the shared box head regresses."""
        pv = downsample(br.pixel_values)
        mask = F.interpolate(br.pixel_mask[:, None].float(), size=pv.shape[-2:], mode="nearest")[:, 0].long()
        outs = self.student.decode(pv, mask)
        return DetrOutputs(self.student.aux_class_embed(outs.hidden), outs.boxes, outs.hidden)

    def lsm_losses(self, br: Branch, sd: bool) -> dict[str, Tensor]:
        """L_pim on the main branch's indices (targets with score > alpha) and L_sd on the last
        layer's queries matched to scores in (alpha, t)."""
        pim = self.pim_branch(br)
        alpha = self.lsm.alpha
        # pseudo-boxes above alpha; ground truth (the labeled batch, no scores) is all positive
        positive = [t["scores"] > alpha for t in br.targets] if all("scores" in t for t in br.targets) else None
        out = {f"loss_pim_{k[5:]}": v for k, v in
               self.criterion.losses(pim.logits, pim.boxes, br.targets, br.indices, positive).items()}
        if sd:
            main_l, aux_l = [], []
            for b, (qi, ti) in enumerate(br.indices[-1]):
                t = br.targets[b]
                m = sd_mask(t["scores"][ti.to(t["scores"].device)], t["labels"][ti.to(t["labels"].device)],
                            self.num_classes, alpha, self.t)
                q = qi.to(m.device)[m]
                main_l.append(br.outs.logits[-1, b, q])
                aux_l.append(pim.logits[-1, b, q])
            # softmax over the K class logits: the class distribution of a query known to be an object
            out["loss_sd"] = kl_aux_to_main(torch.cat(main_l), torch.cat(aux_l))
        return out

    # -- pseudo-labels ------------------------------------------------------------------------------
    def pseudo_targets(self, items: list[dict]) -> list[dict]:
        """Stored teacher boxes mapped into each item's weak view: score >= t (main) or, with LSM,
        score > alpha too (PIM; the main branch ignores those below t)."""
        if self.pseudo_labels is None:
            raise BenchError("ddetr has no pseudo-labels: the worker must call attach_pseudo_labels() with the "
                             "stage-2 file of the Faster R-CNN teacher (the supervised cell of this split)")
        out = []
        for it in items:
            stored = self.pseudo_labels[it["image_id"]]
            keep = stored["scores"] >= self.t
            if self.lsm.enabled:
                keep = keep | (stored["scores"] > self.lsm.alpha)
            target = boxes_into_view({k: v[keep] for k, v in stored.items()}, it["views"]["weak"])
            out.append({k: v.to(self.device) for k, v in target.items()})
        return out

    # -- the step -----------------------------------------------------------------------------------
    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        self.student.train()
        d, lsm = self.ddetr, self.lsm
        terms: dict[str, Tensor] = {}
        metrics: dict[str, float] = {}
        pretrain = self.pretraining(iteration)
        if not pretrain:  # supervised, stac, or the fine-tuning phase
            images_l, targets_l = batch_to_device(batch["labeled"], "weak", self.device)
            br_l, sup = self.main_branch(images_l, targets_l)
            terms.update({f"{k}_sup": v for k, v in sup.items()})
            if lsm.enabled and lsm.pim_on_labeled and d.strategy == "stac":
                for k, v in self.lsm_losses(br_l, sd=False).items():
                    terms[f"{k}_sup"] = lsm.pim_weight * v
        if d.strategy == "stac" or pretrain:
            weight = d.lambda_u if d.strategy == "stac" else 1.0
            unsup, metrics = self.unlabeled_terms(batch["unlabeled"])
            terms.update({k: weight * v for k, v in unsup.items()})
        return StepOutput(terms, metrics)

    def unlabeled_terms(self, items: list[dict]) -> tuple[dict[str, Tensor], dict[str, float]]:
        """L_unsup (+ pim_weight * L_pim + sd_weight * L_sd with LSM) on the pseudo-labeled images."""
        lsm = self.lsm
        views = [it["views"]["weak"] for it in items]
        images = [v.image.to(self.device) for v in views]
        pseudo = self.pseudo_targets(items)
        positive = [p["scores"] >= self.t for p in pseudo] if lsm.enabled else None
        br, main = self.main_branch(images, pseudo, positive)
        terms = {f"{k}_unsup": v for k, v in main.items()}
        if lsm.enabled:
            for k, v in self.lsm_losses(br, sd=lsm.sd).items():
                terms[f"{k}_unsup" if k != "loss_sd" else k] = (lsm.sd_weight if k == "loss_sd" else lsm.pim_weight) * v

        hidden_gt = [{"boxes": v.boxes.to(self.device), "labels": v.labels.to(self.device)} for v in views]
        main_set = [{k: v[p["scores"] >= self.t] for k, v in p.items()} for p in pseudo]
        metrics = pseudo_label_metrics(hidden_gt, pixel_scales([v.matrix for v in views]), self.cfg.eval.area_scale,
                                       pl=main_set, pl_alpha=alpha_set(pseudo, lsm.alpha) if lsm.enabled else None)
        return terms, metrics
