"""COCO-format reader/writer and the one image loader every consumer uses.

The reader validates strictly (every malformed entry is a ``BenchError`` naming the file, the image id
and the annotation id) but repairs what detectron2/mmdet silently repair: boxes sticking out of the
image are clipped (and counted), a missing ``area`` is computed from the box. Records are sorted by
image id, which is also the order detectron2 uses, so index-based split files line up.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from core.data.types import DetectionDataset, ImageRecord
from core.errors import BenchError

_FIX_JSON = "fix the file or re-export it as COCO detection JSON"
MAX_SIDE = 1 << 16  # pixels: larger sides are a unit or a typo, and overflow float32 box arithmetic


def load_image(path: Path) -> Image.Image:
    """Open any image file as 8-bit RGB (grayscale, palette, RGBA, CMYK, 16-bit all converted).

    EXIF orientation is applied, as detectron2's ``read_image`` does, so pixels match the
    annotation's width/height for phone pictures. Alpha is dropped (colour kept), as detectron2's
    ``convert("RGB")`` does; 16-bit and float grayscale are rescaled instead of clipped.
    """
    path = Path(path)
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            if im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = 65535.0 if arr.max(initial=0) > 255 else 255.0
                im = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
            elif im.mode == "F":
                arr = np.asarray(im, dtype=np.float64)
                scale = 255.0 if arr.max(initial=0) <= 1.0 else 1.0
                im = Image.fromarray(np.clip(arr * scale + 0.5, 0, 255).astype(np.uint8), "L")
            return im.convert("RGB")
    except FileNotFoundError:
        raise BenchError(f"image file {path} does not exist; fix the image directory or the file_name") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise BenchError(f"cannot decode image {path} ({e}); replace the corrupt file or drop it from the annotations") from None


def _read_json(path: Path) -> object:
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        raise BenchError(f"annotation file {path} does not exist; check the path (data.root for the coco presets)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BenchError(f"cannot read annotation file {path} ({e}); check permissions/encoding") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise BenchError(f"{path}: invalid JSON at line {e.lineno} column {e.colno} ({e.msg}); {_FIX_JSON}") from None


def _require(obj: object, keys: tuple[str, ...], where: str, path: Path) -> dict:
    if not isinstance(obj, dict):
        raise BenchError(f"{path}: {where} is not a JSON object; {_FIX_JSON}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BenchError(f"{path}: {where} lacks required key(s) {', '.join(missing)}; {_FIX_JSON}")
    return obj


def _number(v: object, what: str, where: str, path: Path) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise BenchError(f"{path}: {where} has non-numeric {what} {v!r}; {_FIX_JSON}")
    return float(v)


def _int_id(v: object, what: str, path: Path) -> int:
    """An id: a JSON integer (not a bool, a float, a string, a list or null)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise BenchError(f"{path}: {what} {_short(v)} is not an integer id; {_FIX_JSON}")
    return _int64(v, what, path)


def _int64(v: int, what: str, path: Path) -> int:
    """Ids are stored in 64-bit arrays (and COCO's evaluation holds them so): JSON allows larger."""
    if not -2 ** 63 <= v < 2 ** 63:
        raise BenchError(f"{path}: {what} {_short(v)} does not fit in 64 bits; use ids between -2**63 and 2**63 - 1")
    return v


def _printable(text: str) -> str:
    """A file name as written, but with control characters escaped: an error stays one line."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _short(v: object) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def load_coco(annotation_file: Path, image_dir: Path, name: str | None = None,
              check_images: bool = True) -> DetectionDataset:
    """Read a COCO detection JSON into the internal format (see ``core.data.types``).

    ``stats`` reports ``clipped_boxes``, ``computed_areas``, ``crowd``, ``images_without_boxes``,
    ``annotations``, and ``areas`` ({annotation id: area}) so ``to_coco_dict`` can round-trip areas.
    """
    path = Path(annotation_file)
    image_dir = Path(image_dir)
    doc = _require(_read_json(path), ("images", "categories"), "the top level", path)
    anns = doc.get("annotations", [])  # image_info_*.json (unlabeled) files have none
    if not isinstance(doc["images"], list) or not isinstance(doc["categories"], list) or not isinstance(anns, list):
        raise BenchError(f"{path}: 'images', 'annotations' and 'categories' must be lists; {_FIX_JSON}")

    if not doc["categories"]:
        raise BenchError(f"{path}: 'categories' is empty; a detector needs at least one class: list them as "
                         '[{"id": 1, "name": "..."}, ...]')
    cat_ids: dict[int, str] = {}
    for c in doc["categories"]:
        _require(c, ("id", "name"), "a category", path)
        cid = c["id"]
        if not isinstance(cid, int) or isinstance(cid, bool):
            raise BenchError(f"{path}: category {_short(c.get('name'))} has non-integer id {_short(cid)}; {_FIX_JSON}")
        _int64(cid, f"category {_short(c.get('name'))}: id", path)
        if cid in cat_ids:
            raise BenchError(f"{path}: duplicate category id {cid}; give every category a unique id")
        if not isinstance(c["name"], str) or not c["name"]:
            raise BenchError(f"{path}: category {cid} has name {_short(c['name'])}, not a non-empty string; {_FIX_JSON}")
        cat_ids[cid] = c["name"]
    categories = [{"id": cid, "name": cat_ids[cid]} for cid in sorted(cat_ids)]
    label_of = {c["id"]: i for i, c in enumerate(categories)}

    images: dict[int, dict] = {}
    for im in doc["images"]:
        _require(im, ("id", "file_name", "width", "height"),
                 f"image {_short(im.get('id')) if isinstance(im, dict) else _short(im)}", path)
        iid = _int_id(im["id"], "image id", path)
        file_name = im["file_name"]
        if not isinstance(file_name, str) or not file_name.strip() or "\x00" in file_name:
            raise BenchError(f"{path}: image {iid} has file_name {_short(file_name)}, not a file name; {_FIX_JSON}")
        if iid in images:
            raise BenchError(f"{path}: duplicate image id {iid} ({_printable(images[iid]['file_name'])} and {_printable(file_name)}); "
                             "give every image a unique id")
        w = _number(im["width"], "width", f"image {iid}", path)
        h = _number(im["height"], "height", f"image {iid}", path)
        if w <= 0 or h <= 0 or w != int(w) or h != int(h) or max(w, h) > MAX_SIDE:
            raise BenchError(f"{path}: image {iid} has size {_short(im['width'])}x{_short(im['height'])}; set its "
                             f"real width and height (whole pixels, 1 to {MAX_SIDE})")
        images[iid] = im

    per_image: dict[int, list] = {iid: [] for iid in images}
    areas: dict[int, float] = {}
    clipped = computed = crowd = 0
    seen_ann: set[int] = set()
    for a in anns:
        _require(a, ("id", "image_id", "category_id", "bbox"),
                 f"annotation {_short(a.get('id')) if isinstance(a, dict) else _short(a)}", path)
        aid = _int_id(a["id"], "annotation id", path)
        iid = _int_id(a["image_id"], f"annotation {aid}'s image_id", path)
        where = f"annotation {aid} (image {iid})"
        if isinstance(a["category_id"], bool) or not isinstance(a["category_id"], int):
            raise BenchError(f"{path}: {where} has category_id {_short(a['category_id'])}, not an integer id; "
                             f"{_FIX_JSON}")
        if aid in seen_ann:
            raise BenchError(f"{path}: duplicate annotation id {aid}; give every annotation a unique id")
        seen_ann.add(aid)
        if iid not in images:
            raise BenchError(f"{path}: {where} refers to an image id that is not in 'images'; "
                             "add the image or delete the annotation")
        if a["category_id"] not in label_of:
            raise BenchError(f"{path}: {where} has unknown category id {a['category_id']} "
                             f"(known: {sorted(label_of)}); add the category or fix the annotation")
        bbox = a["bbox"]
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
            raise BenchError(f"{path}: {where} bbox {_short(bbox)} is not [x, y, width, height]; {_FIX_JSON}")
        x, y, bw, bh = (_number(v, "bbox", where, path) for v in bbox)
        if bw <= 0 or bh <= 0:
            kind = "negative" if (bw < 0 or bh < 0) else "zero"
            raise BenchError(f"{path}: {where} has {kind}-size bbox {list(bbox)} (width and height must be > 0); "
                             "fix or delete the annotation")
        W, H = float(images[iid]["width"]), float(images[iid]["height"])
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, W), min(y + bh, H)
        if x2 <= x1 or y2 <= y1:
            raise BenchError(f"{path}: {where} bbox {list(bbox)} lies entirely outside the {W:g}x{H:g} image; "
                             "fix the box or the image's width/height")
        if (x1, y1, x2, y2) != (x, y, x + bw, y + bh):
            clipped += 1
        if "area" in a and a["area"] is not None:
            area = _number(a["area"], "area", where, path)
            if area < 0:
                raise BenchError(f"{path}: {where} has negative area {area:g}; fix it or delete the key (it is then "
                                 "computed from the box)")
        else:
            area = (x2 - x1) * (y2 - y1)
            computed += 1
        iscrowd = a.get("iscrowd", 0)
        if iscrowd not in (0, 1):  # "no" and "false" would read as crowd
            raise BenchError(f"{path}: {where} has iscrowd {_short(iscrowd)}; it must be 0 or 1")
        is_crowd = bool(iscrowd)
        crowd += is_crowd
        areas[int(aid)] = area
        per_image[iid].append((x1, y1, x2, y2, label_of[a["category_id"]], is_crowd, aid, area))

    records = []
    missing: list[tuple[int, Path]] = []
    for iid in sorted(images):
        im = images[iid]
        file = image_dir / im["file_name"]
        if check_images and not file.is_file():
            missing.append((iid, file))
        rows = per_image[iid]
        records.append(ImageRecord(
            id=int(iid), file=file, width=int(im["width"]), height=int(im["height"]),
            boxes=np.array([r[:4] for r in rows], dtype=np.float32).reshape(-1, 4),
            labels=np.array([r[4] for r in rows], dtype=np.int64),
            iscrowd=np.array([r[5] for r in rows], dtype=bool),
            ann_ids=np.array([r[6] for r in rows], dtype=np.int64),
            areas=np.array([r[7] for r in rows], dtype=np.float64),
        ))
    if missing:
        iid, file = missing[0]
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise BenchError(f"{path}: image {iid} file {_printable(str(file))} does not exist{more}; "
                         "point data.root (train) or --image-dir (bench data check) at the folder holding the images")
    return DetectionDataset(
        name=name or path.stem,
        records=records,
        categories=categories,
        annotation_file=path,
        stats={"clipped_boxes": clipped, "computed_areas": computed, "crowd": crowd,
               "annotations": sum(len(v) for v in per_image.values()),
               "images_without_boxes": sum(1 for v in per_image.values() if not v),
               "image_dir": str(image_dir), "areas": areas},
    )


def to_coco_dict(dataset: DetectionDataset) -> dict:
    """The inverse of ``load_coco``: a COCO JSON dict with the original category ids.

    Annotation ids are kept where the source had them (``ann_ids >= 0``) and otherwise numbered
    after the largest existing one; areas come from ``stats["areas"]`` when known, else box area.
    """
    image_dir = dataset.stats.get("image_dir")
    known_areas = dataset.stats.get("areas", {})
    next_id = max([int(r.ann_ids.max()) for r in dataset.records if len(r.ann_ids)] + [0]) + 1
    images, annotations = [], []
    for r in dataset.records:
        file_name = r.file.name
        if image_dir is not None:
            try:
                file_name = r.file.relative_to(image_dir).as_posix()
            except ValueError:
                pass
        images.append({"id": int(r.id), "file_name": file_name, "width": int(r.width), "height": int(r.height)})
        for box, label, crowd, aid in zip(r.boxes.tolist(), r.labels.tolist(), r.iscrowd.tolist(), r.ann_ids.tolist()):
            if aid < 0:
                aid, next_id = next_id, next_id + 1
            x1, y1, x2, y2 = box
            w, h = x2 - x1, y2 - y1
            annotations.append({
                "id": int(aid), "image_id": int(r.id),
                "category_id": int(dataset.categories[label]["id"]),
                "bbox": [x1, y1, w, h],
                "area": float(known_areas.get(aid, w * h)),
                "iscrowd": int(crowd),
            })
    return {"images": images, "annotations": annotations,
            "categories": [{"id": int(c["id"]), "name": c["name"]} for c in dataset.categories]}
