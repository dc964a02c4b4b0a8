from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from core.data.transforms import (ViewSettings, HorizontalFlip, ResizeShortestEdge, _blur_kernel, make_views,
                                   relative_matrix, strong_photometric, transform_boxes)
from core.data.types import ImageRecord
from core.errors import BenchError


def record(w, h, boxes, crowd=None):
    n = len(boxes)
    return ImageRecord(id=1, file=Path("x.png"), width=w, height=h, boxes=boxes, labels=list(range(n)),
                       iscrowd=crowd or [False] * n, ann_ids=list(range(n)))


def image(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def test_resize_shortest_edge_maps_boxes():
    cfg = ViewSettings(short_sizes=(25,), max_size=1000, flip_prob=0.0)
    v = make_views(image(100, 50), record(100, 50, [[10, 10, 30, 20]]), np.random.default_rng(0), cfg, ("weak",))["weak"]
    assert tuple(v.image.shape) == (3, 25, 50)
    assert v.boxes.tolist() == [[5.0, 5.0, 15.0, 10.0]]
    np.testing.assert_allclose(v.matrix, np.diag([0.5, 0.5, 1.0]))
    # max_size caps the long side: 100x50 at short 40 would be 80 wide -> capped to 60x30
    assert ResizeShortestEdge.output_size(100, 50, 40, 60) == (60, 30)
    assert ResizeShortestEdge.output_size(50, 100, 25, 1000) == (25, 50)


def test_flip_maps_boxes():
    cfg = ViewSettings(short_sizes=(50,), max_size=1000, flip_prob=1.0)
    img = image(100, 50)
    v = make_views(img, record(100, 50, [[10, 5, 30, 15]]), np.random.default_rng(0), cfg, ("weak",))["weak"]
    assert v.boxes.tolist() == [[70.0, 5.0, 90.0, 15.0]]
    expected = torch.from_numpy(np.asarray(img)[:, ::-1].copy()).permute(2, 0, 1).float() / 255
    assert torch.equal(v.image, expected)
    _, m = HorizontalFlip(0.0)(img, np.random.default_rng(0))
    np.testing.assert_array_equal(m, np.eye(3))


def test_transform_boxes_affine_and_relative_matrix():
    m = np.array([[2.0, 0, 3], [0, 0.5, -1], [0, 0, 1]])
    np.testing.assert_allclose(transform_boxes(np.array([[10, 10, 20, 30]], np.float32), m), [[23, 4, 43, 14]])
    flip = np.array([[-1.0, 0, 100], [0, 1, 0], [0, 0, 1]])
    out = transform_boxes(torch.tensor([[10.0, 5, 30, 15]]), flip)
    assert isinstance(out, torch.Tensor) and out.tolist() == [[70.0, 5.0, 90.0, 15.0]]
    # two independently augmented views: boxes of one map onto the other through relative_matrix
    cfg = ViewSettings(short_sizes=(40, 60, 80), max_size=1000, flip_prob=0.5, independent_strong=True, strong=False)
    rec = record(100, 50, [[10, 5, 30, 15], [50, 20, 90, 45]])
    for seed in range(6):
        views = make_views(image(100, 50), rec, np.random.default_rng(seed), cfg)
        w, s = views["weak"], views["strong"]
        rel = relative_matrix(w, s)
        np.testing.assert_allclose(transform_boxes(w.boxes.numpy(), rel), s.boxes.numpy(), atol=1e-4)
        np.testing.assert_allclose(relative_matrix(s, w) @ rel, np.eye(3), atol=1e-12)


def test_strong_view_is_pixel_aligned():
    cfg = ViewSettings(short_sizes=(64,), max_size=1000, flip_prob=0.5)
    rec = record(96, 64, [[10, 10, 40, 30], [50, 5, 90, 60]])
    differs = 0
    for seed in range(5):
        v = make_views(image(96, 64), rec, np.random.default_rng(seed), cfg)
        w, s = v["weak"], v["strong"]
        assert torch.equal(w.boxes, s.boxes) and torch.equal(w.labels, s.labels)
        np.testing.assert_array_equal(w.matrix, s.matrix)
        assert w.image.shape == s.image.shape and s.image.dtype == torch.float32
        assert 0.0 <= s.image.min() and s.image.max() <= 1.0
        differs += not torch.equal(w.image, s.image)
    assert differs >= 4


def test_determinism():
    cfg = ViewSettings(short_sizes=(48, 56, 64), max_size=1000)
    rec = record(80, 60, [[10, 10, 40, 30]])

    def run(seed):
        return make_views(image(80, 60), rec, np.random.default_rng(seed), cfg, ("weak", "strong", "test"))

    a, b = run(7), run(7)
    for name in ("weak", "strong", "test"):
        assert torch.equal(a[name].image, b[name].image) and torch.equal(a[name].boxes, b[name].boxes)
    outs = [run(s)["strong"].image for s in range(8)]
    assert sum(not torch.equal(outs[0], o) if o.shape == outs[0].shape else True for o in outs[1:]) == 7
    # the weak view does not depend on which other views were requested
    weak_only = make_views(image(80, 60), rec, np.random.default_rng(7), cfg, ("weak",))["weak"]
    assert torch.equal(weak_only.image, a["weak"].image)


def test_test_view_fixed_size_no_flip():
    cfg = ViewSettings(short_sizes=(10,), max_size=1000, flip_prob=1.0, test_size=30)
    v = make_views(image(60, 40), record(60, 40, [[6, 4, 12, 8]]), np.random.default_rng(0), cfg, ("test",))["test"]
    assert tuple(v.image.shape) == (3, 30, 45)
    np.testing.assert_allclose(v.boxes.numpy(), [[4.5, 3, 9, 6]])


def test_crowd_and_degenerate_boxes_dropped():
    cfg = ViewSettings(short_sizes=(50,), max_size=1000, flip_prob=0.0, min_box_size=0.5)
    rec = record(100, 100, [[10, 10, 20, 20], [30, 30, 50, 50], [60, 60, 60.8, 70]], crowd=[False, True, False])
    v = make_views(image(100, 100), rec, np.random.default_rng(0), cfg, ("weak", "strong"))
    for name in ("weak", "strong"):
        assert v[name].boxes.tolist() == [[5.0, 5.0, 10.0, 10.0]] and v[name].labels.tolist() == [0]
        assert v[name].dropped_crowd == 1 and v[name].dropped_degenerate == 1


def test_tiny_images_and_blur_kernel():
    assert _blur_kernel(2.0, 3, 5) == 3 and _blur_kernel(2.0, 4, 4) == 3 and _blur_kernel(2.0, 1, 9) == 1
    assert _blur_kernel(0.1, 100, 100) == 3 and _blur_kernel(2.0, 100, 100) == 13
    for seed in range(30):
        out = strong_photometric(torch.rand(3, 2, 3), np.random.default_rng(seed))
        assert out.shape == (3, 2, 3) and torch.isfinite(out).all()


def test_size_mismatch_and_unknown_view():
    with pytest.raises(BenchError, match=r"image 1 \(x\.png\) is 50x40 but its annotation says 60x40"):
        make_views(image(50, 40), record(60, 40, []), np.random.default_rng(0), ViewSettings())
    with pytest.raises(BenchError, match="unknown view name"):
        make_views(image(60, 40), record(60, 40, []), np.random.default_rng(0), ViewSettings(), ("weird",))
