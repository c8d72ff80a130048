"""Max pooling, forward (the max of each window and the tap that won it) and backward.

``max_pool2d_forward`` and ``max_pool2d_backward`` compute what the reference
in ``scratchseg.functional.pooling`` computes, with the same numbers (ties
keep the first maximum, a NaN propagates and its last tap wins).

Why it is fast: the reference takes the running max over the kh*kw taps as
whole-array operations (a compare, a maximum and an index update per tap,
each a pass over the output) and scatters the gradient back tap by tap.
These kernels do one pass each, one (n, c) plane per ``prange`` task; the
common 2x2, stride-2 window is unrolled with selects instead of branches.
Small inputs run the serial twin (``runtime._launch``); float32 from 32K
elements on shares blocks of planes with a native worker (``native.py``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit, prange

from . import native
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


@njit(cache=True, nogil=True, inline="always")
def _forward_plane(x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg, t):
    # plane t = n*C + c of x (N, C, H, W), best and arg (N, C, Ho, Wo)
    N, C, H, W = x.shape
    Ho, Wo = best.shape[2], best.shape[3]
    inside = ph == 0 and pw == 0 and (Ho - 1) * sh + (kh - 1) * dh < H and (Wo - 1) * sw + (kw - 1) * dw < W
    two_by_two = inside and kh == 2 and kw == 2 and sh == 2 and sw == 2 and dh == 1 and dw == 1
    n = t // C
    c = t % C
    if two_by_two:
        _max_pool_2x2(x[n, c], best[n, c], arg[n, c])
        return
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
        return
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


@njit(cache=True, nogil=True, inline="always")
def _backward_plane(dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx, t):
    N, C, H, W = dx.shape
    Ho, Wo = dout.shape[2], dout.shape[3]
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


@_parallel_njit()
def _max_pool_forward(x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg):
    for t in prange(x.shape[0] * x.shape[1]):
        _forward_plane(x, kh, kw, sh, sw, ph, pw, dh, dw, best, arg, t)


@_parallel_njit()
def _max_pool_backward(dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx):
    for t in prange(dx.shape[0] * dx.shape[1]):
        _backward_plane(dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx, t)


# ------------------------------------------------- float32 on the native workers (native.py)
# Blocks of planes handed out to the caller and a native worker, from this many input elements on
# (uint8 taps: windows of at most 256).
_NATIVE_MIN_WORK = 1 << 15
_BLOCKS = 8
_FORWARD, _BACKWARD = 1, 2
SERVED = 5  # this module's tasks, to the native workers' loop (serve.py)


@njit(cache=True, nogil=True)
def _drain(kind, a, arg, b, geometry, counter, per_block):
    """Blocks of ``per_block`` planes until none is left: the forward (a = x, b = best) or the backward
    (a = dout, b = dx)."""
    kh, kw, sh, sw, ph, pw, dh, dw = geometry
    planes = a.shape[0] * a.shape[1]
    while True:
        blk = native._take(counter.ctypes.data)
        if blk * per_block >= planes:
            return
        for t in range(blk * per_block, min((blk + 1) * per_block, planes)):
            if kind == _FORWARD:
                _forward_plane(a, kh, kw, sh, sw, ph, pw, dh, dw, b, arg, t)
            else:
                _backward_plane(a, arg, kh, kw, sh, sw, ph, pw, dh, dw, b, t)


@njit(cache=True, nogil=True)
def _run_task(t):
    """A worker's share of the task row ``t`` (see ``_share``)."""
    f32, i64 = native._f32, native._i64
    N, C = t[2], t[3]
    a = carray(f32(t[4]), (N, C, t[5], t[6]))
    arg = carray(native._u8(t[7]), (N, C, t[8], t[9]))
    b = carray(f32(t[10]), (N, C, t[11], t[12]))
    _drain(t[1], a, arg, b, carray(i64(t[13]), (8,)), carray(i64(t[14]), (1,)), t[15])


def _share(kind, a, arg, b, geometry):
    """The forward or backward on the caller and the native worker; False where it does not run there."""
    if a.dtype != np.float32 or arg.dtype != np.uint8 or max(a.size, b.size) < _NATIVE_MIN_WORK:
        return False
    planes = a.shape[0] * a.shape[1]
    if planes < 2 or not native.available():
        return False
    per_block = -(-planes // min(_BLOCKS, planes))
    counter, geo = np.zeros(1, np.int64), np.asarray(geometry, np.int64)

    def own():
        _drain(kind, a, arg, b, geo, counter, per_block)

    def fill(task, threads):
        at = native.address
        task[:16] = (SERVED, kind, a.shape[0], a.shape[1], at(a), *a.shape[2:], at(arg), *arg.shape[2:], at(b),
                     *b.shape[2:], at(geo), at(counter), per_block)

    return native.share(SERVED, -(-planes // per_block), own, fill)


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
    if not _share(_FORWARD, x, arg, best, (kh, kw, sh, sw, ph, pw, dh, dw)):
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
    arg = np.ascontiguousarray(arg)
    if not _share(_BACKWARD, dout, arg, dx, (kh, kw, sh, sw, ph, pw, dh, dw)):
        _launch(_max_pool_backward, dx.size, dout, arg, kh, kw, sh, sw, ph, pw, dh, dw, dx)
    return dx if given == dx.dtype else dx.astype(given)
