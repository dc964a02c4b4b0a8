import json

import numpy as np
import pytest
from PIL import Image

from core.data.coco import load_coco
from core.data import synth
from core.data.synth import CATEGORIES, MIN_OBJECT_EXTENT, SIZE_BOUNDS, SIZE_MIX, ensure_demo_data, generate


@pytest.fixture(scope="module")
def synth40(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth40")
    return out, generate(out, 40, seed=3, workers=1)


def test_deterministic_bytes(synth40, tmp_path):
    out, path = synth40
    again = generate(tmp_path / "a", 5, seed=3, workers=1)  # fewer images: each image has its own stream
    full = json.loads(path.read_text())
    part = json.loads(again.read_text())
    assert part["images"] == full["images"][:5]
    assert [a for a in full["annotations"] if a["image_id"] <= 5] == part["annotations"]
    for im in part["images"]:
        f = im["file_name"]
        assert (tmp_path / "a" / "images" / "train" / f).read_bytes() == (out / "images" / "train" / f).read_bytes()
    # same arguments -> byte-identical JSON, also with parallel workers
    par = generate(tmp_path / "b", 5, seed=3, workers=2)
    assert par.read_bytes() == again.read_bytes()
    assert (tmp_path / "b/images/train/train_000004.png").read_bytes() == \
        (tmp_path / "a/images/train/train_000004.png").read_bytes()
    generate(tmp_path / "c", 2, seed=4, workers=1)  # another seed -> other pixels
    assert (tmp_path / "c/images/train/train_000001.png").read_bytes() != \
        (tmp_path / "a/images/train/train_000001.png").read_bytes()


def test_content_distribution(synth40):
    out, path = synth40
    doc = json.loads(path.read_text())
    ids = [c["id"] for c in doc["categories"]]
    assert len(ids) == len(CATEGORIES) == 6 and ids != list(range(1, len(ids) + 1))  # non-contiguous on purpose
    size = {im["id"]: (im["width"], im["height"]) for im in doc["images"]}
    assert all(144 <= w <= 176 and 144 <= h <= 176 for w, h in size.values())
    assert len(set(size.values())) > 1  # sizes vary: padding/batching is exercised
    assert len({a["category_id"] for a in doc["annotations"]}) == len(CATEGORIES)
    for a in doc["annotations"]:
        x, y, w, h = a["bbox"]
        W, H = size[a["image_id"]]
        # every object lies inside its image (nothing truncated), at least the separability floor
        assert 1 <= x and 1 <= y and x + w <= W - 1 and y + h <= H - 1
        assert max(w, h) >= MIN_OBJECT_EXTENT - 1
        assert 3 <= a["area"] <= w * h and a["iscrowd"] == 0
    # the reader maps the ids to contiguous labels and finds every image
    ds = load_coco(path, out / "images" / "train")
    assert ds.num_classes == len(CATEGORIES) and ds.categories[2]["id"] == 7
    im = Image.open(ds.records[0].file)
    assert im.mode == "RGB" and im.size == (ds.records[0].width, ds.records[0].height)


def test_size_mix_follows_coco(tmp_path):
    """About 40 / 35 / 25 % small / medium / large by segment area, COCO's bounds scaled to the image."""
    doc = json.loads(generate(tmp_path, 150, seed=5, image_size=128, workers=1).read_text())
    area = np.array([a["area"] for a in doc["annotations"]])
    small, large = (SIZE_BOUNDS[0] * 128) ** 2, (SIZE_BOUNDS[1] * 128) ** 2
    fractions = [(area < small).mean(), ((area >= small) & (area < large)).mean(), (area >= large).mean()]
    assert len(area) > 600
    for got, want in zip(fractions, SIZE_MIX):
        assert abs(got - want) < 0.07, (fractions, SIZE_MIX)


def test_every_drawn_object_is_annotated(monkeypatch):
    """Objects are the only per-pixel-coloured pastes (clutter is one colour): each one drawn has
    exactly one annotation of its class, and objects barely overlap."""
    drawn = []
    real_paste = synth._paste

    def counting_paste(canvas, alpha, x0, y0, color):
        if color.ndim == 3:
            drawn.append((x0, y0) + alpha.shape)
        return real_paste(canvas, alpha, x0, y0, color)

    monkeypatch.setattr(synth, "_paste", counting_paste)
    for index in range(30):
        drawn.clear()
        _, anns = synth._draw_image(np.random.default_rng([9, index]), 128)
        assert len(anns) == len(drawn) >= 1
        boxes = np.array([[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]]
                          for a in anns])
        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                iw = min(boxes[i, 2], boxes[j, 2]) - max(boxes[i, 0], boxes[j, 0])
                ih = min(boxes[i, 3], boxes[j, 3]) - max(boxes[i, 1], boxes[j, 1])
                smaller = min(np.prod(boxes[i, 2:] - boxes[i, :2]), np.prod(boxes[j, 2:] - boxes[j, :2]))
                # pixel boxes are up to a pixel larger per side than the placed outlines
                assert max(iw, 0) * max(ih, 0) <= synth.MAX_OVERLAP * smaller + 2 * (max(iw, 0) + max(ih, 0))


def test_ensure_demo_data_caches(tmp_path):
    r1 = ensure_demo_data(tmp_path, seed=1, train_images=6, val_images=3, image_size=64)
    assert r1["root"].name.startswith("synth-") and r1["root"].parent == tmp_path / "data"
    assert r1["train"].is_file() and r1["val"].is_file()
    assert len(json.loads(r1["val"].read_text())["images"]) == 3
    assert len(list((r1["root"] / "images" / "train").glob("*.png"))) == 6
    stamp = r1["train"].stat().st_mtime_ns
    r2 = ensure_demo_data(tmp_path, seed=1, train_images=6, val_images=3, image_size=64)
    assert r2 == r1 and r2["train"].stat().st_mtime_ns == stamp
    r3 = ensure_demo_data(tmp_path, seed=2, train_images=6, val_images=3, image_size=64)
    assert r3["root"] != r1["root"]
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == sorted([r1["root"].name, r3["root"].name])
    # val images come from their own stream, not a copy of train
    assert (r1["root"] / "images/val/val_000001.png").read_bytes() != \
        (r1["root"] / "images/train/train_000001.png").read_bytes()
