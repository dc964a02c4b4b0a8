"""Shared fixtures for the data-layer tests: tiny COCO files written on the fly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image


def write_coco(root: Path, images: list[dict], annotations: list[dict], categories: list[dict],
               make_files: bool = True, name: str = "instances_mini.json") -> tuple[Path, Path]:
    """Write a COCO JSON (and flat-grey PNGs of the declared sizes) under ``root``."""
    img_dir = root / "images"
    img_dir.mkdir(parents=True, exist_ok=True)
    if make_files:
        for im in images:
            Image.new("RGB", (im["width"], im["height"]), (128, 128, 128)).save(img_dir / im["file_name"])
    path = root / name
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    return path, img_dir


@pytest.fixture
def coco_writer(tmp_path):
    return lambda *a, **k: write_coco(tmp_path, *a, **k)


@pytest.fixture
def mini_coco(tmp_path) -> tuple[Path, Path]:
    """Five images in non-id JSON order: 20 is empty, 40 has only a crowd box; ids 3,1,10 categories."""
    images = [{"id": i, "file_name": f"im{i}.png", "width": 100, "height": 80} for i in (30, 10, 20, 40, 50)]
    cats = [{"id": 3, "name": "c3"}, {"id": 1, "name": "c1"}, {"id": 10, "name": "c10"}]
    anns = [
        {"id": 1, "image_id": 10, "category_id": 10, "bbox": [10, 20, 30, 40], "area": 1000.0, "iscrowd": 0},
        {"id": 2, "image_id": 30, "category_id": 1, "bbox": [0, 0, 10, 10], "iscrowd": 0},  # no area
        {"id": 3, "image_id": 40, "category_id": 3, "bbox": [5, 5, 20, 20], "area": 400.0, "iscrowd": 1},
        {"id": 4, "image_id": 50, "category_id": 3, "bbox": [90, 70, 20, 20], "area": 100.0, "iscrowd": 0},
        {"id": 5, "image_id": 50, "category_id": 1, "bbox": [-5, 10, 15, 10], "area": 100.0, "iscrowd": 0},
    ]
    return write_coco(tmp_path, images, anns, cats)
