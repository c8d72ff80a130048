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
           "Normalize", "resize_image", "resize_mask", "center_crop_mask", "parse_size"]


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


class Normalize:
    """uint8 (H, W, C) -> float32 (H, W, C): ``(image / 255 - mean) / std`` per channel."""

    def __init__(self, mean, std):
        self.mean = numpy.asarray(mean, dtype=numpy.float32)
        self.std = numpy.asarray(std, dtype=numpy.float32)

    def __call__(self, image, mask, rng=None):
        return (image.astype(numpy.float32) / 255.0 - self.mean) / self.std, mask

    def __repr__(self):
        return f"Normalize({self.mean.tolist()}, {self.std.tolist()})"
