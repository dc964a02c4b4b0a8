"""``bench data check``: validate a data set and summarise what a detector will see.

Reading is done by the real readers (so every error is the one training would raise); missing
image files and size mismatches are collected as problems instead of stopping at the first one.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.data.coco import load_coco
from core.data.types import DetectionDataset
from core.data.voc import load_voc
from core.errors import BenchError

SMALL, MEDIUM = 32.0, 96.0  # COCO's size bounds (sides of the area thresholds)
_MAX_LISTED = 5


def _image_dir_for(json_path: Path) -> Path:
    """Image folder of a COCO JSON: <root>/images/<split> or <root>/<split> (COCO's layout)."""
    split = json_path.stem[len("instances_"):] if json_path.stem.startswith("instances_") else json_path.stem
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = [root / "images" / split, root / split, json_path.parent / "images" / split, json_path.parent / split]
    for c in candidates:
        if c.is_dir():
            return c
    raise BenchError(f"no image folder found for {json_path} (looked in {', '.join(str(c) for c in candidates[:2])}); "
                     "pass the image folder explicitly (--image-dir)")


def check_dataset(path: Path, image_dir: Path | None = None, image_set: str = "trainval",
                  verify_sizes: int = 50, area_scale: float = 1.0) -> dict:
    """Validate a COCO JSON (images next to it, see ``_image_dir_for``) or a VOC root; return a summary.

    ``verify_sizes``: how many images (evenly spread) to open to compare their size with the
    annotation; 0 skips it, -1 opens all. ``area_scale`` scales COCO's size bounds as the
    evaluation does (a preset's ``eval.area_scale``), so the size mix reported is the one scored.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "Annotations").is_dir() or not (path / "ImageSets" / "Main").is_dir():
            raise BenchError(f"{path} is a folder but not a VOC root (no Annotations/ and ImageSets/Main/) nor a COCO "
                             "root (no annotations/instances_*.json); pass a COCO JSON file, a COCO root or a "
                             "VOCdevkit/VOC20xx folder")
        ds, fmt = load_voc(path, image_set=image_set, check_images=False), "voc"
        areas_by_ann: dict = {}
    elif path.is_file():
        img_dir = Path(image_dir) if image_dir is not None else _image_dir_for(path)
        ds, fmt = load_coco(path, img_dir, check_images=False), "coco"
        areas_by_ann = ds.stats.get("areas", {})
    else:
        raise BenchError(f"{path} does not exist; pass a COCO annotation JSON or a VOC root folder")
    return _summarise(ds, fmt, path, areas_by_ann, verify_sizes, area_scale)


def coco_annotation_files(root: Path) -> list[Path]:
    """The annotation files of a COCO root (annotations/instances_*.json), [] if it is none."""
    return sorted(Path(root).glob("annotations/instances_*.json")) if Path(root).is_dir() else []


def check_path(path: Path, image_dir: Path | None = None, area_scale: float = 1.0) -> list[dict]:
    """`check_dataset` of a file or a VOC root, or of each annotation file of a COCO root."""
    files = coco_annotation_files(path)
    if files and not (Path(path) / "Annotations").is_dir():
        if image_dir is not None:
            raise BenchError(f"--image-dir goes with one annotation file; {path} is a COCO root whose image folders "
                             "are found per file (annotations/instances_<split>.json -> <split>/)")
        return [check_dataset(f, area_scale=area_scale) for f in files]
    return [check_dataset(path, image_dir=image_dir, area_scale=area_scale)]


def _summarise(ds: DetectionDataset, fmt: str, path: Path, areas_by_ann: dict, verify_sizes: int,
               area_scale: float) -> dict:
    small, medium = (SMALL * area_scale) ** 2, (MEDIUM * area_scale) ** 2
    per_class: Counter = Counter()
    hist = {"small": 0, "medium": 0, "large": 0}
    crowd = tiny = 0
    missing: list[str] = []
    for r in ds.records:
        if not r.file.is_file():
            missing.append(f"image {r.id}: {r.file}")
        wh = (r.boxes[:, 2:] - r.boxes[:, :2]).astype(np.float64)
        for (w, h), lab, is_crowd, aid in zip(wh.tolist(), r.labels.tolist(), r.iscrowd.tolist(), r.ann_ids.tolist()):
            if is_crowd:
                crowd += 1
                continue
            per_class[ds.categories[lab]["name"]] += 1
            area = areas_by_ann.get(aid, w * h) if aid >= 0 else w * h
            hist["small" if area < small else "medium" if area < medium else "large"] += 1
            tiny += min(w, h) < 1.0

    problems: list[str] = []
    if missing:
        problems.append(f"{len(missing)} image file(s) missing, e.g. " + "; ".join(missing[:_MAX_LISTED]))
    mismatched = []
    if verify_sizes and ds.records:
        present = [r for r in ds.records if r.file.is_file()]
        k = len(present) if verify_sizes < 0 else min(verify_sizes, len(present))
        for i in np.linspace(0, len(present) - 1, k).round().astype(int).tolist() if k else []:
            r = present[i]
            try:
                with Image.open(r.file) as im:
                    size = im.size
            except (UnidentifiedImageError, OSError) as e:
                problems.append(f"image {r.id}: {r.file} cannot be decoded ({e})")
                continue
            if size != (r.width, r.height):
                mismatched.append(f"image {r.id}: file {size[0]}x{size[1]} vs annotation {r.width}x{r.height}")
    if mismatched:
        problems.append(f"{len(mismatched)} image size mismatch(es), e.g. " + "; ".join(mismatched[:_MAX_LISTED]))
    notes: list[str] = []  # repaired or harmless: reported, not a reason to refuse the set
    if tiny:
        notes.append(f"{tiny} box(es) narrower than 1 px (kept, but hardly learnable)")
    clipped = int(ds.stats.get("clipped_boxes", 0))
    if clipped:
        notes.append(f"{clipped} box(es) extended beyond their image and were clipped")
    if not ds.records:
        problems.append("no images")
    if not per_class:
        problems.append("no annotated box (crowd boxes aside): nothing to train on or score")
    empty_classes = [c["name"] for c in ds.categories if per_class[c["name"]] == 0]
    if empty_classes and per_class:
        problems.append(f"{len(empty_classes)} class(es) without any box: {', '.join(empty_classes[:10])}")
    return {
        "path": str(path), "format": fmt, "name": ds.name,
        "images": len(ds.records),
        "images_without_boxes": sum(1 for r in ds.records if not (~r.iscrowd).any()),
        "boxes": int(sum(per_class.values())),
        "classes": ds.num_classes,
        "boxes_per_class": {c["name"]: per_class[c["name"]] for c in ds.categories},
        "area": hist,
        "area_scale": area_scale,
        "crowd": crowd,
        "clipped_boxes": clipped,
        "problems": problems,
        "notes": notes,
    }


def _format_area(hist: dict, area_scale: float) -> str:
    total = max(sum(hist.values()), 1)
    bounds = f"{SMALL * area_scale:g}^2, {MEDIUM * area_scale:g}^2"
    scale = "" if area_scale == 1.0 else f", COCO's scaled by {area_scale:g}"
    return ("area: " + ", ".join(f"{k} {v} ({100 * v / total:.1f}%)" for k, v in hist.items())
            + f"  (thresholds {bounds}{scale})")


def format_summary(summary: dict) -> str:
    """Plain-text rendering of ``check_dataset``'s summary (the CLI renders it with rich)."""
    lines = [
        f"{summary['name']} ({summary['format']}): {summary['path']}",
        f"images: {summary['images']} ({summary['images_without_boxes']} without boxes)",
        f"boxes: {summary['boxes']} in {summary['classes']} classes, crowd/difficult: {summary['crowd']}, "
        f"clipped: {summary['clipped_boxes']}",
        _format_area(summary["area"], summary.get("area_scale", 1.0)),
        "boxes per class:",
    ]
    width = max((len(n) for n in summary["boxes_per_class"]), default=0)
    lines += [f"  {n:<{width}}  {c}" for n, c in summary["boxes_per_class"].items()]
    if summary.get("notes"):
        lines.append("notes:")
        lines += [f"  - {n}" for n in summary["notes"]]
    if summary["problems"]:
        lines.append("problems:")
        lines += [f"  - {p}" for p in summary["problems"]]
    else:
        lines.append("problems: none")
    return "\n".join(lines)
