"""STAC's strong augmentation: colour-op strengths by hand, where each op may change pixels, the
matrix of the global affine, and determinism."""

import numpy as np
import pytest
from PIL import Image

from adapters.stac_augment import COLOR_OPS, color_op, cutout, in_box_affine, strong_augment
from core.data.transforms import FILL


def _flat(value: int, size=(8, 8)) -> Image.Image:
    return Image.new("RGB", size, (value, value, value))


@pytest.mark.parametrize("name,level,pixel,want", [
    ("Solarize", 5, 200, 55),     # threshold 256 - 128 = 128: 200 -> 255 - 200
    ("Solarize", 5, 100, 100),    # below the threshold: unchanged
    ("Posterize", 5, 203, 192),   # 4 - int(2.0) = 2 bits kept: 0b11001011 -> 0b11000000
    ("Posterize", 9, 203, 128),   # 4 - int(3.6) = 1 bit
    ("Brightness", 1, 100, 28),   # factor 0.1 + 1.8 * 0.1 = 0.28
    ("Brightness", 5, 100, 100),  # factor 1.0
    ("Identity", 9, 77, 77),
])
def test_colour_op_strengths_by_hand(name, level, pixel, want):
    out = np.asarray(color_op(_flat(pixel), name, level))
    assert (out == want).all()


def test_every_colour_op_keeps_size_and_mode():
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 16, 3), dtype=np.uint8))
    for name in COLOR_OPS:
        for level in (1, 9):
            out = color_op(img, name, level)
            assert out.size == img.size and out.mode == "RGB", name


def test_in_box_affine_changes_only_the_box_pixels():
    arr = np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    box = np.array([10.7, 5.2, 31.9, 27.0])  # integer-truncated: columns 10..30, rows 5..26
    out = np.asarray(in_box_affine(Image.fromarray(arr), box, np.random.default_rng(3)))
    changed = (out != arr).any(axis=2)
    assert changed.any()
    rows, cols = np.nonzero(changed)
    assert rows.min() >= 5 and rows.max() < 27 and cols.min() >= 10 and cols.max() < 31


def test_cutout_paints_up_to_five_grey_squares_of_a_fifth_of_the_side_or_nothing():
    full_square, empty = False, False
    for seed in range(40):
        out = np.asarray(cutout(_flat(0, (50, 40)), np.random.default_rng(seed)))
        grey = (out == FILL).all(axis=2)
        assert ((out == 0).all(axis=2) | grey).all()  # nothing but the fill is painted
        assert grey.sum() <= 5 * 8 * 8  # at most 5 squares of side 0.2 * 40 = 8
        empty |= not grey.any()  # the size-0 choice: no cutout at all
        full_square |= any(grey[r:r + 8, c:c + 8].all() for r in range(33) for c in range(43))
    assert full_square and empty


def test_strong_augment_matrix_is_identity_unless_a_global_affine_moved_the_pixels():
    img = Image.fromarray(np.random.default_rng(2).integers(0, 256, (32, 48, 3), dtype=np.uint8))
    boxes = np.array([[4.0, 4.0, 20.0, 20.0]])
    moved = 0
    for seed in range(60):
        out, m = strong_augment(img, boxes, np.random.default_rng(seed))
        again, m2 = strong_augment(img, boxes, np.random.default_rng(seed))
        assert np.array_equal(np.asarray(out), np.asarray(again)) and np.array_equal(m, m2)  # deterministic
        assert out.size == img.size
        if not np.allclose(m, np.eye(3)):
            moved += 1
            assert abs(np.linalg.det(m[:2, :2]) - 1) < 1e-6  # translate / rotate / shear keep the area
    assert 15 <= moved <= 45  # the global affine is one of the two geometric choices
