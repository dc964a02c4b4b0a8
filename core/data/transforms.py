"""Box-aware augmentation producing the weak / strong / test views of one image.

Every random number is drawn from an explicit ``numpy.random.Generator`` (never global RNG state),
so a view is a pure function of (image, record, generator seed, config): the loader can resume
exactly and two workers never share a stream. Each view records the affine ``matrix`` that maps
ORIGINAL image coordinates to view coordinates; Soft Teacher / PseCo map boxes between
independently augmented views with ``relative_matrix``.

Weak = detectron2's ResizeShortestEdge (random short side) + horizontal flip. Strong = Unbiased
Teacher's photometric recipe (colour jitter, grayscale, blur, cutout) applied to the weak view's pixels, so the two
views are pixel-aligned and share boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image

from core.data.types import ImageRecord
from core.errors import BenchError

VIEW_NAMES = ("weak", "strong", "test")


@dataclass
class View:
    image: torch.Tensor  # float32 [3, H, W] in [0, 1]
    boxes: torch.Tensor  # (N, 4) float32 xyxy in view coordinates
    labels: torch.Tensor  # (N,) int64
    matrix: np.ndarray  # (3, 3) float64: original image coords -> view coords
    dropped_crowd: int = 0  # crowd boxes removed (training views never see them)
    dropped_degenerate: int = 0  # boxes that collapsed to <= min_box_size after resize/clip


@dataclass
class ViewSettings:
    """How the views of an image are made: the resolved form of a config's `data.aug` section."""
    short_sizes: tuple[int, ...] = (640, 672, 704, 736, 768, 800)
    max_size: int = 1333
    flip_prob: float = 0.5
    strong: bool = True  # False: the "strong" view is an un-augmented copy of the weak one (ablation)
    test_size: int = 800
    min_box_size: float = 1e-5  # detectron2's filter_empty_instances threshold, in view pixels
    independent_strong: bool = False  # True: strong view draws its own resize/flip (Soft Teacher style)
    erasing: tuple = field(default=((0.7, (0.05, 0.2), (0.3, 3.3)),
                                    (0.5, (0.02, 0.2), (0.1, 6.0)),
                                    (0.3, (0.02, 0.2), (0.05, 8.0))))


def view_settings(aug, strong: bool) -> ViewSettings:
    """`aug`: a config's `data.aug` section; `strong`: whether the strong view is augmented."""
    return ViewSettings(short_sizes=tuple(aug.short_sizes), max_size=aug.max_size, flip_prob=aug.flip_prob,
                        strong=strong, test_size=aug.test_size)


# ----------------------------------------------------------------------------- geometry


def transform_boxes(boxes, matrix: np.ndarray):
    """Map xyxy boxes through an affine matrix; result = bounding box of the 4 mapped corners.

    Accepts a numpy array or a torch tensor and returns the same type and dtype.
    """
    is_torch = isinstance(boxes, torch.Tensor)
    b = boxes.detach().cpu().numpy() if is_torch else np.asarray(boxes)
    dtype = b.dtype
    b = b.reshape(-1, 4).astype(np.float64)
    x1, y1, x2, y2 = b.T
    corners = np.stack([np.stack([x1, y1], -1), np.stack([x2, y1], -1),
                        np.stack([x1, y2], -1), np.stack([x2, y2], -1)], 1)  # (N, 4, 2)
    m = np.asarray(matrix, dtype=np.float64)
    mapped = corners @ m[:2, :2].T + m[:2, 2]
    out = np.concatenate([mapped.min(1), mapped.max(1)], 1).astype(dtype)
    if is_torch:
        return torch.from_numpy(out).to(boxes.device)
    return out


def relative_matrix(view_from, view_to) -> np.ndarray:
    """Affine mapping coordinates of ``view_from`` to ``view_to`` (``M_to @ inv(M_from)``)."""
    m_from = view_from.matrix if isinstance(view_from, View) else np.asarray(view_from, dtype=np.float64)
    m_to = view_to.matrix if isinstance(view_to, View) else np.asarray(view_to, dtype=np.float64)
    return m_to @ np.linalg.inv(m_from)


class ResizeShortestEdge:
    """detectron2's ResizeShortestEdge: short side = random choice of ``short_sizes``, long <= max_size."""

    def __init__(self, short_sizes: tuple[int, ...] | int, max_size: int):
        self.short_sizes = (short_sizes,) if isinstance(short_sizes, int) else tuple(short_sizes)
        if not self.short_sizes or min(self.short_sizes) <= 0:
            raise BenchError(f"resize short sizes {self.short_sizes} must be positive; fix the augmentation config")
        self.max_size = max_size

    @staticmethod
    def output_size(w: int, h: int, short: int, max_size: int) -> tuple[int, int]:
        scale = short / min(h, w)
        newh, neww = (short, scale * w) if h < w else (scale * h, short)
        if max(newh, neww) > max_size:
            s = max_size / max(newh, neww)
            newh, neww = newh * s, neww * s
        return max(1, int(neww + 0.5)), max(1, int(newh + 0.5))

    def __call__(self, image: Image.Image, rng: np.random.Generator | None = None) -> tuple[Image.Image, np.ndarray]:
        short = self.short_sizes[int(rng.integers(len(self.short_sizes)))] if rng is not None else self.short_sizes[0]
        w, h = image.size
        neww, newh = self.output_size(w, h, short, self.max_size)
        m = np.diag([neww / w, newh / h, 1.0])
        if (neww, newh) != (w, h):
            image = image.resize((neww, newh), Image.BILINEAR)
        return image, m


class HorizontalFlip:
    """Mirror with probability ``p``: x -> W - x (continuous coordinates, as detectron2)."""

    def __init__(self, p: float = 0.5):
        self.p = p

    def __call__(self, image: Image.Image, rng: np.random.Generator) -> tuple[Image.Image, np.ndarray]:
        if rng.random() < self.p:
            w = image.size[0]
            return image.transpose(Image.FLIP_LEFT_RIGHT), np.array([[-1.0, 0, w], [0, 1, 0], [0, 0, 1]])
        return image, np.eye(3)


# ----------------------------------------------------------------------------- photometric


# Uncovered pixels of the geometric ops are grey, as in STAC and Soft Teacher (img_fill_val 125).
FILL = (125, 125, 125)


def random_geometric(image: Image.Image, rng: np.random.Generator, translate: float, rotate: float,
                     shear: float) -> tuple[Image.Image, np.ndarray]:
    """One of TranslateX, TranslateY, Rotate, ShearX+ShearY (STAC's OneOf, ported by Soft Teacher),
    about the image centre, same output size; ranges: +-translate of the side, +-rotate and +-shear
    degrees. Returns the image and its 3x3 matrix (input -> output)."""
    w, h = image.size
    op = int(rng.integers(4))
    if op == 0:
        m = np.array([[1.0, 0, rng.uniform(-translate, translate) * w], [0, 1, 0], [0, 0, 1]])
    elif op == 1:
        m = np.array([[1.0, 0, 0], [0, 1, rng.uniform(-translate, translate) * h], [0, 0, 1]])
    else:
        if op == 2:
            a = math.radians(rng.uniform(-rotate, rotate))
            core = np.array([[math.cos(a), math.sin(a), 0], [-math.sin(a), math.cos(a), 0], [0, 0, 1]])
        else:
            sx = math.tan(math.radians(rng.uniform(-shear, shear)))
            sy = math.tan(math.radians(rng.uniform(-shear, shear)))
            core = np.array([[1.0, 0, 0], [sy, 1, 0], [0, 0, 1]]) @ np.array([[1.0, sx, 0], [0, 1, 0], [0, 0, 1]])
        centre = np.array([[1.0, 0, w / 2], [0, 1, h / 2], [0, 0, 1]])
        m = centre @ core @ np.linalg.inv(centre)
    inv = np.linalg.inv(m)  # PIL asks, for every output pixel, where to read in the input
    out = image.transform((w, h), Image.AFFINE, data=tuple(inv[:2].ravel()), resample=Image.BILINEAR,
                          fillcolor=FILL)
    return out, m


def _blur_kernel(sigma: float, h: int, w: int) -> int:
    """Odd kernel covering +-3 sigma, never larger than the image (tiny images stay valid)."""
    k = 2 * math.ceil(3 * sigma) + 1
    side = min(h, w)
    if k > side:
        k = side if side % 2 == 1 else side - 1
    return max(1, k)


def strong_photometric(img: torch.Tensor, rng: np.random.Generator, cfg: ViewSettings | None = None) -> torch.Tensor:
    """Unbiased Teacher's strong augmentation on a [3,H,W] float tensor in [0,1]; no geometry.

    ColorJitter(0.4,0.4,0.4,0.1) p=0.8 in random op order (as torchvision), RandomGrayscale p=0.2,
    GaussianBlur sigma~U[0.1,2] p=0.5, then three RandomErasing with noise fill. UBTeacher fills with
    N(0,1) noise that ToPILImage's byte cast wraps into arbitrary bytes; uniform [0,1] noise keeps
    the same effect while honouring the [0,1] range.
    """
    cfg = cfg or ViewSettings()
    img = img.clone()
    if rng.random() < 0.8:
        order = rng.permutation(4)
        b, c, s = rng.uniform(0.6, 1.4, 3)
        hue = rng.uniform(-0.1, 0.1)
        for op in order:
            if op == 0:
                img = TF.adjust_brightness(img, float(b))
            elif op == 1:
                img = TF.adjust_contrast(img, float(c))
            elif op == 2:
                img = TF.adjust_saturation(img, float(s))
            else:
                img = TF.adjust_hue(img, float(hue))
    if rng.random() < 0.2:
        img = TF.rgb_to_grayscale(img, num_output_channels=3).contiguous()  # else an expand() view
    if rng.random() < 0.5:
        sigma = float(rng.uniform(0.1, 2.0))
        k = _blur_kernel(sigma, img.shape[1], img.shape[2])
        if k > 1:
            img = TF.gaussian_blur(img, [k, k], [sigma, sigma])
    _, H, W = img.shape
    for p, scale, ratio in cfg.erasing:
        if rng.random() >= p:
            continue
        log_r = (math.log(ratio[0]), math.log(ratio[1]))
        for _ in range(10):  # torchvision's RandomErasing.get_params, driven by rng
            area = H * W * rng.uniform(scale[0], scale[1])
            aspect = math.exp(rng.uniform(*log_r))
            eh, ew = int(round(math.sqrt(area * aspect))), int(round(math.sqrt(area / aspect)))
            if not (eh < H and ew < W):
                continue
            i, j = int(rng.integers(0, H - eh + 1)), int(rng.integers(0, W - ew + 1))
            img[:, i:i + eh, j:j + ew] = torch.from_numpy(rng.random((3, eh, ew), dtype=np.float32))
            break
    return img.clamp_(0.0, 1.0)


# ----------------------------------------------------------------------------- views


def to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> float32 [3, H, W] in [0, 1]."""
    arr = np.asarray(image, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float().div_(255.0)


def boxes_in_view(boxes: np.ndarray, labels: np.ndarray, m: np.ndarray, w: int, h: int,
                  min_size: float) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Original-pixel boxes through a view's matrix, clipped to its w x h; (boxes, labels, dropped)."""
    b = transform_boxes(boxes.astype(np.float64), m)
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, w)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, h)
    keep = ((b[:, 2] - b[:, 0]) > min_size) & ((b[:, 3] - b[:, 1]) > min_size)
    return (torch.from_numpy(b[keep].astype(np.float32)).reshape(-1, 4),
            torch.from_numpy(labels[keep].astype(np.int64)), int((~keep).sum()))


def _geometry(image: Image.Image, rng: np.random.Generator | None, cfg: ViewSettings, test: bool):
    if test:
        return ResizeShortestEdge(cfg.test_size, cfg.max_size)(image, None)
    img, m = ResizeShortestEdge(cfg.short_sizes, cfg.max_size)(image, rng)
    img, f = HorizontalFlip(cfg.flip_prob)(img, rng)
    return img, f @ m


def make_views(image: Image.Image, record: ImageRecord, rng: np.random.Generator, cfg: ViewSettings,
               views: tuple[str, ...] = ("weak", "strong")) -> dict[str, View]:
    """The requested views of one image. Random draws happen in a fixed order (weak geometry,
    strong geometry if independent, strong photometric), so a view does not depend on which other
    views were requested. Crowd boxes are dropped from all views and counted in ``dropped_crowd``.
    """
    unknown = [v for v in views if v not in VIEW_NAMES]
    if unknown:
        raise BenchError(f"unknown view name(s) {unknown}; use {', '.join(VIEW_NAMES)}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    w, h = image.size
    if record.width > 0 and (w, h) != (record.width, record.height):
        raise BenchError(f"image {record.id} ({record.file}) is {w}x{h} but its annotation says "
                         f"{record.width}x{record.height}; fix the width/height in the annotation file")
    keep = ~record.iscrowd
    n_crowd = int(record.iscrowd.sum())
    boxes, labels = record.boxes[keep], record.labels[keep]

    def build(img: Image.Image, m: np.ndarray) -> View:
        t = to_tensor(img)
        b, lab, n_bad = boxes_in_view(boxes, labels, m, img.size[0], img.size[1], cfg.min_box_size)
        return View(image=t, boxes=b, labels=lab, matrix=m, dropped_crowd=n_crowd, dropped_degenerate=n_bad)

    out: dict[str, View] = {}
    if "weak" in views or "strong" in views:
        weak_img, weak_m = _geometry(image, rng, cfg, test=False)
        weak = build(weak_img, weak_m)
        if "weak" in views:
            out["weak"] = weak
        if "strong" in views:
            base, base_img, base_m = weak, weak_img, weak_m
            if cfg.independent_strong:
                base_img, base_m = _geometry(image, rng, cfg, test=False)
                base = build(base_img, base_m)
            pixels = strong_photometric(base.image, rng, cfg) if cfg.strong else base.image.clone()
            out["strong"] = View(image=pixels, boxes=base.boxes.clone(), labels=base.labels.clone(),
                                 matrix=base_m.copy(), dropped_crowd=n_crowd,
                                 dropped_degenerate=base.dropped_degenerate)
    if "test" in views:
        test_img, test_m = _geometry(image, None, cfg, test=True)
        out["test"] = build(test_img, test_m)
    return {name: out[name] for name in views}
