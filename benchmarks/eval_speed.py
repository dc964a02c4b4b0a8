"""Time ``core.evaluate.evaluate_coco`` with faster-coco-eval and with pycocotools.

A synthetic COCO-like ground truth (~7 boxes per image over 80 classes with COCO's non-contiguous
ids and skewed class frequencies; about 41% small, 34% medium, 24% large boxes; 1% crowd) and
detections as a detector returns them after its top-100 cut: several jittered copies of each GT
(sometimes with the wrong class), background boxes filling up to 100 per image.

    python benchmarks/eval_speed.py [--images 5000] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout, installed or not

from core.data.types import DetectionDataset, ImageRecord  # noqa: E402
from core.evaluate import evaluate_coco  # noqa: E402

COCO_IDS = [i for i in range(1, 91) if i not in {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}]
DETS_PER_IMAGE = 100


def random_boxes(rng, n: int, width: int, height: int) -> np.ndarray:
    """``n`` xyxy boxes: sqrt(area) small 4-32 / medium 32-96 / large 96-400 px w.p. .41/.34/.25."""
    ranges = np.array([[4, 32], [32, 96], [96, 400]], float)[rng.choice(3, n, p=[0.41, 0.34, 0.25])]
    side = rng.uniform(ranges[:, 0], ranges[:, 1])
    aspect = np.exp(rng.uniform(-0.8, 0.8, n))
    w, h = np.minimum(side * aspect, width - 1), np.minimum(side / aspect, height - 1)
    x1, y1 = rng.uniform(0, width - w), rng.uniform(0, height - h)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1)


def ground_truth(rng, num_images: int) -> DetectionDataset:
    class_p = 1.0 / np.arange(1, 81) ** 0.8
    class_p /= class_p.sum()
    records = []
    for i in range(num_images):
        width, height = int(rng.integers(480, 641)), int(rng.integers(360, 641))
        n = min(int(rng.poisson(7.3)), 60)
        labels = rng.choice(80, n, p=class_p)
        boxes = random_boxes(rng, n, width, height)
        crowd = rng.random(n) < 0.01
        records.append(ImageRecord(i + 1, Path(f"{i + 1:012d}.jpg"), width, height, boxes, labels, crowd, [-1] * n))
    categories = [{"id": cid, "name": f"class{cid}"} for cid in COCO_IDS]
    return DetectionDataset("synthetic-coco", records, categories)


def detections_for(rng, rec: ImageRecord) -> dict:
    """Up to 100 detections: 1-6 jittered copies per GT (10% relabelled), then background."""
    copies = rng.integers(1, 7, len(rec.boxes))
    source = np.repeat(np.arange(len(rec.boxes)), copies)
    boxes = rec.boxes[source].astype(np.float64)
    size = np.tile(boxes[:, 2:] - boxes[:, :2], 2)
    boxes += rng.normal(0, 1, boxes.shape) * size * rng.uniform(0.02, 0.3, (len(boxes), 1))
    labels = np.where(rng.random(len(boxes)) < 0.1, rng.integers(0, 80, len(boxes)), rec.labels[source])
    scores = rng.beta(4, 2, len(boxes))
    n_bg = max(DETS_PER_IMAGE - len(boxes), 0)
    boxes = np.concatenate([boxes, random_boxes(rng, n_bg, rec.width, rec.height)])
    labels = np.concatenate([labels, rng.integers(0, 80, n_bg)])
    scores = np.concatenate([scores, rng.beta(1, 6, n_bg)])
    top = np.argsort(-scores, kind="stable")[:DETS_PER_IMAGE]
    return {"image_id": rec.id, "boxes": boxes[top], "scores": scores[top], "labels": labels[top]}


def best_time(fn, repeats: int) -> tuple[float, dict]:
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000, help="number of synthetic images (default 5000)")
    parser.add_argument("--repeats", type=int, default=2, help="timed runs per backend, best kept (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    dataset = ground_truth(rng, args.images)
    detections = [detections_for(rng, rec) for rec in dataset.records]
    num_gt = sum(len(r.boxes) for r in dataset.records)
    num_dt = sum(len(d["scores"]) for d in detections)
    print(f"{args.images} images, {num_gt} GT boxes, {num_dt} detections, best of {args.repeats}")

    t_faster, faster = best_time(lambda: evaluate_coco(dataset, detections, backend="faster"), args.repeats)
    t_pycoco, pycoco = best_time(lambda: evaluate_coco(dataset, detections, backend="pycocotools"), args.repeats)
    same = all(faster[k] == pycoco[k] or abs(faster[k] - pycoco[k]) < 1e-9 for k in ("AP", "AP50", "AR100"))
    print(f"AP {faster['AP']:.3f}  AP50 {faster['AP50']:.3f}  (backends agree: {same})")
    print(f"faster-coco-eval: {t_faster:.2f} s")
    print(f"pycocotools:      {t_pycoco:.2f} s")
    print(f"ratio pycocotools / faster-coco-eval: {t_pycoco / t_faster:.2f}x")


if __name__ == "__main__":
    main()
