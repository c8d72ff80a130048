"""The ReLU gradient on CuPy arrays in one element-wise launch (kernel in ``activation.cu``)."""

from __future__ import annotations

import numpy

from .runtime import _CTYPES, _kernel, _launch


def relu_backward(dout, out):
    """dx = dout where out > 0, else 0, in one launch.

    Shape:
        dout, out: the same shape -> dx of that shape, dout's dtype.
    """
    import cupy

    dtype = numpy.dtype(dout.dtype)
    if dtype not in _CTYPES or out.dtype != dtype or dout.shape != out.shape:
        return dout * (out > 0)  # the reference formula
    dx = cupy.empty(dout.shape, dtype=dtype)  # before ascontiguousarray, which makes a 0-d array 1-d
    dout, out = cupy.ascontiguousarray(dout), cupy.ascontiguousarray(out)
    _launch(_kernel("relu_backward", dtype), dx.size, (dout, out, dx, numpy.int64(dx.size)))
    return dx
