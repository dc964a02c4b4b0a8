"""STAC (Sohn et al., 2020; google-research/ssl_detection), with the LSM toggle.

Three stages (google-research/ssl_detection):
1. teacher: the `supervised` cell of the same split (labeled images only, resize + flip);
2. offline pseudo-labels: the frozen teacher detects on every unlabeled image once
   (`generate_pseudo_labels`); the detections are stored as a COCO JSON file (`write_pseudo_labels`)
   with ALL scores the teacher's test-time post-processing emits, so thresholds are applied later;
3. student (`StacAdapter`): a fresh detector from the backbone initialisation (never the teacher's
   weights) trained on labeled + pseudo-labeled images. A pseudo-box is kept when its score is
   >= min(tau, top score of its image) (`select_pseudo_labels`: the top box always survives).

Read off `training_step` (STAC, + LSM's Eq. 3 terms when `lsm.enabled`):
    L = 1/2 L_sup + 1/2 lambda_u (L_unsup + pim_weight L_pim + sd_weight L_sd) + 1/2 pim_weight L_pim^labeled
The 1/2 is the original's mean over its two forwards (labeled, unlabeled); `average_forwards=false`
drops it. L_unsup has all four detector losses (RPN cls/loc, RoI cls/reg) on the pseudo-boxes; with
LSM its RoI classification leaves out the RoIs of pseudo-boxes above alpha that STAC's main branch
does not keep (`lsm.ignore_uncertain`, adapters/lsm.py).
docs/stac.md lists every difference from the original.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from adapters import mlc
from adapters.base import Adapter, StepOutput, batch_to_device, register
from adapters.engine.mean_teacher import pixel_scales, pseudo_label_metrics
from adapters.lsm import alpha_set, lowest_threshold, main_cls_loss, uncertain_rois
from adapters.stac_augment import stac_view
from core.data.transforms import View, transform_boxes
from core.data.types import DetectionDataset
from core.errors import BenchError
from core.streams import STAC_STRONG_VIEW

# File name of the stage-2 artifact inside the teacher's cell directory.
PSEUDO_LABEL_FILE = "pseudo_labels.json"
# Boxes narrower than this in a view are dropped (core/data/transforms.ViewSettings.min_box_size).
MIN_BOX_SIZE = 1e-5


# ----------------------------------------------------------------------------- pseudo-label selection
def select_pseudo_labels(target: dict, threshold: float, keep_top_box: bool = True) -> dict:
    """STAC's filter on one image's stored detections {boxes, labels, scores}: keep score >=
    min(threshold, top score) with `keep_top_box` (boxes tied with the top score all survive),
    score >= threshold without. An image without detections stays empty."""
    keep = target["scores"] >= main_cut(target["scores"], threshold, keep_top_box)
    return {k: v[keep] for k, v in target.items()}


def boxes_into_view(target: dict, view: View) -> dict:
    """Original-image pseudo-boxes -> a view's pixels through its recorded matrix (any geometry),
    clipped to the view; boxes that collapse are dropped with their labels and scores."""
    h, w = view.image.shape[-2:]
    boxes = transform_boxes(target["boxes"], view.matrix)
    if len(boxes):
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h)
    keep = ((boxes[:, 2] - boxes[:, 0]) > MIN_BOX_SIZE) & ((boxes[:, 3] - boxes[:, 1]) > MIN_BOX_SIZE)
    return {"boxes": boxes[keep], "labels": target["labels"][keep], "scores": target["scores"][keep]}


# ----------------------------------------------------------------------------- the pseudo-label file
@dataclass
class PseudoLabels:
    """Stage 2's output, parsed: per unlabeled image id, its stored detections in ORIGINAL image
    pixels (boxes xyxy float32, labels = contiguous class index, scores), by descending score."""

    targets: dict[int, dict[str, Tensor]]
    score_floor: float  # every detection scoring above it was stored (the teacher's score_thresh)

    def __getitem__(self, image_id: int) -> dict[str, Tensor]:
        return self.targets[int(image_id)]

    def check_covers(self, lowest: float, thresholds: str) -> None:
        """A run that filters at `lowest` needs every detection above it stored."""
        if lowest < self.score_floor:
            raise BenchError(f"the pseudo-label file keeps scores above {self.score_floor} only, but this run "
                             f"filters at {lowest}; raise {thresholds} or regenerate the file with a lower "
                             "model.score_thresh")


def xyxy_to_xywh(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1)


def xywh_to_xyxy(boxes: np.ndarray) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], 1)


def detections_to_coco(detections: list[dict], unlabeled: DetectionDataset, score_floor: float,
                       max_per_image: int) -> dict:
    """Teacher detections ({image_id, boxes xyxy in original pixels, labels, scores}) as a COCO
    result-style JSON dict: images = the unlabeled split, one annotation per detection with
    bbox [x, y, w, h], the ORIGINAL category id and its score. Nothing is thresholded here."""
    by_id = {int(d["image_id"]): d for d in detections}
    missing = [r.id for r in unlabeled.records if r.id not in by_id]
    if missing:
        raise BenchError(f"no teacher detections for unlabeled image {missing[0]} ({len(missing)} missing); "
                         "run the teacher over the whole unlabeled split")
    images, annotations = [], []
    for r in unlabeled.records:
        images.append({"id": int(r.id), "file_name": r.file.name, "width": int(r.width), "height": int(r.height)})
        d = by_id[r.id]
        scores = torch.as_tensor(d["scores"]).float()
        order = torch.argsort(scores, descending=True, stable=True)
        xywh = xyxy_to_xywh(torch.as_tensor(d["boxes"]).double()[order].numpy())
        labels = torch.as_tensor(d["labels"])[order].tolist()
        for box, label, score in zip(xywh.tolist(), labels, scores[order].tolist()):
            annotations.append({"id": len(annotations) + 1, "image_id": int(r.id),
                                "category_id": int(unlabeled.categories[label]["id"]), "bbox": box,
                                "area": box[2] * box[3], "score": score, "iscrowd": 0})
    return {
        "info": {"description": "STAC pseudo-labels: every teacher detection with score > score_floor, "
                                "at most max_per_image per image; thresholds are applied when read",
                 "score_floor": float(score_floor), "max_per_image": int(max_per_image)},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": int(c["id"]), "name": c["name"]} for c in unlabeled.categories],
    }


@torch.no_grad()
def generate_pseudo_labels(model, unlabeled: DetectionDataset, aug_cfg, device: torch.device,
                           batch_size: int = 8) -> dict:
    """Stage 2: the frozen teacher on every unlabeled image (test view: resize to the test size, no
    flip; boxes mapped back to original pixels), as a COCO dict (`detections_to_coco`).

    Stored rule: every detection the teacher's post-processing emits, i.e. score >
    `model.score_thresh` (0.05), per-class NMS `model.nms_thresh` (0.5), the top
    `model.detections_per_img` (100) per image: the original's predict.py settings. tau, the top-box
    rule and LSM's alpha are applied to these stored scores when training reads them."""
    from adapters.engine.inference import run_inference

    dets = run_inference(model, unlabeled, aug_cfg, device, batch_size=batch_size)
    heads = model.roi_heads
    return detections_to_coco(dets, unlabeled, heads.score_thresh, heads.detections_per_img)


def write_pseudo_labels(path: Path, coco: dict) -> None:
    """Write atomically (temp file in the same folder + rename): a crash never leaves a partial file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(coco, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


_REGENERATE = "delete it so that it is regenerated from the stage-1 teacher"


def read_pseudo_labels(path: Path, unlabeled: DetectionDataset) -> PseudoLabels:
    """Read and validate a pseudo-label file for `unlabeled` (the split it must cover exactly)."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise BenchError(f"pseudo-label file {path} does not exist; train the stage-1 teacher (the supervised "
                         "cell of this split) and generate it with adapters.stac.generate_pseudo_labels") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read pseudo-label file {path} ({e}); check permissions or {_REGENERATE}") from None
    try:
        coco = json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"pseudo-label file {path} is not valid JSON (line {e.lineno} column {e.colno}: "
                         f"{e.msg}); {_REGENERATE}") from None
    return parse_pseudo_labels(coco, unlabeled, str(path))


def parse_pseudo_labels(coco: object, unlabeled: DetectionDataset, source: str = "pseudo-labels") -> PseudoLabels:
    """A COCO pseudo-label dict -> `PseudoLabels`, refusing anything that does not describe exactly
    the unlabeled split's images and categories."""
    def bad(what: str) -> BenchError:
        return BenchError(f"pseudo-label file {source}: {what}; {_REGENERATE}")

    if not isinstance(coco, dict) or not all(isinstance(coco.get(k), list)
                                             for k in ("images", "annotations", "categories")):
        raise bad("not a COCO JSON object with 'images', 'annotations' and 'categories' lists")
    try:
        file_ids = {int(im["id"]) for im in coco["images"]}
        cat_ids = {int(c["id"]) for c in coco["categories"]}
    except (TypeError, KeyError, ValueError):
        raise bad("an image or category entry lacks an integer 'id'") from None
    split_ids = {r.id for r in unlabeled.records}
    if file_ids != split_ids:
        missing, extra = sorted(split_ids - file_ids), sorted(file_ids - split_ids)
        parts = ([f"{len(missing)} unlabeled image(s) missing (e.g. id {missing[0]})"] if missing else []) + \
                ([f"{len(extra)} image(s) not in the unlabeled split (e.g. id {extra[0]})"] if extra else [])
        raise bad(f"its image ids do not match the unlabeled split ({', '.join(parts)}): "
                  "it was made for another split")
    label_of = {int(c["id"]): i for i, c in enumerate(unlabeled.categories)}
    if not cat_ids <= set(label_of):
        raise bad(f"unknown category id(s) {sorted(cat_ids - set(label_of))[:3]} (the data set has {sorted(label_of)})")
    rows: dict[int, list] = {i: [] for i in split_ids}
    for a in coco["annotations"]:
        try:
            iid, cid, score = int(a["image_id"]), int(a["category_id"]), float(a["score"])
            x, y, w, h = (float(v) for v in a["bbox"])
        except (TypeError, KeyError, ValueError):
            raise bad(f"annotation {a.get('id') if isinstance(a, dict) else a!r} lacks image_id, category_id, "
                      "score or a 4-number bbox") from None
        if iid not in rows or cid not in label_of:
            raise bad(f"annotation {a.get('id')} refers to image {iid} / category {cid}, not in the file's lists")
        if not all(math.isfinite(v) for v in (x, y, w, h, score)) or w <= 0 or h <= 0 or not 0 <= score <= 1:
            raise bad(f"annotation {a.get('id')} has bbox {a['bbox']} / score {a['score']} "
                      "(need finite numbers, width and height > 0, score in [0, 1])")
        rows[iid].append((x, y, w, h, label_of[cid], score))
    targets = {}
    for iid, r in rows.items():
        arr = np.array(r, dtype=np.float64).reshape(-1, 6)
        order = np.argsort(-arr[:, 5], kind="stable")
        arr = arr[order]
        targets[iid] = {"boxes": torch.from_numpy(xywh_to_xyxy(arr[:, :4]).astype(np.float32)),
                        "labels": torch.from_numpy(arr[:, 4].astype(np.int64)),
                        "scores": torch.from_numpy(arr[:, 5].astype(np.float32))}
    info = coco.get("info") if isinstance(coco.get("info"), dict) else {}
    return PseudoLabels(targets, float(info.get("score_floor", 0.0)))


def ensure_pseudo_labels(path: Path, teacher, unlabeled: DetectionDataset, aug_cfg, device: torch.device,
                         batch_size: int = 8) -> PseudoLabels:
    """The cached stage-2 artifact: read `path` if it exists, else run the teacher, write, read."""
    path = Path(path)
    if not path.exists():
        write_pseudo_labels(path, generate_pseudo_labels(teacher, unlabeled, aug_cfg, device, batch_size))
    return read_pseudo_labels(path, unlabeled)


# ----------------------------------------------------------------------------- the adapter
@register("stac")
class StacAdapter(Adapter):
    """Stage 3: the student. Its pseudo-labels come in through `attach_pseudo_labels` (the worker
    reads the teacher cell's file with `read_pseudo_labels`/`ensure_pseudo_labels`), again after a
    resume: they are an input, not training state. No teacher, no EMA, no burn-in."""

    labeled_views = ("weak",)  # resize + flip (the original's default augmentation)
    # The loader's unlabeled items carry the record; the student's view is `strong_views` (STAC's
    # own recipe, adapters/stac_augment.py), whose matrix maps the stored boxes.
    unlabeled_views = ("weak",)

    def __init__(self, cfg, num_classes: int, device: torch.device):
        from adapters.lsm import PIM, attach_aux_classifier, init_aux_from_main

        super().__init__(cfg, num_classes, device)  # a fresh detector from model.weights, never the teacher's
        self.stac = cfg.stac
        self.lsm = cfg.lsm
        self.pim = None
        self.pseudo_labels: PseudoLabels | None = None
        if cfg.lsm.enabled:
            if cfg.lsm.alpha > self.stac.tau:
                raise BenchError(f"lsm.alpha ({cfg.lsm.alpha}) must not exceed stac.tau ({self.stac.tau}), "
                                 "the main branch's threshold; lower lsm.alpha")
            attach_aux_classifier(self.student)
            init_aux_from_main(self.student)  # STAC's unlabeled phase starts at iteration 0
            # LSM's t is STAC's own main-branch threshold tau: SD works on scores in (alpha, tau).
            self.pim = PIM(cfg.lsm, self.stac.tau, cfg.model)

    def attach_pseudo_labels(self, pseudo: PseudoLabels) -> None:
        pseudo.check_covers(lowest_threshold(self.stac.tau, self.lsm), "stac.tau / lsm.alpha")
        self.pseudo_labels = pseudo

    def unlabeled_start(self) -> int:
        return 0  # the teacher is offline: unlabeled images from the first iteration

    def _stored(self, item: dict) -> dict:
        if self.pseudo_labels is None:
            raise BenchError("stac has no pseudo-labels: the worker must call attach_pseudo_labels() with the "
                             "stage-2 file of the teacher (the supervised cell of this split)")
        return self.pseudo_labels[item["image_id"]]

    def strong_views(self, items: list[dict], iteration: int) -> list[View]:
        """STAC's strong view of each unlabeled item (its in-box op picks one of the main pseudo-boxes);
        a pure function of (seed, iteration, position), so a resumed run draws the same views."""
        aug, st = self.cfg.data.aug, self.stac
        return [stac_view(it["record"], tuple(aug.short_sizes), aug.max_size,
                          select_pseudo_labels(self._stored(it), st.tau, st.keep_top_box)["boxes"].numpy(),
                          np.random.default_rng([self.cfg.seed, STAC_STRONG_VIEW, iteration, j]))
                for j, it in enumerate(items)]

    def pseudo_targets(self, items: list[dict], views: list[View]) -> tuple[list[dict], list[dict], list[dict]]:
        """Per unlabeled item, mapped into its view: the main branch's pseudo-boxes (STAC's tau + top-box
        rule), those with score > lsm.alpha (PIM's; logged without LSM too) and LSM's ignore-region
        candidates (both sets, `certain` = in the main set), selected on the stored scores."""
        st, main, alpha, candidates = self.stac, [], [], []
        for it, v in zip(items, views):
            stored = self._stored(it)
            main.append(_to(boxes_into_view(select_pseudo_labels(stored, st.tau, st.keep_top_box), v), self.device))
            alpha.append(_to(boxes_into_view(alpha_set([stored], self.lsm.alpha)[0], v), self.device))
            cut = main_cut(stored["scores"], st.tau, st.keep_top_box)
            both = boxes_into_view({k: x[(stored["scores"] > self.lsm.alpha) | (stored["scores"] >= cut)]
                                    for k, x in stored.items()}, v)
            candidates.append(_to({"boxes": both["boxes"], "certain": both["scores"] >= cut}, self.device))
        return main, alpha, candidates

    def training_step(self, iteration: int, batch: dict) -> StepOutput:
        self.student.train()
        st = self.stac
        items = batch["unlabeled"]
        views = self.strong_views(items, iteration)
        pseudo_main, pseudo_alpha, candidates = self.pseudo_targets(items, views)
        images_l, targets_l = batch_to_device(batch["labeled"], "weak", self.device)
        images_u = [v.image.to(self.device) for v in views]
        # the views' hidden labels: pseudo-label statistics only
        hidden_gt = [{"boxes": v.boxes.to(self.device), "labels": v.labels.to(self.device)} for v in views]

        fwd_l = self.student.train_forward(images_l, targets_l)
        fwd_u = self.student.train_forward(images_u, pseudo_main)
        unsup = dict(fwd_u.losses)  # all four losses
        ignored = None
        if self.pim is not None and self.lsm.ignore_uncertain:
            # LSM's ignore region: RoIs of alpha-set boxes outside STAC's main set (adapters/lsm.py)
            ignored = uncertain_rois(fwd_u.samples.proposals, candidates)
            unsup["loss_cls"] = main_cls_loss(self.student.roi_heads, fwd_u.logits, fwd_u.samples.labels, ignored)
        terms = {f"{k}_sup": v for k, v in fwd_l.losses.items()}
        terms.update({f"{k}_unsup": st.lambda_u * v for k, v in unsup.items()})
        terms.update(mlc.weighted_terms(self.student, images_u, pseudo_main, self.cfg.mlc, st.lambda_u))  # Table 4
        if self.pim is not None:
            terms.update(self.pim.weighted_terms(self.student, fwd_u, pseudo_alpha, fwd_l, targets_l, st.lambda_u))
        half = 0.5 if st.average_forwards else 1.0  # the original's mean over its two forwards
        losses = {k: half * v for k, v in terms.items()}

        covered = self.lsm.alpha >= self.pseudo_labels.score_floor  # the file holds every box above alpha
        metrics = pseudo_label_metrics(hidden_gt, pixel_scales([v.matrix for v in views]), self.cfg.eval.area_scale,
                                       pl=pseudo_main, pl_alpha=pseudo_alpha if covered else None)
        if ignored is not None:
            metrics["lsm_ignored_rois_per_img"] = int(ignored.sum()) / max(len(items), 1)
        return StepOutput(losses, metrics)


def main_cut(scores: Tensor, tau: float, keep_top_box: bool = True) -> float:
    """The lowest stored score STAC's main branch keeps (`select_pseudo_labels`: score >= the cut)."""
    return min(tau, float(scores.max())) if keep_top_box and len(scores) else tau


def _to(target: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in target.items()}
