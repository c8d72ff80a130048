"""Prediction of images of any size: overlap-tile, flip and multi-scale inference.

``predict(model, images, tile=None, overlap=None, flip=False, scales=(1.0,))``
returns class probabilities ``(N, K, H, W)`` for normalized images
``(N, C, H, W)`` of any size. Three things can be switched on:

**Tiles** (``tile=N`` or ``(h, w)``): the image is cut into overlapping tiles
that go through the network a few at a time (``batch_size``), so the memory
of the activations is that of a tile, not of the image; only the input, the
output and per-axis weights are image-sized. How the tiles are put together
depends on the network:

* The paper's U-Net (``create("unet_original")`` or ``unet`` with
  ``padding=False``) uses unpadded ("valid") convolutions: a tile of ``T``
  input pixels gives the segmentation of its centre, ``T - 2m`` pixels (``m``
  = ``model.margin()``, 92 at depth 4: 572 -> 388). This is the paper's
  *overlap-tile* strategy (Ronneberger et al. 2015, Fig. 2): the output tiles
  lie side by side, each input tile reaches ``m`` pixels beyond its output
  tile, and where that reach leaves the image the missing context is the
  image mirrored at its border::

        mirrored | image ........................... | mirrored
        <-- m -->|<------ out 0 ------>|<------ out 1 ------>|
        [=========== input tile 0 ===========]
                             [=========== input tile 1 ===========]

  Max-pooling makes the network the same at every position only on its
  pooling grid (shifts by multiples of ``2**depth``), so consecutive output
  tiles start ``2**depth``-aligned: they step by the largest multiple of
  ``2**depth`` that fits in the output tile and overlap by the few pixels
  left (where both give the same values; the later tile is written). The
  result is then the network's prediction of the whole mirrored image at
  once (``model(images)``), tile for tile, to float rounding.

* 'Same' (zero-padded) networks -- the default ``unet``, FCN, DeepLab -- see
  zeros beyond every tile border, so a pixel near a tile border is predicted
  from less context than in the whole image. Tiles overlap by at least
  ``overlap`` pixels (default ``tile // 4``) and their probabilities are
  averaged with a Gaussian window (sigma = tile / 8 per axis, as nnU-Net
  does), normalised by the summed weights::

        1 |                .-'''-.
          |              .'       '.          the weight of a tile along one axis
          |           .-'           '-.
        0 |_______.--'                 '--._______
          |<-------------- tile --------------->|

          |<---- tile a ---->|
                        |<---- tile b ---->|       neighbouring tiles
                        |<-->| overlap

  A pixel thus comes mostly from the tile in which it lies furthest from a
  border; the weights change smoothly, so there are no seams. Measured on a
  random (untrained) depth-2 U-Net against the whole image (float64, tile 64, overlap
  32), the largest difference of a probability was 0.03 with this window,
  0.05 keeping only each tile's centre (crop), 0.11 with a linear ramp across
  each overlap and 0.39 with a plain mean; ``overlap = tile // 2`` comes
  closer than the default at about twice the tiles per axis. The window
  is a product of one per axis, so the normaliser is the outer product of
  two 1-D sums: no image-sized weight map. Tile starts step by a multiple
  of the network's total stride (``2**depth`` for a U-Net,
  ``output_stride`` for DeepLab, 32 otherwise) where the tile allows it,
  so that every tile pools on the same grid; the last tile is moved back
  to end at the image border. A ``tile`` larger than the image is the
  whole image.

**Flip** (``flip=True``): the average with the prediction of the
horizontally flipped image, flipped back.

**Scales** (``scales=(0.5, 1.0, 1.5)``): DeepLab's multi-scale evaluation:
the input is resized (bilinear, ``functional.interpolate``) to each scale,
predicted (tiled and flipped as asked), the probabilities resized back to
``(H, W)`` (bilinear) and averaged. Every prediction counts equally:
``len(scales) * (1 + flip)`` of them. Probabilities are averaged, not
logits, so every pass votes with the same weight whatever its confidence
scale.

A one-channel sigmoid model (``--binary``) gives ``[1 - p, p]``, so ``K = 2``.

    >>> import scratchseg
    >>> from scratchseg import models
    >>> net = models.create("unet", num_classes=3, in_channels=1, base=2, depth=2)
    >>> p = predict(net, scratchseg.randn(1, 1, 50, 70).data, tile=32, overlap=8, flip=True)
    >>> p.shape, bool(abs(p.sum(axis=1) - 1).max() < 1e-5)
    ((1, 3, 50, 70), True)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy

from . import functional as F
from .args import check_image_batch, pair, positive_int
from .autograd import Tensor, no_grad
from .backend import get_array_module
from .models.unet import UNet, valid_output_size

__all__ = ["predict", "log_probabilities", "options_from_text"]

_FN = "predict()"


def predict(model, images, tile=None, overlap=None, flip=False, scales=(1.0,), batch_size=4):
    """Class probabilities for ``images`` at their own size, tiled, flipped and multi-scale as asked.

    Args:
        model: a segmentation network (a ``Module`` mapping (n, C, h, w) to logits (n, K, h, w), or the
            valid U-Net's (n, K, h - 2m, w - 2m)); put in eval mode for the call, its modes restored after.
        images: (N, C, H, W) float array (NumPy or CuPy; a Tensor's data is used), already normalized.
        tile: None (the whole image at once), or the network's input tile size, N or (h, w).
            A valid U-Net needs a size it can pool (the error names the nearest ones).
        overlap: least overlap of neighbouring tiles, N or (h, w); needs ``tile``. Default: 0 for a
            valid U-Net (its tiles bring their own context), ``tile // 4`` otherwise.
        flip: also predict the horizontally flipped image and average.
        scales: positive resize factors whose predictions are averaged.
        batch_size: images (untiled) or tiles per forward pass; the memory of the activations grows with it.

    Shape:
        images (N, C, H, W) -> probabilities (N, K, H, W), summing to 1 over K; K = 2 for a one-channel
        sigmoid model. The array module and float type follow the network's output.
    """
    if isinstance(images, Tensor):
        images = images.data
    shape = tuple(getattr(images, "shape", ()))
    if len(shape) != 4:
        raise ValueError(f"{_FN}: images must be a 4-D array (N, C, H, W), got shape {shape}")
    if numpy.dtype(images.dtype).kind != "f":
        raise ValueError(f"{_FN}: images must be a float array (the normalized network input), got {images.dtype}")
    if not isinstance(flip, bool):
        raise ValueError(f"{_FN}: flip must be True or False, got {flip!r}")
    scales = _check_scales(scales)
    batch_size = positive_int(batch_size, "batch_size", _FN)
    net = _Network.of(model)
    tiling = net.tiling(tile, overlap)

    N, _, H, W = shape
    passes = [(s, flipped) for s in scales for flipped in ((False, True) if flip else (False,))]
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with no_grad():
            total = None
            for s, flipped in passes:
                size = (max(1, round(H * s)), max(1, round(W * s)))
                x = _resize(images, size)
                x = get_array_module(x).ascontiguousarray(x[..., ::-1]) if flipped else x
                p = _predict_once(net, x, tiling, batch_size)  # (N, K, *size)
                p = p[..., ::-1] if flipped else p  # back to the image's orientation
                p = _resize(p, (H, W))
                if total is None:  # the first pass; later ones are added in place, so own the array
                    total = p if len(passes) == 1 else get_array_module(p).array(p, copy=True)
                else:
                    total += p
    finally:
        for m, training in modes:  # each module's own mode (a frozen batch norm may differ from the rest)
            m.training = training
    if len(passes) > 1:
        total /= len(passes)
    return total


def log_probabilities(p):
    """``log p`` of probabilities (N, K, H, W): logits whose softmax is ``p`` again, so the cross-entropy
    of ``predict``'s averaged probabilities is computed as for a network's logits. A probability of
    exactly 0 gives -inf (an infinite loss at that pixel, not a clipped one)."""
    with numpy.errstate(divide="ignore"):  # log(0) = -inf is the answer, not an accident
        return get_array_module(p).log(p)


def options_from_text(tile=None, overlap=None, flip=False, scales=None):
    """``predict``'s options from the command line's text (``--tile 64x96 --overlap 16 --flip --scales
    0.5,1,1.5``), or None when nothing is asked (the plain forward).

    >>> options_from_text("64x96", "16", True, "0.5,1")
    {'tile': (64, 96), 'overlap': 16, 'flip': True, 'scales': (0.5, 1.0)}
    """
    def pixels(text, what):  # "64" -> 64, "64x96" -> (64, 96)
        parts = str(text).lower().split("x")
        if len(parts) not in (1, 2) or not all(v.strip().isdigit() for v in parts):
            raise ValueError(f"{what} must be N or HxW in whole pixels, got {text!r}")
        return int(parts[0]) if len(parts) == 1 else (int(parts[0]), int(parts[1]))

    if tile is None and overlap is None and not flip and scales is None:
        return None
    if scales is not None:
        try:
            scales = tuple(float(v) for v in str(scales).split(",") if v.strip())
        except ValueError:
            raise ValueError(f"--scales must be comma-separated numbers such as 0.5,1,1.5, got {scales!r}") from None
    return {"tile": None if tile is None else pixels(tile, "--tile"),
            "overlap": None if overlap is None else pixels(overlap, "--overlap"),
            "flip": bool(flip), "scales": (1.0,) if scales is None else _check_scales(scales)}


# ----------------------------------------------------------------- checks
def _check_scales(scales):
    """``scales`` as a tuple of positive finite floats, or a clear error."""
    try:
        values = tuple(float(s) for s in scales)
    except (TypeError, ValueError):
        raise ValueError(f"{_FN}: scales must be a sequence of positive numbers, got {scales!r}") from None
    if not values or any(not math.isfinite(s) or s <= 0 for s in values):
        raise ValueError(f"{_FN}: scales must be a non-empty sequence of positive numbers, got {scales!r}")
    return values


def _resize(x, size):
    """Bilinear resize of (N, C, h, w) to ``size`` (x itself when it has that size already)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False).data


def _probabilities(logits):
    """(n, K, h, w) logits -> probabilities: softmax over K, or [1 - p, p] for one sigmoid channel."""
    if logits.shape[1] == 1:
        p = F.sigmoid(logits).data
        return get_array_module(p).concatenate([1 - p, p], axis=1)
    return F.softmax(logits, dim=1).data


def _mirror(index, size):
    """Indices into an axis of ``size`` pixels, mirrored at both ends as often as needed.

    The reflection does not repeat the edge pixel (-1 -> 1, size -> size - 2), so the
    mirrored axis has period 2 (size - 1), as ``models.unet.mirror_pad``; an axis of one
    pixel is its own mirror image.

    >>> _mirror(numpy.arange(-4, 8), 3).tolist()
    [0, 1, 2, 1, 0, 1, 2, 1, 0, 1, 2, 1]
    """
    if size == 1:
        return numpy.zeros_like(index)
    period = 2 * (size - 1)
    r = index % period
    return numpy.where(r < size, r, period - r)


# ----------------------------------------------------------------- the network
@dataclass
class _Network:
    """What tiling needs to know of a model: how to run it, its margin and its pooling grid."""

    model: object
    margin: int  # pixels a valid network trims from each side of its input; 0 for 'same' networks
    grid: int  # the network is the same at every position only for shifts by multiples of this
    depth: int | None  # the valid U-Net's number of poolings (None otherwise)

    @classmethod
    def of(cls, model):
        config = getattr(model, "config", None)
        if isinstance(model, UNet):
            if not config.padding:
                return cls(model, model.margin(), 2**config.depth, config.depth)
            return cls(model, 0, 2**config.depth, None)
        return cls(model, 0, int(getattr(config, "output_stride", None) or 32), None)

    @property
    def valid(self):
        return self.depth is not None

    def run(self, x):
        """Logits for the batch ``x`` (n, C, h, w): (n, K, h - 2m, w - 2m)."""
        if self.valid:
            # the tiles are valid inputs that already carry their context: the network proper,
            # without forward's own mirroring (which tiling='same' would add again)
            check_image_batch(x, self.model.config.in_channels, "U-Net")
            return self.model._forward(Tensor(x))
        return self.model(Tensor(x))

    # ------------------------------------------------------------- tile checks
    def smallest_tile(self):
        """The smallest tile worth tiling with: a valid input size whose output tile holds at least one
        pooling cell (so consecutive tiles can keep to the grid); one grid cell for 'same' networks."""
        if not self.valid:
            return self.grid
        t = 1
        while (valid_output_size(t, self.depth) or 0) < self.grid:
            t += 1
        return t

    def tiling(self, tile, overlap):
        """((tile_h, overlap_h), (tile_w, overlap_w)) checked, or None for the whole image."""
        if tile is None:
            if overlap is not None:
                raise ValueError(f"{_FN}: overlap={overlap!r} needs a tile size (tile=N or (h, w))")
            return None
        tiles = pair(tile, "tile", _FN, minimum=1)
        default = 0 if self.valid else None
        overlaps = pair(overlap, "overlap", _FN, minimum=0) if overlap is not None else (default, default)
        return tuple(self._check_axis(t, o) for t, o in zip(tiles, overlaps))

    def _check_axis(self, t, ov):
        smallest = self.smallest_tile()
        what = f"the valid U-Net (depth {self.depth})"
        if t < smallest:
            why = (f"than {what} can tile with" if self.valid else
                   f"than one cell of {type(self.model).__name__}'s pooling grid")
            raise ValueError(f"{_FN}: tile {t} is smaller {why}: the smallest valid tile is {smallest}")
        if self.valid and valid_output_size(t, self.depth) is None:
            below = max(s for s in range(smallest, t) if valid_output_size(s, self.depth))
            above = next(s for s in range(t + 1, t + 2 * self.grid) if valid_output_size(s, self.depth))
            raise ValueError(f"{_FN}: tile {t} is not an input size {what} can pool (every 2x2 pooling must "
                             f"meet an even size): the nearest valid tiles are {below} and {above}")
        if ov is None:
            ov = t // 4
        if self.valid:
            out = t - 2 * self.margin
            largest = out - self.grid  # the output tiles must still step by one grid cell
            if ov > largest:
                raise ValueError(f"{_FN}: overlap {ov} is too large for tile {t}, whose output tile is {out} "
                                 f"pixels and must step by a multiple of {self.grid}: the largest valid overlap "
                                 f"is {largest}")
        elif ov >= t:
            raise ValueError(f"{_FN}: overlap {ov} is not below the tile {t}: the largest valid overlap is {t - 1}")
        return t, ov


# ----------------------------------------------------------------- tiles along one axis
@dataclass
class _Axis:
    """The tiles along one image axis.

    ``size``: the input tile size; ``starts``: each tile's first input pixel (image coordinates,
    beyond the image for a valid network: mirrored); ``out``: each tile's first output pixel and
    how many of its output pixels are kept; ``weights``: each tile's blending weights along the axis
    (None for a valid network, whose output tiles are written, not blended); ``norm``: their sum at
    every pixel.
    """

    size: int
    starts: list
    out: list
    weights: list | None = None
    norm: numpy.ndarray | None = None


def _valid_axis(length, tile, overlap, net):
    """Overlap-tile along an axis of ``length`` pixels: output tiles of ``tile - 2m`` pixels stepping
    by a multiple of the grid; each input tile reaches ``m`` pixels beyond its output tile."""
    m = net.margin
    whole = _smallest_valid(length + 2 * m, net.depth)  # one tile holds the whole image
    if tile is None or tile >= whole:
        return _Axis(whole, [-m], [(0, length)])
    out = tile - 2 * m
    step = (out - overlap) // net.grid * net.grid
    count = 1 + -(-(length - out) // step)  # ceil: the last output tile reaches the end
    firsts = [k * step for k in range(count)]
    return _Axis(tile, [s - m for s in firsts], [(s, min(out, length - s)) for s in firsts])


def _smallest_valid(size, depth):
    """The smallest input size >= ``size`` the valid U-Net can pool (valid sizes recur every 2**depth)."""
    while valid_output_size(size, depth) is None:
        size += 1
    return size


def _same_axis(length, tile, overlap, net):
    """Overlapping tiles of a 'same' network, blended by a Gaussian window (sigma = tile / 8)."""
    if tile is None or tile >= length:  # one tile along this axis (the other may have several)
        return _Axis(length, [0], [(0, length)], [numpy.ones(length)], numpy.ones(length))
    step = tile - overlap
    if step >= net.grid:
        step -= step % net.grid  # keep every tile on the same pooling grid (the overlap grows a little)
    count = 1 + -(-(length - tile) // step)
    starts = [min(k * step, length - tile) for k in range(count)]  # the last one moved back inside
    i = numpy.arange(tile) + 0.5  # pixel centres
    # exp(-8) = 3e-4 at the tile's border, where the zeros beyond it are felt most: > 0, so every pixel is counted
    window = numpy.exp(-0.5 * ((i - tile / 2) / (tile / 8)) ** 2)
    norm = numpy.zeros(length)
    for s in starts:
        norm[s:s + tile] += window
    return _Axis(tile, starts, [(s, tile) for s in starts], [window] * count, norm)


# ----------------------------------------------------------------- one pass
def _predict_once(net, x, tiling, batch_size):
    """Probabilities (N, K, H, W) of ``x`` (N, C, H, W), tile by tile (``tiling`` None: whole images)."""
    N, _, H, W = x.shape
    if tiling is None and not net.valid:  # the network takes any size: no tiles
        parts = [_probabilities(net.run(x[i:i + batch_size])) for i in range(0, N, batch_size)]
        return parts[0] if len(parts) == 1 else get_array_module(parts[0]).concatenate(parts)
    make = _valid_axis if net.valid else _same_axis
    (th, oh), (tw, ow) = tiling if tiling is not None else ((None, 0), (None, 0))
    rows, cols = make(H, th, oh, net), make(W, tw, ow, net)

    xp = get_array_module(x)
    index_r = [xp.asarray(_mirror(numpy.arange(s, s + rows.size), H)) for s in rows.starts]
    index_c = [xp.asarray(_mirror(numpy.arange(s, s + cols.size), W)) for s in cols.starts]
    jobs = [(n, a, b) for n in range(N) for a in range(len(rows.starts)) for b in range(len(cols.starts))]
    out = None
    for j in range(0, len(jobs), batch_size):
        chunk = jobs[j:j + batch_size]
        # (n, C, tile_h, tile_w): each tile cut out (and mirrored where it leaves the image)
        batch = xp.stack([x[n][:, index_r[a][:, None], index_c[b][None, :]] for n, a, b in chunk])
        p = _probabilities(net.run(batch))  # (n, K, out_h, out_w)
        if out is None:
            out = xp.zeros((N, p.shape[1], H, W), dtype=p.dtype)
        for (n, a, b), tile_p in zip(chunk, p):
            (r0, kr), (c0, kc) = rows.out[a], cols.out[b]
            if net.valid:  # the output tiles agree where they overlap: written
                out[n, :, r0:r0 + kr, c0:c0 + kc] = tile_p[:, :kr, :kc]
            else:
                w = xp.asarray(numpy.outer(rows.weights[a], cols.weights[b]), dtype=p.dtype)  # (tile_h, tile_w)
                out[n, :, r0:r0 + kr, c0:c0 + kc] += tile_p * w
    if not net.valid:  # the summed weights are norm_r (x) norm_c: divide by each in turn
        out /= xp.asarray(rows.norm, dtype=out.dtype)[:, None]
        out /= xp.asarray(cols.norm, dtype=out.dtype)
    return out
