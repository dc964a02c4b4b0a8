"""core.evaluate: backend parity, hand-computed COCO and VOC values, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError
from core.evaluate import COCO_STATS, _coco_gt_dict, evaluate_coco, evaluate_voc, teacher_diagnostics, voc_iou

# Non-contiguous ids, deliberately not sorted; the last class has no GT at all.
CATEGORIES = [{"id": i, "name": f"cls{i}"} for i in (12, 3, 41, 7, 90)]


def _record(image_id, boxes, labels, iscrowd=None, size=(640, 480)) -> ImageRecord:
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    iscrowd = np.zeros(len(boxes), bool) if iscrowd is None else iscrowd
    return ImageRecord(image_id, Path(f"{image_id}.jpg"), size[0], size[1], boxes, labels, iscrowd, [-1] * len(boxes))


def _random_boxes(rng, n, width, height) -> np.ndarray:
    """``n`` xyxy boxes whose sides spread over COCO's small / medium / large ranges."""
    side = np.exp(rng.uniform(np.log(6), np.log(300), n))
    aspect = np.exp(rng.uniform(-0.7, 0.7, n))
    w, h = np.minimum(side * aspect, width - 1), np.minimum(side / aspect, height - 1)
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def _synthetic_dataset(rng, num_images=240) -> DetectionDataset:
    records = []
    for i in range(num_images):
        width, height = int(rng.integers(320, 800)), int(rng.integers(240, 640))
        n = 0 if rng.random() < 0.1 else int(rng.integers(1, 12))
        labels = rng.integers(0, len(CATEGORIES) - 1, n)  # never the last class
        crowd = rng.random(n) < 0.06
        records.append(_record(1000 + 3 * i, _random_boxes(rng, n, width, height), labels, crowd, (width, height)))
    return DetectionDataset("synthetic", records, CATEGORIES)


def _synthetic_detections(rng, dataset: DetectionDataset) -> list[dict]:
    """Jittered GT (some missed, some relabelled, some duplicated) plus random false positives."""
    detections = []
    for k, rec in enumerate(dataset.records):
        found = rng.random(len(rec.boxes)) < 0.85  # 15% missed
        twice = found & (rng.random(len(rec.boxes)) < 0.1)  # some detected twice
        keep = np.concatenate([np.flatnonzero(found), np.flatnonzero(twice)])
        boxes, labels = rec.boxes[keep], rec.labels[keep]
        size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
        boxes = boxes + rng.normal(0, 0.08, boxes.shape) * size
        labels = np.where(rng.random(len(labels)) < 0.05, rng.integers(0, len(CATEGORIES), len(labels)), labels)
        n_fp = int(rng.integers(0, 5))
        boxes = np.concatenate([boxes, _random_boxes(rng, n_fp, rec.width, rec.height)])
        labels = np.concatenate([labels, rng.integers(0, len(CATEGORIES), n_fp)])
        det = {"image_id": rec.id, "boxes": boxes, "scores": rng.random(len(boxes)), "labels": labels}
        if k % 2:  # half as torch tensors, as a model returns them
            det = {**det, **{key: torch.as_tensor(det[key]) for key in ("boxes", "scores", "labels")}}
        detections.append(det)
    return detections


@pytest.fixture(scope="module")
def synthetic():
    rng = np.random.default_rng(0)
    dataset = _synthetic_dataset(rng)
    return dataset, _synthetic_detections(rng, dataset)


def _perfect(dataset: DetectionDataset) -> list[dict]:
    keep = [~r.iscrowd for r in dataset.records]
    return [
        {"image_id": r.id, "boxes": r.boxes[k], "scores": np.linspace(1, 0.5, k.sum()), "labels": r.labels[k]}
        for r, k in zip(dataset.records, keep)
    ]


# ----------------------------------------------------------------------------- COCO


def test_backends_give_identical_results(synthetic):
    dataset, detections = synthetic
    assert len(dataset.records) >= 200 and any(r.iscrowd.any() for r in dataset.records)
    faster = evaluate_coco(dataset, detections, backend="faster")
    reference = evaluate_coco(dataset, detections, backend="pycocotools")
    for name in COCO_STATS:
        assert abs(faster[name] - reference[name]) < 1e-9, name
    assert 20 < faster["AP"] < 90 and all(faster[n] > 0 for n in ("APs", "APm", "APl"))
    assert faster["per_class_AP"].keys() == reference["per_class_AP"].keys() == {c["name"] for c in CATEGORIES}
    np.testing.assert_allclose(
        list(faster["per_class_AP"].values()), list(reference["per_class_AP"].values()), rtol=0, atol=1e-9
    )
    assert math.isnan(faster["per_class_AP"]["cls90"])  # no GT
    assert faster["summary"] == reference["summary"] and len(faster["summary"].splitlines()) == 12


def test_json_path_matches_dataset(synthetic, tmp_path):
    dataset, detections = synthetic
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(_coco_gt_dict(dataset)))
    from_path = evaluate_coco(path, detections, categories=dataset.categories)
    from_dataset = evaluate_coco(dataset, detections)
    assert {k: from_path[k] for k in COCO_STATS} == {k: from_dataset[k] for k in COCO_STATS}


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_perfect_detections_give_100(synthetic, backend):
    dataset, _ = synthetic
    result = evaluate_coco(dataset, _perfect(dataset), backend=backend)
    for name in set(COCO_STATS) - {"AR1", "AR10"}:  # several boxes of a class per image
        assert result[name] == pytest.approx(100.0, abs=1e-9), name
    assert all(v == pytest.approx(100.0) for k, v in result["per_class_AP"].items() if k != "cls90")


def _two_gt_case(fp_box) -> tuple[DetectionDataset, list[dict]]:
    """One class, 2 GT; detections: TP (score .9), FP (.8), TP (.7)."""
    gt = [[10, 10, 50, 50], [60, 60, 90, 90]]
    dataset = DetectionDataset("hand", [_record(1, gt, [0, 0], size=(100, 100))], [{"id": 5, "name": "a"}])
    boxes = np.array([gt[0], fp_box, gt[1]], np.float32)
    return dataset, [{"image_id": 1, "boxes": boxes, "scores": [0.9, 0.8, 0.7], "labels": [0, 0, 0]}]


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_coco_hand_computed_ap(backend):
    # Ranked: TP, FP, TP -> recall .5, .5, 1; precision 1, 1/2, 2/3. Interpolated precision
    # (max precision at recall >= r): 1 for r <= .5, 2/3 for r > .5. The 101 recall points
    # 0.00..0.50 (51 points) get 1, 0.51..1.00 (50 points) get 2/3:
    # AP50 = (51 * 1 + 50 * 2/3) / 101 = 84.333.../101 = 0.834983...
    dataset, detections = _two_gt_case(fp_box=[0, 70, 20, 95])
    result = evaluate_coco(dataset, detections, backend=backend)
    expected = (51 + 50 * 2 / 3) / 101 * 100
    assert result["AP50"] == pytest.approx(expected, abs=1e-9)
    assert result["AP"] == pytest.approx(expected, abs=1e-9)  # exact boxes: same at every IoU
    assert result["per_class_AP"] == {"a": pytest.approx(expected, abs=1e-9)}


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_no_detected_box_reports_zero(synthetic, backend):
    dataset, _ = synthetic
    empty = [{"image_id": r.id, "boxes": np.zeros((0, 4)), "scores": [], "labels": []} for r in dataset.records]
    for detections in ([], empty):
        result = evaluate_coco(dataset, detections, backend=backend)
        assert all(result[name] == 0.0 for name in COCO_STATS)
        assert result["per_class_AP"]["cls12"] == 0.0 and math.isnan(result["per_class_AP"]["cls90"])


# ----------------------------------------------------------------------------- VOC

# Same ranking as the COCO case: recall .5, .5, 1 and precision 1, 1/2, 2/3.
# VOC07, 11 points: t = 0, .1, ..., .5 (6 points) -> 1; t = .6, ..., 1 (5 points) -> 2/3;
#   AP = (6 + 5 * 2/3) / 11 = 0.848484...
# Area: precision envelope 1 on recall (0, .5], 2/3 on (.5, 1]; AP = .5 * 1 + .5 * 2/3 = 0.833333...
VOC_CASES = [(True, (6 + 5 * 2 / 3) / 11 * 100), (False, (0.5 + 0.5 * 2 / 3) * 100)]


@pytest.mark.parametrize("use_07_metric, expected", VOC_CASES)
@pytest.mark.parametrize("fp_box", [[0, 70, 20, 95], [10, 10, 50, 50]], ids=["background", "duplicate"])
def test_voc_hand_computed_ap(use_07_metric, expected, fp_box):
    dataset, detections = _two_gt_case(fp_box)  # a duplicate of the first GT is a FP too
    result = evaluate_voc(dataset, detections, use_07_metric=use_07_metric)
    assert result["AP50"] == pytest.approx(expected, abs=1e-9)
    assert result["AP75"] == pytest.approx(expected, abs=1e-9)
    assert result["AP"] == pytest.approx(expected, abs=1e-9)
    assert result["per_class_AP50"] == {"a": pytest.approx(expected, abs=1e-9)}


@pytest.mark.parametrize("use_07_metric", [True, False])
def test_voc_difficult_match_is_not_a_false_positive(use_07_metric):
    gt = [[10, 10, 50, 50], [60, 60, 90, 90]]
    dataset = DetectionDataset("hand", [_record(1, gt, [0, 0], [False, True], (100, 100))], [{"id": 1, "name": "a"}])
    # The highest-scored detection sits on the difficult GT: ignored, so precision stays 1.
    detections = [{"image_id": 1, "boxes": [gt[1], gt[0]], "scores": [0.95, 0.9], "labels": [0, 0]}]
    assert evaluate_voc(dataset, detections, use_07_metric)["AP50"] == pytest.approx(100.0)
    # Without that GT the same detection is a FP, and precision at the only TP is 1/2.
    without = DetectionDataset("hand", [_record(1, gt[:1], [0], size=(100, 100))], [{"id": 1, "name": "a"}])
    assert evaluate_voc(without, detections, use_07_metric)["AP50"] == pytest.approx(50.0)


def test_voc_iou_uses_the_devkit_plus_one_convention():
    # Devkit boxes are 1-based inclusive: x1..x2 spans x2 - x1 + 1 pixels.
    assert voc_iou(np.array([[1.0, 1, 5, 10]]), np.array([[1.0, 1, 10, 10]]))[0, 0] == 0.5  # 5*10 / 10*10
    assert voc_iou(np.array([[1.0, 1, 1, 1]]), np.array([[1.0, 1, 1, 1]]))[0, 0] == 1.0  # one pixel
    assert voc_iou(np.array([[1.0, 1, 5, 5]]), np.array([[6.0, 1, 9, 5]]))[0, 0] == 0.0  # adjacent


def test_voc_boxes_go_back_to_devkit_coordinates():
    # The reader turns devkit pixels 1..10 into 0..10 (x1 -= 1, y1 -= 1, as detectron2's loader);
    # the evaluator shifts x1, y1 back, so a detection 0..5 is devkit 1..5: IoU 5*10 / 10*10 = 0.5,
    # not > 0.5, a FP. Detection 0..6 has IoU 0.6: a TP at 0.5, a FP at 0.75.
    dataset = DetectionDataset("hand", [_record(1, [[0, 0, 10, 10]], [0], size=(20, 20))], [{"id": 1, "name": "a"}])
    detections = [{"image_id": 1, "boxes": [[0, 0, 5, 10]], "scores": [1.0], "labels": [0]}]
    assert evaluate_voc(dataset, detections, use_07_metric=False)["AP50"] == 0.0
    detections[0]["boxes"] = [[0, 0, 6, 10]]
    result = evaluate_voc(dataset, detections, use_07_metric=False)
    assert (result["AP50"], result["AP75"]) == (100.0, 0.0)


def test_voc_on_synthetic_data(synthetic):
    dataset, detections = synthetic
    result = evaluate_voc(dataset, detections, use_07_metric=False)
    assert 0 < result["AP"] < result["AP50"] < 100 and result["AP75"] < result["AP50"]
    assert math.isnan(result["per_class_AP50"]["cls90"])
    perfect = evaluate_voc(dataset, _perfect(dataset), use_07_metric=True)
    assert perfect["AP"] == pytest.approx(100.0)


# ----------------------------------------------------------------------------- errors


def test_unknown_backend_names_the_known_ones(synthetic):
    dataset, detections = synthetic
    with pytest.raises(BenchError, match="faster, pycocotools"):
        evaluate_coco(dataset, detections, backend="detectron")


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_detection_image_not_in_ground_truth(synthetic, backend):
    dataset, _ = synthetic
    detections = [{"image_id": 7, "boxes": [[0, 0, 10, 10]], "scores": [0.5], "labels": [0]}]
    with pytest.raises(BenchError, match="not in the ground truth"):
        evaluate_coco(dataset, detections, backend=backend)
    with pytest.raises(BenchError, match="not in the ground truth"):
        evaluate_voc(dataset, detections, use_07_metric=False)


def test_unreadable_ground_truth(tmp_path):
    with pytest.raises(BenchError, match="cannot read"):
        evaluate_coco(tmp_path / "missing.json", [])
    (tmp_path / "bad.json").write_text(json.dumps({"images": []}))
    with pytest.raises(BenchError, match="lacks"):
        evaluate_coco(tmp_path / "bad.json", [])


def test_area_scale_moves_the_size_bounds_in_both_backends(synthetic):
    dataset, detections = synthetic
    default = evaluate_coco(dataset, detections, backend="faster")
    scaled = {b: evaluate_coco(dataset, detections, backend=b, area_scale=0.5) for b in ("faster", "pycocotools")}
    for name in COCO_STATS:
        assert scaled["faster"][name] == pytest.approx(scaled["pycocotools"][name], abs=1e-9, nan_ok=True), name
    # "all" is untouched; halving the bounds moves boxes from small into medium/large
    assert scaled["faster"]["AP"] == pytest.approx(default["AP"], abs=1e-9)
    assert scaled["faster"]["APs"] != pytest.approx(default["APs"], abs=1e-6)


@pytest.mark.parametrize("backend", ["faster", "pycocotools"])
def test_size_bins_use_the_annotations_own_area(backend):
    """A 40x40 box (1600 px: medium by its box) whose annotation area is 900 px (a thin object:
    small, < 32^2) counts as small, as in COCO; without an area the box decides (medium)."""
    box = [[10.0, 10, 50, 50]]
    detections = [{"image_id": 1, "boxes": box, "scores": [0.9], "labels": [0]}]
    cats = [{"id": 1, "name": "a"}]
    rec = ImageRecord(1, Path("1.jpg"), 100, 100, box, [0], [False], [-1], areas=[900.0])
    assert _coco_gt_dict(DetectionDataset("d", [rec], cats))["annotations"][0]["area"] == 900.0
    by_area = evaluate_coco(DetectionDataset("d", [rec], cats), detections, backend=backend)
    assert by_area["APs"] == pytest.approx(100.0) and math.isnan(by_area["APm"])
    by_box = evaluate_coco(DetectionDataset("d", [_record(1, box, [0], size=(100, 100))], cats), detections,
                           backend=backend)
    assert by_box["APm"] == pytest.approx(100.0) and math.isnan(by_box["APs"])


def test_teacher_diagnostics_hand_computed():
    """3 GT (small, medium, large), 4 detections; t 0.7, alpha 0.5 (COCO bounds, area_scale 1).

    D0 = G0 exactly (class 0, 0.9): TP, small. D1 on G1 at IoU 2500/3000 (class 0, 0.6): TP, medium.
    D2 = G2's box with the wrong class (0.8): FP, large. D3 on G2 at IoU exactly 0.5 (0.55): TP, large.
    A second image has only a crowd region; a 0.95 detection on it is counted neither way.
    """
    cats = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}]
    gt = DetectionDataset("d", [
        _record(1, [[0, 0, 10, 10], [50, 50, 100, 100], [0, 100, 100, 200]], [0, 0, 1], size=(200, 300)),
        _record(2, [[0, 0, 50, 50]], [0], np.array([True]), size=(200, 300)),
    ], cats)
    detections = [
        {"image_id": 1, "boxes": [[0, 0, 10, 10], [50, 50, 100, 110], [0, 100, 100, 200], [0, 100, 100, 300]],
         "scores": [0.9, 0.6, 0.8, 0.55], "labels": [0, 0, 0, 1]},
        {"image_id": 2, "boxes": [[0, 0, 50, 50]], "scores": [0.95], "labels": [0]},
    ]
    d = teacher_diagnostics(gt, detections, {"t": 0.7, "alpha": 0.5})
    nan = pytest.approx(float("nan"), nan_ok=True)
    # above t: D0 (TP, small), D2 (FP, large), the crowd detection (not counted)
    assert d["cover_t"] == pytest.approx(1 / 3)
    assert (d["cover_t_small"], d["cover_t_medium"], d["cover_t_large"]) == (1.0, 0.0, 0.0)
    assert d["precision_t"] == pytest.approx(1 / 2)
    assert (d["precision_t_small"], d["precision_t_medium"], d["precision_t_large"]) == (1.0, nan, 0.0)
    assert d["dets_per_img_t"] == pytest.approx(3 / 2)
    # above alpha: every GT object covered; D0, D1, D3 correct of 4 counted
    assert d["cover_alpha"] == 1.0
    assert (d["cover_alpha_small"], d["cover_alpha_medium"], d["cover_alpha_large"]) == (1.0, 1.0, 1.0)
    assert d["precision_alpha"] == pytest.approx(3 / 4)
    assert (d["precision_alpha_small"], d["precision_alpha_medium"], d["precision_alpha_large"]) == (1.0, 1.0, 0.5)
    # area_scale 0.25 moves the bounds to 8^2 and 24^2: G0 (100 px) becomes medium, G1 and G2 large
    s = teacher_diagnostics(gt, detections, {"t": 0.7}, area_scale=0.25)
    assert (s["cover_t_small"], s["cover_t_medium"], s["cover_t_large"]) == (nan, 1.0, 0.0)
    # the GT's own area decides its bin: G1 with an annotated area of 50 px is small
    gt.records[0].areas = np.array([100.0, 50.0, 10000.0])
    assert teacher_diagnostics(gt, detections, {"alpha": 0.5})["cover_alpha_small"] == 1.0
    assert math.isnan(teacher_diagnostics(gt, detections, {"alpha": 0.5})["cover_alpha_medium"])
