"""Max-unpooling: put each pooled value back where its maximum came from.

SegNet's decoder (Badrinarayanan et al. 2017) up-samples this way: the
encoder's ``max_pool2d(..., return_indices=True)`` remembers, for every
window, the flat index ``h*W + w`` of its maximum in the ``(H, W)`` plane; the
decoder scatters its values to those positions and leaves zeros elsewhere,
a sparse map that the following convolutions densify. No parameters, and the
boundaries the encoder saw come back in place.
"""

from __future__ import annotations

import numpy

from ..args import is_int, pair
from ..autograd import Function, Tensor
from ..backend import get_array_module

__all__ = ["max_unpool2d"]


class MaxUnpool2d(Function):
    """out[n, c].flat[indices[n, c, h, w]] = x[n, c, h, w]; every other output entry is 0.

    Shape: x, indices (N, C, H, W) -> (N, C, Ho, Wo) (or without N); planes are
    flattened to (N*C, H*W) and (N*C, Ho*Wo), so one fancy assignment scatters them all.
    """

    @staticmethod
    def forward(ctx, x, indices, out_hw):
        xp = get_array_module(x)
        planes = int(numpy.prod(x.shape[:-2]))  # N*C (C when unbatched)
        flat = indices.reshape(planes, -1)  # (N*C, H*W) positions in the output plane
        out = xp.zeros((planes, out_hw[0] * out_hw[1]), dtype=x.dtype)  # (N*C, Ho*Wo)
        rows = xp.arange(planes).reshape(planes, 1)  # (N*C, 1), broadcast along the plane
        out[rows, flat] = x.reshape(planes, -1)
        ctx.flat, ctx.x_shape = flat, x.shape
        return out.reshape(x.shape[:-2] + tuple(out_hw))

    # Gradient: each input was copied to one output position, so it gets that
    # position's gradient back (a gather): dx[n, c, h, w] = dout[n, c].flat[indices[n, c, h, w]].
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        planes = ctx.flat.shape[0]
        dx = xp.take_along_axis(dout.reshape(planes, -1), ctx.flat, axis=1)  # (N*C, H*W)
        return dx.reshape(ctx.x_shape), None, None


def _unpool_output_size(fn, shape, k, s, p, output_size):
    """The default ``(H - 1)*stride - 2*padding + kernel_size`` per axis, or ``output_size``
    checked against it as torch does (strictly within one stride of the default)."""
    default = tuple((shape[-2 + a] - 1) * s[a] - 2 * p[a] + k[a] for a in range(2))
    if output_size is None:
        size = default
    else:
        size = tuple(output_size)
        if len(size) == len(shape):
            size = size[-2:]  # torch also takes the full output shape
        if len(size) != 2 or not all(is_int(n) for n in size):
            raise ValueError(
                f"{fn}(): output_size must be (Ho, Wo) or the full output shape, got {output_size!r}"
            )
        for a in range(2):
            if not default[a] - s[a] < size[a] < default[a] + s[a]:
                raise ValueError(
                    f"{fn}(): invalid output_size {tuple(output_size)}: dimension {a} must lie strictly between "
                    f"{default[a] - s[a]} and {default[a] + s[a]} (the default {default[a]} +- stride {s[a]})"
                )
    if size[0] <= 0 or size[1] <= 0:
        raise ValueError(f"{fn}(): the output size {size} is not positive for input shape {tuple(shape)}")
    return tuple(int(n) for n in size)


def max_unpool2d(input, indices, kernel_size, stride=None, padding=0, output_size=None):
    """The partial inverse of ``max_pool2d``, as ``torch.nn.functional.max_unpool2d``.

    ``indices`` are ``max_pool2d(..., return_indices=True)``'s: for every
    input value, the flat index ``h*Wo + w`` of its position in the output
    plane. Each value goes there; every other output entry is zero.
    ``stride`` defaults to ``kernel_size``.

    Shape:
        input, indices (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo) with
        ``Ho = (H - 1)*stride[0] - 2*padding[0] + kernel_size[0]`` (the same for W),
        or ``output_size`` when given (it must lie strictly within one stride of that),
        which is how the size of an odd input is recovered.

        >>> import numpy as np
        >>> from scratchseg.functional import max_pool2d
        >>> x = np.arange(25.0).reshape(1, 1, 5, 5)
        >>> out, idx = max_pool2d(x, 2, return_indices=True)
        >>> max_unpool2d(out, idx, 2).shape     # (2 - 1)*2 + 2 = 4: too small for 5x5's indices
        Traceback (most recent call last):
        ...
        ValueError: max_unpool2d(): index 18 at position (0, 0, 1, 1) of indices does not fit the 4x4 output plane (expected 0 <= index < 16); pass the pooled input's size as output_size
        >>> max_unpool2d(out, idx, 2, output_size=(5, 5)).numpy()[0, 0]
        array([[ 0.,  0.,  0.,  0.,  0.],
               [ 0.,  6.,  0.,  8.,  0.],
               [ 0.,  0.,  0.,  0.,  0.],
               [ 0., 16.,  0., 18.,  0.],
               [ 0.,  0.,  0.,  0.,  0.]])
    """
    fn = "max_unpool2d"
    if not (hasattr(input, "shape") and hasattr(input, "dtype")):
        raise TypeError(f"{fn}(): input must be a Tensor or an array, got {type(input).__name__}")
    if input.ndim not in (3, 4):
        raise ValueError(f"{fn}(): expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {tuple(input.shape)}")
    idx = indices.data if isinstance(indices, Tensor) else indices
    if not (hasattr(idx, "shape") and hasattr(idx, "dtype")) or numpy.dtype(idx.dtype).kind not in "iu":
        what = getattr(idx, "dtype", type(idx).__name__)
        raise TypeError(f"{fn}(): indices must be an integer array or Tensor (max_pool2d's), got {what}")
    if tuple(idx.shape) != tuple(input.shape):
        raise ValueError(
            f"{fn}(): indices must have the input's shape {tuple(input.shape)}, got {tuple(idx.shape)}"
        )
    k = pair(kernel_size, "kernel_size", f"{fn}()", minimum=1)
    s = k if stride is None else pair(stride, "stride", f"{fn}()", minimum=1)
    p = pair(padding, "padding", f"{fn}()", minimum=0)
    out_hw = _unpool_output_size(fn, input.shape, k, s, p, output_size)
    plane = out_hw[0] * out_hw[1]
    if idx.size:
        low, high = int(idx.min()), int(idx.max())
        if low < 0 or high >= plane:
            xp = get_array_module(idx)
            bad = low if low < 0 else high
            where = tuple(int(i) for i in numpy.unravel_index(int(xp.argmax(idx == bad)), idx.shape))
            raise ValueError(
                f"{fn}(): index {bad} at position {where} of indices does not fit the {out_hw[0]}x{out_hw[1]} "
                f"output plane (expected 0 <= index < {plane}); pass the pooled input's size as output_size"
            )
    return MaxUnpool2d.apply(input, idx, out_hw)
