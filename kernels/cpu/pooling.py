"""Max pooling, forward (the max of each window and the tap that won it) and backward.

``max_pool2d_forward`` and ``max_pool2d_backward`` compute what the reference
in ``scratchseg.functional.pooling`` computes, with the same numbers (ties
keep the first maximum, a NaN propagates and its last tap wins).

Why it is fast: the reference takes the running max over the kh*kw taps as
whole-array operations (a compare, a maximum and an index update per tap,
each a pass over the output) and scatters the gradient back tap by tap.
These kernels do one pass each, one (n, c) plane per ``prange`` task; the
common 2x2, stride-2 window is unrolled with selects instead of branches.
Small inputs run the serial twin (``runtime._launch``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit, prange

from ._common import _working_dtype
from .runtime import _launch, _parallel_njit

__all__ = ["max_pool2d_forward", "max_pool2d_backward"]


@njit(cache=True, inline="always")
def _max_pool_2x2(xp, bp, ap):
    # The 2x2, stride-2 windows of one plane (U-Net's and VGG's pool), unrolled:
    # the four taps compared by selects, not branches, in the taps' order. On
    # random data the general loop below mispredicts half its comparisons
    # (measurements: benchmarks/NOTES.md).
    for ho in range(bp.shape[0]):
        r0 = xp[2 * ho]
        r1 = xp[2 * ho + 1]
        for wo in range(bp.shape[1]):
            m = r0[2 * wo]
            a = 0
            v = r0[2 * wo + 1]
            take = v != v or v > m  # the last NaN wins and propagates; ties keep the first max
            m = v if take else m
            a = 1 if take else a
            v = r1[2 * wo]
            take = v != v or v > m
            m = v if take else m
            a = 2 if take else a
            v = r1[2 * wo + 1]
            take = v != v or v > m
            m = v if take else m
            a = 3 if take else a
            bp[ho, wo] = m
            ap[ho, wo] = a


@_parallel_njit()
def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg):
    N, C, H, W = x.shape
    Ho, Wo = best.shape[2], best.shape[3]
    inside = ph == 0 and pw == 0 and (Ho - 1) * sh + (kh - 1) * dh < H and (Wo - 1) * sw + (kw - 1) * dw < W
    two_by_two = inside and kh == 2 and kw == 2 and sh == 2 and sw == 2 and dh == 1 and dw == 1
    for t in prange(N * C):
        n = t // C
        c = t % C
        if two_by_two:
            _max_pool_2x2(x[n, c], best[n, c], arg[n, c])
            continue
        if inside:  # every window within the input (no padding, floor mode): no bounds checks
            for ho in range(Ho):
                for wo in range(Wo):
                    m = x[n, c, ho * sh, wo * sw]
                    a = 0
                    for i in range(kh):
                        for j in range(kw):
                            v = x[n, c, ho * sh + i * dh, wo * sw + j * dw]
                            if v != v or v > m:  # the last NaN wins and propagates; ties keep the first max
                                m = v
                                a = i * kw + j
                    best[n, c, ho, wo] = m
                    arg[n, c, ho, wo] = a
            continue
        for ho in range(Ho):
            for wo in range(Wo):
                m = -np.inf
                a = 0
                for i in range(kh):
                    h = ho * sh - ph + i * dh
                    for j in range(kw):
                        w = wo * sw - pw + j * dw
                        v = -np.inf
                        if h >= 0 and h < H and w >= 0 and w < W:
                            v = x[n, c, h, w]
                        tap = i * kw + j
                        if tap == 0:
                            m = v
                        elif v != v:  # NaN propagates and its tap wins, as in the reference
                            m = v
                            a = tap
                        elif v > m:  # strictly greater: ties keep the first max
                            m = v
                            a = tap
                best[n, c, ho, wo] = m
                arg[n, c, ho, wo] = a


@_parallel_njit()
def _max_pool_backward(dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx):
    N, C, H, W = dx.shape
    Ho, Wo = dout.shape[2], dout.shape[3]
    for t in prange(N * C):
        n = t // C
        c = t % C
        dx[n, c] = 0
        for ho in range(Ho):
            for wo in range(Wo):
                a = arg[n, c, ho, wo]
                h = ho * sh - ph + (a // kw) * dh
                w = wo * sw - pw + (a % kw) * dw
                if h >= 0 and h < H and w >= 0 and w < W:
                    dx[n, c, h, w] += dout[n, c, ho, wo]


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, out_hw):
    """Max over each window and the tap that won it, in one pass.

    out[n, c, ho, wo] = max_{i, j} x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1] (outside: -inf);
    arg = i*kw + j of the first maximum (of the last NaN, which propagates).

    Shape:
        x (N, C, H, W) -> out (N, C, Ho, Wo) of x's dtype, arg (N, C, Ho, Wo) of the
        smallest unsigned dtype that holds kh*kw - 1; (Ho, Wo) = out_hw.

        >>> out, arg = max_pool2d_forward(np.arange(16.0).reshape(1, 1, 4, 4), (2, 2), (2, 2), (0, 0), (1, 1), (2, 2))
        >>> out[0, 0], arg[0, 0]
        (array([[ 5.,  7.],
               [13., 15.]]), array([[3, 3],
               [3, 3]], dtype=uint8))
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C = x.shape[0], x.shape[1]
    given = x.dtype
    x = np.ascontiguousarray(x, dtype=_working_dtype(given))
    best = np.empty((N, C) + tuple(out_hw), dtype=x.dtype)
    arg = np.empty((N, C) + tuple(out_hw), dtype=np.min_scalar_type(kh * kw - 1))
    _launch(_max_pool_forward, x.size, x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg)
    return (best if given == best.dtype else best.astype(given)), arg


def max_pool2d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """Each window sends dout to the input it took its max from; overlapping windows add.

    dx[n, c, h, w] = sum over windows whose winning tap is (h, w) of dout[n, c, ho, wo].

    Shape:
        dout, arg (N, C, Ho, Wo) -> dx x_shape = (N, C, H, W), dout's dtype.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    given = dout.dtype
    dout = np.ascontiguousarray(dout, dtype=_working_dtype(given))
    dx = np.empty(tuple(x_shape), dtype=dout.dtype)
    _launch(_max_pool_backward, dx.size, dout, np.ascontiguousarray(arg), kh, kw, sh, sw, ph, pw, dh, dw, dx)
    return dx if given == dx.dtype else dx.astype(given)
