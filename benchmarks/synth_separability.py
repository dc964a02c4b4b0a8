"""How small can the synthetic demo's objects be and still be told apart? (The generator's floor.)

For each object extent, draws every class many times the way the generator does (random rotation
and sub-pixel position, blur, sensor noise, the minimum colour contrast), crops a window centred on
the object's box, and classifies held-out instances by their nearest neighbour among the others.
A simple classifier's accuracy is a lower bound on what is separable in principle: the extent at
which it is still far above chance (1/6) is a floor where small objects are hard but learnable.

    python benchmarks/synth_separability.py [--per-class 300] [--extents 3,4,5,6,8,10]
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image, ImageFilter

from core.data import synth

WINDOW = 16


def draw(rng: np.random.Generator, name: str, extent: float) -> np.ndarray:
    """One instance on a flat background, blurred and noisy, centred on its box (WINDOW x WINDOW)."""
    polys, holes, rot = synth._shape_polygons(name, rng)
    polys = [synth._rotate(p, rot) * extent for p in polys]
    holes = [synth._rotate(p, rot) * extent for p in holes]
    lo = np.concatenate(polys).min(0)
    hi = np.concatenate(polys).max(0)
    shift = WINDOW / 2 - (lo + hi) / 2 + rng.uniform(-0.5, 0.5, 2)
    alpha, x0, y0 = synth._render_alpha([p + shift for p in polys], [p + shift for p in holes])
    canvas = np.zeros((WINDOW, WINDOW), np.float32)
    h, w = alpha.shape
    ys, xs = slice(max(0, y0), min(WINDOW, y0 + h)), slice(max(0, x0), min(WINDOW, x0 + w))
    canvas[ys, xs] = alpha[ys.start - y0:ys.stop - y0, xs.start - x0:xs.stop - x0]
    contrast = synth.MIN_CONTRAST / np.sqrt(3)  # the weakest per-channel contrast the generator allows
    img = Image.fromarray((canvas * contrast * 255 + 64).astype(np.uint8))
    arr = np.asarray(img.filter(ImageFilter.GaussianBlur(float(rng.uniform(0.3, 1.0)))), np.float32)
    arr = arr + rng.standard_normal(arr.shape).astype(np.float32) * rng.uniform(2, 10)
    return (arr - arr.mean()).ravel()


def accuracy(extent: float, per_class: int, seed: int) -> float:
    rng = np.random.default_rng([seed, int(extent * 100)])
    names = [c["name"] for c in synth.CATEGORIES]
    x = np.stack([draw(rng, n, extent) for n in names for _ in range(2 * per_class)])
    y = np.repeat(np.arange(len(names)), 2 * per_class)
    train = np.tile(np.r_[np.ones(per_class, bool), np.zeros(per_class, bool)], len(names))
    d = ((x[~train, None, :] - x[None, train, :]) ** 2).sum(-1)
    return float((y[train][d.argmin(1)] == y[~train]).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--per-class", type=int, default=300)
    ap.add_argument("--extents", default="3,4,5,6,8,10")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    print(f"{len(synth.CATEGORIES)} classes, chance {1 / len(synth.CATEGORIES):.3f}; "
          f"1-NN accuracy on held-out instances ({args.per_class} per class as references)")
    for e in [float(v) for v in args.extents.split(",")]:
        print(f"extent {e:4.1f} px: {accuracy(e, args.per_class, args.seed):.3f}")


if __name__ == "__main__":
    main()
