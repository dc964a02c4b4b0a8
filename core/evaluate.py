"""Detection evaluation: COCO bbox metrics (faster-coco-eval or pycocotools) and Pascal VOC metrics.

Detections are a list of per-image dicts ``{"image_id", "boxes", "scores", "labels"}``: boxes are
absolute ``xyxy`` (N, 4), labels are contiguous class indices (label ``i`` is the category
``categories[i]``). Torch tensors and numpy arrays are both accepted.

COCO (``evaluate_coco``)
    The ground truth is a ``DetectionDataset`` (converted here to a COCO dict: annotation ids 1..N,
    bbox ``xywh``, ``area`` = the record's own object area where the source gave one (COCO's segment
    area, which the small/medium/large bins use), else ``w * h``; crowd flags kept) or the path of a COCO JSON. Both backends
    apply the COCO rules: crowd GT are "ignore" regions (a detection matched to one is neither TP
    nor FP, and its IoU is intersection over the detection's own area), 101-point interpolated
    precision, IoU 0.50:0.05:0.95, area ranges small/medium/large, maxDets 1/10/100. Stats are in
    percent as detectron2 reports them; a stat the library reports as -1 (nothing to measure, e.g.
    no small GT) becomes NaN. ``per_class_AP`` follows detectron2: the mean of the precision array
    over IoU thresholds and recall thresholds at area=all, maxDets=100, entries of -1 excluded,
    NaN for a class without GT. When there is not a single detected box, the libraries are not run
    (pycocotools cannot load an empty result); a warning is logged and every stat is 0.0 (like
    detectron2, which warns and reports nothing found).

Teacher diagnostics (``teacher_diagnostics``)
    How good a teacher a model would be at the pseudo-label thresholds (``t`` and ``alpha``), on the
    evaluation set: ``cover_<name>`` is the fraction of (non-crowd) GT objects matched, IoU >= 0.5 and
    the same class, by at least one detection scoring above the threshold (a pseudo-label recall);
    ``precision_<name>`` the fraction of those detections that match a GT object (duplicates each
    count, as a teacher's duplicates each become a pseudo-box; a detection matching only a crowd
    region is not counted); ``dets_per_img_<name>`` their number per image. ``_small`` / ``_medium``
    / ``_large`` suffixes bin the GT objects by their own area and the detections by their box area,
    COCO's bounds times ``area_scale``. NaN where nothing is counted.

Pascal VOC (``evaluate_voc``), the rules of detectron2's ``PascalVOCDetectionEvaluator``
    * Per class, detections are ranked by score (stable sort) and each one is compared with all
      GT boxes of that class in its image; only the GT of highest IoU counts.
    * IoU uses the VOC devkit's +1 pixel convention: ``w = x2 - x1 + 1`` for boxes and
      intersections alike (``iw = max(ixmax - ixmin + 1, 0)``), on devkit coordinates. Our boxes
      are 0-based continuous (the VOC reader, like detectron2's loader, did ``x1 -= 1, y1 -= 1``),
      so GT and detections first get ``x1 += 1, y1 += 1`` back, as detectron2's evaluator does to
      the detections it writes out. (In our coordinates this equals the plain continuous IoU.)
    * A detection whose best IoU is strictly greater than the threshold is a TP when that GT is not
      yet taken, a FP when it is (duplicate detections are FP), and is ignored (neither TP nor FP)
      when that GT is difficult. Difficult GT are our ``iscrowd=True`` boxes; they do not count
      in the number of positives. All other detections are FP.
    * AP: ``use_07_metric=True`` (VOC2007) averages the highest precision at recall >= t over the
      11 points t = 0.0, 0.1, ..., 1.0; otherwise (VOC2010+) it is the area under the PR curve made
      monotonically decreasing (precision at recall r = max precision at recall >= r).
    * ``AP50``/``AP75`` are the means over classes at IoU 0.5/0.75, ``AP`` the mean over the
      IoU thresholds 0.50:0.05:0.95 of those class means, all in percent. A class without
      (non-difficult) GT has a NaN AP and is left out of the means.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np

from core.data.types import DetectionDataset
from core.errors import BenchError

log = logging.getLogger(__name__)

BACKENDS = ("faster", "pycocotools")
COCO_STATS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
VOC_IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))

# (AP or AR, IoU, area, maxDets) of the 12 lines of the standard COCO summary, in COCO_STATS order.
_SUMMARY_LINES = (
    [(1, "0.50:0.95", "all", 100), (1, "0.50", "all", 100), (1, "0.75", "all", 100)]
    + [(1, "0.50:0.95", area, 100) for area in ("small", "medium", "large")]
    + [(0, "0.50:0.95", "all", n) for n in (1, 10, 100)]
    + [(0, "0.50:0.95", area, 100) for area in ("small", "medium", "large")]
)


# ----------------------------------------------------------------------------- detections


def _as_numpy(x, dtype) -> np.ndarray:
    """A torch tensor or array-like as a numpy array of ``dtype``."""
    if hasattr(x, "detach"):  # torch, possibly on GPU or in half precision
        x = x.detach().cpu()
        x = (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x, dtype=dtype)


def _unpack(det: dict) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """``(image_id, boxes (N,4) float64, scores (N,), labels (N,))`` of one image's detections."""
    try:
        boxes = _as_numpy(det["boxes"], np.float64).reshape(-1, 4)
        scores = _as_numpy(det["scores"], np.float64).reshape(-1)
        labels = _as_numpy(det["labels"], np.int64).reshape(-1)
        image_id = int(det["image_id"])
    except (KeyError, ValueError, TypeError) as e:
        raise BenchError(
            f"malformed detections ({e!r}): give one dict per image with 'image_id', "
            "'boxes' (N,4 xyxy), 'scores' (N,) and 'labels' (N,)"
        ) from None
    if not len(boxes) == len(scores) == len(labels):
        raise BenchError(
            f"detections of image {image_id} have {len(boxes)} boxes, {len(scores)} scores and "
            f"{len(labels)} labels: give the same number of each"
        )
    return image_id, boxes, scores, labels


def _check_detections(detections: list[dict], image_ids, num_classes: int) -> list[tuple]:
    """Unpacked detections, after checking image ids and label range against the ground truth."""
    unpacked = [_unpack(d) for d in detections]
    unknown = sorted({i for i, *_ in unpacked} - set(image_ids))
    if unknown:
        raise BenchError(
            f"{len(unknown)} detection image id(s) are not in the ground truth (first: {unknown[:5]}): "
            "evaluate on the data set the detections were made on"
        )
    for image_id, _, _, labels in unpacked:
        bad = labels[(labels < 0) | (labels >= num_classes)]
        if len(bad):
            raise BenchError(
                f"detections of image {image_id} have label {int(bad[0])}, outside 0..{num_classes - 1}: "
                "give the contiguous labels of the evaluated data set"
            )
    return unpacked


# ----------------------------------------------------------------------------- COCO


def _coco_gt_dict(dataset: DetectionDataset) -> dict:
    """The COCO ground-truth dict of ``dataset`` (annotation ids 1..N, bbox xywh, area = the
    record's object area: COCO bins objects by the annotation's area, not its box's)."""
    images, annotations = [], []
    for rec in dataset.records:
        images.append({"id": rec.id, "width": rec.width, "height": rec.height, "file_name": str(rec.file)})
        xyxy = rec.boxes.astype(np.float64)
        xywh = np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)
        areas = rec.areas if rec.areas is not None else xywh[:, 2] * xywh[:, 3]
        for box, label, crowd, area in zip(xywh.tolist(), rec.labels.tolist(), rec.iscrowd.tolist(), areas.tolist()):
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": rec.id,
                "category_id": dataset.categories[label]["id"],
                "bbox": box,
                "area": area,
                "iscrowd": int(crowd),
            })
    categories = [{"id": c["id"], "name": c["name"]} for c in dataset.categories]
    return {"images": images, "annotations": annotations, "categories": categories}


def _load_coco_gt(gt: DetectionDataset | Path | str, categories: list[dict] | None) -> tuple[dict, list[dict]]:
    """``(COCO ground-truth dict, categories in contiguous-label order)``.

    For a JSON path without ``categories`` the labels are taken to index its categories sorted by id.
    """
    if isinstance(gt, DetectionDataset):
        return _coco_gt_dict(gt), categories or gt.categories
    path = Path(gt)
    try:
        gt_dict = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise BenchError(f"cannot read COCO ground truth {path} ({e}): give an existing COCO JSON file") from None
    missing = {"images", "annotations", "categories"} - set(gt_dict if isinstance(gt_dict, dict) else ())
    if missing:
        raise BenchError(f"{path} lacks {sorted(missing)}: give a COCO detection JSON (images, annotations, categories)")
    return gt_dict, categories or sorted(gt_dict["categories"], key=lambda c: c["id"])


def _coco_results(unpacked: list[tuple], categories: list[dict]) -> list[dict]:
    """COCO result entries ``{image_id, category_id, bbox xywh, score}`` of unpacked detections."""
    if not unpacked:
        return []
    cat_ids = np.array([c["id"] for c in categories], dtype=np.int64)
    image_ids = np.concatenate([np.full(len(s), i, np.int64) for i, _, s, _ in unpacked]).tolist()
    boxes = np.concatenate([b for _, b, _, _ in unpacked])
    xywh = np.concatenate([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], axis=1).tolist()
    scores = np.concatenate([s for _, _, s, _ in unpacked]).tolist()
    labels = cat_ids[np.concatenate([lab for *_, lab in unpacked])].tolist()
    return [
        {"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in zip(image_ids, labels, xywh, scores)
    ]


def _area_ranges(area_scale: float) -> list[list[float]]:
    """COCO's all/small/medium/large area ranges with the 32 and 96 px sides scaled."""
    small, medium = (32 * area_scale) ** 2, (96 * area_scale) ** 2
    return [[0.0, 1e10], [0.0, small], [small, medium], [medium, 1e10]]


def _run_faster(gt_dict: dict, results: list[dict], area_scale: float = 1.0):
    """``(stats[12], precision[T,R,K,A,M], category ids along K)`` from faster-coco-eval."""
    from faster_coco_eval import COCO, COCOeval_faster

    quiet = lambda *args, **kwargs: None  # noqa: E731
    coco_gt = COCO(gt_dict, print_function=quiet)
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval_faster(coco_gt, coco_dt, iouType="bbox", print_function=quiet)
    if area_scale != 1.0:
        evaluator.params.areaRng = _area_ranges(area_scale)
    evaluator.run()
    return np.asarray(evaluator.stats[:12]), np.asarray(evaluator.eval["precision"]), evaluator.params.catIds


def _run_pycocotools(gt_dict: dict, results: list[dict], area_scale: float = 1.0):
    """``(stats[12], precision[T,R,K,A,M], category ids along K)`` from pycocotools."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco_gt = COCO()
    coco_gt.dataset = gt_dict
    coco_gt.createIndex()
    coco_dt = coco_gt.loadRes(results)
    evaluator = COCOeval(coco_gt, coco_dt, iouType="bbox")
    if area_scale != 1.0:
        evaluator.params.areaRng = _area_ranges(area_scale)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return np.asarray(evaluator.stats[:12]), np.asarray(evaluator.eval["precision"]), evaluator.params.catIds


def _per_class_ap(precision: np.ndarray, cat_ids, names: dict[int, str]) -> dict[str, float]:
    """detectron2's per-class AP (%): mean precision over IoU and recall, area=all, maxDets=100."""
    per_class = {}
    for k, cat_id in enumerate(cat_ids):
        p = precision[:, :, k, 0, -1]
        p = p[p > -1]
        per_class[names[int(cat_id)]] = float(p.mean() * 100) if p.size else float("nan")
    return per_class


def _coco_summary(stats) -> str:
    """The standard 12-line COCO table (values as fractions, -1 where undefined)."""
    lines = []
    for (is_ap, iou, area, max_dets), value in zip(_SUMMARY_LINES, stats):
        title, kind = ("Average Precision", "(AP)") if is_ap else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_dets:>3d} ] = {value:0.3f}")
    return "\n".join(lines)


def _no_detection_result(gt_dict: dict) -> dict:
    """The result when no box was detected: 0.0 everywhere, NaN for classes without (non-crowd) GT."""
    log.warning("No detected boxes: every COCO metric is reported as 0.0")
    with_gt = {a["category_id"] for a in gt_dict["annotations"] if not a.get("iscrowd", 0)}
    result = {name: 0.0 for name in COCO_STATS}
    result["per_class_AP"] = {
        c["name"]: 0.0 if c["id"] in with_gt else float("nan")
        for c in sorted(gt_dict["categories"], key=lambda c: c["id"])
    }
    result["summary"] = _coco_summary([0.0] * len(COCO_STATS))
    return result


def evaluate_coco(
    gt: DetectionDataset | Path,
    detections: list[dict],
    backend: str = "faster",
    categories: list[dict] | None = None,
    area_scale: float = 1.0,
) -> dict:
    """COCO bbox metrics of ``detections`` against ``gt`` (a data set or a COCO JSON path).

    ``categories`` maps contiguous labels to category ids (default: the data set's categories, or
    the JSON's sorted by id). Returns the 12 stats in percent under ``COCO_STATS`` names, plus
    ``per_class_AP`` ({class name: AP %}) and ``summary`` (the standard 12-line table).
    ``area_scale`` scales the small/medium/large bounds (32, 96 px) for data sets of small images.
    """
    runners = {"faster": _run_faster, "pycocotools": _run_pycocotools}
    if backend not in runners:
        raise BenchError(f"unknown COCO evaluation backend {backend!r}: use one of {', '.join(BACKENDS)}")
    gt_dict, categories = _load_coco_gt(gt, categories)
    unpacked = _check_detections(detections, [img["id"] for img in gt_dict["images"]], len(categories))
    results = _coco_results(unpacked, categories)
    if not results:
        return _no_detection_result(gt_dict)
    with contextlib.redirect_stdout(io.StringIO()):
        stats, precision, cat_ids = runners[backend](gt_dict, results, area_scale)
    result = {name: float(s * 100) if s >= 0 else float("nan") for name, s in zip(COCO_STATS, stats)}
    result["per_class_AP"] = _per_class_ap(precision, cat_ids, {c["id"]: c["name"] for c in gt_dict["categories"]})
    result["summary"] = _coco_summary(stats)
    return result


# ----------------------------------------------------------------------------- teacher diagnostics

SIZES = ("small", "medium", "large")


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N, M) IoU of continuous xyxy boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=2)
    area_a = np.prod(np.clip(a[:, 2:] - a[:, :2], 0, None), axis=1)
    area_b = np.prod(np.clip(b[:, 2:] - b[:, :2], 0, None), axis=1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def _size_bins(areas: np.ndarray, area_scale: float) -> np.ndarray:
    """0 small, 1 medium, 2 large: COCO's 32^2 and 96^2 bounds with the sides times area_scale."""
    small, medium = (32 * area_scale) ** 2, (96 * area_scale) ** 2
    return (areas >= small).astype(np.int64) + (areas >= medium).astype(np.int64)


def teacher_diagnostics(gt: DetectionDataset, detections: list[dict], thresholds: dict[str, float],
                        area_scale: float = 1.0) -> dict[str, float]:
    """Coverage, precision and count of the detections above each threshold ({name: score}), overall
    and by size (module docstring): what a teacher would hand its student as pseudo-labels."""
    unpacked = _check_detections(detections, [r.id for r in gt.records], gt.num_classes)
    by_id = {i: (boxes, scores, labels) for i, boxes, scores, labels in unpacked}
    none = (np.zeros((0, 4)), np.zeros(0), np.zeros(0, np.int64))
    out: dict[str, float] = {}
    for name, threshold in thresholds.items():
        covered, objects, correct, counted = (np.zeros(3) for _ in range(4))
        num_dets = 0
        for rec in gt.records:
            boxes, scores, labels = by_id.get(rec.id, none)
            keep = scores > threshold
            boxes, labels = boxes[keep], labels[keep]
            num_dets += len(boxes)
            crowd = rec.iscrowd
            match = (_iou(boxes, rec.boxes.astype(np.float64)) >= 0.5) & (labels[:, None] == rec.labels[None, :])
            gt_hit = match[:, ~crowd].any(axis=0)
            det_ok = match[:, ~crowd].any(axis=1)
            det_counted = det_ok | ~match[:, crowd].any(axis=1)
            gt_bin = _size_bins(rec.object_areas()[~crowd], area_scale)
            det_bin = _size_bins(np.prod(np.clip(boxes[:, 2:] - boxes[:, :2], 0, None), axis=1), area_scale)
            for b in range(3):
                objects[b] += np.sum(gt_bin == b)
                covered[b] += np.sum(gt_hit & (gt_bin == b))
                counted[b] += np.sum(det_counted & (det_bin == b))
                correct[b] += np.sum(det_ok & det_counted & (det_bin == b))
        ratio = lambda num, den: float(num / den) if den else float("nan")  # noqa: E731
        out[f"cover_{name}"] = ratio(covered.sum(), objects.sum())
        out[f"precision_{name}"] = ratio(correct.sum(), counted.sum())
        out[f"dets_per_img_{name}"] = ratio(num_dets, len(gt.records))
        for b, size in enumerate(SIZES):
            out[f"cover_{name}_{size}"] = ratio(covered[b], objects[b])
            out[f"precision_{name}_{size}"] = ratio(correct[b], counted[b])
    return out


# ----------------------------------------------------------------------------- Pascal VOC


def to_devkit(boxes: np.ndarray) -> np.ndarray:
    """0-based continuous xyxy boxes as the VOC devkit's 1-based inclusive pixel indices."""
    return boxes + np.array([1.0, 1.0, 0.0, 0.0])


def voc_iou(boxes: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """(N, M) IoU of devkit xyxy ``boxes`` with ``gt`` under the VOC +1 pixel convention."""
    ix = np.minimum(boxes[:, None, 2], gt[None, :, 2]) - np.maximum(boxes[:, None, 0], gt[None, :, 0]) + 1.0
    iy = np.minimum(boxes[:, None, 3], gt[None, :, 3]) - np.maximum(boxes[:, None, 1], gt[None, :, 1]) + 1.0
    inter = np.maximum(ix, 0.0) * np.maximum(iy, 0.0)
    area_b = (boxes[:, 2] - boxes[:, 0] + 1.0) * (boxes[:, 3] - boxes[:, 1] + 1.0)
    area_g = (gt[:, 2] - gt[:, 0] + 1.0) * (gt[:, 3] - gt[:, 1] + 1.0)
    return inter / (area_b[:, None] + area_g[None, :] - inter)


def _best_gt(boxes, labels, gt_boxes, gt_labels) -> tuple[np.ndarray, np.ndarray]:
    """Per detection of one image: (highest IoU with a same-class GT or -inf, that GT's index)."""
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return np.full(len(boxes), -np.inf), np.full(len(boxes), -1, dtype=np.int64)
    iou = voc_iou(to_devkit(boxes), to_devkit(gt_boxes))
    iou = np.where(labels[:, None] == gt_labels[None, :], iou, -np.inf)
    best = iou.argmax(axis=1)
    return iou[np.arange(len(boxes)), best], best


def _voc_tp_fp(best_iou, gt_index, gt_difficult, threshold) -> tuple[np.ndarray, np.ndarray]:
    """TP and FP flags of score-ranked detections of one class at one IoU threshold.

    The first detection (in rank order) over the threshold on a non-difficult GT is a TP, later
    ones on the same GT are FP, those on a difficult GT are neither; the rest are FP.
    """
    hit = best_iou > threshold
    difficult = np.zeros_like(hit)
    difficult[hit] = gt_difficult[gt_index[hit]]
    counted = hit & ~difficult
    first = np.zeros_like(hit)
    _, first_pos = np.unique(np.where(counted, gt_index, -1), return_index=True)
    first[first_pos] = True
    tp = counted & first
    fp = ~hit | (counted & ~first)
    return tp, fp


def voc_ap(recall: np.ndarray, precision: np.ndarray, use_07_metric: bool) -> float:
    """AP of a PR curve: VOC07 11-point average, or the area under the interpolated curve."""
    if use_07_metric:
        points = [precision[recall >= t].max() if (recall >= t).any() else 0.0 for t in np.arange(0.0, 1.1, 0.1)]
        return float(np.mean(points))
    rec = np.concatenate([[0.0], recall, [1.0]])
    prec = np.concatenate([[0.0], precision, [0.0]])
    prec = np.maximum.accumulate(prec[::-1])[::-1]
    step = np.flatnonzero(rec[1:] != rec[:-1])
    return float(np.sum((rec[step + 1] - rec[step]) * prec[step + 1]))


def _voc_class_ap(tp, fp, num_positives, use_07_metric) -> float:
    """AP of one class from rank-ordered TP/FP flags (NaN without positives)."""
    if num_positives == 0:
        return float("nan")
    tp_cum, fp_cum = np.cumsum(tp), np.cumsum(fp)
    recall = tp_cum / num_positives
    precision = tp_cum / np.maximum(tp_cum + fp_cum, np.finfo(np.float64).eps)
    return voc_ap(recall, precision, use_07_metric)


def _match_inputs(gt: DetectionDataset, unpacked: list[tuple]) -> dict[str, np.ndarray]:
    """All detections flattened: score, label, best same-class IoU and that GT's global index."""
    records = gt.by_id()
    offsets = np.cumsum([0] + [len(r.boxes) for r in gt.records])
    gt_offset = {r.id: int(o) for r, o in zip(gt.records, offsets)}
    columns = {
        "scores": [np.zeros(0)],
        "labels": [np.zeros(0, np.int64)],
        "best_iou": [np.zeros(0)],
        "gt_index": [np.zeros(0, np.int64)],
    }
    for image_id, boxes, scores, labels in unpacked:
        rec = records[image_id]
        best_iou, index = _best_gt(boxes, labels, rec.boxes.astype(np.float64), rec.labels)
        columns["scores"].append(scores)
        columns["labels"].append(labels)
        columns["best_iou"].append(best_iou)
        columns["gt_index"].append(np.where(index >= 0, index + gt_offset[image_id], -1))
    return {name: np.concatenate(parts) for name, parts in columns.items()}


def evaluate_voc(gt: DetectionDataset, detections: list[dict], use_07_metric: bool) -> dict:
    """Pascal VOC metrics (%) as detectron2 computes them: AP, AP50, AP75 and per_class_AP50."""
    dets = _match_inputs(gt, _check_detections(detections, [r.id for r in gt.records], gt.num_classes))
    gt_difficult = np.concatenate([r.iscrowd for r in gt.records] + [np.zeros(0, bool)])
    gt_labels = np.concatenate([r.labels for r in gt.records] + [np.zeros(0, np.int64)])

    aps = np.full((len(VOC_IOU_THRESHOLDS), gt.num_classes), np.nan)  # (IoU threshold, class)
    for c in range(gt.num_classes):
        ranked = np.flatnonzero(dets["labels"] == c)
        ranked = ranked[np.argsort(-dets["scores"][ranked], kind="mergesort")]
        num_positives = int(np.sum((gt_labels == c) & ~gt_difficult))
        for t, threshold in enumerate(VOC_IOU_THRESHOLDS):
            tp, fp = _voc_tp_fp(dets["best_iou"][ranked], dets["gt_index"][ranked], gt_difficult, threshold)
            aps[t, c] = _voc_class_ap(tp, fp, num_positives, use_07_metric) * 100

    with warnings.catch_warnings():  # a threshold where no class has GT: NaN, not a warning
        warnings.simplefilter("ignore", RuntimeWarning)
        class_mean = np.nanmean(aps, axis=1)
    return {
        "AP": float(np.mean(class_mean)),
        "AP50": float(class_mean[0]),
        "AP75": float(class_mean[VOC_IOU_THRESHOLDS.index(0.75)]),
        "per_class_AP50": dict(zip(gt.class_names, aps[0].tolist())),
    }
