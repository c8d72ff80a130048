"""``shapes3d``: the embedded synthetic volume dataset, deterministic from a seed.

The volume twin of ``shapes``: each volume holds a few spheres, boxes and tori
(rotated at random, of random size) in a textured, noisy volume; the mask
gives every voxel its class: 0 background, 1 sphere, 2 box, 3 torus. One grey
channel, as CT, MRI and microscopy stacks have. Objects are brighter than the
background (as contrast-enhanced structures in a CT scan), so *finding* them
is easy. Their brightness hints at the class, in bands that overlap (sphere
0.5-0.7, box 0.65-0.85, torus 0.8-1.0 of the range, as tissues overlap in
intensity), under stripes and noise that vary voxel by voxel: a voxel's value
does not tell its class, and where the bands overlap only the geometry does,
so a network has to look at whole objects in all three dimensions (a slice
through a torus can be a disc or two, a slice through a box a square or a
hexagon). The 2-D ``shapes`` is harder (brightness tells nothing there);
volumes pay for difficulty in CPU minutes.

Sample ``i`` of a split is drawn from its own generator seeded with
``(seed, split, i)``: the same volumes on every machine, and asking for more
keeps the first ones unchanged. Volumes are ``(D, H, W, 1)`` uint8 and masks
``(D, H, W)`` int64, the layout of ``scratchseg.data.task`` with one more axis.

    >>> task = make_task(n_train=2, n_val=1, n_test=0, size=16)
    >>> volume, mask = task.split("train")[0]
    >>> volume.shape, volume.dtype.name, mask.shape, set(mask.ravel().tolist()) <= {0, 1, 2, 3}
    ((16, 16, 16, 1), 'uint8', (16, 16, 16), True)
"""

from __future__ import annotations

import math

import numpy

from .shapes import generate_split
from .task import DataError, Task

__all__ = ["CLASS_NAMES", "COLORS", "DEFAULTS", "make_sample", "make_split", "make_task"]

CLASS_NAMES = ["background", "sphere", "box", "torus"]
COLORS = [(0, 0, 0), (230, 25, 75), (60, 180, 75), (0, 130, 200)]

# What `scratchseg train --data shapes3d --model unet3d` uses; each can be changed with
# `--data shapes3d:n_train=...,size=...`. Small volumes, so that training takes minutes on two cores.
DEFAULTS = dict(n_train=256, n_val=32, n_test=32, size=16, min_objects=1, max_objects=3,
                min_radius=0.3, max_radius=0.45, noise=0.06, seed=0)


def _texture(rng, zz, yy, xx, low, high):
    """A random base brightness in [low, high] plus sinusoidal stripes along a random 3-D direction:
    (D, H, W) floats."""
    level = rng.uniform(low, high)
    freq = rng.uniform(1 / 10, 1 / 4)  # cycles per voxel
    direction = rng.standard_normal(3)
    direction /= numpy.linalg.norm(direction)
    amp = rng.uniform(0.04, 0.15)
    wave = numpy.sin(2 * math.pi * freq * (direction[0] * zz + direction[1] * yy + direction[2] * xx)
                     + rng.uniform(0, 2 * math.pi))
    return level + amp * wave, level


def _rotation(rng):
    """A uniformly random 3-D rotation matrix (QR of a Gaussian matrix, signs fixed)."""
    q, r = numpy.linalg.qr(rng.standard_normal((3, 3)))
    q = q * numpy.sign(numpy.diag(r))
    if numpy.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _inside(cls, offsets, r, rotation, rng):
    """Boolean (D, H, W): the voxels inside an object that fits in a ball of radius ``r``.

    ``offsets`` (3, D, H, W) are the voxel centres minus the object's centre.
    Sizes are chosen so that the three classes have similar volumes (about
    2 r^3 each): a sphere of radius 0.8 r, a box whose corners touch the ball,
    a torus of tube radius 0.35-0.45 r.
    """
    u, v, w = numpy.tensordot(rotation.T, offsets, axes=1)  # into the object's frame: (3, D, H, W)
    if cls == 1:  # sphere
        return u * u + v * v + w * w <= (0.8 * r) ** 2
    if cls == 2:  # box: half-sides in random proportions, half-diagonal r
        sides = rng.uniform(0.6, 1.4, size=3)  # a cuboid, seldom a cube: not to be taken for a sphere
        a, b, c = r * sides / numpy.linalg.norm(sides)
        return (numpy.abs(u) <= a) & (numpy.abs(v) <= b) & (numpy.abs(w) <= c)
    # torus around the w axis: a tube of radius t at distance R from the axis, R + t = r
    t = rng.uniform(0.35, 0.45) * r
    R = r - t
    ring = numpy.sqrt(u * u + v * v) - R
    return ring * ring + w * w <= t * t


def make_sample(rng, size=16, min_objects=1, max_objects=3, min_radius=0.3, max_radius=0.45, noise=0.06):
    """One volume (size, size, size, 1) uint8 and its mask (size, size, size) int64 from generator ``rng``.

    Radii are fractions of ``size``; objects do not overlap (their bounding
    spheres are kept apart), and the border may cut a part of one off.
    """
    grid = numpy.mgrid[0:size, 0:size, 0:size] + 0.5  # voxel centres: (3, D, H, W)
    volume, _ = _texture(rng, *grid, 0.05, 0.4)  # the background: darker than any object
    mask = numpy.zeros((size,) * 3, dtype=numpy.int64)
    placed = []
    for _ in range(int(rng.integers(min_objects, max_objects + 1))):
        for _attempt in range(30):
            r = rng.uniform(min_radius, max_radius) * size
            centre = rng.uniform(r * 0.4, size - r * 0.4, size=3)  # objects may be cut by the border
            if all(numpy.linalg.norm(centre - c) > r + cr + 1 for c, cr in placed):
                break
        else:
            continue  # no room left
        cls = int(rng.integers(1, 4))
        low = 0.35 + 0.15 * cls  # brightness bands that overlap: 0.5-0.7, 0.65-0.85, 0.8-1.0
        tex, _ = _texture(rng, *grid, low, low + 0.2)
        inside = _inside(cls, grid - centre[:, None, None, None], r, _rotation(rng), rng)
        volume[inside] = tex[inside]
        mask[inside] = cls
        placed.append((centre, r))
    volume = volume + noise * rng.standard_normal(volume.shape)
    return (numpy.clip(volume, 0, 1) * 255 + 0.5).astype(numpy.uint8)[..., None], mask


def make_split(split, n, seed=0, **options):
    """``n`` samples of ``split`` ('train', 'val' or 'test') as an ArrayDataset."""
    return generate_split(make_sample, split, n, (seed, 3), **options)  # 3: other draws than 2-D shapes'


def make_task(**options):
    """The ``shapes3d`` Task; any key of ``DEFAULTS`` may be given."""
    unknown = set(options) - set(DEFAULTS)
    if unknown:
        raise DataError(f"unknown shapes3d option(s) {sorted(unknown)}; expected some of {sorted(DEFAULTS)}")
    cfg = dict(DEFAULTS, **options)
    for key in ("n_train", "n_val", "n_test", "size", "min_objects", "max_objects", "seed"):
        cfg[key] = int(cfg[key])
    for key in ("min_radius", "max_radius", "noise"):
        cfg[key] = float(cfg[key])
    if cfg["size"] < 8:
        raise DataError(f"shapes3d size must be at least 8 voxels, got {cfg['size']}")
    if cfg["n_train"] < 1:
        raise DataError(f"shapes3d n_train must be at least 1, got {cfg['n_train']}")
    if not 0 < cfg["min_radius"] <= cfg["max_radius"] < 0.5:
        raise DataError(f"shapes3d radii must satisfy 0 < min_radius <= max_radius < 0.5, got "
                        f"{cfg['min_radius']} and {cfg['max_radius']}")
    if not 0 <= cfg["min_objects"] <= cfg["max_objects"]:
        raise DataError(f"shapes3d needs 0 <= min_objects <= max_objects, got {cfg['min_objects']} and "
                        f"{cfg['max_objects']}")
    sample_opts = {k: cfg[k] for k in ("size", "min_objects", "max_objects", "min_radius", "max_radius", "noise")}
    splits = {name: make_split(name, cfg[f"n_{name}"], cfg["seed"], **sample_opts)
              for name in ("train", "val", "test") if cfg[f"n_{name}"] > 0}
    return Task(name="shapes3d", splits=splits, class_names=list(CLASS_NAMES), colors=list(COLORS),
                ignore_index=None, in_channels=1, mean=(0.5,), std=(0.25,),
                spec={"kind": "shapes3d", "options": cfg})
