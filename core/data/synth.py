"""Deterministic synthetic detection data: the default demo and test data set.

No real multi-class detection set is available offline, so the demo runs on generated shapes. The
set is built to be *well posed* (a detector's errors are its own, not the labels') and to keep what
LSM exploits, a hard small-object tail:

* Every object drawn with a class's shape is annotated, fully inside the image, with its visible
  mask's box and pixel count (COCO's ``area``). Objects may touch but barely overlap, so none is
  hidden behind another.
* Clutter cannot be mistaken for a class: thin lines and open arcs, textured backgrounds, blur and
  sensor noise. No filled blobs or polygons.
* Six classes that stay apart at every drawn size (circle, square, triangle, plus, star, ring); each
  object's colour differs from the background under it, and colour carries no class information.
* Sizes follow COCO's mix relative to the image: about 40 % small, 35 % medium and 25 % large
  objects, where COCO's 32 and 96 px bounds (on ~640 px images) become 5 % and 15 % of the image
  side. Small objects go down to a 5 px extent, the smallest at which the six shapes can still be
  told apart (docs/demo.md measures it), so small objects are genuinely harder than large ones and
  low-confidence pseudo-labels exist where LSM expects them.

Every image is drawn from its own ``numpy.random.default_rng([seed, split_key, index])`` so files are
byte-identical for the same arguments (and independent of how many images come before them).
Image sides vary by +-10 % around ``image_size`` so that padding/batching is exercised.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

GENERATOR_VERSION = "2"

# Deliberately non-contiguous ids: readers must map them to contiguous labels and back.
CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle"},
    {"id": 3, "name": "square"},
    {"id": 7, "name": "triangle"},
    {"id": 11, "name": "ring"},
    {"id": 13, "name": "plus"},
    {"id": 20, "name": "star"},
]

MIN_OBJECT_EXTENT = 5.0  # px, longest extent of the un-rotated shape: the separability floor
# COCO's size mix (share of objects by segment area) and its bounds as fractions of the image side.
SIZE_MIX = (0.40, 0.35, 0.25)  # small, medium, large
SIZE_BOUNDS = (0.05, 0.15)  # 32 and 96 px of a ~640 px COCO image
MAX_OBJECT_FRACTION = 0.5  # largest extent, of the shorter image side
MAX_OVERLAP = 0.15  # of the smaller box: placements overlapping more are redrawn
MIN_CONTRAST = 0.35  # RGB distance between an object's colour and the background under it
_SS = 4  # supersampling factor for anti-aliased shape masks
# Segment area of each unit-extent shape (its area factor): converts a sampled area into an extent.
_AREA_FACTOR = {"circle": 0.785, "square": 1.0, "triangle": 0.393, "ring": 0.503, "plus": 0.58,
                "star": 0.35}


# ----------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _shape_polygons(name: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Unit-extent outline(s) of one class instance: (filled polygons, holes, rotation in radians).

    Coordinates lie roughly in [-0.5, 0.5]; the caller scales by the object's extent.
    """
    rot = float(rng.uniform(0, 2 * np.pi))
    if name == "circle":
        return [_regular(40, 0.5)], [], 0.0
    if name == "square":
        return [np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])], [], rot
    if name == "triangle":
        return [_regular(3, 0.55, -np.pi / 2) + [0, 0.1]], [], rot
    if name == "ring":  # a wide hole, so that a ring never blurs into a disc
        return [_regular(40, 0.5)], [_regular(40, float(rng.uniform(0.28, 0.32)))], 0.0
    if name == "plus":
        w = rng.uniform(0.15, 0.2)
        p = np.array([[-w, -0.5], [w, -0.5], [w, -w], [0.5, -w], [0.5, w], [w, w], [w, 0.5],
                      [-w, 0.5], [-w, w], [-0.5, w], [-0.5, -w], [-w, -w]])
        return [p], [], rot
    if name == "star":
        inner = rng.uniform(0.22, 0.26)
        outer = _regular(5, 0.5, -np.pi / 2)
        inn = _regular(5, inner, -np.pi / 2 + np.pi / 5)
        p = np.empty((10, 2))
        p[0::2], p[1::2] = outer, inn
        return [p], [], rot
    raise ValueError(name)


def _rotate(p: np.ndarray, rot: float) -> np.ndarray:
    c, s = np.cos(rot), np.sin(rot)
    return p @ np.array([[c, s], [-s, c]])


def _render_alpha(polys: list[np.ndarray], holes: list[np.ndarray]) -> tuple[np.ndarray, int, int]:
    """Anti-aliased coverage mask of polygons given in image coordinates.

    Returns (alpha float32 (h, w) in [0, 1], x0, y0) where (x0, y0) is the integer top-left corner.
    """
    allp = np.concatenate(polys)
    x0, y0 = np.floor(allp.min(0)).astype(int)
    x1, y1 = np.ceil(allp.max(0)).astype(int)
    w, h = max(1, x1 - x0), max(1, y1 - y0)
    mask = Image.new("L", (w * _SS, h * _SS), 0)
    draw = ImageDraw.Draw(mask)
    for p, fill in [(p, 255) for p in polys] + [(p, 0) for p in holes]:
        q = (p - [x0, y0]) * _SS
        draw.polygon([tuple(v) for v in q.tolist()], fill=fill)
    alpha = np.asarray(mask.resize((w, h), Image.BOX), dtype=np.float32) / 255.0
    return alpha, int(x0), int(y0)


def _paste(canvas: np.ndarray, alpha: np.ndarray, x0: int, y0: int, color: np.ndarray) -> tuple[slice, slice, np.ndarray]:
    """Alpha-blend ``color`` (3,) or (h, w, 3) into canvas; returns the clipped region and alpha."""
    H, W = canvas.shape[:2]
    h, w = alpha.shape
    cx0, cy0, cx1, cy1 = max(0, x0), max(0, y0), min(W, x0 + w), min(H, y0 + h)
    if cx1 <= cx0 or cy1 <= cy0:
        return slice(0, 0), slice(0, 0), np.zeros((0, 0), np.float32)
    a = alpha[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    if color.ndim == 3:
        color = color[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    region = canvas[cy0:cy1, cx0:cx1]
    region += (color - region) * a[..., None]
    return slice(cy0, cy1), slice(cx0, cx1), a


# ----------------------------------------------------------------------------- backgrounds


@lru_cache(maxsize=64)
def _grid(H: int, W: int) -> tuple[np.ndarray, np.ndarray]:
    yy, xx = np.mgrid[0:H, 0:W].astype(np.float32)
    yy.flags.writeable = xx.flags.writeable = False
    return yy, xx


def _background(rng: np.random.Generator, H: int, W: int) -> np.ndarray:
    """Gradient, low-frequency noise or stripe/checker texture (float32 HxWx3 in [0, 1])."""
    kind = int(rng.integers(4))
    c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    yy, xx = _grid(H, W)
    if kind == 0:  # linear gradient
        phi = rng.uniform(0, 2 * np.pi)
        t = xx * np.cos(phi) + yy * np.sin(phi)
        t = (t - t.min()) / max(1e-6, float(t.max() - t.min()))
    elif kind == 1:  # radial gradient
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        t = np.hypot(xx - cx, yy - cy)
        t = t / max(1e-6, float(t.max()))
    elif kind == 2:  # smooth blotches
        g = rng.uniform(0, 255, (int(rng.integers(3, 9)), int(rng.integers(3, 9)), 3)).astype(np.uint8)
        return np.asarray(Image.fromarray(g).resize((W, H), Image.BICUBIC), dtype=np.float32) / 255.0
    else:  # stripes or checker texture
        period = rng.uniform(4, 24)
        phi = rng.uniform(0, np.pi)
        u = xx * np.cos(phi) + yy * np.sin(phi)
        t = (np.floor(u / period) % 2).astype(np.float32)
        if rng.random() < 0.5:
            v = -xx * np.sin(phi) + yy * np.cos(phi)
            t = np.abs(t - (np.floor(v / period) % 2))
        c1 = c0 + (c1 - c0) * rng.uniform(0.15, 0.5)  # low-contrast texture
    return (c0 + (c1 - c0) * t[..., None]).astype(np.float32)


def _clutter(rng: np.random.Generator, canvas: np.ndarray, n: int) -> None:
    """Thin lines and open arcs: structure that no class shape resembles (no filled regions).

    Each item is rasterised only inside its own bounding box (2x supersampled) to keep generation fast.
    """
    H, W = canvas.shape[:2]
    ss = 2
    for _ in range(n):
        width = int(rng.integers(1, 4))  # in supersampled pixels: at most 1.5 px
        if rng.random() < 0.5:
            pts = rng.uniform(0, 1, (int(rng.integers(2, 4)), 2)) * [W, H]
        else:
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(6, max(7.0, W / 2))
            ang = rng.uniform(0, 2 * np.pi) + np.linspace(0, rng.uniform(0.7, 3.0), 24)
            pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        color = rng.uniform(0, 1, 3)
        x0, y0 = np.floor(np.maximum(pts.min(0) - 2, 0)).astype(int)
        x1, y1 = np.ceil(np.minimum(pts.max(0) + 2, [W, H])).astype(int)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        ImageDraw.Draw(mask).line([tuple(v) for v in ((pts - [x0, y0]) * ss).tolist()], fill=255, width=width)
        alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32) / 255.0
        _paste(canvas, alpha, int(x0), int(y0), color)


# ----------------------------------------------------------------------------- one image


def _sample_extent(rng: np.random.Generator, name: str, side: int) -> float:
    """An object's extent: a COCO-like size bin first, then a log-uniform segment area inside it."""
    f = _AREA_FACTOR[name]
    a_min = f * MIN_OBJECT_EXTENT ** 2
    a_max = max(a_min, f * (MAX_OBJECT_FRACTION * side) ** 2)
    edges = np.clip([a_min, (SIZE_BOUNDS[0] * side) ** 2, (SIZE_BOUNDS[1] * side) ** 2, a_max], a_min, a_max)
    b = int(rng.choice(3, p=SIZE_MIX))
    lo, hi = (edges[b], edges[b + 1]) if edges[b + 1] > edges[b] else (a_min, a_max)  # bin empty on tiny images
    area = float(np.exp(rng.uniform(np.log(lo), np.log(hi)))) if hi > lo else lo
    return float(np.sqrt(area / f))


def _overlaps(box: np.ndarray, placed: list[np.ndarray]) -> bool:
    """Whether ``box`` covers more than MAX_OVERLAP of itself or of an already placed box."""
    for q in placed:
        iw = min(box[2], q[2]) - max(box[0], q[0])
        ih = min(box[3], q[3]) - max(box[1], q[1])
        if iw > 0 and ih > 0:
            smaller = min((box[2] - box[0]) * (box[3] - box[1]), (q[2] - q[0]) * (q[3] - q[1]))
            if iw * ih > MAX_OVERLAP * smaller:
                return True
    return False


def _object_color(rng: np.random.Generator, under: np.ndarray) -> np.ndarray:
    """A random colour at least MIN_CONTRAST from ``under`` (the mean background colour below the
    object), so that no annotated object is invisible; the farthest of 10 draws otherwise."""
    best, best_d = None, -1.0
    for _ in range(10):
        c = rng.uniform(0, 1, 3)
        d = float(np.linalg.norm(c - under))
        if d > best_d:
            best, best_d = c, d
        if d >= MIN_CONTRAST:
            break
    return best


def _draw_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image; returns (uint8 HxWx3, [{"category_id", "bbox", "area"}...])."""
    lo, hi = int(round(image_size * 0.9)), int(round(image_size * 1.1))
    W, H = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    canvas = _background(rng, H, W)
    _clutter(rng, canvas, int(rng.integers(2, 8)))

    idmap = np.full((H, W), -1, dtype=np.int16)
    placed: list[np.ndarray] = []
    classes: list[int] = []
    for _ in range(int(rng.integers(3, 11))):
        cls = int(rng.integers(len(CATEGORIES)))
        name = CATEGORIES[cls]["name"]
        size = _sample_extent(rng, name, min(H, W))
        polys, holes, rot = _shape_polygons(name, rng)
        polys = [_rotate(p, rot) * size for p in polys]
        holes = [_rotate(p, rot) * size for p in holes]
        allp = np.concatenate(polys)
        pmin, pmax = allp.min(0), allp.max(0)
        if np.any(pmax - pmin > [W - 2, H - 2]):
            continue  # cannot fit (only on images far smaller than the demo's)
        for _attempt in range(20):  # objects lie inside the image and barely overlap
            c = rng.uniform([1 - pmin[0], 1 - pmin[1]], [W - 1 - pmax[0], H - 1 - pmax[1]])
            box = np.concatenate([pmin + c, pmax + c])
            if not _overlaps(box, placed):
                break
        else:
            continue
        alpha, x0, y0 = _render_alpha([p + c for p in polys], [p + c for p in holes])
        if (alpha >= 0.5).sum() < 3:
            continue  # too thin to have a visible pixel: not drawn, so nothing unannotated remains
        h, w = alpha.shape
        region = canvas[max(0, y0):y0 + h, max(0, x0):x0 + w]
        a = alpha[max(0, -y0):max(0, -y0) + region.shape[0], max(0, -x0):max(0, -x0) + region.shape[1]]
        under = (region * a[..., None]).sum((0, 1)) / max(float(a.sum()), 1e-6)
        base = _object_color(rng, under)
        # colour independent of class, with a mild shading gradient across the object
        shade = np.linspace(1 - rng.uniform(0, 0.2), 1 + rng.uniform(0, 0.2), max(h, w), dtype=np.float32)
        shade = shade[:w][None, :] if rng.random() < 0.5 else shade[:h][:, None]
        color = np.clip(base[None, None, :] * np.broadcast_to(shade, (h, w))[..., None], 0, 1).astype(np.float32)
        ys, xs, a = _paste(canvas, alpha, x0, y0, color)
        idmap[ys, xs][a >= 0.5] = len(classes)
        placed.append(box)
        classes.append(cls)

    anns = []
    for k, cls in enumerate(classes):
        vis = idmap == k  # MAX_OVERLAP < 1 leaves every placed object visible pixels
        n_vis = int(vis.sum())
        rows, cols = np.flatnonzero(vis.any(1)), np.flatnonzero(vis.any(0))
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
        anns.append({"category_id": CATEGORIES[cls]["id"],
                     "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "area": float(n_vis)})

    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 10))
    return np.clip(arr + 0.5, 0, 255).astype(np.uint8), anns


def _split_key(split_name: str) -> int:
    return zlib.crc32(split_name.encode())


def _write_range(start: int, stop: int, seed: int, image_size: int, split_name: str,
                 img_dir: Path) -> list[tuple[int, int, list[dict]]]:
    """Draw and save images ``start..stop-1``; returns [(width, height, annotations), ...]."""
    out = []
    for index in range(start, stop):
        rng = np.random.default_rng([seed, _split_key(split_name), index])
        pixels, anns = _draw_image(rng, image_size)
        Image.fromarray(pixels).save(Path(img_dir) / _file_name(split_name, index + 1), format="PNG",
                                     compress_level=1)
        out.append((int(pixels.shape[1]), int(pixels.shape[0]), anns))
    return out


def _write_parallel(bounds: list[int], seed: int, image_size: int, split_name: str,
                    img_dir: Path) -> list[tuple[int, int, list[dict]]]:
    """Run this module as worker processes on contiguous index ranges.

    Plain subprocesses rather than multiprocessing: spawn re-imports the caller's ``__main__``
    (breaking unguarded user scripts) and fork is unsafe once torch has started threads.
    """
    procs = []
    for start, stop in zip(bounds[:-1], bounds[1:]):
        args = json.dumps([start, stop, seed, image_size, split_name, str(img_dir)])
        # Run this file as a script (-I: isolated, so the sibling types.py cannot shadow the stdlib
        # module): it imports only numpy/PIL, not the (heavier) bench package.
        procs.append(subprocess.Popen([sys.executable, "-I", str(Path(__file__).resolve()), args],
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    results = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"synthetic data worker failed: {err.decode(errors='replace')[-2000:]}")
        results.extend(tuple(r) for r in json.loads(out))
    return results


def _file_name(split_name: str, image_id: int) -> str:
    return f"{split_name}_{image_id:06d}.png"


def generate(out_dir: Path, num_images: int, seed: int, image_size: int = 160, split_name: str = "train",
             workers: int | None = None) -> Path:
    """Write ``out_dir/images/<split>/*.png`` and ``out_dir/annotations/instances_<split>.json``.

    Image ids are 1..num_images; the JSON follows COCO (bbox xywh of the *visible* part, ``area`` =
    visible pixel count as COCO's segmentation area, ``iscrowd`` 0). Returns the JSON path.
    ``workers`` processes draw images in parallel (default: up to 8 CPUs for >= 64 images); the
    output does not depend on it because each image has its own random stream.
    """
    out_dir = Path(out_dir)
    img_dir = out_dir / "images" / split_name
    ann_dir = out_dir / "annotations"
    img_dir.mkdir(parents=True, exist_ok=True)
    ann_dir.mkdir(parents=True, exist_ok=True)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if num_images >= 64 else 1
    workers = max(1, min(workers, num_images))
    bounds = np.linspace(0, num_images, workers + 1).round().astype(int).tolist()
    if workers == 1:
        results = _write_range(0, num_images, seed, image_size, split_name, img_dir)
    else:
        results = _write_parallel(bounds, seed, image_size, split_name, img_dir)
    images, annotations = [], []
    for i, (width, height, anns) in enumerate(results):
        image_id = i + 1
        images.append({"id": image_id, "file_name": _file_name(split_name, image_id),
                       "width": width, "height": height})
        for a in anns:
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "iscrowd": 0, **a})
    doc = {
        "info": {"description": "lsm-bench synthetic shapes", "version": GENERATOR_VERSION,
                 "seed": seed, "image_size": image_size, "split": split_name},
        "licenses": [],
        "images": images,
        "annotations": annotations,
        "categories": [dict(c, supercategory="shape") for c in CATEGORIES],
    }
    path = ann_dir / f"instances_{split_name}.json"
    path.write_text(json.dumps(doc, separators=(",", ":")))
    return path


def demo_hash(seed: int, train_images: int, val_images: int, image_size: int) -> str:
    """Cache key of a demo data set: the generator parameters plus GENERATOR_VERSION."""
    params = {"version": GENERATOR_VERSION, "seed": seed, "train_images": train_images,
              "val_images": val_images, "image_size": image_size}
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def ensure_demo_data(home: Path, seed: int = 0, train_images: int = 600, val_images: int = 150,
                     image_size: int = 160) -> dict[str, Path]:
    """Generate the demo set once under ``home/data/synth-<hash>/`` and return its paths.

    Generation happens in a temporary sibling directory renamed into place at the end, so an
    interrupted run never leaves a half data set behind and a finished one is reused as is.
    """
    data_dir = Path(home) / "data"
    root = data_dir / f"synth-{demo_hash(seed, train_images, val_images, image_size)}"
    result = {"train": root / "annotations" / "instances_train.json",
              "val": root / "annotations" / "instances_val.json", "root": root}
    if result["train"].is_file() and result["val"].is_file():
        return result
    data_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.tmp-", dir=data_dir))
    try:
        t0 = time.perf_counter()
        generate(tmp, train_images, seed, image_size, "train")
        generate(tmp, val_images, seed, image_size, "val")
        (tmp / "generated.json").write_text(json.dumps(
            {"version": GENERATOR_VERSION, "seed": seed, "train_images": train_images,
             "val_images": val_images, "image_size": image_size,
             "seconds": round(time.perf_counter() - t0, 2)}, indent=1))
        try:
            os.rename(tmp, root)
        except OSError:
            if not (result["train"].is_file() and result["val"].is_file()):
                raise  # not a concurrent writer that finished first: a real error
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return result


if __name__ == "__main__":  # worker entry point of _write_parallel
    _a = json.loads(sys.argv[1])
    print(json.dumps(_write_range(*_a[:5], Path(_a[5]))))
