"""ReLU and its gradient, one pass each.

``relu_forward`` and ``relu_backward`` compute what the reference in
``scratchseg.functional.activation`` computes, with the same numbers (NaN
passes through the forward, as ``np.maximum(x, 0)``).

Why it is fast: NumPy's relu is one pass and its gradient two (the mask, then
the product); these are one pass each, split between the cores by ``prange``
for large arrays and run by the serial twin for small ones
(``runtime._launch``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import prange

from ._common import _NATIVE
from .runtime import _launch, _parallel_njit

__all__ = ["relu_forward", "relu_backward"]


@_parallel_njit()
def _relu_forward(x, out):
    for k in prange(x.shape[0]):
        v = x[k]
        out[k] = v if v > 0 or v != v else 0  # NaN passes through, as np.maximum(x, 0)


@_parallel_njit()
def _relu_backward(dout, out, dx):
    for k in prange(dout.shape[0]):
        dx[k] = dout[k] if out[k] > 0 else 0


def relu_forward(x):
    """out = max(x, 0) (NaN stays NaN), in one pass (parallel for large arrays).

    Shape:
        x of any shape -> out of the same shape and dtype.

        >>> relu_forward(np.array([-1.0, 0.0, 2.5]))
        array([0. , 0. , 2.5])
    """
    if x.dtype not in _NATIVE:
        return np.maximum(x, 0)
    out = np.empty(x.shape, x.dtype)
    _launch(_relu_forward, x.size, np.ascontiguousarray(x).reshape(-1), out.reshape(-1))
    return out


def relu_backward(dout, out):
    """dx = dout where out > 0, else 0, in one pass (parallel for large arrays).

    Shape:
        dout, out: the same shape -> dx of that shape, dout's dtype.

        >>> relu_backward(np.array([1.0, 2.0, 3.0]), np.array([0.5, 0.0, -1.0]))
        array([1., 0., 0.])
    """
    if dout.dtype not in _NATIVE or out.dtype != dout.dtype or dout.shape != out.shape:
        return dout * (out > 0)  # the reference formula
    dx = np.empty(dout.shape, dout.dtype)
    _launch(_relu_backward, dx.size, np.ascontiguousarray(dout).reshape(-1), np.ascontiguousarray(out).reshape(-1),
            dx.reshape(-1))
    return dx
