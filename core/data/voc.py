"""Pascal VOC 2007/2012 reader (``ImageSets/Main``, ``Annotations``, ``JPEGImages`` layout).

Conversions follow detectron2's ``load_voc_instances``: VOC boxes are 1-based inclusive pixel
indices, so ``x1 -= 1, y1 -= 1`` and ``x2, y2`` are kept, giving 0-based continuous coordinates.

``difficult=1`` objects become ``iscrowd=True``: training drops them (as detectron2 does by default)
and COCO-style evaluation treats them as "ignore" regions, which is how the VOC protocol treats
difficult objects (they neither count as misses nor make detections false positives).

Image ids are the integer form of the file stem ("000005" -> 5, "2008_000002" -> 2008000002), so
VOC07 and VOC12 ids never collide; ``stats["stems"]`` maps id -> stem. If any stem is not of that
form (custom data), or two give one id, or one is 2**63 or more (ids are stored in 64 bits), ids are
instead 1..N in image-set order (``stats["id_scheme"] = "index"``).
"""

from __future__ import annotations

import math
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from PIL import Image

from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train",
    "tvmonitor",
)

_STEM = re.compile(r"^\d+(_\d+)?$")


def _text(node: ET.Element, tag: str, xml: Path, stem: str) -> str:
    child = node.find(tag)
    if child is None or child.text is None or not child.text.strip():
        raise BenchError(f"{xml}: image {stem} lacks <{tag}>; fix the annotation XML")
    return child.text.strip()


def _float(node: ET.Element, tag: str, xml: Path, stem: str, where: str) -> float:
    raw = _text(node, tag, xml, stem)
    try:
        value = float(raw)
    except ValueError:
        raise BenchError(f"{xml}: {where} has non-numeric <{tag}> {raw!r}; fix the annotation XML") from None
    if not math.isfinite(value):  # float() reads "nan", "inf" and "1e400" too
        raise BenchError(f"{xml}: {where} has non-finite <{tag}> {raw!r}; fix the annotation XML")
    return value


def read_annotation(xml: Path, label_of: dict[str, int], image: Path | None = None, stem: str | None = None):
    """One VOC XML: (width, height, xyxy boxes in 0-based continuous pixels clipped to the image
    (float64), labels, difficult flags, number of boxes clipped). A missing <size> is read from
    `image`. Malformed files, unknown class names and empty boxes are one-line BenchErrors."""
    stem = stem or xml.stem
    try:
        tree = ET.parse(xml).getroot()
    except FileNotFoundError:
        raise BenchError(f"{xml}: annotation of image {stem} does not exist; restore the file") from None
    except ET.ParseError as e:
        raise BenchError(f"{xml}: malformed XML for image {stem} ({e}); fix or re-download the file") from None
    size = tree.find("size")
    if size is not None and size.find("width") is not None:
        W = _float(size, "width", xml, stem, "<size>")
        H = _float(size, "height", xml, stem, "<size>")
    else:  # a few hand-made VOC sets omit <size>: read it from the image header
        if image is None or not image.is_file():
            raise BenchError(f"{xml}: image {stem} has no <size> and {image} does not exist; add <size> or the image")
        with Image.open(image) as im:
            W, H = map(float, im.size)
    if W <= 0 or H <= 0:
        raise BenchError(f"{xml}: image {stem} has size {W:g}x{H:g}; fix <size>")
    boxes, labels, crowd, clipped = [], [], [], 0
    for k, obj in enumerate(tree.findall("object")):
        cls = _text(obj, "name", xml, stem)
        where = f"object {k} ({cls}) of image {stem}"
        if cls not in label_of:
            raise BenchError(f"{xml}: {where} has unknown class name {cls!r}, not one of {', '.join(label_of)}; "
                             "fix the name or pass class names that include it")
        bb = obj.find("bndbox")
        if bb is None:
            raise BenchError(f"{xml}: {where} lacks <bndbox>; fix the annotation XML")
        x1, y1, x2, y2 = (_float(bb, t, xml, stem, where) for t in ("xmin", "ymin", "xmax", "ymax"))
        x1, y1 = x1 - 1.0, y1 - 1.0  # 1-based inclusive -> 0-based continuous (detectron2)
        if x2 <= x1 or y2 <= y1:
            raise BenchError(f"{xml}: {where} has empty or inverted box (xmin..xmax, ymin..ymax) = "
                             f"({x1 + 1:g}..{x2:g}, {y1 + 1:g}..{y2:g}); fix the box")
        c = (max(x1, 0.0), max(y1, 0.0), min(x2, W), min(y2, H))
        if c[2] <= c[0] or c[3] <= c[1]:
            raise BenchError(f"{xml}: {where} box lies outside the {W:g}x{H:g} image; fix the box or <size>")
        clipped += c != (x1, y1, x2, y2)
        diff_node = obj.find("difficult")
        difficult = "0" if diff_node is None else (diff_node.text or "0").strip()
        if difficult not in ("0", "1"):  # "yes" or "true" would silently read as not difficult
            raise BenchError(f"{xml}: {where} has <difficult> {difficult!r}; it must be 0 or 1")
        crowd.append(difficult == "1")
        boxes.append(c)
        labels.append(label_of[cls])
    return (int(W), int(H), np.array(boxes, dtype=np.float64).reshape(-1, 4), np.array(labels, dtype=np.int64),
            np.array(crowd, dtype=bool), clipped)


def load_voc(root: Path, image_set: str = "trainval", name: str | None = None,
             class_names: tuple[str, ...] | list[str] = VOC_CLASSES, check_images: bool = True) -> DetectionDataset:
    """Read ``root/ImageSets/Main/<image_set>.txt`` and its XML annotations.

    Category ids are 1..len(class_names) in ``class_names`` order; labels are 0-based.
    """
    root = Path(root)
    list_file = root / "ImageSets" / "Main" / f"{image_set}.txt"
    if not list_file.is_file():
        raise BenchError(f"VOC image set file {list_file} does not exist; check the VOC root "
                         f"(it must contain ImageSets/Main/{image_set}.txt) or the image set name")
    stems = [line.split()[0] for line in list_file.read_text().splitlines() if line.strip()]
    if len(set(stems)) != len(stems):
        dup = next(s for s in stems if stems.count(s) > 1)
        raise BenchError(f"{list_file}: image {dup} is listed twice; remove the duplicate line")
    label_of = {n: i for i, n in enumerate(class_names)}

    numeric = all(_STEM.match(s) for s in stems)
    ids = [int(s.replace("_", "")) for s in stems] if numeric else list(range(1, len(stems) + 1))
    if numeric and (len(set(ids)) != len(ids) or max(ids, default=0) >= 2 ** 63):  # ids live in 64-bit arrays
        ids, numeric = list(range(1, len(stems) + 1)), False

    records: list[ImageRecord] = []
    clipped = difficult = 0
    for iid, stem in zip(ids, stems):
        xml = root / "Annotations" / f"{stem}.xml"
        file = root / "JPEGImages" / f"{stem}.jpg"
        if not xml.is_file():
            raise BenchError(f"{xml}: annotation of image {stem} does not exist; restore the file or "
                             f"remove {stem} from {list_file}")
        if check_images and not file.is_file():
            raise BenchError(f"{file}: image {stem} listed in {list_file} does not exist; restore JPEGImages "
                             "or remove the line")
        W, H, boxes, labels, crowd, n_clipped = read_annotation(xml, label_of, file, stem)
        clipped += n_clipped
        difficult += int(crowd.sum())
        records.append(ImageRecord(
            id=iid, file=file, width=int(W), height=int(H),
            boxes=boxes.astype(np.float32), labels=labels, iscrowd=crowd,
            ann_ids=np.full(len(boxes), -1, dtype=np.int64),
        ))
    records.sort(key=lambda r: r.id)
    return DetectionDataset(
        name=name or f"{root.name}_{image_set}",
        records=records,
        categories=[{"id": i + 1, "name": n} for i, n in enumerate(class_names)],
        annotation_file=None,
        stats={"clipped_boxes": clipped, "difficult": difficult, "crowd": difficult,
               "annotations": sum(len(r.labels) for r in records),
               "images_without_boxes": sum(1 for r in records if len(r.labels) == 0),
               "stems": {r_id: s for r_id, s in zip(ids, stems)},
               "id_scheme": "stem" if numeric else "index", "image_dir": str(root / "JPEGImages")},
    )
