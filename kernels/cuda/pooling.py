"""Max pooling on CuPy arrays (kernels in ``pooling.cu``): the max and its winning tap, and the backward gather.

The backward is a gather (each input pixel sums the windows it won), so it
needs no atomics and is deterministic.
"""

from __future__ import annotations

import numpy

from .runtime import _CTYPES, _check_index_range, _ints, _kernel, _launch_rows


def max_pool2d_forward(x, kernel_size, stride, padding, dilation, out_hw):
    """Max over each window and the tap that won it, one thread per output.

    out[n, c, ho, wo] = max_{i, j} x[n, c, ho*s0 - p0 + i*d0, wo*s1 - p1 + j*d1] (outside: -inf);
    arg = i*kw + j of the first maximum (of the last NaN, which propagates).

    Shape:
        x (N, C, H, W) -> out (N, C, Ho, Wo) of x's dtype, arg (N, C, Ho, Wo) int32; (Ho, Wo) = out_hw.
    """
    import cupy

    given = numpy.dtype(x.dtype)
    if given not in _CTYPES:
        best, arg = max_pool2d_forward(x.astype(numpy.float32), kernel_size, stride, padding, dilation, out_hw)
        return best.astype(given), arg
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C, H, W = (int(s) for s in x.shape)
    Ho, Wo = (int(s) for s in out_hw)
    _check_index_range(H * W, Ho * Wo)
    x = cupy.ascontiguousarray(x)
    best = cupy.empty((N, C, Ho, Wo), dtype=given)
    arg = cupy.empty((N, C, Ho, Wo), dtype=numpy.int32)
    _launch_rows(_kernel("max_pool_forward", given), N * C, Ho * Wo,
                 (x, best, arg) + _ints(H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo) + (given.type(-numpy.inf),))
    return best, arg


def max_pool2d_backward(dout, arg, x_shape, kernel_size, stride, padding, dilation):
    """Each window sends dout to the input it took its max from; overlapping windows add (a gather).

    dx[n, c, h, w] = sum over windows whose winning tap is (h, w) of dout[n, c, ho, wo].

    Shape:
        dout, arg (N, C, Ho, Wo) -> dx x_shape = (N, C, H, W), dout's dtype.
    """
    import cupy

    given = numpy.dtype(dout.dtype)
    if given not in _CTYPES:
        return max_pool2d_backward(dout.astype(numpy.float32), arg, x_shape, kernel_size, stride, padding,
                                   dilation).astype(given)
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel_size, stride, padding, dilation
    N, C, H, W = (int(s) for s in x_shape)
    Ho, Wo = int(dout.shape[2]), int(dout.shape[3])
    dout = cupy.ascontiguousarray(dout)
    arg = cupy.ascontiguousarray(arg, dtype=numpy.int32)
    dx = cupy.empty((N, C, H, W), dtype=given)
    _launch_rows(_kernel("max_pool_backward", given), N * C, H * W,
                 (dout, arg, dx) + _ints(H, W, kh, kw, sh, sw, ph, pw, dh, dw, Ho, Wo))
    return dx
