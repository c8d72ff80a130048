"""Shape ops: concatenate, pad, crop.

These carry the skip connections of U-Net and FCN: features from the encoder
are cropped (or the decoder's padded) to a common size and concatenated along
channels or summed.
"""

from __future__ import annotations

from ..autograd import Function, Tensor
from ..backend import get_array_module

__all__ = ["cat", "pad", "center_crop", "crop"]


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


def pad(input, pad, mode="constant", value=0.0):
    """Pad the last dimensions of ``input``, as ``torch.nn.functional.pad`` (constant mode).

    Shape: ``out.shape[-1] = in.shape[-1] + pad[0] + pad[1]``, and so on
    backwards for the pairs that follow.
    """
    if mode != "constant":
        raise ValueError(f"pad mode {mode!r} is not supported; expected 'constant'")
    pad = tuple(int(p) for p in pad)
    if len(pad) % 2 or len(pad) // 2 > input.ndim:
        raise ValueError(
            f"pad needs an even number of amounts, at most 2 per dimension ({2 * input.ndim}), got {pad}"
        )
    for i in range(len(pad) // 2):
        n = input.shape[input.ndim - 1 - i]
        if n + pad[2 * i] + pad[2 * i + 1] < 0:
            raise ValueError(f"pad {pad} would make dimension {input.ndim - 1 - i} (size {n}) negative")
    return Pad.apply(input, pad, value)


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
