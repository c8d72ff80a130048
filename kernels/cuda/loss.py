"""Cross entropy on CuPy arrays (kernels in ``loss.cu``).

Softmax, per-position loss and target weights in one launch, the gradient
from the saved softmax in another.
"""

from __future__ import annotations

import numpy

from .runtime import _CTYPES, _check_index_range, _ints, _kernel, _launch_rows


def cross_entropy_forward(x, target, weight, ignore_index, label_smoothing=0.0):
    """Softmax, per-position loss and target weight of every position, in one launch.

    Per position (t the target, w the class weights, all ones when None; an
    ignored position counts as class 0 with weight 0):
    p = softmax(x) over the classes, w_t = w[t], loss = w_t * (-log p_t).

    ``NotImplemented`` (the reference runs) with label smoothing and for
    dtypes other than float32 and float64.

    Shape:
        x (N, C, *), target (N, *) integer, weight (C,) or None ->
        p (N, C, S), loss (N, 1, S), w_t (N, 1, S) with S = prod(*), x's dtype.
    """
    import cupy

    dtype = numpy.dtype(x.dtype)
    if label_smoothing or dtype not in _CTYPES:
        return NotImplemented
    N, C = int(x.shape[0]), int(x.shape[1])
    x3 = cupy.ascontiguousarray(x).reshape(N, C, -1)  # (N, C, S)
    S = int(x3.shape[2])
    _check_index_range(S, C)
    t = cupy.ascontiguousarray(target, dtype=numpy.int64)
    w = x3 if weight is None else cupy.ascontiguousarray(weight, dtype=dtype)  # x3: an unread stand-in
    p = cupy.empty_like(x3)
    loss, w_t = cupy.empty((2, N, 1, S), dtype=dtype)
    _launch_rows(_kernel("ce_forward", dtype), N, S,
                 (x3, t, w, p, loss, w_t) + _ints(C, S) + (numpy.int64(ignore_index),) + _ints(weight is not None))
    return p, loss, w_t


def cross_entropy_backward(p, target, weight, w_t, g, ignore_index, label_smoothing=0.0):
    """dx of the cross entropy from the saved softmax, in one launch: dx = w_t g (p - onehot(t)).

    ``g`` is the upstream gradient of each position (N, 1, S) or one for all
    (a 0-d or one-element array); ``weight`` enters through ``w_t``.
    ``NotImplemented`` with label smoothing and for dtypes other than float32
    and float64.

    Shape:
        p (N, C, S), target (N, *), w_t (N, 1, S), g (N, 1, S) or () -> dx (N, C, S).
    """
    import cupy

    dtype = numpy.dtype(p.dtype)
    if label_smoothing or dtype not in _CTYPES:
        return NotImplemented
    N, C, S = (int(n) for n in p.shape)
    g = cupy.ascontiguousarray(g, dtype=dtype)
    per_position = g.size != 1
    if per_position and g.size != N * S:
        raise ValueError(f"cross_entropy_backward: g has shape {tuple(g.shape)}, expected {(N, 1, S)} or one value")
    t = cupy.ascontiguousarray(target, dtype=numpy.int64)
    p = cupy.ascontiguousarray(p)
    dx = cupy.empty_like(p)
    _launch_rows(_kernel("ce_backward", dtype), N, S,
                 (p, t, cupy.ascontiguousarray(w_t), g, dx) + _ints(C, S) + (numpy.int64(ignore_index),)
                 + _ints(per_position))
    return dx
