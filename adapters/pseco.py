"""PseCo (Li et al., ECCV 2022; ligang-cs/PseCo, `PseCo_FRCNN`), with the LSM and MLC toggles.

Per iteration after burn-in (the original's `PseCo_FRCNN`):
- the teacher (weak view: resize + flip) proposes (RPN), detects (score 0.05, NMS 0.5, top 100) and
  keeps detections with score > `initial_score_thr` (0.3) as pseudo-boxes; its class scores and
  box deltas on its own proposals are kept for PLA;
- pseudo-boxes, teacher proposals and the teacher's refined boxes are mapped into the student view
  (drawn independently, as Soft Teacher's: resize + flip + one geometric op + strong photometric);
- RPN loss on the student view (pseudo-boxes with score > `rpn_thr` 0.5);
- the teacher's proposals are the student's RoIs; PLA (`pla_assign`) labels them from the
  teacher's predictions against the cls pseudo-boxes (score > `semi.t`, 0.5 in the original);
  then 512 RoIs / image, 25% positive, no pseudo-boxes added as proposals;
- RoI classification (sigmoid focal x 10) and regression weighted by PCV (`pcv_weights`);
- MSL, feature level (`msl`): the student view downsampled 0.5x; its P_(k-1) has the stride of the
  full view's P_k, so the same anchors, pseudo-boxes, RoIs, targets and PCV weights are reused on
  the shifted pyramid (`*_v2` losses);
- all unsupervised terms x lambda_u (`unsup_weight` 2.0) x a linear ramp over `unsup_warmup`
  iterations after burn-in (the original's unsup_start_iter / unsup_warmup_iter);
- teacher = EMA of the student's parameters, Soft Teacher's warm-up formula.

Read off `unlabeled_step`, the step after burn-in (LSM paper Eq. 3 with PseCo's unsupervised terms):
    L = L_sup + lambda_u * ramp * (L_rpn + L_cls + L_reg^PCV + L_rpn^v2 + L_cls^v2 + L_reg^PCV,v2
                                   [+ mlc_weight * L_mlc] [+ pim_weight * L_pim + sd_weight * L_sd])
With LSM, L_cls and L_cls^v2 leave out the RoIs of pseudo-boxes scored in (alpha, t] (`lsm.ignore_uncertain`).
docs/pseco.md lists every difference from the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.rpn import concat_box_prediction_layers
from torchvision.ops import boxes as box_ops

from adapters import mlc
from adapters.base import StepOutput, register, teacher_rpn_settings
from adapters.engine.mean_teacher import filter_pseudo_labels, pixel_scales, pseudo_label_metrics
from adapters.lsm import alpha_set, lowest_threshold, main_cls_loss, uncertain_marks, uncertain_rois
from adapters.models.faster_rcnn import (FEATURE_NAMES, POOLED_LEVELS, RoIHeads, RoISamples, SigmoidFocal,
                                         TrainForward, pool_by_level)
from adapters.student_view import (StudentViewAdapter, map_boxes, map_pseudo_labels, select,
                                   teacher_and_student_views, teacher_pass)
from core.streams import PSECO_STUDENT_VIEW

# MSL's level shift: P_k of the 0.5x view has the stride of P_(k+1) of the full view (in full-view
# coordinates), so it stands in for that level. The full view's P2 has no source (no P1 of the 0.5x view).
MSL_SHIFT = {"p2": "p3", "p3": "p4", "p4": "p5", "p5": "p6"}


# ----------------------------------------------------------------------------- the detector change
def class_scores(heads: RoIHeads, logits: Tensor) -> Tensor:
    """(R, K) per-class scores as PseCo's PLA reads them: sigmoid (`pseco.sigmoid_focal`, the RoI
    head's `SigmoidFocal`), or for the CE config a softmax over the K foreground logits (the
    original's `cls_score[:, :num_classes].softmax(-1)`)."""
    if heads.sigmoid_focal is not None:
        return heads.class_scores(logits)
    return F.softmax(logits[:, : heads.num_classes], dim=-1)


# ----------------------------------------------------------------------------- PLA and PCV
def aligned_iou(a: Tensor, b: Tensor) -> Tensor:
    """IoU of a[i] with b[i]."""
    lt = torch.max(a[:, :2], b[:, :2])
    rb = torch.min(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    return inter / (area_a + area_b - inter).clamp(min=1e-6)


@torch.no_grad()
def pla_assign(proposals: Tensor, refined: Tensor, scores: Tensor, gt_boxes: Tensor, gt_labels: Tensor,
               iou_thr: float = 0.4, candidate_topk: int = 12) -> Tensor:
    """Prediction-guided label assignment for one image: the index of each proposal's pseudo-box,
    -1 for background.

    `refined` are the teacher's boxes decoded on each proposal with its argmax class, `scores` its
    (N, K) class scores, all in the student view. A proposal joins the candidate bag of the pseudo-box
    its refined box overlaps most if that IoU >= `iou_thr`. In each bag, cost = sqrt(IoU * score of
    the pseudo-box's class); the top k_g by cost become positives, k_g = max(1, floor(sum of the
    top-min(|bag|, candidate_topk) IoUs)); of those, proposals of zero area are dropped. Every other
    proposal, bag members included, is background.
    """
    assigned = torch.full((len(proposals),), -1, dtype=torch.int64, device=proposals.device)
    if len(gt_boxes) == 0 or len(proposals) == 0:
        return assigned
    ious = box_ops.box_iou(refined, gt_boxes)  # (N, M)
    best_iou, best_gt = ious.max(dim=1)
    areas = (proposals[:, 2:] - proposals[:, :2]).prod(1)
    for g in torch.unique(best_gt[best_iou >= iou_thr]):
        bag = torch.where((best_iou >= iou_thr) & (best_gt == g))[0]
        bag_iou = ious[bag, g]
        cost = (bag_iou * scores[bag, gt_labels[g]]).sqrt()
        k = max(1, int(bag_iou.topk(min(len(bag), candidate_topk)).values.sum()))
        chosen = bag[cost.argsort(descending=True)[:k]]
        assigned[chosen[areas[chosen] > 0]] = g
    return assigned


@torch.no_grad()
def sample_assigned(heads: RoIHeads, proposals: list[Tensor], assigned: list[Tensor],
                    targets: list[dict]) -> RoISamples:
    """The RoI head's random fg/bg sampling on PLA's assignment (no pseudo-boxes added as
    proposals, the original's add_gt_as_proposals=False)."""
    k = heads.num_classes
    props, labels, reg_targets, scores, matched = [], [], [], [], []
    for p, a, t in zip(proposals, assigned, targets):
        idx = a.clamp(min=0)
        if len(t["boxes"]):
            lab = torch.where(a >= 0, t["labels"][idx], torch.full_like(a, k))
            sc = torch.where(a >= 0, t["scores"][idx].to(p.dtype), torch.zeros_like(p[:, 0]))
            boxes = t["boxes"][idx].to(p.dtype)
        else:
            lab, sc, boxes = torch.full_like(a, k), torch.zeros_like(p[:, 0]), torch.zeros_like(p)
        pos, neg = heads.sampler([torch.where(lab == k, 0, lab + 1)])
        keep = torch.where(pos[0] | neg[0])[0]
        props.append(p[keep])
        labels.append(lab[keep])
        scores.append(sc[keep])
        matched.append(idx[keep])
        reg_targets.append(heads.box_coder.encode_single(boxes[keep], p[keep]))
    return RoISamples(props, torch.cat(labels), torch.cat(reg_targets), torch.cat(scores), matched)


@torch.no_grad()
def pcv_weights(heads: RoIHeads, deltas: Tensor, samples: RoISamples, gt_boxes: list[Tensor]) -> Tensor:
    """Positive-proposal consistency voting: every positive RoI of pseudo-box g weighs the mean IoU
    of g with the boxes the *student* decodes (class of g) on all positives of g; negatives 0."""
    k = heads.num_classes
    weights = deltas.new_zeros(len(samples.labels))
    start = 0
    for p, matched, gts in zip(samples.proposals, samples.matched_idxs, gt_boxes):
        labels = samples.labels[start:start + len(p)]
        pos = torch.where(labels < k)[0]
        if len(pos):
            d = deltas[start + pos].reshape(len(pos), -1, 4)[torch.arange(len(pos)), labels[pos]]
            iou = aligned_iou(heads.box_coder.decode_single(d, p[pos]), gts[matched[pos]].to(p.dtype))
            for g in torch.unique(matched[pos]):
                same = matched[pos] == g
                weights[start + pos[same]] = iou[same].mean()
        start += len(p)
    return weights


def pcv_factor(weights: Tensor, labels: Tensor, num_classes: int) -> Tensor:
    """sum w / sum w^2 over the positive RoIs (0 without positives, or when every weight is 0)."""
    w = weights[labels < num_classes]
    w2 = w.pow(2).sum()
    return w.sum() / w2 if w2 > 0 else w2 * 0


def pcv_regression_loss(deltas: Tensor, labels: Tensor, regression_targets: Tensor, weights: Tensor,
                        num_classes: int, factor: Tensor | None = None, n: int | None = None) -> Tensor:
    """factor * sum_i w_i^2 * L1_i / n over the positive RoIs: the square sharpens the weights, the
    factor (`pcv_factor`) restores their scale, n is the number of sampled RoIs. MSL's view 2 passes
    its subset of RoIs with the full set's factor and n."""
    factor = pcv_factor(weights, labels, num_classes) if factor is None else factor
    n = max(len(labels), 1) if n is None else n
    fg = torch.where(labels < num_classes)[0]
    if len(fg) == 0:
        return deltas.sum() * 0
    d = deltas.reshape(deltas.shape[0], -1, 4)[fg, labels[fg]]
    l1 = (d - regression_targets[fg]).abs().sum(1)
    return factor * (weights[fg].pow(2) * l1).sum() / n


# ----------------------------------------------------------------------------- RPN loss and MSL
def rpn_loss(rpn, image_list, maps: list[Tensor], anchor_generator: AnchorGenerator,
             targets: list[dict]) -> tuple[Tensor, Tensor]:
    """Objectness and box losses of the RPN on `maps` with `anchor_generator`'s anchors (torchvision's
    training forward without the proposal filtering PseCo does not use on the student)."""
    objectness, deltas = rpn.head(maps)
    anchors = anchor_generator(image_list, maps)
    objectness, deltas = concat_box_prediction_layers(objectness, deltas)
    labels, matched = rpn.assign_targets_to_anchors(anchors, [{"boxes": t["boxes"]} for t in targets])
    return rpn.compute_loss(objectness, deltas, labels, rpn.box_coder.encode(matched, anchors))


def shifted_anchor_generator(main: AnchorGenerator) -> AnchorGenerator:
    """Anchors of the full-view levels MSL_SHIFT reaches (P3..P6): the 0.5x view's P2..P5 reuse them."""
    start = FEATURE_NAMES.index(next(iter(MSL_SHIFT.values())))
    return AnchorGenerator(main.sizes[start:], main.aspect_ratios[start:])


def downsample(images: Tensor) -> Tensor:
    """0.5x of the padded, normalised batch, nearest (PseCo's resize_image); sizes divisible by 32
    stay divisible by 16, so the 0.5x P_(k-1) has exactly the shape of the full P_k."""
    return F.interpolate(images, scale_factor=0.5, mode="nearest")


def shifted_maps(features_d: dict[str, Tensor]) -> dict[str, Tensor]:
    """{full-view level name: the 0.5x view's map that stands in for it}."""
    return {full: features_d[src] for src, full in MSL_SHIFT.items()}


def unsup_ramp(iteration: int, start: int, warmup: int) -> float:
    """Weight of the unsupervised losses: 0 at `start`, linear to 1 over `warmup` iterations."""
    if warmup == 0:
        return 1.0
    return float(min(max((iteration - start) / warmup, 0.0), 1.0))


# ----------------------------------------------------------------------------- the adapter
@dataclass
class TeacherOutput:
    image_sizes: list[tuple[int, int]]
    detections: list[dict]  # boxes, labels, scores (teacher view) above the lowest threshold in use
    proposals: list[Tensor]  # the teacher's RPN proposals (teacher view)
    refined: list[Tensor]  # teacher boxes decoded on each proposal with its argmax class
    scores: list[Tensor]  # (N_i, K) teacher class scores on each proposal


@register("pseco")
class PseCo(StudentViewAdapter):
    section = "pseco"
    view_stream = PSECO_STUDENT_VIEW  # Soft Teacher's independent student views on their own stream

    def __init__(self, cfg, num_classes: int, device: torch.device):
        super().__init__(cfg, num_classes, device)
        self.pc = cfg.pseco
        self.mlc = cfg.mlc
        self.v2_anchors = shifted_anchor_generator(self.student.rpn.anchor_generator)

    def roi_classifier(self, cfg) -> SigmoidFocal | None:
        """The RoI classifier of the student and its teacher, supervised and unsupervised."""
        pc = cfg.pseco
        return SigmoidFocal(pc.focal_gamma, pc.focal_alpha, pc.cls_loss_weight) if pc.sigmoid_focal else None

    def eval_models(self) -> dict:
        models = {"teacher": self.teacher}  # the original evaluates the teacher (inference_on="teacher")
        if self.cfg.eval.evaluate_student:
            models["student"] = self.student
        return models

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def pseudo_label(self, images: list[Tensor]) -> TeacherOutput:
        heads = self.teacher.roi_heads
        out = teacher_pass(self.teacher, images, teacher_rpn_settings(self.cfg.semi),
                           lowest_threshold(self.pc.initial_score_thr, self.lsm))
        scores = class_scores(heads, out.logits)
        best = out.deltas.reshape(len(out.deltas), -1, 4)[torch.arange(len(out.deltas)), scores.argmax(1)]
        refined = heads.box_coder.decode_single(best, torch.cat(out.proposals))
        n = [len(p) for p in out.proposals]
        return TeacherOutput(out.image_list.image_sizes, out.detections, out.proposals, list(refined.split(n)),
                             list(scores.split(n)))

    def student_unsup(self, images: list[Tensor], rpn_set: list[dict], cls_set: list[dict], proposals: list[Tensor],
                      refined: list[Tensor], scores: list[Tensor],
                      candidates: list[dict] | None = None) -> tuple[dict, TrainForward, Tensor, int, Tensor]:
        """Unweighted unsupervised losses on the student view; `proposals`, `refined`, `scores` are
        the teacher's, mapped into the student view. With LSM's ignore-region `candidates`
        (adapters/lsm.py) the uncertain RoIs are left out of both views' RoI classification. Returns
        losses, the forward (for PIM), the PCV weights, PLA's number of positives before sampling and
        the ignored-RoI mask."""
        model, heads, pc = self.student, self.student.roi_heads, self.pc
        image_list, features = model.extract(images)
        rpn_cls, rpn_loc = rpn_loss(model.rpn, image_list, list(features.values()), model.rpn.anchor_generator, rpn_set)

        assigned = [pla_assign(p, r, s, t["boxes"], t["labels"], pc.pla_iou_thr, pc.pla_candidate_topk)
                    for p, r, s, t in zip(proposals, refined, scores, cls_set)]
        samples = sample_assigned(heads, proposals, assigned, cls_set)
        box_feats = heads.box_features(features, samples.proposals)
        logits, deltas = heads.box_predictor(box_feats)
        weights = pcv_weights(heads, deltas, samples, [t["boxes"] for t in cls_set])
        ignored = torch.zeros_like(samples.labels, dtype=torch.bool)
        if candidates is not None:
            ignored = uncertain_rois(samples.proposals, candidates)
        losses = {
            "loss_rpn_cls": rpn_cls,
            "loss_rpn_loc": rpn_loc,
            "loss_cls": main_cls_loss(heads, logits, samples.labels, ignored),
            "loss_box_reg": pcv_regression_loss(deltas, samples.labels, samples.regression_targets, weights,
                                                heads.num_classes),
        }
        if pc.msl:
            losses.update(self.msl_losses(image_list, samples, weights, rpn_set, ignored))
        fwd = TrainForward(losses, image_list, features, proposals, samples, box_feats, logits, deltas)
        return losses, fwd, weights, sum(int((a >= 0).sum()) for a in assigned), ignored

    def msl_losses(self, image_list, samples: RoISamples, weights: Tensor, rpn_set: list[dict],
                   ignored: Tensor | None = None) -> dict:
        """View 2: the 0.5x student view's shifted pyramid with the full view's anchors, pseudo-boxes,
        RoIs, targets and PCV weights. RoIs of the full view's P2 have no source and count as zero;
        `ignored` RoIs (LSM's ignore region) are left out of its classification, as in view 1."""
        model, heads = self.student, self.student.roi_heads
        shifted = shifted_maps(model.backbone(downsample(image_list.tensors)))
        rpn_cls, rpn_loc = rpn_loss(model.rpn, image_list, list(shifted.values()), self.v2_anchors, rpn_set)
        by_level = {k: shifted[name] for name, k in POOLED_LEVELS.items() if name in shifted}
        pooled, has_source = pool_by_level(by_level, samples.proposals, heads.canonical_scale, 7, heads.sampling_ratio,
                                           heads.pooler_aligned)
        keep = torch.where(has_source)[0]
        logits, deltas = heads.box_predictor(heads.box_head(pooled[keep]))
        labels, n = samples.labels, max(len(samples.labels), 1)
        factor = pcv_factor(weights, labels, heads.num_classes)
        if ignored is not None and ignored.any():
            counted = ~ignored[keep]
            loss_cls = heads.classification_loss(logits[counted], labels[keep][counted]) * int(counted.sum()) \
                / max(int((~ignored).sum()), 1)
        else:
            loss_cls = heads.classification_loss(logits, labels[keep]) * len(keep) / n
        return {
            "loss_rpn_cls_v2": rpn_cls,
            "loss_rpn_loc_v2": rpn_loc,
            "loss_cls_v2": loss_cls,
            "loss_box_reg_v2": pcv_regression_loss(deltas, labels[keep], samples.regression_targets[keep],
                                                   weights[keep], heads.num_classes, factor, n),
        }

    def unlabeled_step(self, iteration: int, items: list[dict], losses: dict, fwd_l, targets_l) -> StepOutput:
        semi, pc, lsm = self.cfg.semi, self.pc, self.lsm
        images_t, hidden_gt, images_s, to_student = teacher_and_student_views(self, items, iteration)
        sizes_s = [tuple(img.shape[-2:]) for img in images_s]

        teacher_out = self.pseudo_label(images_t)
        pseudo = map_pseudo_labels(teacher_out.detections, to_student, sizes_s)
        proposals = [map_boxes(p, m, s) for p, m, s in zip(teacher_out.proposals, to_student, sizes_s)]
        refined = [map_boxes(r, m, s) for r, m, s in zip(teacher_out.refined, to_student, sizes_s)]
        rpn_set = select(pseudo, [p["scores"] > pc.rpn_thr for p in pseudo])
        cls_set = select(pseudo, [p["scores"] > semi.t for p in pseudo])
        pseudo_pim = alpha_set(pseudo, lsm.alpha) if self.pim is not None else None
        # LSM's ignore region: the RoIs of pseudo-boxes scored in (alpha, t] (adapters/lsm.py)
        candidates = uncertain_marks(pseudo_pim, semi.t) if self.pim is not None and lsm.ignore_uncertain else None
        unsup, fwd_u, weights, n_pos, ignored = self.student_unsup(images_s, rpn_set, cls_set, proposals, refined,
                                                                   teacher_out.scores, candidates)
        ramp = unsup_ramp(iteration, semi.burn_in, pc.unsup_warmup)
        lambda_u = semi.lambda_u * ramp  # PIM and MLC ramp up with PseCo's own unsupervised terms
        losses.update({f"{k}_unsup": lambda_u * v for k, v in unsup.items()})
        losses.update(mlc.weighted_terms(self.student, images_s, cls_set, self.mlc, lambda_u))

        metrics = self._metrics(items, teacher_out, hidden_gt, fwd_u, weights, n_pos)
        metrics["unsup_ramp"] = ramp
        if candidates is not None:
            metrics["lsm_ignored_rois_per_img"] = int(ignored.sum()) / max(len(items), 1)
        if self.pim is not None:
            losses.update(self.pim.weighted_terms(self.student, fwd_u, pseudo_pim, fwd_l, targets_l, lambda_u))
        return StepOutput(losses, metrics)

    def _metrics(self, items, teacher_out: TeacherOutput, hidden_gt, fwd_u: TrainForward, weights: Tensor,
                 n_pos: int) -> dict:
        """Pseudo-label quality of the cls set (and LSM's alpha set) in the teacher view against the
        hidden labels, PLA positives per image (before sampling), mean PCV weight of sampled positives."""
        dets = teacher_out.detections
        kept = self.pim is not None or self.lsm.alpha >= self.pc.initial_score_thr  # detections kept above alpha
        metrics = pseudo_label_metrics(hidden_gt, pixel_scales([it["views"]["weak"].matrix for it in items]),
                                       self.cfg.eval.area_scale, pl=filter_pseudo_labels(dets, self.cfg.semi.t),
                                       pl_alpha=alpha_set(dets, self.lsm.alpha) if kept else None)
        metrics["pla_pos_per_img"] = n_pos / max(len(items), 1)
        fg = fwd_u.samples.labels < self.num_classes
        if fg.any():
            metrics["pcv_weight_mean"] = float(weights[fg].mean())
        return metrics
