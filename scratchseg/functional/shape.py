"""Shape ops: concatenate, pad (constant, reflect, replicate), crop, pixel
shuffle and unshuffle, one-hot.

These carry the skip connections of U-Net and FCN: features from the encoder
are cropped (or the decoder's padded) to a common size and concatenated along
channels or summed. Reflect padding is U-Net's mirroring of the image border;
pixel shuffle is the rearrangement behind sub-pixel convolution (Shi et al.
2016), up-sampling by moving channels into space.
"""

from __future__ import annotations

import numpy

from ..args import is_int
from ..autograd import Function, Tensor
from ..backend import get_array_module

__all__ = ["cat", "pad", "center_crop", "crop", "pixel_shuffle", "pixel_unshuffle", "one_hot"]


class Cat(Function):
    """out = [x_0, x_1, ...] joined along ``dim``.

    Shape: inputs agree on every dimension except ``dim``;
    ``out.shape[dim] = sum_i x_i.shape[dim]``.
    Gradient: each input gets its own slice of ``dout`` back.
    """

    @staticmethod
    def forward(ctx, dim, *xs):
        xp = get_array_module(*xs)
        ctx.dim = dim
        ctx.sizes = [x.shape[dim] for x in xs]
        return xp.concatenate(xs, axis=dim)

    @staticmethod
    def backward(ctx, dout):
        grads, start = [None], 0
        for size, needed in zip(ctx.sizes, ctx.needs_input_grad[1:]):
            index = [slice(None)] * dout.ndim
            index[ctx.dim] = slice(start, start + size)
            grads.append(dout[tuple(index)] if needed else None)
            start += size
        return tuple(grads)


def cat(tensors, dim=0):
    """Concatenate a sequence of tensors (or arrays) along ``dim``, as ``torch.cat``."""
    tensors = list(tensors)
    if not tensors:
        raise ValueError("cat() needs a non-empty sequence of tensors")
    ndim = tensors[0].ndim
    if not -ndim <= dim < ndim:
        raise IndexError(f"cat dimension {dim} is out of range for {ndim}-D tensors")
    dim %= ndim
    ref = tensors[0].shape
    for i, t in enumerate(tensors):
        shape = t.shape
        if len(shape) != ndim or any(a != b for k, (a, b) in enumerate(zip(shape, ref)) if k != dim):
            raise ValueError(
                f"cat: tensor {i} has shape {tuple(shape)}, expected {tuple(ref)} except in dimension {dim}"
            )
    return Cat.apply(dim, *tensors)


class Pad(Function):
    """Constant padding. ``pads`` is torch's order: last dimension first,
    ``(left, right, top, bottom, ...)``; negative amounts crop.

    Gradient: dx = the interior of dout (the padded border got constants).
    """

    @staticmethod
    def forward(ctx, x, pads, value):
        xp = get_array_module(x)
        ctx.in_shape = x.shape
        widths = [(0, 0)] * x.ndim
        for i in range(len(pads) // 2):
            widths[x.ndim - 1 - i] = (pads[2 * i], pads[2 * i + 1])
        # negative widths crop: slice first, then pad what is positive
        crop = tuple(slice(max(-a, 0), n - max(-b, 0)) for (a, b), n in zip(widths, x.shape))
        ctx.crop = crop
        ctx.widths = [(max(a, 0), max(b, 0)) for a, b in widths]
        return xp.pad(x[crop], ctx.widths, mode="constant", constant_values=value)

    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        interior = tuple(slice(a, n - b) for (a, b), n in zip(ctx.widths, dout.shape))
        g = dout[interior]
        if g.shape == ctx.in_shape:
            return g, None, None
        dx = xp.zeros(ctx.in_shape, dtype=dout.dtype)
        dx[ctx.crop] = g
        return dx, None, None


def _source_index(n, before, after, mode):
    """For each output position along one axis, the input position it copies.

    Output ``j`` sits at input coordinate ``i = j - before`` (``before < 0``
    crops). Inside ``[0, n)`` it copies ``i``; outside, ``'reflect'`` mirrors
    about the edge without repeating it (``-i`` and ``2(n-1) - i``) and
    ``'replicate'`` repeats the edge (``clip(i, 0, n-1)``).

    >>> _source_index(4, 2, 3, "reflect")
    array([2, 1, 0, 1, 2, 3, 2, 1, 0])
    >>> _source_index(4, 2, 1, "replicate")
    array([0, 0, 0, 1, 2, 3, 3])
    """
    i = numpy.arange(-before, n + after)
    if mode == "replicate":
        return numpy.clip(i, 0, n - 1)
    i = numpy.abs(i)  # reflect the left border: -i
    return numpy.where(i >= n, 2 * (n - 1) - i, i)  # and the right one


class PadIndexed(Function):
    """Reflect or replicate padding: along each padded axis, ``out[j] = x[src[j]]``
    with ``src`` from ``_source_index`` (a gather, one axis after the other).

    Gradient: the adjoint of a gather is a scatter-add. Along each axis (last
    padded axis first, undoing the forward in reverse) the interior of ``dout``
    goes back to its own position and every border position ``j`` adds its
    gradient to ``dx[src[j]]``: an edge pixel copied three times gets three
    gradients.
    """

    @staticmethod
    def forward(ctx, x, pads, mode):
        xp = get_array_module(x)
        ctx.axes = []  # (axis, n, before, src) for every padded axis, in forward order
        for k in range(len(pads) // 2):
            axis, before, after = x.ndim - 1 - k, pads[2 * k], pads[2 * k + 1]
            n = x.shape[axis]
            src = _source_index(n, before, after, mode)  # (n + before + after,) host ints
            ctx.axes.append((axis, n, before, src))
            x = xp.take(x, xp.asarray(src), axis=axis)
        return x

    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        for axis, n, before, src in reversed(ctx.axes):
            g = xp.moveaxis(dout, axis, -1)  # (..., n_out): the padded axis last
            dx = xp.zeros(g.shape[:-1] + (n,), dtype=dout.dtype)  # (..., n)
            lo = min(max(before, 0), len(src))  # output positions [lo, hi) lie inside the input
            hi = max(lo, min(before + n, len(src)))
            dx[..., lo - before : hi - before] = g[..., lo:hi]
            for j in list(range(lo)) + list(range(hi, len(src))):  # the border: a few columns each side
                dx[..., src[j]] += g[..., j]
            dout = xp.moveaxis(dx, -1, axis)
        return dout, None, None


_PAD_MODES = ("constant", "reflect", "replicate")


def pad(input, pad, mode="constant", value=None):
    """Pad the last dimensions of ``input``, as ``torch.nn.functional.pad``.

    ``pad`` is torch's order, last dimension first: ``(left, right)``,
    ``(left, right, top, bottom)``, ... . Modes:

    * ``'constant'``: fill with ``value`` (0 by default); any number of
      dimensions, negative amounts crop;
    * ``'reflect'``: mirror about the edge without repeating it
      (``[1 2 3] -> 3 2 [1 2 3] 2 1``); each amount must be smaller than the
      size it pads (torch's rule);
    * ``'replicate'``: repeat the edge (``[1 2 3] -> 1 1 [1 2 3] 3 3``).

    ``'reflect'`` and ``'replicate'`` pad the last 1, 2 or 3 dimensions of an
    input with one or two dimensions more (a 2-D pad of 4 amounts takes
    ``(C, H, W)`` or ``(N, C, H, W)``), as torch.

    Shape:
        ``out.shape[-1] = in.shape[-1] + pad[0] + pad[1]``,
        ``out.shape[-2] = in.shape[-2] + pad[2] + pad[3]``, and so on.

        >>> import numpy as np
        >>> x = np.arange(1.0, 4.0).reshape(1, 1, 3)
        >>> pad(x, (2, 2), mode="reflect").numpy()[0, 0]
        array([3., 2., 1., 2., 3., 2., 1.])
        >>> pad(x, (2, 1), mode="replicate").numpy()[0, 0]
        array([1., 1., 1., 2., 3., 3.])
        >>> pad(np.zeros((2, 3, 5, 7)), (1, 2, 3, 0), mode="reflect").shape
        (2, 3, 8, 10)
    """
    if mode not in _PAD_MODES:
        raise ValueError(f"pad mode {mode!r} is not supported; expected one of {', '.join(map(repr, _PAD_MODES))}")
    if not all(is_int(p) for p in pad):
        raise TypeError(f"pad amounts must be ints, got {tuple(pad)}")
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2 or len(pad) // 2 > input.ndim:
        raise ValueError(
            f"pad needs an even number of amounts, at most 2 per dimension ({2 * input.ndim}), got {pad}"
        )
    for i in range(len(pad) // 2):
        n = input.shape[input.ndim - 1 - i]
        if n + pad[2 * i] + pad[2 * i + 1] < 0:
            raise ValueError(f"pad {pad} would make dimension {input.ndim - 1 - i} (size {n}) negative")
    if mode == "constant":
        return Pad.apply(input, pad, 0.0 if value is None else value)

    if value not in (None, 0, 0.0):
        raise ValueError(f"pad mode {mode!r} takes no fill value, got value={value!r}")
    d = len(pad) // 2
    if d not in (1, 2, 3) or input.ndim not in (d + 1, d + 2):
        raise ValueError(
            f"pad mode {mode!r} with {len(pad)} amounts pads the last {d} dimension(s) of a "
            f"{d + 1}-D or {d + 2}-D input, got a {input.ndim}-D input of shape {tuple(input.shape)} "
            "(2 amounts: 2-D or 3-D input; 4: 3-D or 4-D; 6: 4-D or 5-D)"
        )
    for k in range(d):
        axis, n = input.ndim - 1 - k, input.shape[input.ndim - 1 - k]
        before, after = pad[2 * k], pad[2 * k + 1]
        if n == 0:
            raise ValueError(f"pad mode {mode!r} cannot pad dimension {axis} of size 0 (shape {tuple(input.shape)})")
        if mode == "reflect" and (before >= n or after >= n):
            raise ValueError(
                f"reflect padding must be smaller than the dimension it pads: got padding ({before}, {after}) "
                f"for dimension {axis} of size {n} (input shape {tuple(input.shape)}); expected at most {n - 1}"
            )
    return PadIndexed.apply(input, pad, mode)


def crop(input, top, left, height, width):
    """``input[..., top:top+height, left:left+width]`` with a clear error when it does not fit."""
    H, W = input.shape[-2], input.shape[-1]
    if top < 0 or left < 0 or top + height > H or left + width > W:
        raise ValueError(f"crop ({top}, {left}, {height}, {width}) does not fit in a {H}x{W} input")
    return input[..., top : top + height, left : left + width]


def center_crop(input, size):
    """The central ``size = (h, w)`` window of the last two dimensions (U-Net's skip crop).

    When the margin is odd the extra row/column is dropped at the bottom/right.
    """
    h, w = size
    H, W = input.shape[-2], input.shape[-1]
    if h > H or w > W:
        raise ValueError(f"cannot center-crop a {H}x{W} input to {h}x{w}: the crop is larger")
    if (h, w) == (H, W):
        return input  # nothing to crop (a padded U-Net): no copy, no gradient pass
    top, left = (H - h) // 2, (W - w) // 2
    return input[..., top : top + h, left : left + w]


# ------------------------------------------------------------- pixel shuffle
def _shuffle(x, r):
    """(*, C*r*r, H, W) -> (*, C, H*r, W*r): ``out[c, h*r + i, w*r + j] = x[c*r*r + i*r + j, h, w]``."""
    *batch, Cr2, H, W = x.shape
    C = Cr2 // (r * r)
    x = x.reshape(-1, C, r, r, H, W)  # (B, C, i, j, H, W)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # (B, C, H, i, W, j)
    return x.reshape(*batch, C, H * r, W * r)


def _unshuffle(x, r):
    """(*, C, H*r, W*r) -> (*, C*r*r, H, W), the inverse (and the adjoint) of ``_shuffle``."""
    *batch, C, Hr, Wr = x.shape
    H, W = Hr // r, Wr // r
    x = x.reshape(-1, C, H, r, W, r)  # (B, C, H, i, W, j)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # (B, C, i, j, H, W)
    return x.reshape(*batch, C * r * r, H, W)


class PixelShuffle(Function):
    """out[..., c, h*r + i, w*r + j] = x[..., c*r^2 + i*r + j, h, w]: a permutation of the entries.

    Gradient: a permutation's adjoint is its inverse, so dx = pixel_unshuffle(dout, r).
    """

    @staticmethod
    def forward(ctx, x, r):
        ctx.r = r
        return _shuffle(x, r)

    @staticmethod
    def backward(ctx, dout):
        return _unshuffle(dout, ctx.r), None


class PixelUnshuffle(Function):
    """out[..., c*r^2 + i*r + j, h, w] = x[..., c, h*r + i, w*r + j], the inverse of ``PixelShuffle``.

    Gradient: dx = pixel_shuffle(dout, r).
    """

    @staticmethod
    def forward(ctx, x, r):
        ctx.r = r
        return _unshuffle(x, r)

    @staticmethod
    def backward(ctx, dout):
        return _shuffle(dout, ctx.r), None


def _check_factor(input, factor, name, fn):
    if not is_int(factor) or factor <= 0:
        raise ValueError(f"{fn}(): {name} must be a positive integer, got {factor!r}")
    if input.ndim < 3:
        raise ValueError(
            f"{fn}(): expected an input of at least 3 dimensions (*, C, H, W), got shape {tuple(input.shape)}"
        )
    return int(factor)


def pixel_shuffle(input, upscale_factor):
    """Move channels into space, as ``torch.nn.functional.pixel_shuffle``: each group of
    ``r^2`` channels becomes one channel, ``r`` times taller and wider.

    With a convolution to ``C*r^2`` channels in front, this is the sub-pixel
    convolution of Shi et al. (2016): a learned up-sampling computed at low
    resolution.

    Shape:
        (*, C*r^2, H, W) -> (*, C, H*r, W*r), r = upscale_factor

        >>> import numpy as np
        >>> pixel_shuffle(np.zeros((2, 12, 3, 5)), 2).shape
        (2, 3, 6, 10)
        >>> pixel_shuffle(np.arange(4.0).reshape(1, 4, 1, 1), 2).numpy()[0, 0]
        array([[0., 1.],
               [2., 3.]])
    """
    r = _check_factor(input, upscale_factor, "upscale_factor", "pixel_shuffle")
    C = input.shape[-3]
    if C % (r * r):
        raise ValueError(
            f"pixel_shuffle(): the channel dimension must be divisible by upscale_factor**2 = {r * r}, "
            f"got {C} channels (input shape {tuple(input.shape)})"
        )
    return PixelShuffle.apply(input, r)


def pixel_unshuffle(input, downscale_factor):
    """Move space into channels, as ``torch.nn.functional.pixel_unshuffle``: the inverse of ``pixel_shuffle``.

    Shape:
        (*, C, H*r, W*r) -> (*, C*r^2, H, W), r = downscale_factor

        >>> import numpy as np
        >>> pixel_unshuffle(np.zeros((2, 3, 6, 10)), 2).shape
        (2, 12, 3, 5)
    """
    r = _check_factor(input, downscale_factor, "downscale_factor", "pixel_unshuffle")
    H, W = input.shape[-2:]
    if H % r or W % r:
        raise ValueError(
            f"pixel_unshuffle(): height and width must be divisible by downscale_factor = {r}, "
            f"got {H}x{W} (input shape {tuple(input.shape)})"
        )
    return PixelUnshuffle.apply(input, r)


# ------------------------------------------------------------------ one-hot
def one_hot(tensor, num_classes=-1):
    """``out[..., k] = 1`` where ``tensor == k``, else 0, as ``torch.nn.functional.one_hot``.

    ``tensor`` holds integer class indices in ``[0, num_classes)``;
    ``num_classes=-1`` takes ``max + 1``. The result is an int64 Tensor that
    needs no gradient (a function of integers has none).

    Shape:
        (*) -> (*, num_classes)

        >>> import numpy as np
        >>> one_hot(np.array([0, 2, 1]), 4).numpy()
        array([[1, 0, 0, 0],
               [0, 0, 1, 0],
               [0, 1, 0, 0]])
        >>> one_hot(np.zeros((2, 5, 7), dtype=np.int64)).shape
        (2, 5, 7, 1)
    """
    x = tensor.data if isinstance(tensor, Tensor) else tensor
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"one_hot(): expected an integer array or Tensor, got {type(tensor).__name__}")
    if numpy.dtype(x.dtype).kind not in "iu":
        raise TypeError(f"one_hot(): expected integer class indices, got dtype {x.dtype}")
    if not is_int(num_classes) or num_classes < -1:
        raise ValueError(f"one_hot(): num_classes must be -1 or a non-negative integer, got {num_classes!r}")
    xp = get_array_module(x)
    if x.size:
        low, high = int(x.min()), int(x.max())
        if low < 0:
            raise ValueError(f"one_hot(): class values must be non-negative, got {low}")
        if num_classes != -1 and high >= num_classes:
            raise ValueError(f"one_hot(): class values must be smaller than num_classes = {num_classes}, got {high}")
    elif num_classes == -1:
        raise ValueError("one_hot(): cannot infer the number of classes from an empty tensor; pass num_classes")
    K = high + 1 if num_classes == -1 else int(num_classes)
    out = x[..., None] == xp.arange(K)  # (*, K) booleans
    return Tensor(out.astype(numpy.int64))
