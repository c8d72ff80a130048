"""Batches of samples, shuffled from a seed, moved to the active backend.

The order of epoch ``e`` is a permutation drawn from a generator seeded with
``(seed, e)``, and sample ``i`` of epoch ``e`` is augmented with a generator
seeded with ``(seed, e, i)``. Nothing depends on what ran before, so a
training resumed at batch ``b`` of epoch ``e`` (``batches(e, start=b)``) sees
exactly the batches an uninterrupted run would have seen.

    >>> import numpy as np
    >>> from scratchseg.data.task import ArrayDataset
    >>> ds = ArrayDataset([np.zeros((4, 4, 3), np.uint8)] * 5, [np.zeros((4, 4), np.int64)] * 5)
    >>> loader = Loader(ds, batch_size=2, shuffle=True, seed=1, mean=(0.5,) * 3, std=(0.25,) * 3)
    >>> len(loader), [b[0].shape for b in loader.batches(epoch=0)]
    (3, [(2, 3, 4, 4), (2, 3, 4, 4), (1, 3, 4, 4)])
"""

from __future__ import annotations

import numpy

from .. import backend
from .task import DataError
from .transforms import Normalize

__all__ = ["Loader"]


class Loader:
    """Iterate ``dataset`` in batches: ``(images (N, C, H, W) float, masks (N, H, W) int64 or None, indices)``
    (volumes: ``(N, C, D, H, W)`` and ``(N, D, H, W)``)."""

    def __init__(self, dataset, batch_size=8, shuffle=False, seed=0, transform=None, drop_last=False,
                 mean=None, std=None, dtype=None):
        if int(batch_size) < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if len(dataset) == 0:
            raise DataError("the dataset is empty: nothing to load")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.transform = transform
        self.drop_last = bool(drop_last) and len(dataset) >= self.batch_size
        channels = numpy.asarray(dataset[0][0]).shape[-1]
        self.normalize = Normalize(mean if mean is not None else (0.5,) * channels,
                                   std if std is not None else (0.25,) * channels)
        self.dtype = dtype
        self.shard = (0, 1)  # (rank, world size): this loader serves slice `rank` of each batch

    def sharded(self, rank, world_size):
        """A copy that serves slice ``rank`` of ``world_size`` of each batch (``batch_size`` is the global batch).

        Process r of R then sees exactly its part of the batches one process sees
        with the global batch size, so R processes train as one would.
        """
        if not 0 <= int(rank) < int(world_size):
            raise ValueError(f"rank must be in 0..{int(world_size) - 1}, got {rank}")
        if len(self.dataset) < int(world_size):
            raise DataError(f"{len(self.dataset)} samples cannot be shared by {world_size} processes")
        copy = Loader.__new__(Loader)
        copy.__dict__.update(self.__dict__, shard=(int(rank), int(world_size)))
        return copy

    def __len__(self):
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch):
        """Sample indices of ``epoch`` in the order they are served."""
        n = len(self.dataset)
        if not self.shuffle:
            return numpy.arange(n)
        return numpy.random.default_rng([self.seed, int(epoch)]).permutation(n)

    def sample(self, index, epoch=0):
        """Sample ``index`` as it is served in ``epoch``: (C, H, W) float32 and (H, W) int64 or None
        (a volume: (C, D, H, W) and (D, H, W))."""
        image, mask = self.dataset[int(index)]
        if self.transform is not None:
            rng = numpy.random.default_rng([self.seed, int(epoch), int(index)])
            image, mask = self.transform(image, mask, rng)
        image, mask = self.normalize(image, mask)
        return numpy.ascontiguousarray(numpy.moveaxis(image, -1, 0)), mask  # (H, W, C) -> (C, H, W), or 3-D

    def batches(self, epoch=0, start=0):
        """Yield the batches of ``epoch`` beginning with batch number ``start``."""
        xp = backend.xp()
        dtype = self.dtype or backend.get_default_dtype()
        order = self.order(epoch)
        for b in range(int(start), len(self)):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            if self.shard[1] > 1:  # this process's slice of the global batch
                idx = numpy.array_split(idx, self.shard[1])[self.shard[0]]
            samples = [self.sample(i, epoch) for i in idx]
            shapes = {s[0].shape for s in samples}
            if len(shapes) > 1:
                names = [getattr(self.dataset, "names", [str(i) for i in range(len(self.dataset))])[i] for i in idx]
                raise DataError(f"images of one batch differ in size ({', '.join(names[:4])}: "
                                f"{sorted(s[1:] for s in shapes)}); use --crop or --resize, or --batch-size 1")
            images = numpy.stack([s[0] for s in samples]).astype(dtype, copy=False)  # (N, C, H, W) or (N, C, D, H, W)
            masks = None
            if all(s[1] is not None for s in samples):
                masks = numpy.stack([s[1] for s in samples]).astype(numpy.int64, copy=False)  # (N, H, W)
            yield xp.asarray(images), (xp.asarray(masks) if masks is not None else None), list(map(int, idx))
