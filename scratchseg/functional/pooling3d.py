"""Pooling over volumes: max, average and adaptive average over 3-D windows.

The 2-D page (``pooling.py``) with one axis more; read that one first. Every
pooling is a loop over the ``kd x kh x kw`` kernel taps: tap ``(i, j, l)`` is
one strided slice of the padded input, of shape ``(N, C, Do, Ho, Wo)``,

    window_ijl = x_pad[:, :, i*dd : ... : sd, j*dh : ... : sh, l*dw : ... : sw]

and the backward is the same loop with ``+=``. Output sizes follow the 2-D
rule along each axis (``pool_output_size``, ceil_mode included):

    D_out = floor((D + 2*padding[0] - dilation[0]*(kernel_size[0] - 1) - 1) / stride[0]) + 1

and likewise for H and W. The ops take 5-D ``(N, C, D, H, W)`` input only: a
4-D array could be an image batch or one volume, and the two readings give
different answers, so an unbatched volume is passed as ``x[None]``.

    >>> import numpy as np
    >>> max_pool3d(np.zeros((1, 2, 8, 9, 9)), 2).shape          # 3-D U-Net's 2x2x2 pooling
    (1, 2, 4, 4, 4)
"""

from __future__ import annotations

import numpy

from ..args import triple
from ..autograd import Function, Tensor
from ..backend import get_array_module, replaceable
from .pooling import _avg_divisor, _averaging_matrix, _padded_extent, pool_output_size

__all__ = ["max_pool3d", "avg_pool3d", "adaptive_avg_pool3d"]


# ----------------------------------------------------------------- helpers
def _check_input(input, fn):
    """Check ``input`` is a non-empty floating 5-D array/Tensor; return its shape."""
    if not (hasattr(input, "shape") and hasattr(input, "dtype")):
        raise TypeError(f"{fn}(): input must be a Tensor or an array, got {type(input).__name__}")
    if input.ndim != 5:
        hint = "; for one unbatched volume (C, D, H, W) pass input[None]" if input.ndim == 4 else ""
        raise ValueError(f"{fn}(): expected a 5-D input (N, C, D, H, W), got shape {tuple(input.shape)}{hint}")
    if any(n == 0 for n in input.shape[2:]):
        raise ValueError(f"{fn}(): expected a non-empty volume, got shape {tuple(input.shape)}")
    if numpy.dtype(input.dtype).kind != "f":
        raise TypeError(f"{fn}(): input must have a floating dtype, got {input.dtype}")
    return tuple(input.shape)


def _pool_geometry(fn, shape, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate the pooling arguments and return ``(k, s, p, d, (Do, Ho, Wo))`` as triples."""
    k = triple(kernel_size, "kernel_size", f"{fn}()")
    no_stride = stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0)
    s = k if no_stride else triple(stride, "stride", f"{fn}()")
    p = triple(padding, "padding", f"{fn}()")
    d = triple(dilation, "dilation", f"{fn}()")
    if min(k) <= 0:
        raise ValueError(f"{fn}(): kernel_size should be greater than zero, got {k}")
    if min(s) <= 0:
        raise ValueError(f"{fn}(): stride should be greater than zero, got {s}")
    if min(d) <= 0:
        raise ValueError(f"{fn}(): dilation should be greater than zero, got {d}")
    if min(p) < 0:
        raise ValueError(f"{fn}(): padding should be non-negative, got {p}")
    if any(pa > ka // 2 for pa, ka in zip(p, k)):
        raise ValueError(
            f"{fn}(): pad should be smaller than or equal to half of kernel size, "
            f"but got padding={p} for kernel_size={k}"
        )
    spatial = shape[2:]
    out = tuple(pool_output_size(n, k[a], s[a], p[a], d[a], ceil_mode) for a, n in enumerate(spatial))
    if min(out) < 1:
        spans = tuple(da * (ka - 1) + 1 for ka, da in zip(k, d))
        raise ValueError(
            f"{fn}(): kernel {k} with dilation {d} spans {spans} voxels, larger than the padded input "
            f"{tuple(n + 2 * pa for n, pa in zip(spatial, p))} (input {'x'.join(map(str, spatial))}, "
            f"padding {p}): calculated output size {out} is too small"
        )
    return k, s, p, d, out


def _tap(x_pad, i, j, l, s, d, out):
    """Kernel tap ``(i, j, l)``: a strided view ``(N, C, Do, Ho, Wo)`` of the padded input."""
    Do, Ho, Wo = out
    return x_pad[
        :,
        :,
        i * d[0] : i * d[0] + s[0] * (Do - 1) + 1 : s[0],
        j * d[1] : j * d[1] + s[1] * (Ho - 1) + 1 : s[1],
        l * d[2] : l * d[2] + s[2] * (Wo - 1) + 1 : s[2],
    ]


def _taps(k):
    """Every kernel tap ``(t, i, j, l)`` with ``t = (i*kh + j)*kw + l``, in row-major order."""
    for t in range(k[0] * k[1] * k[2]):
        ij, l = divmod(t, k[2])
        i, j = divmod(ij, k[1])
        yield t, i, j, l


def _right_padding(spatial, out, k, s, p, d):
    """Padding after each axis so that every window of ``out`` fits (see ``_padded_extent``)."""
    return tuple(_padded_extent(n, out[a], k[a], s[a], p[a], d[a]) for a, n in enumerate(spatial))


def _pad_spatial(x, p, right, value):
    """``x`` (N, C, D, H, W) with ``p`` planes before and ``right`` after each axis, filled with ``value``."""
    xp = get_array_module(x)
    if p == (0, 0, 0) and right == (0, 0, 0):
        return x
    N, C, D, H, W = x.shape
    x_pad = xp.full((N, C, D + p[0] + right[0], H + p[1] + right[1], W + p[2] + right[2]), value, dtype=x.dtype)
    x_pad[:, :, p[0] : p[0] + D, p[1] : p[1] + H, p[2] : p[2] + W] = x
    return x_pad


# -------------------------------------------------------------- max pool
@replaceable
def max_pool3d_forward(x, kernel_size, stride, padding, dilation, out_dhw):
    """The max of each window and its winning tap ``t = (i*kh + j)*kw + l`` (the first max in row-major order).

    x (N, C, D, H, W) -> best (N, C, Do, Ho, Wo) of x's dtype, arg (N, C, Do, Ho, Wo) of a
    small unsigned integer type, with ``out_dhw = (Do, Ho, Wo)``. Taps in the padding are -inf.
    """
    xp = get_array_module(x)
    k, s, p, d, out = kernel_size, stride, padding, dilation, out_dhw
    x_pad = _pad_spatial(x, p, _right_padding(x.shape[2:], out, k, s, p, d), -numpy.inf)

    # running max over the taps in row-major order; a later tap wins only when
    # strictly greater (or NaN), so ties keep the first max, as torch
    best = _tap(x_pad, 0, 0, 0, s, d, out).copy()  # (N, C, Do, Ho, Wo)
    arg = xp.zeros(best.shape, dtype=numpy.min_scalar_type(k[0] * k[1] * k[2] - 1))
    for t, i, j, l in _taps(k):
        if t == 0:
            continue
        window = _tap(x_pad, i, j, l, s, d, out)
        better = (window > best) | xp.isnan(window)
        xp.maximum(best, window, out=best)  # NaN propagates, as torch's max does
        arg += better.view(numpy.uint8) * (arg.dtype.type(t) - arg)  # arg = where(better, t, arg), branch-free
    return best, arg


# Gradient: each window sends dout to the one input it took its max from;
# overlapping windows add: dx_pad[tap (i, j, l)] += dout * [arg == t].
@replaceable
def max_pool3d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """dout, arg (N, C, Do, Ho, Wo) -> dx ``x_shape`` = (N, C, D, H, W)."""
    xp = get_array_module(dout)
    k, s, p, d = kernel_size, stride, padding, dilation
    N, C, D, H, W = x_shape
    out = dout.shape[2:]
    right = _right_padding((D, H, W), out, k, s, p, d)
    dx_pad = xp.zeros((N, C, D + p[0] + right[0], H + p[1] + right[1], W + p[2] + right[2]), dtype=dout.dtype)
    zero = xp.zeros((), dtype=dout.dtype)
    for t, i, j, l in _taps(k):
        _tap(dx_pad, i, j, l, s, d, out)[...] += xp.where(arg == t, dout, zero)
    return dx_pad[:, :, p[0] : p[0] + D, p[1] : p[1] + H, p[2] : p[2] + W]


class MaxPool3d(Function):
    """out[n, c, od, oh, ow] = max over the window of x (taps outside the input are -inf).

    Shape: (N, C, D, H, W) -> (N, C, Do, Ho, Wo), see ``pool_output_size``.
    Saves only the winning tap of each window (a small integer array).
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, out_dhw, indices_out=None):
        xp = get_array_module(x)
        k, s, p, d = kernel_size, stride, padding, dilation
        best, arg = max_pool3d_forward(x, k, s, p, d, out_dhw)
        arg, ctx.outside = _torch_default_taps(xp, best, arg, k, s, p, d, out_dhw, x.shape[2:])
        if indices_out is not None:
            indices_out.append(_flat_indices(xp, arg, k, s, p, d, x.shape[2:]))
        ctx.arg, ctx.geometry, ctx.x_shape = arg, (k, s, p, d), x.shape
        return best

    @staticmethod
    def backward(ctx, dout):
        dx = max_pool3d_backward(dout, ctx.arg, ctx.x_shape, *ctx.geometry)
        dx = _add_outside(get_array_module(dout), dx, dout, ctx.outside)
        return (dx,) + (None,) * 6


def _torch_default_taps(xp, best, arg, k, s, p, d, out, size):
    """torch's index for windows no tap beats -inf, and the windows with no tap inside the input.

    As ``pooling._torch_default_taps``, per axis: torch starts each window's max
    at -inf with its first tap at or after the volume's corner, and keeps it
    unless a tap is greater. Returns the corrected ``arg`` and ``outside``:
    ``((od, oh, ow), d*H*W + h*W + w)`` for each window none of whose taps is
    inside the input and whose default tap's flat index still lies inside the
    volume, where torch's backward adds that window's gradient.
    """
    taps, starts, empty = [], [], []
    for a in range(3):
        o = numpy.arange(out[a]) * s[a] - p[a]  # first tap position of each window
        t0 = (numpy.maximum(-o, 0) + d[a] - 1) // d[a]  # first tap at a position >= 0
        taps.append(t0)
        starts.append(o + t0 * d[a])
        empty.append(o + t0 * d[a] >= size[a])  # no tap of the window inside the input
    first = (taps[0][:, None, None] * k[1] + taps[1][None, :, None]) * k[2] + taps[2][None, None, :]  # (Do, Ho, Wo)
    if first.any():
        stuck = (arg == 0) & (best == -numpy.inf)  # tap 0 in the padding, nothing greater
        arg = xp.where(stuck, xp.asarray(first.astype(arg.dtype)), arg)
    D, H, W = size
    outside = []
    any_empty = empty[0][:, None, None] | empty[1][None, :, None] | empty[2][None, None, :]
    for od, oh, ow in zip(*numpy.nonzero(any_empty)):
        flat = (int(starts[0][od]) * H + int(starts[1][oh])) * W + int(starts[2][ow])
        if flat < D * H * W:
            outside.append(((int(od), int(oh), int(ow)), flat))
    return arg, outside


def _add_outside(xp, dx, dout, outside):
    """``dx`` (N, C, D, H, W) plus, as torch, each window of ``outside`` adding its ``dout`` at its flat index."""
    if not outside:
        return dx
    dx = xp.ascontiguousarray(dx)
    volumes = dx.reshape(dx.shape[0], dx.shape[1], -1)  # (N, C, D*H*W), a view
    for (od, oh, ow), flat in outside:
        volumes[:, :, flat] += dout[:, :, od, oh, ow]
    return dx


def _flat_indices(xp, arg, k, s, p, d, size):
    """torch's ``return_indices``: the flat index ``d*H*W + h*W + w`` of each max in its volume."""
    Do, Ho, Wo = arg.shape[2:]
    _, H, W = size
    arg = arg.astype(numpy.int64)
    i, j, l = arg // (k[1] * k[2]), (arg // k[2]) % k[1], arg % k[2]  # winning tap along D, H, W
    z = xp.arange(Do).reshape(Do, 1, 1) * s[0] - p[0] + i * d[0]  # (N, C, Do, Ho, Wo)
    y = xp.arange(Ho).reshape(1, Ho, 1) * s[1] - p[1] + j * d[1]
    x = xp.arange(Wo).reshape(1, 1, Wo) * s[2] - p[2] + l * d[2]
    return (z * H + y) * W + x


def max_pool3d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """3-D max pooling over ``kernel_size`` windows, as ``torch.nn.functional.max_pool3d``.

    ``out[n, c, od, oh, ow] = max_{i, j, l} x[n, c, od*s0 - p0 + i*d0, oh*s1 - p1 + j*d1, ow*s2 - p2 + l*d2]``,
    taps outside the input ignored. ``stride`` defaults to ``kernel_size``;
    ``padding`` may be at most half the kernel. With ``return_indices`` the
    flat index ``d*H*W + h*W + w`` of each max in its volume is returned too, as torch.

    Shape:
        input (N, C, D, H, W) -> output (N, C, Do, Ho, Wo) with
        ``Do = floor((D + 2*padding[0] - dilation[0]*(kernel_size[0] - 1) - 1) / stride[0]) + 1``
        (``ceil`` with ``ceil_mode``; the last window starts inside the input or left padding), and
        likewise Ho and Wo.

        >>> import numpy as np
        >>> x = np.zeros((2, 3, 5, 7, 9))
        >>> max_pool3d(x, 3, stride=2, padding=1).shape
        (2, 3, 3, 4, 5)
        >>> max_pool3d(x, 2, ceil_mode=True).shape
        (2, 3, 3, 4, 5)
        >>> max_pool3d(x, (1, 3, 3), stride=1, padding=(0, 1, 1), dilation=(1, 2, 2)).shape
        (2, 3, 5, 5, 7)
    """
    shape = _check_input(input, "max_pool3d")
    k, s, p, d, out = _pool_geometry("max_pool3d", shape, kernel_size, stride, padding, dilation, ceil_mode)
    if not return_indices:
        return MaxPool3d.apply(input, k, s, p, d, out)
    holder = []
    result = MaxPool3d.apply(input, k, s, p, d, out, indices_out=holder)
    return result, Tensor(holder[0])


# ---------------------------------------------------------- average pool
class AvgPool3d(Function):
    """out[n, c, od, oh, ow] = (sum of x over the window) / divisor[od, oh, ow].

    Shape: (N, C, D, H, W) -> (N, C, Do, Ho, Wo), see ``pool_output_size`` (dilation 1).
    The divisor is separable: the window's length along D times along H times along W.
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, out_dhw, count_include_pad, divisor_override):
        xp = get_array_module(x)
        k, s, p, d, out = kernel_size, stride, padding, (1, 1, 1), out_dhw
        right = _right_padding(x.shape[2:], out, k, s, p, d)
        x_pad = _pad_spatial(x, p, right, 0)

        total = _tap(x_pad, 0, 0, 0, s, d, out).copy()  # (N, C, Do, Ho, Wo)
        for t, i, j, l in _taps(k):
            if t:
                total += _tap(x_pad, i, j, l, s, d, out)

        if divisor_override is not None:
            divisor = xp.asarray(float(divisor_override), dtype=x.dtype)
        else:
            dd, dh, dw = (  # (Do,), (Ho,), (Wo,): the window lengths along each axis
                _avg_divisor(n, out[a], k[a], s[a], p[a], count_include_pad) for a, n in enumerate(x.shape[2:])
            )
            divisor = dd[:, None, None] * dh[None, :, None] * dw[None, None, :]  # (Do, Ho, Wo)
            divisor = xp.asarray(divisor, dtype=x.dtype)
        total /= divisor
        ctx.divisor, ctx.geometry, ctx.x_shape = divisor, (k, s, p, d, out, right), x.shape
        return total

    # Gradient: every input in a window gets dout / divisor of that window;
    # overlapping windows add: dx_pad[tap (i, j, l)] += dout / divisor.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        k, s, p, d, out, right = ctx.geometry
        N, C, D, H, W = ctx.x_shape
        share = dout / ctx.divisor  # (N, C, Do, Ho, Wo)
        dx_pad = xp.zeros((N, C, D + p[0] + right[0], H + p[1] + right[1], W + p[2] + right[2]), dtype=dout.dtype)
        for _, i, j, l in _taps(k):
            _tap(dx_pad, i, j, l, s, d, out)[...] += share
        return (dx_pad[:, :, p[0] : p[0] + D, p[1] : p[1] + H, p[2] : p[2] + W],) + (None,) * 6


def avg_pool3d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """3-D average pooling, as ``torch.nn.functional.avg_pool3d``.

    ``out = sum(window) / divisor``: the divisor is ``divisor_override`` if
    given, else the window's volume (zero padding counted when
    ``count_include_pad``, and in ceil mode never past the far padding). As
    torch, the input must be at least as large as the kernel, padding or not.

    Shape:
        input (N, C, D, H, W) -> (N, C, Do, Ho, Wo) with
        ``Do = floor((D + 2*padding[0] - kernel_size[0]) / stride[0]) + 1`` (``ceil`` with
        ``ceil_mode``), and likewise Ho and Wo.

        >>> import numpy as np
        >>> x = np.ones((2, 3, 5, 7, 9))
        >>> avg_pool3d(x, 3, stride=2, padding=1).shape
        (2, 3, 3, 4, 5)
        >>> avg_pool3d(x, (1, 2, 2), ceil_mode=True).shape
        (2, 3, 5, 4, 5)
    """
    shape = _check_input(input, "avg_pool3d")
    k, s, p, _, out = _pool_geometry("avg_pool3d", shape, kernel_size, stride, padding, 1, ceil_mode)
    if any(n < ka for n, ka in zip(shape[2:], k)):  # torch's rule for avg_pool3d, padding or not
        raise ValueError(f"avg_pool3d(): input volume {'x'.join(map(str, shape[2:]))} is smaller than the kernel {k}")
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override, (int, numpy.integer)):
            raise TypeError(f"avg_pool3d(): divisor_override must be an int or None, got {divisor_override!r}")
        if divisor_override == 0:
            raise ValueError("avg_pool3d(): divisor_override must be non-zero, got 0")
    return AvgPool3d.apply(input, k, s, p, out, bool(count_include_pad), divisor_override)


# --------------------------------------------------------- adaptive pool
def _adaptive_output_size(fn, shape, output_size):
    """``output_size`` (int, triple, ``None`` entries keep the input size) as a triple of ints."""
    spatial = shape[2:]
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 3:
            raise ValueError(f"{fn}(): output_size must be an int or a triple, got {output_size!r}")
        size = tuple(n if o is None else o for o, n in zip(output_size, spatial))
    else:
        size = (output_size,) * 3
    for o in size:
        if isinstance(o, bool) or not isinstance(o, (int, numpy.integer)):
            raise TypeError(f"{fn}(): output_size entries must be ints or None, got {output_size!r}")
        if o < 0:
            raise ValueError(f"{fn}(): output_size must be non-negative, got {output_size!r}")
    return tuple(int(o) for o in size)


class AdaptiveAvgPool3d(Function):
    """out = the averages over the adaptive bins, one averaging matrix per axis (they are separable):

        out[n, c] = A_d (x) A_h (x) A_w applied to x[n, c]

    Shape: (N, C, D, H, W) -> (N, C, Do, Ho, Wo) for any requested (Do, Ho, Wo).
    """

    @staticmethod
    def forward(ctx, x, output_size):
        xp = get_array_module(x)
        N, C, D, H, W = x.shape
        Do, Ho, Wo = output_size
        A_d, A_h, A_w = (
            xp.asarray(_averaging_matrix(n, o), dtype=x.dtype) for n, o in zip((D, H, W), output_size)
        )  # (Do, D), (Ho, H), (Wo, W)
        ctx.A, ctx.x_shape = (A_d, A_h, A_w), x.shape
        out = xp.matmul(xp.matmul(A_h, x), A_w.T)  # (N, C, D, Ho, W) then (N, C, D, Ho, Wo)
        out = xp.matmul(A_d, out.reshape(N, C, D, Ho * Wo))  # (N, C, Do, Ho*Wo)
        return out.reshape(N, C, Do, Ho, Wo)

    # Gradient: the map is linear, so dx = the transposed matrices applied to dout.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        A_d, A_h, A_w = ctx.A
        N, C, D, H, W = ctx.x_shape
        Do, Ho, Wo = dout.shape[2:]
        dx = xp.matmul(A_d.T, dout.reshape(N, C, Do, Ho * Wo)).reshape(N, C, D, Ho, Wo)  # (N, C, D, Ho, Wo)
        dx = xp.matmul(xp.matmul(A_h.T, dx), A_w)  # (N, C, D, H, Wo) then (N, C, D, H, W)
        return dx, None


def adaptive_avg_pool3d(input, output_size):
    """Average over ``output_size`` adaptive bins, as ``torch.nn.functional.adaptive_avg_pool3d``.

    Bin ``od`` covers planes ``floor(od*D/Do)`` to ``ceil((od+1)*D/Do)`` (exclusive),
    and likewise for rows and columns; bins may overlap when the sizes do not divide.

    Shape:
        input (N, C, D, H, W) -> (N, C, Do, Ho, Wo); an ``int`` means (Do, Do, Do),
        ``None`` keeps that input size.

        >>> import numpy as np
        >>> x = np.ones((2, 3, 5, 7, 9))
        >>> adaptive_avg_pool3d(x, 1).shape
        (2, 3, 1, 1, 1)
        >>> adaptive_avg_pool3d(x, (None, 3, 4)).shape
        (2, 3, 5, 3, 4)
    """
    shape = _check_input(input, "adaptive_avg_pool3d")
    return AdaptiveAvgPool3d.apply(input, _adaptive_output_size("adaptive_avg_pool3d", shape, output_size))
