"""Pictures: colour masks, overlays and three orthogonal slices of a volume with Pillow; training curves
with matplotlib.

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
def _finite(values):
    """Values as floats, None (a missing or non-finite value) as NaN, which matplotlib leaves as a gap."""
    return [float(v) if v is not None and math.isfinite(float(v)) else math.nan for v in values]


def plot_curves(path, history, width=900, height=360):
    """Save loss (train and val) and validation mIoU / pixel accuracy by epoch from ``metrics.json`` records
    as a PNG of ``width`` x ``height`` pixels (drawn with matplotlib's ``Figure`` and Agg canvas, which need
    no pyplot and no display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    xs = [r["epoch"] for r in history]
    dpi = 100
    fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    panels = [("loss", "cross-entropy", [("train", "train_loss"), ("val", "val_loss")]),
              ("validation", "score", [("mIoU", "miou"), ("pixel acc", "pixel_acc")])]
    for k, (title, ylabel, series) in enumerate(panels):
        ax = fig.add_subplot(1, 2, k + 1)
        for label, key in series:
            ax.plot(xs, _finite([r.get(key) for r in history]), marker="o", markersize=3, label=label)
        if not xs:
            ax.text(0.5, 0.5, "no data yet", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(True, alpha=0.3)
        if xs:
            ax.legend(fontsize="small")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    return path
