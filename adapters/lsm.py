"""LSM: Pseudo Information Mining (PIM) and Self-Distillation (SD), paper section 3.

Shared by every Faster R-CNN adapter; turned on with `lsm.enabled=true`.

PIM (Eq. 6). The student's (normalised, padded) input batch is downsampled 0.5x and passed through
the same backbone + FPN. Level P_k of the half-size image has the stride of P_(k+1) of the full
image in original coordinates, so "shift alignment" pairs P2^d->P3, P3^d->P4, P4^d->P5. PIM reuses
the main branch's RPN proposals (no second RPN), matches them to the pseudo-labels with score
> alpha, pools each RoI from the shifted map of the level the FPN rule assigns it to, and runs the
shared box head E and regression head R plus its own auxiliary classifier F_aux.
Rule for RoIs without a shifted source: a RoI whose FPN level is P2 (the smallest RoIs), or whose
level's source is not in `lsm.pim_levels`, is excluded from PIM (it still trains the main branch).

SD (Eq. 7). For PIM RoIs matched (IoU >= 0.5) to a pseudo-label with score in (alpha, t), the main
classifier's prediction on the full-resolution features is fit to F_aux's by a KL divergence
KL(p_aux || p_main); neither side is detached, so the two classifiers learn from each other.

Choices the paper leaves open (docs/lsm.md): F_aux starts as a copy of F_main at the end of
burn-in; PIM also trains on the labeled batch's ground truth (`pim_on_labeled`); `pim_weight`
0.5 and `sd_weight` 0.2 follow the authors' partial code (ssod_methods.md 7.2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from adapters.models.faster_rcnn import FasterRCNN, RoISamples, TrainForward, pool_by_level

# Shifted source level name -> the main pyramid level it aligns with (same stride in image coords).
SHIFT = {"p2": 3, "p3": 4, "p4": 5}


def attach_aux_classifier(model: FasterRCNN) -> None:
    """Add F_aux (a second K+1-way classifier) to a detector; inference never uses it.

    It is initialised inside a forked RNG: drawing from the global stream would shift every later
    random draw, and UBT and UBT+LSM could not share one burn-in (bench/burn_in.py). Its start
    values are overwritten by `init_aux_from_main` when the teacher is created anyway.
    """
    rep = model.roi_heads.box_predictor.cls_score.in_features
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        aux = nn.Linear(rep, model.num_classes + 1)
        nn.init.normal_(aux.weight, std=0.01)
        nn.init.constant_(aux.bias, 0)
    model.roi_heads.aux_cls_score = aux.to(model.roi_heads.box_predictor.cls_score.weight.device)


@torch.no_grad()
def init_aux_from_main(model: FasterRCNN) -> None:
    model.roi_heads.aux_cls_score.load_state_dict(model.roi_heads.box_predictor.cls_score.state_dict())


def downsample(images: Tensor) -> Tensor:
    """0.5x of the padded batch; sizes divisible by 32 stay divisible by 16, so maps align exactly."""
    return F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)


def shifted_features(features_d: dict[str, Tensor], pim_levels: list[str]) -> dict[int, Tensor]:
    """{main level k: P_(k-1)^d} for the selected sources."""
    return {SHIFT[name]: features_d[name] for name in pim_levels}


def sd_mask(matched_scores: Tensor, labels: Tensor, num_classes: int, alpha: float, t: float) -> Tensor:
    """Foreground RoIs whose matched pseudo-label score lies in the open interval (alpha, t)."""
    return (labels < num_classes) & (matched_scores > alpha) & (matched_scores < t)


def kl_aux_to_main(main_logits: Tensor, aux_logits: Tensor) -> Tensor:
    """KL(p_aux || p_main), mean over RoIs; gradients flow into both classifiers (not detached)."""
    if main_logits.numel() == 0:
        return main_logits.sum() * 0 + aux_logits.sum() * 0
    log_p_main = F.log_softmax(main_logits, dim=-1)
    log_p_aux = F.log_softmax(aux_logits, dim=-1)
    return (log_p_aux.exp() * (log_p_aux - log_p_main)).sum(-1).mean()


class PIM:
    """Computes L_pim (cls + reg) and L_sd for one student forward."""

    def __init__(self, cfg_lsm, t: float, model_cfg):
        self.cfg = cfg_lsm
        self.t = t
        self.canonical_scale = model_cfg.canonical_scale
        self.sampling_ratio = model_cfg.pooler_sampling_ratio

    def weighted_terms(self, model: FasterRCNN, fwd_u: TrainForward, pseudo: list[dict], fwd_l: TrainForward,
                       targets_l: list[dict], lambda_u: float) -> dict[str, Tensor]:
        """LSM's terms of Eq. 3, weighted: lambda_u * (pim_weight * L_pim + sd_weight * L_sd) on the
        unlabeled batch (pseudo-labels above alpha), plus pim_weight * L_pim on the labeled batch."""
        c = self.cfg
        pim_u = self.losses(model, fwd_u, pseudo, sd=c.sd)
        out = {"loss_pim_cls_unsup": lambda_u * c.pim_weight * pim_u["loss_pim_cls"],
               "loss_pim_reg_unsup": lambda_u * c.pim_weight * pim_u["loss_pim_reg"]}
        if c.sd:
            out["loss_sd"] = lambda_u * c.sd_weight * pim_u["loss_sd"]
        if c.pim_on_labeled:
            pim_l = self.losses(model, fwd_l, targets_l, sd=False)
            out["loss_pim_cls_sup"] = c.pim_weight * pim_l["loss_pim_cls"]
            out["loss_pim_reg_sup"] = c.pim_weight * pim_l["loss_pim_reg"]
        return out

    def losses(self, model: FasterRCNN, fwd: TrainForward, targets: list[dict], sd: bool) -> dict[str, Tensor]:
        """PIM losses for `targets` (boxes, labels, scores; already filtered at alpha).

        `fwd` is the main branch's forward on the same images: its RPN proposals and padded input
        batch are reused.
        """
        heads = model.roi_heads
        samples: RoISamples = heads.sample(fwd.proposals, targets)
        features_d = model.backbone(downsample(fwd.images.tensors))
        pooled, has_source = pool_by_level(shifted_features(features_d, self.cfg.pim_levels), samples.proposals,
                                           self.canonical_scale, 7, self.sampling_ratio)
        keep = torch.where(has_source)[0]  # RoIs of a level without a shifted source are excluded
        labels = samples.labels[keep]
        box_feats = heads.box_head(pooled[keep])
        aux_logits = heads.aux_cls_score(box_feats)
        _, deltas = heads.box_predictor(box_feats)  # the shared regression head R
        n = max(len(samples.labels), 1)  # normalise by all sampled RoIs, like the main branch
        out = {
            "loss_pim_cls": heads.classification_loss(aux_logits, labels) * len(labels) / n,
            "loss_pim_reg": heads.box_regression_loss(deltas, labels, samples.regression_targets[keep]) * len(labels) / n,
        }
        if sd:
            mask = sd_mask(samples.matched_scores[keep], labels, heads.num_classes, self.cfg.alpha, self.t)
            if mask.any():
                props = _select(samples.proposals, keep[mask])  # ascending indices: same RoI order
                main_logits = heads.box_predictor.cls_score(heads.box_features(fwd.features, props))
                out["loss_sd"] = kl_aux_to_main(main_logits, aux_logits[mask])
            else:
                out["loss_sd"] = aux_logits.sum() * 0
        return out


def _select(proposals: list[Tensor], flat_idx: Tensor) -> list[Tensor]:
    """Per-image proposal lists restricted to ascending indices into the concatenated list."""
    out, start = [], 0
    for p in proposals:
        local = flat_idx[(flat_idx >= start) & (flat_idx < start + len(p))] - start
        out.append(p[local])
        start += len(p)
    return out
