"""Pooling: max, average and adaptive average over 2-D windows.

Like im2col, every pooling here is a loop over the ``kh x kw`` kernel taps:
tap ``(i, j)`` is one strided slice of the padded input,

    window_ij = x_pad[:, :, i*d : i*d + s*(Ho-1) + 1 : s, j*d : j*d + s*(Wo-1) + 1 : s]

of shape ``(N, C, Ho, Wo)``, vectorised over batch, channels and output
pixels. The backward is the same loop with ``+=`` (col2im), so overlapping
windows add their gradients.

Shape, for ``max_pool2d`` (``avg_pool2d`` is the same with dilation 1)::

    H_out = floor((H + 2*padding - dilation*(kernel_size - 1) - 1) / stride) + 1

and with ``ceil_mode=True`` the ``floor`` becomes ``ceil``, except that the
last window must start inside the input or the left padding (torch's rule).

    >>> pool_output_size(32, kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=False)
    16
    >>> pool_output_size(5, kernel_size=2, stride=2, padding=0, dilation=1, ceil_mode=True)
    3
    >>> pool_output_size(5, kernel_size=2, stride=2, padding=1, dilation=1, ceil_mode=True)
    3
"""

from __future__ import annotations

import numpy

from ..args import pair
from ..autograd import Function, Tensor
from ..backend import get_array_module, replaceable

__all__ = [
    "max_pool2d",
    "avg_pool2d",
    "adaptive_avg_pool2d",
    "adaptive_max_pool2d",
    "pool_output_size",
]


# ----------------------------------------------------------------- helpers
def _check_input(input, fn, ndims=(3, 4)):
    """Check ``input`` is a floating array/Tensor with ``ndim`` in ``ndims``; return its shape."""
    if not (hasattr(input, "shape") and hasattr(input, "dtype")):
        raise TypeError(f"{fn}(): input must be a Tensor or an array, got {type(input).__name__}")
    if input.ndim not in ndims or any(n == 0 for n in input.shape[-2:]) or (input.ndim == 3 and input.shape[0] == 0):
        raise ValueError(
            f"{fn}(): expected a non-empty 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {tuple(input.shape)}"
        )
    if numpy.dtype(input.dtype).kind != "f":
        raise TypeError(f"{fn}(): input must have a floating dtype, got {input.dtype}")
    return tuple(input.shape)


def pool_output_size(size, kernel_size, stride, padding, dilation, ceil_mode):
    """Output length of one spatial axis (torch's ``pooling_output_shape``).

    ``floor`` (or ``ceil``) of ``(size + 2*padding - dilation*(kernel_size-1) - 1) / stride``
    plus one; in ceil mode a last window that would start in the right
    padding (past ``size + padding``) is dropped.

    >>> pool_output_size(7, kernel_size=3, stride=2, padding=1, dilation=2, ceil_mode=False)
    3
    >>> pool_output_size(6, kernel_size=3, stride=2, padding=0, dilation=1, ceil_mode=True)
    3
    """
    span = size + 2 * padding - dilation * (kernel_size - 1) - 1
    out = (span + (stride - 1 if ceil_mode else 0)) // stride + 1
    if ceil_mode and (out - 1) * stride >= size + padding:
        out -= 1
    return out


def _pool_geometry(fn, shape, kernel_size, stride, padding, dilation, ceil_mode):
    """Validate the pooling arguments and return ``(k, s, p, d, (Ho, Wo))`` as pairs."""
    k = pair(kernel_size, "kernel_size", f"{fn}()")
    s = k if stride is None or (isinstance(stride, (tuple, list)) and len(stride) == 0) else pair(stride, "stride", f"{fn}()")
    p = pair(padding, "padding", f"{fn}()")
    d = pair(dilation, "dilation", f"{fn}()")
    if k[0] <= 0 or k[1] <= 0:
        raise ValueError(f"{fn}(): kernel_size should be greater than zero, got {k}")
    if s[0] <= 0 or s[1] <= 0:
        raise ValueError(f"{fn}(): stride should be greater than zero, got {s}")
    if d[0] <= 0 or d[1] <= 0:
        raise ValueError(f"{fn}(): dilation should be greater than zero, got {d}")
    if p[0] < 0 or p[1] < 0:
        raise ValueError(f"{fn}(): padding should be non-negative, got {p}")
    if p[0] > k[0] // 2 or p[1] > k[1] // 2:
        raise ValueError(
            f"{fn}(): pad should be smaller than or equal to half of kernel size, "
            f"but got padding={p} for kernel_size={k}"
        )
    H, W = shape[-2:]
    out = tuple(pool_output_size(n, k[a], s[a], p[a], d[a], ceil_mode) for a, n in enumerate((H, W)))
    if out[0] < 1 or out[1] < 1:
        C = shape[-3]
        raise ValueError(
            f"{fn}(): given input size ({C}x{H}x{W}), calculated output size "
            f"({C}x{out[0]}x{out[1]}) is too small"
        )
    return k, s, p, d, out


def _padded_extent(n, n_out, k, s, p, d):
    """Right padding so that every window of the ``n_out`` fits: ``max(p, needed)``."""
    needed = (n_out - 1) * s + (k - 1) * d + 1  # last window's end in padded coordinates
    return max(p, needed - n - p)


def _tap(x_pad, i, j, s, d, out):
    """Kernel tap ``(i, j)``: a strided view ``(N, C, Ho, Wo)`` of the padded input."""
    Ho, Wo = out
    return x_pad[
        :,
        :,
        i * d[0] : i * d[0] + s[0] * (Ho - 1) + 1 : s[0],
        j * d[1] : j * d[1] + s[1] * (Wo - 1) + 1 : s[1],
    ]


def _pad_spatial(x, p, right, value):
    """``x`` (N, C, H, W) with ``p`` rows/cols before and ``right`` after, filled with ``value``."""
    xp = get_array_module(x)
    if p == (0, 0) and right == (0, 0):
        return x
    N, C, H, W = x.shape
    x_pad = xp.full((N, C, H + p[0] + right[0], W + p[1] + right[1]), value, dtype=x.dtype)
    x_pad[:, :, p[0] : p[0] + H, p[1] : p[1] + W] = x
    return x_pad


# -------------------------------------------------------------- max pool
@replaceable
def max_pool2d_forward(x, kernel_size, stride, padding, dilation, out_hw):
    """The max of each window and its winning tap ``t = i*kw + j`` (the first max in row-major order).

    x (N, C, H, W) -> best (N, C, Ho, Wo) of x's dtype, arg (N, C, Ho, Wo) of a small
    unsigned integer type, with ``out_hw = (Ho, Wo)``. Taps in the padding are -inf.
    """
    xp = get_array_module(x)
    k, s, p, d, out = kernel_size, stride, padding, dilation, out_hw
    right = tuple(_padded_extent(n, out[a], k[a], s[a], p[a], d[a]) for a, n in enumerate(x.shape[2:]))
    x_pad = _pad_spatial(x, p, right, -numpy.inf)

    # running max over the taps in row-major order; a later tap wins only
    # when strictly greater (or NaN), so ties keep the first max, as torch
    K = k[0] * k[1]
    best = _tap(x_pad, 0, 0, s, d, out).copy()  # (N, C, Ho, Wo)
    arg = xp.zeros(best.shape, dtype=numpy.min_scalar_type(K - 1))  # winning tap t = i*kw + j
    for t in range(1, K):
        i, j = divmod(t, k[1])
        window = _tap(x_pad, i, j, s, d, out)
        better = (window > best) | xp.isnan(window)
        xp.maximum(best, window, out=best)  # NaN propagates, as torch's max does
        # arg = where(better, t, arg), branch-free: every arg so far is < t, so
        # t - arg > 0 and this is plain integer arithmetic (several times faster)
        arg += better.view(numpy.uint8) * (arg.dtype.type(t) - arg)
    return best, arg


# Gradient: each window sends dout to the one input it took its max from;
# overlapping windows add: dx_pad[tap (i, j)] += dout * [arg == i*kw + j].
@replaceable
def max_pool2d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """dout, arg (N, C, Ho, Wo) -> dx ``x_shape`` = (N, C, H, W)."""
    xp = get_array_module(dout)
    k, s, p, d = kernel_size, stride, padding, dilation
    N, C, H, W = x_shape
    out = dout.shape[2:]
    right = tuple(_padded_extent(n, out[a], k[a], s[a], p[a], d[a]) for a, n in enumerate((H, W)))
    dx_pad = xp.zeros((N, C, H + p[0] + right[0], W + p[1] + right[1]), dtype=dout.dtype)
    zero = xp.zeros((), dtype=dout.dtype)
    for t in range(k[0] * k[1]):
        i, j = divmod(t, k[1])
        _tap(dx_pad, i, j, s, d, out)[...] += xp.where(arg == t, dout, zero)
    return dx_pad[:, :, p[0] : p[0] + H, p[1] : p[1] + W]


class MaxPool2d(Function):
    """out[n, c, oh, ow] = max over the window of x (taps outside the input are -inf).

    Shape: (N, C, H, W) -> (N, C, Ho, Wo), see ``pool_output_size``.
    Saves only the winning tap of each window (a small integer array).
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, out_hw, indices_out=None):
        xp = get_array_module(x)
        unbatched = x.ndim == 3
        if unbatched:
            x = x[None]  # (1, C, H, W)
        k, s, p, d = kernel_size, stride, padding, dilation
        best, arg = max_pool2d_forward(x, k, s, p, d, out_hw)
        arg, ctx.outside = _torch_default_taps(xp, best, arg, k, s, p, d, out_hw, x.shape[2:])
        if indices_out is not None:
            indices_out.append(_flat_indices(xp, arg, k, s, p, d, x.shape[3], unbatched))
        ctx.arg, ctx.geometry = arg, (k, s, p, d)
        ctx.x_shape, ctx.unbatched = x.shape, unbatched
        return best[0] if unbatched else best

    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        if ctx.unbatched:
            dout = dout[None]
        dx = max_pool2d_backward(dout, ctx.arg, ctx.x_shape, *ctx.geometry)
        dx = _add_outside(xp, dx, dout, ctx.outside)
        return (dx[0] if ctx.unbatched else dx,) + (None,) * 6


def _torch_default_taps(xp, best, arg, k, s, p, d, out, size):
    """torch's index for windows no tap beats -inf, and the windows with no tap inside the input.

    torch starts each window's max at -inf with the index of its first tap at or
    after the input's top-left corner, ``i0 = ceil(max(p - oh*s, 0) / d)`` (and
    ``j0`` alike), and keeps it unless a tap is greater. The running max above
    starts at tap 0 instead, a padding tap for border windows: where the max is
    still -inf from it, ``arg`` becomes ``i0*kw + j0``. Returns that ``arg`` and
    ``outside``: ``(oh, ow, h*W + w)`` for each window none of whose taps is
    inside the input (possible with dilation) and whose default tap ``(h, w)``,
    past the right or bottom edge, still has a flat index inside the plane:
    torch's backward adds that window's gradient there.
    """
    taps, starts, empty = [], [], []
    for a in range(2):
        o = numpy.arange(out[a]) * s[a] - p[a]  # first tap position of each window
        t0 = (numpy.maximum(-o, 0) + d[a] - 1) // d[a]  # first tap at a position >= 0 (< k: p <= k/2)
        taps.append(t0)
        starts.append(o + t0 * d[a])
        empty.append(o + t0 * d[a] >= size[a])  # no tap of the window inside the input
    first = taps[0][:, None] * k[1] + taps[1][None, :]  # (Ho, Wo) host array
    if first.any():
        stuck = (arg == 0) & (best == -numpy.inf)  # tap 0 in the padding, nothing greater
        arg = xp.where(stuck, xp.asarray(first.astype(arg.dtype)), arg)
    H, W = size
    outside = []
    for oh, ow in zip(*numpy.nonzero(empty[0][:, None] | empty[1][None, :])):
        flat = int(starts[0][oh]) * W + int(starts[1][ow])
        if flat < H * W:
            outside.append((int(oh), int(ow), flat))
    return arg, outside


def _add_outside(xp, dx, dout, outside):
    """``dx`` (N, C, H, W) plus, as torch, each window of ``outside`` adding its ``dout``
    at its default tap's flat index (which wraps onto a later row of the plane)."""
    if not outside:
        return dx
    dx = xp.ascontiguousarray(dx)
    planes = dx.reshape(dx.shape[0], dx.shape[1], -1)  # (N, C, H*W), a view
    for oh, ow, flat in outside:
        planes[:, :, flat] += dout[:, :, oh, ow]
    return dx


def _flat_indices(xp, arg, k, s, p, d, W, unbatched):
    """torch's ``return_indices``: the flat index ``h * W + w`` of each max in its (H, W) plane."""
    Ho, Wo = arg.shape[-2:]
    i, j = arg // k[1], arg % k[1]  # winning tap row and column
    h = xp.arange(Ho).reshape(Ho, 1) * s[0] - p[0] + i.astype(numpy.int64) * d[0]  # (N, C, Ho, Wo)
    w = xp.arange(Wo).reshape(1, Wo) * s[1] - p[1] + j.astype(numpy.int64) * d[1]
    idx = h * W + w
    return idx[0] if unbatched else idx


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, return_indices=False):
    """2-D max pooling over ``kernel_size`` windows, as ``torch.nn.functional.max_pool2d``.

    ``out[n, c, oh, ow] = max_{i<kh, j<kw} x[n, c, oh*s - p + i*d, ow*s - p + j*d]``,
    taps outside the input ignored. ``stride`` defaults to ``kernel_size``;
    ``padding`` may be at most half the kernel. With ``return_indices`` the
    flat index ``h*W + w`` of each max is returned too, as torch does.

    Shape:
        input (N, C, H, W) or (C, H, W) -> output (N, C, Ho, Wo) or (C, Ho, Wo) with
        ``Ho = floor((H + 2*padding - dilation*(kernel_size - 1) - 1) / stride) + 1``
        (``ceil`` with ``ceil_mode``; the last window starts inside the input or left padding).

        >>> import numpy as np
        >>> x = np.arange(2 * 3 * 7 * 9, dtype=np.float64).reshape(2, 3, 7, 9)
        >>> max_pool2d(x, 3, stride=2, padding=1).shape
        (2, 3, 4, 5)
        >>> max_pool2d(x, 2, ceil_mode=True).shape
        (2, 3, 4, 5)
        >>> max_pool2d(x, 3, stride=1, padding=1, dilation=2).shape
        (2, 3, 5, 7)
    """
    shape = _check_input(input, "max_pool2d")
    k, s, p, d, out = _pool_geometry("max_pool2d", shape, kernel_size, stride, padding, dilation, ceil_mode)
    if not return_indices:
        return MaxPool2d.apply(input, k, s, p, d, out)
    holder = []
    result = MaxPool2d.apply(input, k, s, p, d, out, indices_out=holder)
    return result, Tensor(holder[0])


# ---------------------------------------------------------- average pool
def _avg_divisor(n, n_out, k, s, p, count_include_pad):
    """Per-position window sizes along one axis (torch's rule), a host int array ``(n_out,)``.

    A window starting at ``o*s - p`` ends at ``min(start + k, n + p)``; with
    ``count_include_pad`` the padded length counts, otherwise only the part
    inside the input.
    """
    start = numpy.arange(n_out) * s - p
    end = numpy.minimum(start + k, n + p)
    if count_include_pad:
        return end - start
    return numpy.minimum(end, n) - numpy.maximum(start, 0)


class AvgPool2d(Function):
    """out[n, c, oh, ow] = (sum of x over the window) / divisor[oh, ow].

    Shape: (N, C, H, W) -> (N, C, Ho, Wo), see ``pool_output_size`` (dilation 1).
    """

    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, ceil_mode, count_include_pad, divisor_override):
        xp = get_array_module(x)
        unbatched = x.ndim == 3
        if unbatched:
            x = x[None]  # (1, C, H, W)
        N, C, H, W = x.shape
        k, s, p, d, out = kernel_size, stride, padding, (1, 1), ceil_mode
        right = tuple(_padded_extent(n, out[a], k[a], s[a], p[a], 1) for a, n in enumerate((H, W)))
        x_pad = _pad_spatial(x, p, right, 0)

        total = _tap(x_pad, 0, 0, s, d, out).copy()  # (N, C, Ho, Wo)
        for t in range(1, k[0] * k[1]):
            i, j = divmod(t, k[1])
            total += _tap(x_pad, i, j, s, d, out)

        if divisor_override is not None:
            divisor = xp.asarray(float(divisor_override), dtype=x.dtype)
        else:
            dh = _avg_divisor(H, out[0], k[0], s[0], p[0], count_include_pad)  # (Ho,)
            dw = _avg_divisor(W, out[1], k[1], s[1], p[1], count_include_pad)  # (Wo,)
            divisor = xp.asarray(numpy.outer(dh, dw), dtype=x.dtype)  # (Ho, Wo)
        total /= divisor
        ctx.divisor, ctx.geometry = divisor, (k, s, p, d, out, right)
        ctx.x_shape, ctx.unbatched = (N, C, H, W), unbatched
        return total[0] if unbatched else total

    # Gradient: every input in a window gets dout / divisor of that window;
    # overlapping windows add: dx_pad[tap (i, j)] += dout / divisor.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        if ctx.unbatched:
            dout = dout[None]
        k, s, p, d, out, right = ctx.geometry
        N, C, H, W = ctx.x_shape
        share = dout / ctx.divisor  # (N, C, Ho, Wo)
        dx_pad = xp.zeros((N, C, H + p[0] + right[0], W + p[1] + right[1]), dtype=dout.dtype)
        for t in range(k[0] * k[1]):
            i, j = divmod(t, k[1])
            _tap(dx_pad, i, j, s, d, out)[...] += share
        dx = dx_pad[:, :, p[0] : p[0] + H, p[1] : p[1] + W]
        if ctx.unbatched:
            dx = dx[0]
        return (dx,) + (None,) * 6


def avg_pool2d(
    input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True, divisor_override=None
):
    """2-D average pooling, as ``torch.nn.functional.avg_pool2d``.

    ``out = sum(window) / divisor``: the divisor is ``divisor_override`` if
    given, else the window size (zero padding counted when
    ``count_include_pad``, and in ceil mode never past the right padding).

    Shape:
        input (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo) with
        ``Ho = floor((H + 2*padding - kernel_size) / stride) + 1`` (``ceil`` with ``ceil_mode``).

        >>> import numpy as np
        >>> x = np.ones((2, 3, 7, 9))
        >>> avg_pool2d(x, 3, stride=2, padding=1).shape
        (2, 3, 4, 5)
        >>> avg_pool2d(x, 2, ceil_mode=True).shape
        (2, 3, 4, 5)
    """
    shape = _check_input(input, "avg_pool2d")
    k, s, p, _, out = _pool_geometry("avg_pool2d", shape, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None:
        if isinstance(divisor_override, bool) or not isinstance(divisor_override, (int, numpy.integer)):
            raise TypeError(f"avg_pool2d(): divisor_override must be an int or None, got {divisor_override!r}")
        if divisor_override == 0:
            raise ValueError("avg_pool2d(): divisor_override must be non-zero, got 0")
    return AvgPool2d.apply(input, k, s, p, out, bool(count_include_pad), divisor_override)


# --------------------------------------------------------- adaptive pools
def _adaptive_output_size(fn, shape, output_size):
    """``output_size`` (int, pair, ``None`` entries keep the input size) as a pair of ints."""
    H, W = shape[-2:]
    if isinstance(output_size, (tuple, list)):
        if len(output_size) != 2:
            raise ValueError(f"{fn}(): output_size must be an int or a pair, got {output_size!r}")
        size = tuple(n if o is None else o for o, n in zip(output_size, (H, W)))
    else:
        size = (output_size, output_size)
    for o in size:
        if isinstance(o, bool) or not isinstance(o, (int, numpy.integer)):
            raise TypeError(f"{fn}(): output_size entries must be ints or None, got {output_size!r}")
        if o < 0:
            raise ValueError(f"{fn}(): output_size must be non-negative, got {output_size!r}")
    return int(size[0]), int(size[1])


def adaptive_bins(n, n_out):
    """Bin ``o`` of an adaptive pool covers ``[floor(o*n/n_out), ceil((o+1)*n/n_out))``.

    >>> adaptive_bins(5, 3)
    (array([0, 1, 3]), array([2, 4, 5]))
    """
    o = numpy.arange(n_out)
    start = (o * n) // n_out
    end = -((-(o + 1) * n) // n_out)  # ceil division on ints
    return start, end


def _averaging_matrix(n, n_out):
    """``A`` (n_out, n) with ``A[o, i] = 1 / len(bin o)`` for ``i`` in bin ``o``, else 0."""
    start, end = adaptive_bins(n, n_out)
    i = numpy.arange(n)
    inside = (i[None, :] >= start[:, None]) & (i[None, :] < end[:, None])  # (n_out, n)
    return inside / (end - start)[:, None]


class AdaptiveAvgPool2d(Function):
    """out = A_h @ x @ A_w^T, the averages over the adaptive bins (they are separable).

    Shape: (N, C, H, W) -> (N, C, Ho, Wo) for any requested (Ho, Wo).
    """

    @staticmethod
    def forward(ctx, x, output_size):
        xp = get_array_module(x)
        H, W = x.shape[-2:]
        A_h = xp.asarray(_averaging_matrix(H, output_size[0]), dtype=x.dtype)  # (Ho, H)
        A_w = xp.asarray(_averaging_matrix(W, output_size[1]), dtype=x.dtype)  # (Wo, W)
        ctx.A_h, ctx.A_w = A_h, A_w
        return xp.matmul(xp.matmul(A_h, x), A_w.T)  # (..., Ho, W) then (..., Ho, Wo)

    # Gradient: the map is linear, so dx = A_h^T @ dout @ A_w.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        dx = xp.matmul(xp.matmul(ctx.A_h.T, dout), ctx.A_w)  # (..., H, Wo) then (..., H, W)
        return dx, None


def adaptive_avg_pool2d(input, output_size):
    """Average over ``output_size`` adaptive bins, as ``torch.nn.functional.adaptive_avg_pool2d``.

    Bin ``oh`` covers rows ``floor(oh*H/Ho)`` to ``ceil((oh+1)*H/Ho)`` (exclusive),
    and likewise for columns; bins may overlap when the sizes do not divide.

    Shape:
        input (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo); an ``int``
        means (Ho, Ho), ``None`` keeps that input size.

        >>> import numpy as np
        >>> x = np.ones((2, 3, 7, 9))
        >>> adaptive_avg_pool2d(x, 1).shape
        (2, 3, 1, 1)
        >>> adaptive_avg_pool2d(x, (None, 4)).shape
        (2, 3, 7, 4)
    """
    shape = _check_input(input, "adaptive_avg_pool2d")
    return AdaptiveAvgPool2d.apply(input, _adaptive_output_size("adaptive_avg_pool2d", shape, output_size))


class AdaptiveMaxPool2d(Function):
    """out = max over each adaptive bin; saves the flat index ``h*W + w`` of each max.

    Shape: (N, C, H, W) -> (N, C, Ho, Wo). Loops over the taps of the largest
    bin; taps past a shorter bin's end repeat its last row/column, which never
    wins (a tie keeps the first max).
    """

    @staticmethod
    def forward(ctx, x, output_size, indices_out=None):
        xp = get_array_module(x)
        H, W = x.shape[-2:]
        Ho, Wo = output_size
        h0, h1 = adaptive_bins(H, Ho)
        w0, w1 = adaptive_bins(W, Wo)
        best = idx = None
        for i in range(int((h1 - h0).max(initial=1))):
            rows = numpy.minimum(h0 + i, h1 - 1)  # (Ho,)
            for j in range(int((w1 - w0).max(initial=1))):
                cols = numpy.minimum(w0 + j, w1 - 1)  # (Wo,)
                window = x[..., xp.asarray(rows)[:, None], xp.asarray(cols)[None, :]]  # (..., Ho, Wo)
                flat = xp.asarray(rows[:, None] * W + cols[None, :])  # (Ho, Wo)
                if best is None:
                    best = window.copy()
                    idx = xp.broadcast_to(flat, window.shape).copy()
                    continue
                better = (window > best) | xp.isnan(window)
                xp.copyto(best, window, where=better)
                xp.copyto(idx, xp.broadcast_to(flat, idx.shape), where=better)
        if indices_out is not None:
            indices_out.append(idx)
        ctx.idx, ctx.x_shape = idx, x.shape
        return best

    # Gradient: dx[h*W + w] += dout for every bin whose max sits at (h, w);
    # bins may share a max, so the scatter adds (bincount over plane offsets).
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        H, W = ctx.x_shape[-2:]
        planes = int(numpy.prod(ctx.x_shape[:-2], dtype=numpy.int64))
        offset = xp.arange(planes, dtype=numpy.int64).reshape(-1, 1) * (H * W)  # (planes, 1)
        where = (ctx.idx.reshape(planes, -1) + offset).ravel()  # (planes*Ho*Wo,)
        dx = xp.bincount(where, weights=dout.reshape(-1), minlength=planes * H * W)
        return dx.astype(dout.dtype, copy=False).reshape(ctx.x_shape), None


def adaptive_max_pool2d(input, output_size, return_indices=False):
    """Max over ``output_size`` adaptive bins, as ``torch.nn.functional.adaptive_max_pool2d``.

    Bins as in ``adaptive_avg_pool2d``; ties keep the first max in row-major order.

    Shape:
        input (N, C, H, W) or (C, H, W) -> (N, C, Ho, Wo) or (C, Ho, Wo).

        >>> import numpy as np
        >>> adaptive_max_pool2d(np.ones((2, 3, 7, 9)), (2, 3)).shape
        (2, 3, 2, 3)
    """
    shape = _check_input(input, "adaptive_max_pool2d")
    size = _adaptive_output_size("adaptive_max_pool2d", shape, output_size)
    if size[0] == 0 or size[1] == 0:
        raise ValueError(f"adaptive_max_pool2d(): output_size must be positive, got {output_size!r}")
    if not return_indices:
        return AdaptiveMaxPool2d.apply(input, size)
    holder = []
    result = AdaptiveMaxPool2d.apply(input, size, indices_out=holder)
    return result, Tensor(holder[0])
