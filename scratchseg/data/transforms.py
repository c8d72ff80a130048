"""Transforms applied to one sample ``(image, mask)`` on the host.

``image`` is (H, W, C) uint8 (float32 after ``Normalize``), ``mask`` is
(H, W) int64 or ``None``; a volume has one axis more, (D, H, W, C) and
(D, H, W), and the crops, flips and mask helpers take both. Every random transform takes the generator it draws
from, so the loader can give each sample of each epoch its own seeded
generator: the same seed gives the same augmented batches, also after a resume.

Geometry moves image and mask together; masks are always resized with
nearest neighbour (a class index must never be blended with its neighbour).

    >>> import numpy as np
    >>> img = np.zeros((10, 20, 3), np.uint8); mask = np.ones((10, 20), np.int64)
    >>> t = Compose([RandomScale(0.5, 0.5), RandomCrop(8, ignore_index=255), RandomHorizontalFlip()])
    >>> out_img, out_mask = t(img, mask, np.random.default_rng(0))
    >>> out_img.shape, out_mask.shape, int(out_mask.max())
    ((8, 8, 3), (8, 8), 255)
"""

from __future__ import annotations

import numpy

from ..backend import get_array_module

__all__ = ["Compose", "Resize", "ResizeImage", "RandomScale", "RandomCrop", "RandomHorizontalFlip", "RandomFlip3d",
           "ElasticDeform", "Normalize", "resize_image", "resize_mask", "center_crop_mask", "parse_size"]


def parse_size(value, dims=2):
    """``64`` / ``"64"`` -> (64, 64); ``"96x128"`` -> (96, 128) as (H, W); ``None`` stays ``None``.

    With ``dims=3`` a single number is a cube; ``"16x32x32"`` is (D, H, W) whatever ``dims`` says.

    >>> parse_size("96x128"), parse_size(24, dims=3), parse_size("16x32x32")
    ((96, 128), (24, 24, 24), (16, 32, 32))
    """
    if value is None:
        return None
    parts = list(value) if isinstance(value, (tuple, list)) else str(value).lower().strip().split("x")
    try:
        size = tuple(int(v) for v in parts)
    except ValueError:
        raise ValueError(f"a size must be N, HxW or DxHxW, got {value!r}") from None
    if len(size) == 1:
        size = size * dims
    if len(size) not in (2, 3) or min(size) < 1:
        raise ValueError(f"a size must be positive, N, HxW or DxHxW, got {value!r}")
    return size


def resize_image(image, size):
    """Bilinear (antialiased when shrinking) resize of (H, W, C) uint8 to ``size`` = (H', W')."""
    from PIL import Image

    if image.ndim != 3:
        raise ValueError(f"resizing takes images (H, W, C), got an array of shape {image.shape} (volumes are "
                         "not resized: crop them with --crop)")
    h, w = size
    if image.shape[:2] == (h, w):
        return image
    channels = [numpy.asarray(Image.fromarray(image[..., c]).resize((w, h), Image.BILINEAR))
                for c in range(image.shape[2])]
    return numpy.stack(channels, axis=-1)  # (H', W', C)


def resize_mask(mask, size):
    """Nearest-neighbour resize of label maps (..., H, W) to ``size`` = (H', W'), on their backend.

    One (H, W) mask or a batch (N, H, W) of masks or predicted labels, NumPy or
    CuPy; with ``size`` = (D', H', W') the last three axes of volumes. Output
    pixel ``i`` takes source pixel ``floor((i + 0.5) * H / H')``.

    >>> resize_mask(numpy.arange(8).reshape(2, 2, 2), (4, 2, 1))[:, :, 0].tolist()
    [[1, 3], [1, 3], [5, 7], [5, 7]]
    """
    size = tuple(int(s) for s in size)
    k = len(size)
    if mask is None or tuple(mask.shape[-k:]) == size:
        return mask
    xp = get_array_module(mask)  # a CuPy array takes indices on its own device
    index = []
    for axis, n in enumerate(size):  # source index of each output index, shaped to broadcast along its axis
        source = ((numpy.arange(n) + 0.5) * mask.shape[mask.ndim - k + axis] / n).astype(numpy.int64)
        index.append(xp.asarray(source.reshape((-1,) + (1,) * (k - 1 - axis))))
    return mask[(Ellipsis, *index)]  # (..., *size)


def center_crop_mask(masks, size):
    """The central ``size`` = (h, w) window of label maps (..., H, W): the map a valid-convolution model predicts
    (``size`` = (d, h, w): the last three axes)."""
    size = tuple(int(s) for s in size)
    have = tuple(masks.shape[-len(size):])
    if have == size:
        return masks
    window = tuple(slice((n - s) // 2, (n - s) // 2 + s) for n, s in zip(have, size))
    return masks[(Ellipsis, *window)]  # (..., *size)


class Compose:
    def __init__(self, transforms):
        self.transforms = [t for t in transforms if t is not None]

    def __call__(self, image, mask, rng):
        for t in self.transforms:
            image, mask = t(image, mask, rng)
        return image, mask

    def __repr__(self):
        return f"Compose({self.transforms})"


class Resize:
    """Resize to a fixed (H, W), or by a factor when ``size`` is a float < 10 (e.g. 0.5)."""

    def __init__(self, size):
        self.factor = float(size) if isinstance(size, float) else None
        self.size = None if self.factor is not None else parse_size(size)

    def target(self, shape):
        if self.factor is None:
            return self.size
        return max(1, int(round(shape[0] * self.factor))), max(1, int(round(shape[1] * self.factor)))

    def __call__(self, image, mask, rng=None):
        size = self.target(image.shape[:2])
        return resize_image(image, size), resize_mask(mask, size)

    def __repr__(self):
        return f"Resize({self.factor if self.factor is not None else self.size})"


class ResizeImage(Resize):
    """Resize the image only, keeping the mask: evaluation scores predictions against the full-size mask."""

    def __call__(self, image, mask, rng=None):
        return resize_image(image, self.target(image.shape[:2])), mask

    def __repr__(self):
        return f"ResizeImage({self.factor if self.factor is not None else self.size})"


class RandomScale:
    """Scale by a factor drawn uniformly from [low, high] (DeepLab's 0.5-2.0 augmentation)."""

    def __init__(self, low=0.5, high=2.0):
        if not 0 < low <= high:
            raise ValueError(f"random scale needs 0 < low <= high, got {low}, {high}")
        self.low, self.high = float(low), float(high)

    def __call__(self, image, mask, rng):
        s = rng.uniform(self.low, self.high)
        size = max(1, int(round(image.shape[0] * s))), max(1, int(round(image.shape[1] * s)))
        return resize_image(image, size), resize_mask(mask, size)

    def __repr__(self):
        return f"RandomScale({self.low}, {self.high})"


class RandomCrop:
    """A random (H, W) window of an image, or (D, H, W) window of a volume; smaller inputs are padded at the
    end of each axis (image with 0, mask with ``ignore_index``). A single number is a square or a cube."""

    def __init__(self, size, ignore_index=-100):
        self.spec = size
        self.size = parse_size(size)
        self.ignore_index = ignore_index

    def __call__(self, image, mask, rng):
        dims = image.ndim - 1  # spatial axes: 2 for (H, W, C), 3 for (D, H, W, C)
        size = parse_size(self.spec, dims)
        if len(size) != dims:
            raise ValueError(f"crop size {'x'.join(map(str, size))} does not fit an input with {dims} spatial axes "
                             f"(shape {image.shape})")
        have = image.shape[:-1]
        short = [max(s - n, 0) for s, n in zip(size, have)]
        if any(short):  # pad at the end so a full window exists
            image = numpy.pad(image, [(0, p) for p in short] + [(0, 0)])
            if mask is not None:
                mask = numpy.pad(mask, [(0, p) for p in short], constant_values=self.ignore_index)
            have = image.shape[:-1]
        starts = [int(rng.integers(0, n - s + 1)) for n, s in zip(have, size)]
        window = tuple(slice(a, a + s) for a, s in zip(starts, size))
        return image[window], (mask[window] if mask is not None else None)

    def __repr__(self):
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = float(p)

    def __call__(self, image, mask, rng):
        if rng.uniform() < self.p:
            image = image[..., ::-1, :]  # the W axis of (H, W, C) or (D, H, W, C)
            mask = mask[..., ::-1] if mask is not None else None
        return image, mask

    def __repr__(self):
        return f"RandomHorizontalFlip({self.p})"


class RandomFlip3d:
    """Flip a volume (D, H, W, C) along each of D, H and W, each with probability ``p`` (8 mirror images)."""

    def __init__(self, p=0.5):
        self.p = float(p)

    def __call__(self, image, mask, rng):
        for axis in range(3):
            if rng.uniform() < self.p:
                image = numpy.flip(image, axis)
                mask = numpy.flip(mask, axis) if mask is not None else None
        return image, mask

    def __repr__(self):
        return f"RandomFlip3d({self.p})"


class ElasticDeform:
    """The U-Net paper's elastic deformation: random displacements on a coarse grid, smoothly interpolated.

    A displacement vector is drawn at each node of a ``grid`` x ``grid`` lattice spread evenly over the
    image (corners included), each component ~ N(0, sigma^2) pixels; cubic-spline interpolation of the
    lattice (bicubic, through the drawn values) gives a smooth displacement u(p) at every pixel p, and

        out(p) = in(p + u(p))

    with the image sampled bilinearly (uint8 rounded back: a convex combination of uint8 values stays in
    0..255) and the mask by nearest neighbour at the same points, so labels stay labels and image and
    mask stay aligned. Points that fall outside are mirrored back in (``reflect``). sigma = 0 is the
    identity. Volumes (D, H, W, C) take a lattice in three axes.

        >>> import numpy as np
        >>> img, mask = np.zeros((20, 30, 1), np.uint8), np.arange(600).reshape(20, 30) % 3
        >>> out_img, out_mask = ElasticDeform(sigma=4.0)(img, mask, np.random.default_rng(0))
        >>> out_img.shape, out_mask.shape, set(np.unique(out_mask).tolist()) <= {0, 1, 2}
        ((20, 30, 1), (20, 30), True)
    """

    def __init__(self, sigma=10.0, grid=3):
        if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not (numpy.isfinite(sigma) and sigma >= 0):
            raise ValueError(f"elastic deformation sigma must be a number >= 0 (pixels), got {sigma!r}")
        if isinstance(grid, bool) or not isinstance(grid, (int, numpy.integer)) or grid < 2:
            raise ValueError(f"elastic deformation grid must be an integer >= 2 (nodes per axis), got {grid!r}")
        self.sigma, self.grid = float(sigma), int(grid)

    def displacement(self, shape, rng):
        """The displacement field (dims, *shape) float64, drawn from ``rng``, for spatial ``shape``."""
        from scipy import ndimage

        dims = len(shape)
        field = rng.normal(0.0, 1.0, size=(dims,) + (self.grid,) * dims) * self.sigma  # (dims, grid, ..., grid)
        # The cubic spline through the nodes is a tensor product, so it is interpolated one axis at a time:
        # A (n, grid) holds the 1-D spline weights of each node at pixel i, which lies at lattice
        # coordinate i (grid - 1) / (n - 1); A[:, k] interpolates the k-th unit vector.
        for axis, n in enumerate(shape):
            where = numpy.arange(n) * ((self.grid - 1) / (n - 1) if n > 1 else 0.0)  # (n,)
            A = numpy.stack([ndimage.map_coordinates(unit, where[None], order=3, mode="nearest")
                             for unit in numpy.eye(self.grid)], axis=1)  # (n, grid)
            field = numpy.moveaxis(numpy.tensordot(field, A, axes=([axis + 1], [1])), -1, axis + 1)  # grid -> n
        return field  # (dims, *shape)

    def __call__(self, image, mask, rng):
        from scipy import ndimage

        shape = image.shape[:-1]  # spatial axes of (H, W, C) or (D, H, W, C)
        if mask is not None and tuple(mask.shape) != tuple(shape):
            raise ValueError(f"elastic deformation: mask shape {tuple(mask.shape)} does not match the image's "
                             f"{tuple(shape)}")
        points = numpy.indices(shape, dtype=numpy.float64) + self.displacement(shape, rng)  # (dims, *shape): p + u(p)
        channels = [ndimage.map_coordinates(image[..., c].astype(numpy.float64), points, order=1, mode="reflect")
                    for c in range(image.shape[-1])]
        out = numpy.stack(channels, axis=-1)  # (*shape, C)
        out = numpy.rint(out).astype(image.dtype) if image.dtype.kind in "iu" else out.astype(image.dtype)
        if mask is not None:
            mask = ndimage.map_coordinates(mask, points, order=0, mode="reflect")  # nearest: labels stay labels
        return out, mask

    def __repr__(self):
        return f"ElasticDeform(sigma={self.sigma}, grid={self.grid})"


class Normalize:
    """uint8 (H, W, C) -> float32 (H, W, C): ``(image / 255 - mean) / std`` per channel."""

    def __init__(self, mean, std):
        self.mean = numpy.asarray(mean, dtype=numpy.float32)
        self.std = numpy.asarray(std, dtype=numpy.float32)

    def __call__(self, image, mask, rng=None):
        return (image.astype(numpy.float32) / 255.0 - self.mean) / self.std, mask

    def __repr__(self):
        return f"Normalize({self.mean.tolist()}, {self.std.tolist()})"
