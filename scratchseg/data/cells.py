"""``cells``: a second embedded synthetic dataset, cell-like tissue, deterministic from a seed.

Each image is a Voronoi tessellation of random seed points, the picture a
light microscope or an electron microscope gives of packed cells: every cell
is filled with its own textured grey level, dark membranes a few pixels wide
run between neighbouring cells, and some cells hold a darker, grainy nucleus
around their seed point. A faint per-image tint, a blur (the optics) and
noise (the sensor) finish it. Three classes:

* 0 ``cytoplasm``: the inside of a cell, outside its nucleus (most pixels);
* 1 ``membrane``: pixels within ``membrane / 2`` of the border between two cells;
* 2 ``nucleus``: an ellipse around the seed of some cells.

Unlike ``shapes`` (a few compact objects on a background, told apart by
shape), this task is dense and thin-structured: every pixel belongs to a
cell, the minority class is a one-pixel-thin network whose topology matters,
and what matters for a boundary is a few pixels of contrast. It is also
imbalanced: at the defaults membranes cover about 20% of the pixels (15-23%
per image) and nuclei about 6% (1-12%), which is what makes pixel accuracy a poor judge here.

Geometry: with seeds ``s_k``, a pixel ``p`` belongs to the cell of its
nearest seed ``a``; its distance to the border with a neighbour ``b`` is the
distance to their perpendicular bisector, ``(|p - s_b|^2 - |p - s_a|^2) /
(2 |s_a - s_b|)``, and it is membrane when the smallest such distance over
``b != a`` is below ``membrane / 2``. The membrane is therefore exactly
``membrane`` pixels wide wherever two cells meet.

Sample ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)`` through ``shapes.generate_split``, so the data are the
same on every machine and asking for more images keeps the first ones
unchanged, as for ``shapes``.

    >>> task = make_task(n_train=3, n_val=1, n_test=0, size=32)
    >>> image, mask = task.split("train")[0]
    >>> image.shape, image.dtype.name, mask.shape, set(mask.ravel().tolist()) <= {0, 1, 2}
    ((32, 32, 3), 'uint8', (32, 32), True)
    >>> task.class_names
    ['cytoplasm', 'membrane', 'nucleus']
"""

from __future__ import annotations

import math

import numpy

from .shapes import generate_split
from .task import DataError, Task

__all__ = ["CLASS_NAMES", "COLORS", "DEFAULTS", "make_sample", "make_split", "make_task", "blur"]

CLASS_NAMES = ["cytoplasm", "membrane", "nucleus"]
COLORS = [(220, 200, 160), (60, 20, 60), (70, 90, 200)]

# What `--data cells` uses; each can be changed with `--data cells:n_train=...,cell_size=...`.
# cell_size is the mean distance between neighbouring seeds in pixels; membrane the membrane width in
# pixels; nucleus_prob the chance that a cell shows a nucleus; blur the Gaussian sigma in pixels.
DEFAULTS = dict(n_train=1024, n_val=64, n_test=64, size=32, cell_size=12.0, membrane=1.2, nucleus_prob=0.6,
                blur=0.6, noise=0.05, seed=1)


def blur(image, sigma):
    """Gaussian blur of an (H, W) or (H, W, C) float array along H and W, edges reflected.

    A separable convolution with the kernel ``g(t) = exp(-t^2 / (2 sigma^2))``, ``|t| <= ceil(3 sigma)``,
    normalised to sum 1. ``sigma = 0`` returns the image unchanged.

    >>> import numpy
    >>> x = numpy.zeros((9, 9)); x[4, 4] = 1.0  # a point far enough from the edges to keep all its mass
    >>> y = blur(x, 1.0)
    >>> round(float(y.sum()), 6), round(float(y[4, 4]), 4), bool(numpy.allclose(y, y.T))
    (1.0, 0.1592, True)

    (the peak is about ``1 / (2 pi sigma^2)``, the 2-D Gaussian's height.)
    """
    if sigma < 0:
        raise DataError(f"blur sigma must be >= 0, got {sigma}")
    if sigma == 0:
        return image
    r = int(math.ceil(3 * sigma))
    t = numpy.arange(-r, r + 1, dtype=numpy.float64)
    g = numpy.exp(-t * t / (2 * sigma * sigma))
    g /= g.sum()
    out = image
    for axis in (0, 1):
        pad = [(0, 0)] * out.ndim
        pad[axis] = (r, r)
        padded = numpy.pad(out, pad, mode="reflect")  # reflect: no dark frame around the image
        n = out.shape[axis]
        # sum of shifted copies, one per kernel tap (the im2col idea, in one dimension)
        out = sum(g[k] * numpy.take(padded, numpy.arange(k, k + n), axis=axis) for k in range(2 * r + 1))
    return out


def _smooth_noise(rng, size, scale):
    """Low-frequency texture: white noise blurred with sigma ``scale``, rescaled to unit std. (H, W)."""
    field = blur(rng.standard_normal((size, size)), scale)
    return field / max(float(field.std()), 1e-8)


def _seeds(rng, size, cell_size):
    """Seed points (S, 2) as (y, x): a jittered grid of spacing ``cell_size``, a margin of one cell
    beyond the image so that border cells are cut by the frame like any real field of view."""
    lo, hi = -cell_size, size + cell_size
    n = max(int(math.ceil((hi - lo) / cell_size)), 2)
    centres = lo + (numpy.arange(n) + 0.5) * (hi - lo) / n
    yy, xx = numpy.meshgrid(centres, centres, indexing="ij")
    # jitter of up to ~0.4 cell: irregular polygons, but no cell collapses to nothing
    jitter = rng.uniform(-0.4, 0.4, size=(2, n, n)) * cell_size
    return numpy.stack([yy + jitter[0], xx + jitter[1]], axis=-1).reshape(-1, 2)  # (S, 2)


def make_sample(rng, size=32, cell_size=12.0, membrane=1.2, nucleus_prob=0.6, blur_sigma=0.6, noise=0.05):
    """One image (size, size, 3) uint8 and its mask (size, size) int64 from generator ``rng``.

    Labels: 0 cytoplasm, 1 membrane, 2 nucleus (see the module docstring for the geometry).
    """
    seeds = _seeds(rng, size, cell_size)  # (S, 2)
    S = len(seeds)
    yy, xx = numpy.mgrid[0:size, 0:size] + 0.5  # pixel centres, (H, W) each
    p = numpy.stack([yy.ravel(), xx.ravel()], axis=-1)  # (P, 2)
    d2 = ((p[:, None, :] - seeds[None, :, :]) ** 2).sum(-1)  # (P, S) squared distances
    owner = d2.argmin(axis=1)  # (P,) nearest seed = the cell of each pixel
    d_own = d2[numpy.arange(len(p)), owner]  # (P,)
    sep = numpy.sqrt(((seeds[owner][:, None, :] - seeds[None, :, :]) ** 2).sum(-1))  # (P, S) |s_a - s_b|
    with numpy.errstate(divide="ignore", invalid="ignore"):
        to_border = (d2 - d_own[:, None]) / (2 * sep)  # (P, S) distance to each bisector
    to_border[numpy.arange(len(p)), owner] = numpy.inf  # a cell has no border with itself
    border = to_border.min(axis=1).reshape(size, size)  # (H, W) distance to the nearest cell border
    owner = owner.reshape(size, size)

    mask = numpy.zeros((size, size), dtype=numpy.int64)
    image = numpy.empty((size, size), dtype=numpy.float64)
    # half the distance to the nearest other seed bounds how far a nucleus may reach from its seed
    seed_gap = numpy.sqrt(((seeds[:, None] - seeds[None]) ** 2).sum(-1) + numpy.diag(numpy.full(S, numpy.inf)))
    reach = seed_gap.min(axis=1) / 2 - membrane  # (S,)
    grain = _smooth_noise(rng, size, 0.8)  # fine texture of nuclei (chromatin)
    # two slow textures per image, mixed with per-cell weights: each cell its own pattern at the cost of two blurs
    slow = numpy.stack([_smooth_noise(rng, size, cell_size / 3) for _ in range(2)])  # (2, H, W)
    for k in numpy.unique(owner):
        cell = owner == k
        level = rng.uniform(0.5, 0.8)
        w = rng.standard_normal(2) * 0.04
        image[cell] = level + w[0] * slow[0][cell] + w[1] * slow[1][cell]
        if rng.uniform() < nucleus_prob and reach[k] > 1.5:
            a, b = rng.uniform(0.55, 0.85, size=2) * reach[k]  # semi-axes, inside the cell
            angle = rng.uniform(0, math.pi)
            dy, dx = yy - seeds[k, 0], xx - seeds[k, 1]
            u = dx * math.cos(angle) + dy * math.sin(angle)
            v = -dx * math.sin(angle) + dy * math.cos(angle)
            nucleus = cell & ((u / a) ** 2 + (v / b) ** 2 <= 1)
            mask[nucleus] = 2
            image[nucleus] = level - rng.uniform(0.15, 0.3) + 0.06 * grain[nucleus]
    membrane_px = border < membrane / 2
    mask[membrane_px] = 1
    image[membrane_px] = rng.uniform(0.1, 0.25) + 0.03 * grain[membrane_px]

    tint = 1 + rng.uniform(-0.08, 0.08, size=3)  # the stain varies a little from image to image
    image = blur(image[..., None] * tint, blur_sigma)  # (H, W, 3)
    image = image + noise * rng.standard_normal(image.shape)
    return (numpy.clip(image, 0, 1) * 255 + 0.5).astype(numpy.uint8), mask


def make_split(split, n, seed=1, **options):
    """``n`` samples of ``split`` ('train', 'val' or 'test') as an ArrayDataset."""
    # the key (seed, 7919) differs from shapes' (seed,), so the two sets never share a random stream
    return generate_split(make_sample, split, n, (seed, 7919), **options)


def make_task(**options):
    """The ``cells`` Task; any key of ``DEFAULTS`` may be given."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown cells option(s) {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **options)
    for key in ("n_train", "n_val", "n_test", "size", "seed"):
        cfg[key] = int(cfg[key])
    for key in ("cell_size", "membrane", "nucleus_prob", "blur", "noise"):
        cfg[key] = float(cfg[key])
    if cfg["size"] < 8:
        raise DataError(f"cells size must be at least 8 pixels, got {cfg['size']}")
    if cfg["n_train"] < 1:
        raise DataError(f"cells n_train must be at least 1, got {cfg['n_train']}")
    if cfg["cell_size"] < 4:
        raise DataError(f"cells cell_size must be at least 4 pixels, got {cfg['cell_size']}")
    if not 0 < cfg["membrane"] <= cfg["cell_size"] / 3:
        raise DataError(f"cells membrane must be in (0, cell_size / 3] = (0, {cfg['cell_size'] / 3:g}] pixels, "
                        f"got {cfg['membrane']}")
    if not 0 <= cfg["nucleus_prob"] <= 1:
        raise DataError(f"cells nucleus_prob must be in [0, 1], got {cfg['nucleus_prob']}")
    if cfg["blur"] < 0 or cfg["noise"] < 0:
        raise DataError(f"cells blur and noise must be >= 0, got {cfg['blur']} and {cfg['noise']}")
    sample_opts = dict(size=cfg["size"], cell_size=cfg["cell_size"], membrane=cfg["membrane"],
                       nucleus_prob=cfg["nucleus_prob"], blur_sigma=cfg["blur"], noise=cfg["noise"])
    splits = {name: make_split(name, cfg[f"n_{name}"], cfg["seed"], **sample_opts)
              for name in ("train", "val", "test") if cfg[f"n_{name}"] > 0}
    return Task(name="cells", splits=splits, class_names=list(CLASS_NAMES), colors=list(COLORS),
                ignore_index=None, in_channels=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25),
                spec={"kind": "cells", "options": cfg})
