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

Ignore region (`lsm.ignore_uncertain`, default on, as the authors' code). RoIs whose best match
(IoU >= 0.5) among the pseudo-boxes above alpha is one the main branch does not train on (score in
(alpha, t]) are left out of the main branch's RoI classification loss: trained as background there,
they would fight SD, which pulls the same RoIs toward F_aux's foreground (`uncertain_rois`).

Choices the paper leaves open (docs/lsm.md): F_aux starts as a copy of F_main at the end of
burn-in; PIM also trains on the labeled batch's ground truth (`pim_on_labeled`); `pim_weight`
0.5 and `sd_weight` 0.2 follow the authors' partial code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.ops import box_iou

from adapters.engine.mean_teacher import filter_pseudo_labels
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


def lowest_threshold(threshold: float, lsm) -> float:
    """The lowest pseudo-label score a method reads: its own `threshold`, or alpha when LSM is on
    and alpha is lower (PIM learns the boxes above alpha)."""
    return min(threshold, lsm.alpha) if lsm.enabled else threshold


def alpha_set(pseudo: list[dict], alpha: float) -> list[dict]:
    """PIM's pseudo-labels: each image's boxes (with labels and scores) scoring above alpha."""
    return filter_pseudo_labels(pseudo, alpha)


def uncertain_marks(pseudo_alpha: list[dict], t: float) -> list[dict]:
    """PIM's pseudo-boxes (score > alpha) with `certain` = the main branch trains on them (score > t):
    the candidates of `uncertain_rois` for the mean-teacher methods."""
    return [{"boxes": p["boxes"], "certain": p["scores"] > t} for p in pseudo_alpha]


@torch.no_grad()
def uncertain_rois(rois: list[Tensor], candidates: list[dict], iou_thr: float = 0.5) -> Tensor:
    """(R,) bool over the concatenated per-image RoIs: the main branch's ignore region.

    `candidates[i]` = image i's pseudo-boxes above alpha together with the main branch's own,
    {"boxes", "certain"}. A RoI is uncertain when its highest-IoU candidate (ties and threshold as
    the RoI head's matcher: IoU >= 0.5) is not certain, i.e. a pseudo-box scored in (alpha, t]. This
    includes a RoI that also overlaps a certain box at IoU >= 0.5 less than the uncertain one: in the
    authors' code each RoI inherits the score of its best-overlapping pseudo-box.
    """
    out = [torch.zeros(0, dtype=torch.bool)]
    for r, c in zip(rois, candidates):
        if len(c["boxes"]) == 0 or len(r) == 0:
            out.append(torch.zeros(len(r), dtype=torch.bool, device=r.device))
            continue
        best, idx = box_iou(c["boxes"].to(r), r).max(dim=0)
        out.append((best >= iou_thr) & ~c["certain"].to(r.device)[idx])
    return torch.cat([o.to(out[-1].device) for o in out])


def pim_cls_loss(heads, aux_logits: Tensor, labels: Tensor, norm: int, kind: str) -> Tensor:
    """F_aux's classification loss over its RoIs, divided by `norm` (all RoIs sampled for the group).
    `ce`: plain softmax cross-entropy summed over the RoIs, as the authors' PIM branch, whatever loss
    the host trains its own classifier with; `host`: the host RoI head's loss (its own normalisation
    rescaled to `norm`)."""
    if kind == "ce":
        if labels.numel() == 0:
            return aux_logits.sum() * 0
        return F.cross_entropy(aux_logits, labels, reduction="sum") / norm
    return heads.classification_loss(aux_logits, labels) * len(labels) / norm


def main_cls_loss(heads, logits: Tensor, labels: Tensor, ignore: Tensor) -> Tensor:
    """The main branch's RoI classification loss without the ignored RoIs, normalised by the RoIs
    kept (the ignored ones are treated as if they had not been sampled)."""
    if not ignore.any():
        return heads.classification_loss(logits, labels)
    keep = ~ignore
    return heads.classification_loss(logits[keep], labels[keep])


class PIM:
    """Computes L_pim (cls + reg) and L_sd for the student's forwards of one step."""

    def __init__(self, cfg_lsm, t: float, model_cfg):
        self.cfg = cfg_lsm
        self.t = t
        self.canonical_scale = model_cfg.canonical_scale
        self.sampling_ratio = model_cfg.pooler_sampling_ratio
        self.aligned = model_cfg.pooler_aligned

    def weighted_terms(self, model: FasterRCNN, fwd_u: TrainForward, pseudo: list[dict], fwd_l: TrainForward,
                       targets_l: list[dict], lambda_u: float) -> dict[str, Tensor]:
        """LSM's terms of Eq. 3, weighted: lambda_u * (pim_weight * L_pim + sd_weight * L_sd) on the
        unlabeled batch (pseudo-labels above alpha), plus pim_weight * L_pim on the labeled batch."""
        c = self.cfg
        groups = [(fwd_u, pseudo, c.sd)] + ([(fwd_l, targets_l, False)] if c.pim_on_labeled else [])
        pim = self.losses(model, groups)
        out = {"loss_pim_cls_unsup": lambda_u * c.pim_weight * pim[0]["loss_pim_cls"],
               "loss_pim_reg_unsup": lambda_u * c.pim_weight * pim[0]["loss_pim_reg"]}
        if c.sd:
            out["loss_sd"] = lambda_u * c.sd_weight * pim[0]["loss_sd"]
        if c.pim_on_labeled:
            out["loss_pim_cls_sup"] = c.pim_weight * pim[1]["loss_pim_cls"]
            out["loss_pim_reg_sup"] = c.pim_weight * pim[1]["loss_pim_reg"]
        return out

    def losses(self, model: FasterRCNN, groups: list[tuple[TrainForward, list[dict], bool]]) -> list[dict[str, Tensor]]:
        """PIM losses of each group (main-branch forward, targets with scores already filtered at
        alpha, whether to add L_sd); each group's losses are normalised on its own.

        Each group's forward gives its RPN proposals and padded input batch. The groups share one
        head pass, and one half-size backbone pass when their batches have the same size: on small
        images the cost is mostly per-call overhead.
        """
        heads = model.roi_heads
        samples: list[RoISamples] = [heads.sample(fwd.proposals, targets) for fwd, targets, _ in groups]
        pooled, has_source = self._pool_shifted(model, [fwd.images.tensors for fwd, _, _ in groups],
                                                [s.proposals for s in samples])
        keep_all = torch.where(has_source)[0]  # RoIs of a level without a shifted source are excluded
        box_feats = heads.box_head(pooled[keep_all])
        aux_all = heads.aux_cls_score(box_feats)
        _, deltas_all = heads.box_predictor(box_feats)  # the shared regression head R
        out, start = [], 0
        for (fwd, _, sd), s in zip(groups, samples):
            n = len(s.labels)
            in_group = (keep_all >= start) & (keep_all < start + n)
            keep = keep_all[in_group] - start
            start += n
            labels, aux_logits, deltas = s.labels[keep], aux_all[in_group], deltas_all[in_group]
            norm = max(n, 1)  # normalise by all sampled RoIs, like the main branch
            terms = {
                "loss_pim_cls": pim_cls_loss(heads, aux_logits, labels, norm, self.cfg.pim_cls_loss),
                "loss_pim_reg": heads.box_regression_loss(deltas, labels, s.regression_targets[keep]) * len(labels) / norm,
            }
            if sd:
                mask = sd_mask(s.matched_scores[keep], labels, heads.num_classes, self.cfg.alpha, self.t)
                if mask.any():
                    props = _select(s.proposals, keep[mask])  # ascending indices: same RoI order
                    main_logits = heads.box_predictor.cls_score(heads.box_features(fwd.features, props))
                    terms["loss_sd"] = kl_aux_to_main(main_logits, aux_logits[mask])
                else:
                    terms["loss_sd"] = aux_logits.sum() * 0
            out.append(terms)
        return out

    def _pool_shifted(self, model: FasterRCNN, batches: list[Tensor], proposals: list[list[Tensor]]):
        """(pooled RoIs, has_source) of every group's proposals, in order, from the shift-aligned
        half-size pyramid. The batches go through the backbone together only where that changes
        nothing: padding them to one size would change the features near their borders, and a
        training-mode BatchNorm (the test trunk's) would mix their statistics."""
        def pool(images: Tensor, props: list[Tensor]):
            features_d = model.backbone(downsample(images))
            return pool_by_level(shifted_features(features_d, self.cfg.pim_levels), props,
                                 self.canonical_scale, 7, self.sampling_ratio, self.aligned)

        batch_norm = any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.backbone.modules())
        if not batch_norm and all(b.shape[-2:] == batches[0].shape[-2:] for b in batches):
            return pool(torch.cat(batches), [p for props in proposals for p in props])
        parts = [pool(b, props) for b, props in zip(batches, proposals)]
        return torch.cat([p for p, _ in parts]), torch.cat([h for _, h in parts])


def _select(proposals: list[Tensor], flat_idx: Tensor) -> list[Tensor]:
    """Per-image proposal lists restricted to ascending indices into the concatenated list."""
    ends = torch.tensor([len(p) for p in proposals], device=flat_idx.device).cumsum(0)
    image = torch.bucketize(flat_idx, ends, right=True)
    counts = torch.bincount(image, minlength=len(proposals)).tolist()  # the one host sync
    return list(torch.cat(proposals)[flat_idx].split(counts))
