"""Transforms applied to one sample ``(image, mask)`` on the host.

``image`` is (H, W, C) uint8 (float32 after ``Normalize``), ``mask`` is
(H, W) int64 or ``None``. Every random transform takes the generator it draws
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

__all__ = ["Compose", "Resize", "ResizeImage", "RandomScale", "RandomCrop", "RandomHorizontalFlip", "Normalize",
           "resize_image", "resize_mask", "center_crop_mask", "parse_size"]


def parse_size(value):
    """``64`` / ``"64"`` -> (64, 64); ``"96x128"`` -> (96, 128) as (H, W); ``None`` stays ``None``."""
    if value is None:
        return None
    if isinstance(value, (tuple, list)):
        h, w = (int(v) for v in value)
    else:
        text = str(value).lower().strip()
        h, _, w = text.partition("x")
        h, w = int(h), int(w or h)
    if h < 1 or w < 1:
        raise ValueError(f"a size must be positive, got {value!r}")
    return h, w


def resize_image(image, size):
    """Bilinear (antialiased when shrinking) resize of (H, W, C) uint8 to ``size`` = (H', W')."""
    from PIL import Image

    h, w = size
    if image.shape[:2] == (h, w):
        return image
    channels = [numpy.asarray(Image.fromarray(image[..., c]).resize((w, h), Image.BILINEAR))
                for c in range(image.shape[2])]
    return numpy.stack(channels, axis=-1)  # (H', W', C)


def resize_mask(mask, size):
    """Nearest-neighbour resize of label maps (..., H, W) to ``size`` = (H', W'), on their backend.

    One (H, W) mask or a batch (N, H, W) of masks or predicted labels, NumPy or
    CuPy. Output pixel ``i`` takes source pixel ``floor((i + 0.5) * H / H')``.
    """
    h, w = size
    if mask is None or mask.shape[-2:] == (h, w):
        return mask
    rows = ((numpy.arange(h) + 0.5) * mask.shape[-2] / h).astype(numpy.int64)  # source row of each output row
    cols = ((numpy.arange(w) + 0.5) * mask.shape[-1] / w).astype(numpy.int64)
    if not isinstance(mask, numpy.ndarray):  # a CuPy array takes indices on its own device
        xp = get_array_module(mask)
        rows, cols = xp.asarray(rows), xp.asarray(cols)
    return mask[..., rows[:, None], cols[None, :]]  # (..., H', W')


def center_crop_mask(masks, size):
    """The central ``size`` = (h, w) window of label maps (..., H, W): the map a valid-convolution model predicts."""
    H, W = masks.shape[-2:]
    h, w = size
    if (H, W) == (h, w):
        return masks
    top, left = (H - h) // 2, (W - w) // 2
    return masks[..., top:top + h, left:left + w]  # (..., h, w)


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
    """A random (H, W) window; smaller inputs are padded (image with 0, mask with ``ignore_index``)."""

    def __init__(self, size, ignore_index=-100):
        self.size = parse_size(size)
        self.ignore_index = ignore_index

    def __call__(self, image, mask, rng):
        h, w = self.size
        H, W = image.shape[:2]
        if H < h or W < w:  # pad bottom/right so a full window exists
            ph, pw = max(h - H, 0), max(w - W, 0)
            image = numpy.pad(image, ((0, ph), (0, pw), (0, 0)))
            if mask is not None:
                mask = numpy.pad(mask, ((0, ph), (0, pw)), constant_values=self.ignore_index)
            H, W = image.shape[:2]
        top = int(rng.integers(0, H - h + 1))
        left = int(rng.integers(0, W - w + 1))
        image = image[top:top + h, left:left + w]
        mask = mask[top:top + h, left:left + w] if mask is not None else None
        return image, mask

    def __repr__(self):
        return f"RandomCrop({self.size})"


class RandomHorizontalFlip:
    def __init__(self, p=0.5):
        self.p = float(p)

    def __call__(self, image, mask, rng):
        if rng.uniform() < self.p:
            image = image[:, ::-1]
            mask = mask[:, ::-1] if mask is not None else None
        return image, mask

    def __repr__(self):
        return f"RandomHorizontalFlip({self.p})"


class Normalize:
    """uint8 (H, W, C) -> float32 (H, W, C): ``(image / 255 - mean) / std`` per channel."""

    def __init__(self, mean, std):
        self.mean = numpy.asarray(mean, dtype=numpy.float32)
        self.std = numpy.asarray(std, dtype=numpy.float32)

    def __call__(self, image, mask, rng=None):
        return (image.astype(numpy.float32) / 255.0 - self.mean) / self.std, mask

    def __repr__(self):
        return f"Normalize({self.mean.tolist()}, {self.std.tolist()})"
