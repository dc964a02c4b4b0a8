"""STAC's strong augmentation of the unlabeled images (the original's `RandomAugmentBBox('strong')`).

After the resize (no flip for unlabeled images in the original's stage 3), three groups: a colour
op and a geometric op in random order, then cutout:
- colour: one RandAugment op from COLOR_OPS at a level drawn from 1..9 of 10, with AutoAugment's
  level -> strength maps (enhance factor 0.1 + 1.8 level/10, solarize threshold 256 - 25.6 level,
  posterize to 4 - int(0.4 level) bits);
- geometric, one of two: a global affine (OneOf translate x / y +-10 %, rotate +-30 deg, shear
  +-30 deg, grey fill; the boxes follow through the view's matrix) or an in-box affine (one
  pseudo-box's pixels get a weak affine: +-5 %, +-10 deg; the boxes stay);
- cutout: 1 to 5 grey squares whose side is 0 or 0.2 of the image's shorter side (imgaug's list
  means one of the two values), centred anywhere in the image.
Every draw comes from the generator passed in, so a view is a pure function of its seed.
Differences from the original: pixels are cut out with grey 125 (imgaug's constant mode uses 128),
and an image whose pseudo-boxes all leave the view keeps none (the original restores the
un-augmented boxes, which then no longer match the pixels).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from core.data.coco import load_image
from core.data.transforms import (FILL, ViewSettings, ResizeShortestEdge, View, boxes_in_view, random_geometric,
                                   to_tensor, transform_boxes)

COLOR_OPS = ("Identity", "AutoContrast", "Equalize", "Solarize", "Color", "Contrast", "Brightness",
             "Sharpness", "Posterize")
MAX_LEVEL = 10  # levels are drawn from 1 .. MAX_LEVEL - 1, strengths scale with level / MAX_LEVEL
_ENHANCERS = {"Color": ImageEnhance.Color, "Contrast": ImageEnhance.Contrast,
              "Brightness": ImageEnhance.Brightness, "Sharpness": ImageEnhance.Sharpness}


def color_op(image: Image.Image, name: str, level: int) -> Image.Image:
    """One RandAugment colour op at `level` (of MAX_LEVEL)."""
    if name == "Identity":
        return image
    if name == "AutoContrast":
        return ImageOps.autocontrast(image)
    if name == "Equalize":
        return ImageOps.equalize(image)
    if name == "Solarize":
        return ImageOps.solarize(image, 256 - int(level * 256 / MAX_LEVEL))
    if name == "Posterize":
        return ImageOps.posterize(image, 4 - int(level * 4 / MAX_LEVEL))
    return _ENHANCERS[name](image).enhance(0.1 + 1.8 * level / MAX_LEVEL)


def in_box_affine(image: Image.Image, box: np.ndarray, rng: np.random.Generator) -> Image.Image:
    """The pixels of one box (integer-truncated, as the original's crop) through a weak affine."""
    x0, y0, x1, y1 = (int(v) for v in box)
    x0, y0 = max(x0, 0), max(y0, 0)
    x1, y1 = min(x1, image.size[0]), min(y1, image.size[1])
    if x1 - x0 < 1 or y1 - y0 < 1:
        return image
    crop, _ = random_geometric(image.crop((x0, y0, x1, y1)), rng, translate=0.05, rotate=10.0, shear=10.0)
    out = image.copy()
    out.paste(crop, (x0, y0))
    return out


def cutout(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    w, h = image.size
    count = int(rng.integers(1, 6))
    side = int(round(float(rng.choice([0.0, 0.2])) * min(w, h)))
    if side == 0:
        return image
    arr = np.array(image)
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        x0, y0 = int(max(cx - side / 2, 0)), int(max(cy - side / 2, 0))
        arr[y0:int(min(cy + side / 2, h)), x0:int(min(cx + side / 2, w))] = FILL
    return Image.fromarray(arr)


def strong_augment(image: Image.Image, boxes: np.ndarray, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
    """STAC's strong augmentation of a resized image whose pseudo-boxes (xyxy, its pixels) are
    `boxes`; returns the image and the 3x3 matrix of its geometry (identity unless a global affine)."""
    matrix = np.eye(3)
    colour_first = bool(rng.integers(2))
    for group in (("colour", "geometric") if colour_first else ("geometric", "colour")):
        if group == "colour":
            image = color_op(image, COLOR_OPS[int(rng.integers(len(COLOR_OPS)))], int(rng.integers(1, MAX_LEVEL)))
        elif rng.integers(2) == 0:  # in-box, on one pseudo-box drawn uniformly
            if len(boxes):
                image = in_box_affine(image, boxes[int(rng.integers(len(boxes)))], rng)
        else:
            image, matrix = random_geometric(image, rng, translate=0.1, rotate=30.0, shear=30.0)
    return cutout(image, rng), matrix


def stac_view(record, short_sizes: tuple[int, ...], max_size: int, pseudo_boxes: np.ndarray,
              rng: np.random.Generator) -> View:
    """The student's strong view of an unlabeled image: resize, then `strong_augment` with the image's
    selected pseudo-boxes (ORIGINAL pixels). `matrix` maps original -> view; the view's boxes are the
    hidden ground truth (pseudo-label statistics only)."""
    image = load_image(record.file)
    img, m = ResizeShortestEdge(short_sizes, max_size)(image, rng)
    img, g = strong_augment(img, transform_boxes(pseudo_boxes.astype(np.float64), m), rng)
    m = g @ m
    keep = ~record.iscrowd
    gt, labels, n_bad = boxes_in_view(record.boxes[keep], record.labels[keep], m, img.size[0], img.size[1],
                                      ViewSettings.min_box_size)
    return View(image=to_tensor(img), boxes=gt, labels=labels, matrix=m, dropped_crowd=int(record.iscrowd.sum()),
                dropped_degenerate=n_bad)
