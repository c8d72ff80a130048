"""The SGD update of one parameter on CuPy arrays in one element-wise launch (kernel in ``optimizer.cu``)."""

from __future__ import annotations

import numpy

from ..twins import sgd_arrays_fit
from .runtime import _CTYPES, _ints, _kernel, _launch


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    """One SGD step of one parameter, in place, in one launch (torch's rule).

    g = grad (negated when maximize) + weight_decay * p;
    buf = g if first else momentum * buf + (1 - dampening) * g   (when momentum != 0);
    g = g + momentum * buf if nesterov else buf;  p = p - lr * g.

    Returns ``NotImplemented``, touching nothing, when the arrays don't suit the
    kernel (the reference then runs): ``p`` and ``buf`` must be
    C-contiguous arrays of p's float dtype, ``grad`` of the same shape.

    Shape:
        p, grad, buf: one shape (buf may be None when momentum is 0).
    """
    import cupy

    if not sgd_arrays_fit(p, grad, buf, momentum, _CTYPES):
        return NotImplemented
    dtype = numpy.dtype(p.dtype)
    grad = cupy.ascontiguousarray(grad)
    T = dtype.type
    _launch(_kernel("sgd", dtype), p.size,
            (p, grad, p if buf is None else buf, numpy.int64(p.size), T(lr), T(momentum), T(dampening),
             T(weight_decay)) + _ints(bool(maximize), bool(first), bool(nesterov)))
    return None
