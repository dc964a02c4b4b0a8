"""The internal data set format every reader produces and every consumer reads.

Boxes are absolute pixel ``xyxy`` float32 in the image's own coordinates. Labels are contiguous
indices ``0..K-1`` into ``DetectionDataset.categories``; the original (possibly non-contiguous)
COCO category id of label ``i`` is ``categories[i]["id"]``. Crowd boxes are kept with
``iscrowd=True``: training drops them, evaluation honours them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


@dataclass
class ImageRecord:
    id: int
    file: Path
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy, absolute pixels
    labels: np.ndarray  # (N,) int64 contiguous class index
    iscrowd: np.ndarray  # (N,) bool
    ann_ids: np.ndarray  # (N,) int64 original annotation ids (-1 where the source has none)
    # (N,) float64 object areas in pixels where the source gives them (COCO's segment `area`, which
    # its small/medium/large bins use); None: the box areas
    areas: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.boxes = np.asarray(self.boxes, dtype=np.float32).reshape(-1, 4)
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        self.iscrowd = np.asarray(self.iscrowd, dtype=bool).reshape(-1)
        self.ann_ids = np.asarray(self.ann_ids, dtype=np.int64).reshape(-1)
        if self.areas is not None:
            self.areas = np.asarray(self.areas, dtype=np.float64).reshape(-1)
            if len(self.areas) != len(self.boxes):
                raise ValueError(f"image {self.id}: {len(self.areas)} areas for {len(self.boxes)} boxes")

    def object_areas(self) -> np.ndarray:
        """(N,) areas for size bins: the source's own where given, else the box areas."""
        if self.areas is not None:
            return self.areas
        wh = np.clip(self.boxes[:, 2:].astype(np.float64) - self.boxes[:, :2], 0, None)
        return wh[:, 0] * wh[:, 1]


@dataclass
class DetectionDataset:
    """A list of images with boxes plus the category table (and where its COCO JSON lives)."""

    name: str
    records: list[ImageRecord]
    categories: list[dict]  # [{"id": original_id, "name": str}, ...] in contiguous-label order
    annotation_file: Path | None = None  # COCO JSON for evaluation when the source is COCO
    stats: dict = field(default_factory=dict)  # reader's report: clipped boxes, skipped crowd, ...

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def class_names(self) -> list[str]:
        return [c["name"] for c in self.categories]

    def subset(self, image_ids) -> "DetectionDataset":
        """The same data set restricted to ``image_ids`` (order of ``records`` kept)."""
        keep = set(int(i) for i in image_ids)
        return DetectionDataset(
            name=self.name,
            records=[r for r in self.records if r.id in keep],
            categories=self.categories,
            annotation_file=self.annotation_file,
            stats=dict(self.stats),
        )

    def by_id(self) -> dict[int, ImageRecord]:
        return {r.id: r for r in self.records}
