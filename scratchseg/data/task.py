"""A ``Task`` = the dataset splits + the label set + the metric it is judged by.

Datasets here are plain sequences of samples ``(image, mask)`` kept on the
host as NumPy arrays: ``image`` is ``(H, W, C)`` uint8 (what image files hold),
``mask`` is ``(H, W)`` int64 class indices, or ``None`` for a split without
labels (a test set that was never annotated). Volumes have one axis more:
``(D, H, W, C)`` (uint8, or float32 as their files store them) and
``(D, H, W)``. Transforms, batching and the move to the device happen in
``scratchseg.data.loader``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

import numpy

__all__ = ["Task", "ArrayDataset", "DataError", "default_colors", "natural_key"]


class DataError(ValueError):
    """A dataset that cannot be used as it is: the message says which file and why."""


def natural_key(name: str):
    """Sort key that orders ``'2' < '10'`` (slice numbers), then by text.

    >>> sorted(['10', '2', 'b', 'a1'], key=natural_key)
    ['2', '10', 'a1', 'b']
    """
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in re.split(r"(\d+)", name) if part]


def default_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """The PASCAL VOC colour map: class ``k``'s colour spreads the bits of ``k`` over R, G, B.

    >>> default_colors(4)
    [(0, 0, 0), (128, 0, 0), (0, 128, 0), (128, 128, 0)]
    """
    colors = []
    for k in range(num_classes):
        r = g = b = 0
        c = k
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        colors.append((r, g, b))
    return colors


class ArrayDataset:
    """Samples held in memory: ``images[i]`` (H, W, C) uint8, ``masks[i]`` (H, W) int64 or None.

    ``names[i]`` identifies a sample in messages and in output file names.
    """

    def __init__(self, images: Sequence, masks: Optional[Sequence], names: Optional[Sequence[str]] = None):
        self.images = list(images)
        self.masks = list(masks) if masks is not None else [None] * len(self.images)
        if len(self.masks) != len(self.images):
            raise DataError(f"{len(self.images)} images but {len(self.masks)} masks")
        self.names = list(names) if names is not None else [f"{i:05d}" for i in range(len(self.images))]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.images[i], self.masks[i]

    @property
    def has_masks(self) -> bool:
        return len(self) > 0 and all(m is not None for m in self.masks)

    def subset(self, indices):
        indices = list(indices)
        return ArrayDataset([self.images[i] for i in indices], [self.masks[i] for i in indices],
                            [self.names[i] for i in indices])


@dataclass
class Task:
    """What a model is trained and judged on.

    ``splits`` maps ``'train'``, ``'val'``, ``'test'`` to datasets (missing
    splits are absent). ``ignore_index`` marks mask pixels that count for
    nothing (VOC's 255 borders, CamVid's void), ``None`` when every pixel is
    labelled. ``metric`` names the score that picks the best checkpoint.
    ``mean``/``std`` (per channel, on the 0..1 scale) normalise the images.
    """

    name: str
    splits: dict
    class_names: List[str]
    colors: List[Tuple[int, int, int]] = None
    ignore_index: Optional[int] = None
    metric: str = "miou"
    in_channels: int = 3
    mean: Tuple[float, ...] = None
    std: Tuple[float, ...] = None
    notes: List[str] = field(default_factory=list)
    spec: dict = field(default_factory=dict)  # how to build it again (saved in checkpoints)

    def __post_init__(self):
        if self.colors is None:
            self.colors = default_colors(self.num_classes)
        if len(self.colors) != self.num_classes:
            raise DataError(f"{len(self.colors)} colours for {self.num_classes} classes")
        if self.mean is None:
            self.mean = (0.5,) * self.in_channels
        if self.std is None:
            self.std = (0.25,) * self.in_channels

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def spatial_dims(self) -> int:
        """2 for images ``(H, W, C)``, 3 for volumes ``(D, H, W, C)`` (read from the first sample)."""
        for dataset in self.splits.values():
            if dataset is not None and len(dataset):
                return numpy.ndim(dataset[0][0]) - 1
        return 2

    @property
    def loss_ignore_index(self) -> int:
        """The ``ignore_index`` to give ``cross_entropy`` (torch's -100 when there is none)."""
        return -100 if self.ignore_index is None else int(self.ignore_index)

    def split(self, name: str):
        if name not in self.splits or self.splits[name] is None:
            have = ", ".join(k for k, v in self.splits.items() if v is not None)
            raise DataError(f"task {self.name!r} has no {name!r} split (it has: {have or 'none'})")
        return self.splits[name]

    def describe(self) -> str:
        parts = [f"{k} {len(v)}" + ("" if v.has_masks else " (no masks)") for k, v in self.splits.items() if v is not None]
        ignore = f", ignore index {self.ignore_index}" if self.ignore_index is not None else ""
        return (f"{self.name}: {self.num_classes} classes ({', '.join(self.class_names)}){ignore}; "
                f"{self.in_channels} channel(s); " + ", ".join(parts))


def pixel_stats(dataset, limit: int = 200):
    """Per-channel mean and std (0..1 scale) over up to ``limit`` images of ``dataset``."""
    total = sq = count = 0.0
    for i in range(min(len(dataset), limit)):
        img = numpy.asarray(dataset[i][0], dtype=numpy.float64) / 255.0  # (H, W, C)
        flat = img.reshape(-1, img.shape[-1])  # (H*W, C)
        total = total + flat.sum(axis=0)
        sq = sq + (flat ** 2).sum(axis=0)
        count += flat.shape[0]
    mean = total / count
    std = numpy.sqrt(numpy.maximum(sq / count - mean ** 2, 1e-12))
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)
