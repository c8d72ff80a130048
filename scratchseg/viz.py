"""Pictures with Pillow only: colour masks, overlays, three orthogonal slices of a volume, and training curves.

    >>> import numpy as np
    >>> colorize(np.array([[0, 1], [2, 255]]), [(0, 0, 0), (255, 0, 0), (0, 255, 0)], ignore_index=255)[..., 0]
    array([[  0, 255],
           [  0, 255]], dtype=uint8)
"""

from __future__ import annotations

import math
import os

import numpy

from .backend import asnumpy

__all__ = ["colorize", "overlay", "save_png", "plot_curves", "IGNORE_COLOR", "display_uint8", "orthogonal_slices",
           "volume_panel"]

IGNORE_COLOR = (255, 255, 255)


def colorize(mask, colors, ignore_index=None):
    """(H, W) class indices -> (H, W, 3) uint8 with ``colors[k]`` for class k (white where ignored)."""
    mask = asnumpy(mask).astype(numpy.int64)
    palette = numpy.array(list(colors) + [IGNORE_COLOR], dtype=numpy.uint8)  # (K + 1, 3)
    K = len(colors)
    index = numpy.where((mask >= 0) & (mask < K), mask, K)  # anything else -> the ignore colour
    return palette[index]  # (H, W, 3)


def overlay(image, color_mask, alpha=0.5):
    """Blend (H, W, C) uint8 ``image`` (C = 1 or 3) with an (H, W, 3) colour mask."""
    image = asnumpy(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] == 1:
        image = numpy.repeat(image, 3, axis=2)
    mixed = (1 - alpha) * image.astype(numpy.float32) + alpha * color_mask.astype(numpy.float32)
    return numpy.clip(mixed + 0.5, 0, 255).astype(numpy.uint8)


def _as_rgb(array):
    array = asnumpy(array)
    if array.ndim == 2:
        array = array[..., None]
    return numpy.repeat(array, 3, axis=2) if array.shape[2] == 1 else array


def panel(pictures, min_height=128, gap=4):
    """Pictures of one size side by side, enlarged (nearest, by a whole factor)
    to at least ``min_height`` pixels so small images can be seen; white gaps."""
    pictures = [_as_rgb(p).astype(numpy.uint8) for p in pictures]
    H = pictures[0].shape[0]
    factor = max(1, -(-min_height // H))  # ceil(min_height / H)
    big = [p.repeat(factor, axis=0).repeat(factor, axis=1) for p in pictures]  # (H*f, W*f, 3) each
    white = numpy.full((H * factor, gap, 3), 255, dtype=numpy.uint8)
    row = [big[0]]
    for p in big[1:]:
        row += [white, p]
    return numpy.concatenate(row, axis=1)  # (H*f, sum of widths + gaps, 3)


def display_uint8(image):
    """An image or volume as uint8 for display: uint8 as it is; any other type stretched from its
    0.5th to its 99.5th percentile to 0..255 (CT numbers, MRI intensities, float predictions)."""
    image = asnumpy(image)
    if image.dtype == numpy.uint8:
        return image
    lo, hi = numpy.percentile(image, [0.5, 99.5])
    scaled = (image.astype(numpy.float64) - lo) / max(hi - lo, 1e-12)
    return (numpy.clip(scaled, 0, 1) * 255 + 0.5).astype(numpy.uint8)


def orthogonal_slices(volume, centre):
    """The three slices of ``volume`` (D, H, W, ...) through voxel ``centre`` = (d, h, w):
    axial (H, W), coronal (D, W) and sagittal (D, H), each keeping any trailing channel axis."""
    d, h, w = (int(c) for c in centre)
    return [volume[d], volume[:, h], volume[:, :, w]]


def _centre(labels):
    """The voxel the slices go through: the middle of the labelled (non-background) voxels, else the centre."""
    found = numpy.argwhere(labels > 0) if labels is not None else numpy.zeros((0, 3))
    if len(found):
        return tuple(int(v) for v in numpy.median(found, axis=0))
    return tuple(n // 2 for n in labels.shape)


def volume_panel(volume, pred, colors, truth=None, ignore_index=None, min_height=128):
    """One picture of a volume's prediction: a row per orthogonal slice (axial, coronal, sagittal)
    through the middle of the objects, each ``image | truth | prediction | overlay`` (no truth: three).

    ``volume`` (D, H, W, C) (C = 1 or 3; any dtype, see ``display_uint8``), ``pred`` and ``truth`` (D, H, W).
    """
    volume = display_uint8(volume)
    pred = asnumpy(pred)
    centre = _centre(truth if truth is not None else pred)
    rows = []
    for k, (img, p) in enumerate(zip(orthogonal_slices(volume, centre), orthogonal_slices(pred, centre))):
        colour = colorize(p, colors)
        pictures = [img, colour, overlay(img, colour)]
        if truth is not None:
            pictures.insert(1, colorize(orthogonal_slices(asnumpy(truth), centre)[k], colors, ignore_index))
        rows.append(panel(pictures, min_height=min_height))
    width = max(r.shape[1] for r in rows)
    rows = [numpy.pad(r, ((0, 4), (0, width - r.shape[1]), (0, 0)), constant_values=255) for r in rows]
    return numpy.concatenate(rows, axis=0)  # (rows stacked, width, 3)


def save_png(path, array):
    """Save (H, W), (H, W, 1) or (H, W, 3) uint8 as a PNG, making folders as needed."""
    from PIL import Image

    array = asnumpy(array)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[..., 0]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(numpy.ascontiguousarray(array).astype(numpy.uint8)).save(path)
    return path


# ------------------------------------------------------------------ curves
_SERIES_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _nice_ticks(lo, hi, count=5):
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0, 1.0]
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw), default=10 * mag)
    start = math.floor(lo / step) * step
    ticks, t = [], start
    while t <= hi + step * 0.5 and len(ticks) < 20:
        ticks.append(round(t, 10))
        t += step
    return ticks


def _panel(draw, box, title, xs, series, ylabel):
    """Draw one chart into ``box`` = (left, top, right, bottom): axes, ticks, lines, legend."""
    left, top, right, bottom = box
    ml, mr, mt, mb = 56, 12, 24, 34  # margins for labels
    x0, y0, x1, y1 = left + ml, top + mt, right - mr, bottom - mb
    draw.text((left + ml, top + 4), f"{title} ({ylabel})", fill=(0, 0, 0))
    values = [v for _, ys, _ in series for v in ys if v is not None and math.isfinite(v)]
    if not xs or not values:
        draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
        draw.text((x0 + 10, (y0 + y1) // 2), "no data yet", fill=(120, 120, 120))
        return
    yt = _nice_ticks(min(values), max(values))
    ylo, yhi = yt[0], yt[-1] if yt[-1] > yt[0] else yt[0] + 1
    xlo, xhi = min(xs), max(xs)
    if xhi == xlo:
        xlo, xhi = xlo - 1, xhi + 1

    def px(x):
        return x0 + (x - xlo) / (xhi - xlo) * (x1 - x0)

    def py(y):
        return y1 - (y - ylo) / (yhi - ylo) * (y1 - y0)

    for t in yt:  # horizontal grid + y labels
        draw.line((x0, py(t), x1, py(t)), fill=(225, 225, 225))
        draw.text((left + 4, py(t) - 6), f"{t:.3g}", fill=(0, 0, 0))
    for t in _nice_ticks(xlo, xhi, 6):
        if xlo <= t <= xhi and float(t).is_integer():
            draw.line((px(t), y1, px(t), y1 + 4), fill=(0, 0, 0))
            draw.text((px(t) - 4, y1 + 6), f"{int(t)}", fill=(0, 0, 0))
    draw.rectangle((x0, y0, x1, y1), outline=(0, 0, 0))
    draw.text(((x0 + x1) // 2 - 14, bottom - 14), "epoch", fill=(0, 0, 0))
    for k, (label, ys, color) in enumerate(series):
        pts = [(px(x), py(y)) for x, y in zip(xs, ys) if y is not None and math.isfinite(y)]
        if len(pts) > 1:
            draw.line(pts, fill=color, width=2)
        for x, y in pts:
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        lx, ly = x1 - 190 + 95 * k, top + 4  # legend, in the title line, clear of the curves
        draw.line((lx, ly + 6, lx + 18, ly + 6), fill=color, width=2)
        draw.text((lx + 22, ly), label, fill=(0, 0, 0))


def plot_curves(path, history, width=900, height=360):
    """Save loss (train and val) and mIoU by epoch from ``metrics.json`` records as a PNG."""
    from PIL import Image, ImageDraw

    xs = [r["epoch"] for r in history]
    img = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    half = width // 2
    _panel(draw, (0, 0, half, height), "loss", xs,
           [("train", [r.get("train_loss") for r in history], _SERIES_COLORS[0]),
            ("val", [r.get("val_loss") for r in history], _SERIES_COLORS[1])], "cross-entropy")
    _panel(draw, (half, 0, width, height), "validation", xs,
           [("mIoU", [r.get("miou") for r in history], _SERIES_COLORS[2]),
            ("pixel acc", [r.get("pixel_acc") for r in history], _SERIES_COLORS[3])], "score")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.save(path)
    return path
