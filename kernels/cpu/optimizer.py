"""The SGD update of one parameter in one pass: the CPU twin of ``scratchseg.optim.sgd_update``.

The reference makes three to six passes over the parameter (each NumPy
operation one, with a temporary array for some); this kernel reads p, grad
and the momentum buffer once and writes p and the buffer once, with the same
operations in the same order and precision, so the numbers are the same.
The optimizer step of a U-Net of 1.93 M parameters (50 arrays): 2.2 ms by the
reference, 1.4-1.7 ms here (minimum of 40, ``benchmarks/NOTES.md``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import njit

from ..twins import sgd_arrays_fit
from ._common import _NATIVE

__all__ = ["sgd_update"]


@njit(cache=True, nogil=True)
def _sgd(p, grad, buf, lr, momentum, keep, weight_decay, maximize, first, nesterov):
    # g = grad (negated when maximize) + weight_decay * p
    # buf = g on the first step, else momentum * buf + keep * g, keep = 1 - dampening (momentum != 0)
    # g = g + momentum * buf (nesterov) or buf;  p = p - lr * g
    for k in range(p.shape[0]):
        g = -grad[k] if maximize else grad[k]
        if weight_decay != 0:
            g = g + weight_decay * p[k]
        if momentum != 0:
            b = g if first else momentum * buf[k] + keep * g
            buf[k] = b
            g = g + momentum * b if nesterov else b
        p[k] = p[k] - lr * g


def sgd_update(p, grad, buf, lr, momentum, dampening, weight_decay, nesterov, maximize, first):
    """One SGD step of one parameter, in place, in one pass (torch's rule; see ``scratchseg.optim.SGD``).

    Returns ``NotImplemented``, touching nothing, when the arrays don't suit the
    kernel (the reference then runs): ``p`` and ``buf`` must be C-contiguous
    float32 or float64 arrays of one dtype, ``grad`` of the same dtype and shape.

    Shape:
        p, grad, buf: one shape (buf may be None when momentum is 0).

        >>> p, g = np.ones(3), np.full(3, 0.5)
        >>> sgd_update(p, g, None, 0.1, 0, 0, 0, False, False, True); p
        array([0.95, 0.95, 0.95])
    """
    if not sgd_arrays_fit(p, grad, buf, momentum, _NATIVE):
        return NotImplemented
    T = p.dtype.type  # the scalars in p's precision, as NumPy rounds a Python float against a float32 array
    flat = p.reshape(-1)
    _sgd(flat, np.ascontiguousarray(grad).reshape(-1), flat if buf is None else buf.reshape(-1), T(lr),
         T(momentum), T(1 - dampening), T(weight_decay), bool(maximize), bool(first), bool(nesterov))
    return None
