"""``shapes``: the embedded synthetic dataset, deterministic from a seed.

Each image holds a few circles, squares and triangles (rotated, of random
size) over a textured, noisy background; the mask gives every pixel its class:
0 background, 1 circle, 2 square, 3 triangle. Background and shapes draw their
colours and stripe textures from the *same* distribution, so neither colour
nor brightness tells a shape from the background or one shape from another:
a threshold cannot solve it, a network has to see edges and geometry.

Sample ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``, so the data are the same on every machine and asking for
more images keeps the first ones unchanged.

    >>> task = make_task(n_train=4, n_val=2, n_test=0, size=32)
    >>> image, mask = task.split("train")[0]
    >>> image.shape, image.dtype.name, mask.shape, set(mask.ravel().tolist()) <= {0, 1, 2, 3}
    ((32, 32, 3), 'uint8', (32, 32), True)
"""

from __future__ import annotations

import math

import numpy

from .task import ArrayDataset, DataError, Task

__all__ = ["CLASS_NAMES", "COLORS", "DEFAULTS", "make_sample", "make_split", "make_task"]

CLASS_NAMES = ["background", "circle", "square", "triangle"]
COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]
_SPLIT_CODE = {"train": 0, "val": 1, "test": 2}

# What `scratchseg train` uses with no arguments; each can be changed with
# `--data shapes:n_train=...,size=...`.
DEFAULTS = dict(n_train=1024, n_val=64, n_test=64, size=32, min_shapes=1, max_shapes=3,
                min_radius=0.16, max_radius=0.30, noise=0.06, seed=0)


def _texture(rng, yy, xx):
    """A random base colour plus sinusoidal stripes, per channel: (H, W, 3) floats in ~[0, 1]."""
    color = rng.uniform(0.15, 0.85, size=3)
    freq = rng.uniform(1 / 10, 1 / 4)  # cycles per pixel
    theta = rng.uniform(0, math.pi)
    phase = rng.uniform(0, 2 * math.pi)
    amp = rng.uniform(0.04, 0.15, size=3)
    wave = numpy.sin(2 * math.pi * freq * (xx * math.cos(theta) + yy * math.sin(theta)) + phase)  # (H, W)
    return color + amp * wave[..., None], color  # (H, W, 3), (3,)


def _inside(cls, xx, yy, cx, cy, r, angle):
    """Boolean (H, W): the pixels inside a shape of circumradius ``r`` centred at (cx, cy)."""
    dx, dy = xx - cx, yy - cy
    if cls == 1:  # circle
        return dx * dx + dy * dy <= r * r
    u = dx * math.cos(angle) + dy * math.sin(angle)  # rotate into the shape's frame
    v = -dx * math.sin(angle) + dy * math.cos(angle)
    if cls == 2:  # square: half side r / sqrt(2)
        a = r / math.sqrt(2)
        return (numpy.abs(u) <= a) & (numpy.abs(v) <= a)
    # equilateral triangle: inside the three edges, each at the inradius r / 2
    inside = numpy.ones(xx.shape, dtype=bool)
    for k in range(3):
        phi = math.pi / 3 + 2 * math.pi * k / 3  # outward normal of edge k
        inside &= u * math.cos(phi) + v * math.sin(phi) <= r / 2
    return inside


def make_sample(rng, size=32, min_shapes=1, max_shapes=3, min_radius=0.16, max_radius=0.30, noise=0.06):
    """One image (size, size, 3) uint8 and its mask (size, size) int64 from generator ``rng``.

    Radii are fractions of ``size``; shapes do not overlap (their circumscribed
    circles are kept apart), so every visible shape is whole.
    """
    yy, xx = numpy.mgrid[0:size, 0:size] + 0.5  # pixel centres, (H, W) each
    image, bg_color = _texture(rng, yy, xx)
    mask = numpy.zeros((size, size), dtype=numpy.int64)
    placed, colors = [], [bg_color]
    count = int(rng.integers(min_shapes, max_shapes + 1))
    for _ in range(count):
        for _attempt in range(30):
            r = rng.uniform(min_radius, max_radius) * size
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, size=2)
            if all(math.hypot(cx - px, cy - py) > r + pr + 1 for px, py, pr in placed):
                break
        else:
            continue  # no room left
        cls = int(rng.integers(1, 4))
        angle = rng.uniform(0, 2 * math.pi)
        for _attempt in range(30):  # a colour that stands out from everything drawn so far
            tex, color = _texture(rng, yy, xx)
            if min(numpy.abs(color - c).max() for c in colors) > 0.2:
                break
        inside = _inside(cls, xx, yy, cx, cy, r, angle)
        image[inside] = tex[inside]
        mask[inside] = cls
        placed.append((cx, cy, r))
        colors.append(color)
    image = image + noise * rng.standard_normal(image.shape)
    return (numpy.clip(image, 0, 1) * 255 + 0.5).astype(numpy.uint8), mask


def generate_split(make, split, n, key, **options):
    """``n`` samples ``make(rng, **options)`` of ``split`` as an ArrayDataset; sample i draws from
    ``default_rng([*key, split code, i])``, so each sample is the same whatever ``n`` is."""
    code = _SPLIT_CODE[split]
    samples = [make(numpy.random.default_rng([*key, code, i]), **options) for i in range(n)]
    return ArrayDataset([x for x, _ in samples], [m for _, m in samples], [f"{split}_{i:05d}" for i in range(n)])


def make_split(split, n, seed=0, **options):
    """``n`` samples of ``split`` ('train', 'val' or 'test') as an ArrayDataset."""
    return generate_split(make_sample, split, n, (seed,), **options)


def make_task(**options):
    """The ``shapes`` Task; any key of ``DEFAULTS`` may be given."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown shapes option(s) {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **options)
    for key in ("n_train", "n_val", "n_test", "size", "min_shapes", "max_shapes", "seed"):
        cfg[key] = int(cfg[key])
    for key in ("min_radius", "max_radius", "noise"):
        cfg[key] = float(cfg[key])
    if cfg["size"] < 8:
        raise DataError(f"shapes size must be at least 8 pixels, got {cfg['size']}")
    if cfg["n_train"] < 1:
        raise DataError(f"shapes n_train must be at least 1, got {cfg['n_train']}")
    if not 0 < cfg["min_radius"] <= cfg["max_radius"] < 0.5:
        raise DataError(f"shapes radii must satisfy 0 < min_radius <= max_radius < 0.5, got "
                        f"{cfg['min_radius']} and {cfg['max_radius']}")
    if not 0 <= cfg["min_shapes"] <= cfg["max_shapes"]:
        raise DataError(f"shapes needs 0 <= min_shapes <= max_shapes, got {cfg['min_shapes']} and {cfg['max_shapes']}")
    sample_opts = {k: cfg[k] for k in ("size", "min_shapes", "max_shapes", "min_radius", "max_radius", "noise")}
    splits = {name: make_split(name, cfg[f"n_{name}"], cfg["seed"], **sample_opts)
              for name in ("train", "val", "test") if cfg[f"n_{name}"] > 0}
    return Task(name="shapes", splits=splits, class_names=list(CLASS_NAMES), colors=list(COLORS),
                ignore_index=None, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                spec={"kind": "shapes", "options": cfg})
