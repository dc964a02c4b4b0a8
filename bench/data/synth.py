"""Deterministic synthetic detection data: the default demo and test data set.

No real multi-class detection set is available offline, so the demo runs on generated shapes. The
generator is built to contain what LSM exploits: object sizes are log-uniform (a long tail of
4-16 px objects), images are blurred and noisy, backgrounds are textured, clutter that is not an
object is drawn, several classes look alike (circle/ellipse, square/rectangle, triangle/arrow,
ring/circle, plus/cross/star) and colour carries no class information. Small objects are therefore
genuinely harder than large ones, so low-confidence pseudo-labels exist and their quality correlates
with area.

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

GENERATOR_VERSION = "1"

# Deliberately non-contiguous ids: readers must map them to contiguous labels and back.
CATEGORIES: list[dict] = [
    {"id": 1, "name": "circle"},
    {"id": 2, "name": "ellipse"},
    {"id": 3, "name": "square"},
    {"id": 5, "name": "rectangle"},
    {"id": 7, "name": "triangle"},
    {"id": 8, "name": "arrow"},
    {"id": 11, "name": "ring"},
    {"id": 13, "name": "plus"},
    {"id": 17, "name": "cross"},
    {"id": 20, "name": "star"},
]

MIN_OBJECT_SIZE = 4.0  # px, longest extent of the un-rotated shape
MAX_OBJECT_FRACTION = 0.6  # of the shorter image side
MAX_OCCLUDED = 0.7  # annotations hidden by more than this fraction are dropped
_SS = 4  # supersampling factor for anti-aliased shape masks


# ----------------------------------------------------------------------------- shapes


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    a = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(a), radius * np.sin(a)], axis=1)


def _shape_polygons(name: str, rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], float]:
    """Unit-size outline(s) of one class instance: (filled polygons, holes, rotation in radians).

    Coordinates lie roughly in [-0.5, 0.5]; the caller scales by the object size. Rotation ranges
    are chosen so that similar classes stay separable in principle (plus vs cross differ by angle).
    """
    rot = float(rng.uniform(0, 2 * np.pi))
    if name == "circle":
        return [_regular(40, 0.5)], [], 0.0
    if name == "ellipse":
        aspect = rng.uniform(1.35, 1.8)
        p = _regular(40, 0.5)
        p[:, 1] /= aspect
        return [p], [], rot
    if name == "square":
        return [np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])], [], rot
    if name == "rectangle":
        h = 0.5 / rng.uniform(1.35, 1.8)
        return [np.array([[-0.5, -h], [0.5, -h], [0.5, h], [-0.5, h]])], [], rot
    if name == "triangle":
        return [_regular(3, 0.55, -np.pi / 2) + [0, 0.1]], [], rot
    if name == "arrow":
        # A triangle head on a short stem: close to "triangle" when small and blurred.
        stem = rng.uniform(0.12, 0.2)
        p = np.array([[0.0, -0.5], [0.5, 0.05], [stem, 0.05], [stem, 0.5], [-stem, 0.5],
                      [-stem, 0.05], [-0.5, 0.05]])
        return [p], [], rot
    if name == "ring":
        inner = rng.uniform(0.25, 0.35)  # a thick ring: looks like a disc once blurred
        return [_regular(40, 0.5)], [_regular(40, inner)], 0.0
    if name in ("plus", "cross"):
        w = rng.uniform(0.13, 0.2)
        p = np.array([[-w, -0.5], [w, -0.5], [w, -w], [0.5, -w], [0.5, w], [w, w], [w, 0.5],
                      [-w, 0.5], [-w, w], [-0.5, w], [-0.5, -w], [-w, -w]])
        base = 0.0 if name == "plus" else np.pi / 4
        return [p], [], base + float(rng.uniform(-np.pi / 12, np.pi / 12))
    if name == "star":
        inner = rng.uniform(0.2, 0.28)
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


def _clutter(rng: np.random.Generator, canvas: np.ndarray, idmap: np.ndarray | None, n: int) -> None:
    """Lines, arcs and irregular blobs that are not objects (marked -1 in ``idmap`` if given).

    Each item is rasterised only inside its own bounding box (2x supersampled) to keep generation fast.
    """
    H, W = canvas.shape[:2]
    ss = 2
    for _ in range(n):
        kind = 0 if idmap is not None else int(rng.integers(3))
        width = int(rng.integers(1, 5))  # in supersampled pixels
        if kind == 0:
            pts = rng.uniform(0, 1, (int(rng.integers(2, 4)), 2)) * [W, H]
        elif kind == 1:
            cx, cy, r = rng.uniform(0, W), rng.uniform(0, H), rng.uniform(3, W / 2)
            a0 = rng.uniform(0, 2 * np.pi)
            ang = a0 + np.linspace(0, rng.uniform(0.7, 3.5), 24)
            pts = np.stack([cx + r * np.cos(ang), cy + r * np.sin(ang)], 1)
        else:  # irregular blob: random radii so it matches no class outline
            k = int(rng.integers(5, 10))
            ang = np.sort(rng.uniform(0, 2 * np.pi, k))
            rad = rng.uniform(0.3, 1.0, k) * rng.uniform(2, W * 0.2)
            cx, cy = rng.uniform(0, W), rng.uniform(0, H)
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1)
        color = rng.uniform(0, 1, 3)
        x0, y0 = np.floor(np.maximum(pts.min(0) - 2, 0)).astype(int)
        x1, y1 = np.ceil(np.minimum(pts.max(0) + 2, [W, H])).astype(int)
        if x1 <= x0 or y1 <= y0:
            continue
        mask = Image.new("L", ((x1 - x0) * ss, (y1 - y0) * ss), 0)
        d = ImageDraw.Draw(mask)
        q = [tuple(v) for v in ((pts - [x0, y0]) * ss).tolist()]
        if kind == 2:
            d.polygon(q, fill=255)
        else:
            d.line(q, fill=255, width=width)
        alpha = np.asarray(mask.resize((x1 - x0, y1 - y0), Image.BOX), dtype=np.float32) / 255.0
        _paste(canvas, alpha, int(x0), int(y0), color)
        if idmap is not None:
            idmap[y0:y1, x0:x1][alpha >= 0.5] = -1


# ----------------------------------------------------------------------------- one image


def _draw_image(rng: np.random.Generator, image_size: int) -> tuple[np.ndarray, list[dict]]:
    """Draw one image; returns (uint8 HxWx3, [{"category_id", "bbox", "area"}...])."""
    lo, hi = int(round(image_size * 0.9)), int(round(image_size * 1.1))
    W, H = int(rng.integers(lo, hi + 1)), int(rng.integers(lo, hi + 1))
    canvas = _background(rng, H, W)
    _clutter(rng, canvas, None, int(rng.integers(2, 8)))

    idmap = np.full((H, W), -1, dtype=np.int16)
    full_area: list[int] = []
    regions: list[tuple[slice, slice]] = []
    classes: list[int] = []
    max_size = MAX_OBJECT_FRACTION * min(H, W)
    for k in range(int(rng.integers(3, 11))):
        cls = int(rng.integers(len(CATEGORIES)))
        size = float(np.exp(rng.uniform(np.log(MIN_OBJECT_SIZE), np.log(max_size))))
        cx, cy = rng.uniform(0, W), rng.uniform(0, H)
        polys, holes, rot = _shape_polygons(CATEGORIES[cls]["name"], rng)
        polys = [_rotate(p, rot) * size + [cx, cy] for p in polys]
        holes = [_rotate(p, rot) * size + [cx, cy] for p in holes]
        alpha, x0, y0 = _render_alpha(polys, holes)
        # Colour independent of class, with a mild shading gradient across the object.
        base = rng.uniform(0, 1, 3)
        h, w = alpha.shape
        shade = np.linspace(1 - rng.uniform(0, 0.25), 1 + rng.uniform(0, 0.25), max(h, w), dtype=np.float32)
        shade = shade[:w][None, :] if rng.random() < 0.5 else shade[:h][:, None]
        color = np.clip(base[None, None, :] * np.broadcast_to(shade, (h, w))[..., None], 0, 1).astype(np.float32)
        ys, xs, a = _paste(canvas, alpha, x0, y0, color)
        full_area.append(int((alpha >= 0.5).sum()))
        regions.append((ys, xs))
        idmap[ys, xs][a >= 0.5] = k
        classes.append(cls)
    _clutter(rng, canvas, idmap, int(rng.integers(0, 3)))  # thin lines over objects

    visible_counts = np.bincount(idmap.ravel().astype(np.int64) + 1, minlength=len(classes) + 1)
    anns = []
    for k, cls in enumerate(classes):
        ys, xs = regions[k]
        n_vis = int(visible_counts[k + 1])
        # full_area includes pixels outside the image: truncation counts as occlusion
        if full_area[k] == 0 or n_vis < 3 or n_vis < (1 - MAX_OCCLUDED) * full_area[k]:
            continue
        vis = idmap[ys, xs] == k  # an object's pixels can only lie inside its own paste region
        rows, cols = np.flatnonzero(vis.any(1)) + ys.start, np.flatnonzero(vis.any(0)) + xs.start
        x0, x1, y0, y1 = int(cols[0]), int(cols[-1]) + 1, int(rows[0]), int(rows[-1]) + 1
        anns.append({"category_id": CATEGORIES[cls]["id"],
                     "bbox": [float(x0), float(y0), float(x1 - x0), float(y1 - y0)],
                     "area": float(n_vis)})

    img = Image.fromarray((canvas * 255 + 0.5).astype(np.uint8))
    img = img.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.1))))
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.standard_normal(arr.shape, dtype=np.float32) * np.float32(rng.uniform(2, 12))
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
