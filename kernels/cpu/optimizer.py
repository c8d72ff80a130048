"""The SGD update in one pass: the CPU twins of ``scratchseg.optim.sgd_update`` and ``sgd_update_many``.

The reference makes three to six passes over the parameter (each NumPy
operation one, with a temporary array for some); this kernel reads p, grad
and the momentum buffer once and writes p and the buffer once, with the same
operations in the same order and precision, so the numbers are the same.
The optimizer step of a U-Net of 1.93 M parameters (50 arrays): 2.2 ms by the
reference, 1.4-1.7 ms here (minimum of 40, ``benchmarks/NOTES.md``).

``sgd_update_many`` updates every parameter of a group in one call: a table
of the arrays' addresses, the elements of all of them taken end to end and
cut into blocks that the caller and a native worker (``native.py``) take in
turn. Per parameter, the Python around a one-array call (checks, dispatch,
conversions) costs about as much as its pass over 40 000 floats, and one
core alone does not reach the memory's bandwidth.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit

from ..twins import sgd_arrays_fit
from . import native
from ._common import _NATIVE

__all__ = ["sgd_update", "sgd_update_many"]


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


# ------------------------------------------------------- every parameter of a group at once
SERVED = 3  # this module's tasks, to the native workers' loop (serve.py)
_SHARE_MIN_ELEMENTS = 1 << 16  # from this many elements in all, the update is shared with a native worker
_BLOCKS = 16
_P, _G, _B, _SIZE, _FIRST = range(5)  # the table's columns: addresses of p, grad, buf; size; first step


@njit(cache=True, nogil=True)
def _span(table, ends, hyper, flags, lo, hi):
    """The update of elements [lo, hi) of the parameters laid end to end (parameter i ends at ends[i]).

    ``hyper``: lr, momentum, 1 - dampening, weight_decay (float64, rounded to the arrays' dtype here, as
    ``sgd_update`` rounds them); ``flags``: maximize, nesterov, float64 arrays.
    """
    maximize, nesterov = flags[0] != 0, flags[1] != 0
    for i in range(table.shape[0]):
        n = table[i, _SIZE]
        start = ends[i] - n
        a, b = max(lo, start) - start, min(hi, ends[i]) - start
        if a >= b:
            continue
        first = table[i, _FIRST] != 0
        if flags[2]:
            f64 = native._f64
            _sgd(carray(f64(table[i, _P]), (n,))[a:b], carray(f64(table[i, _G]), (n,))[a:b],
                 carray(f64(table[i, _B]), (n,))[a:b], hyper[0], hyper[1], hyper[2], hyper[3], maximize, first,
                 nesterov)
        else:
            f32, T = native._f32, np.float32
            _sgd(carray(f32(table[i, _P]), (n,))[a:b], carray(f32(table[i, _G]), (n,))[a:b],
                 carray(f32(table[i, _B]), (n,))[a:b], T(hyper[0]), T(hyper[1]), T(hyper[2]), T(hyper[3]), maximize,
                 first, nesterov)


@njit(cache=True, nogil=True)
def _drain(counter, table, ends, hyper, flags, per_block, blocks):
    """Blocks of ``per_block`` elements until none is left (counter[0])."""
    total = ends[-1]
    while True:
        b = native._take(counter.ctypes.data)
        if b >= blocks:
            return
        _span(table, ends, hyper, flags, b * per_block, min((b + 1) * per_block, total))


@njit(cache=True, nogil=True)
def _run_task(t):
    """A worker's share of the task row ``t`` (see ``sgd_update_many``)."""
    i64, f64 = native._i64, native._f64
    n = t[3]
    _drain(carray(i64(t[1]), (1,)), carray(i64(t[2]), (n, 5)), carray(i64(t[4]), (n,)), carray(f64(t[5]), (4,)),
           carray(i64(t[6]), (3,)), t[7], t[8])


def sgd_update_many(params, grads, bufs, lr, momentum, dampening, weight_decay, nesterov, maximize, firsts):
    """``sgd_update`` of every parameter of a group in one call (the same numbers): lists of p, grad, buf
    (None where momentum is 0) and first. From ``_SHARE_MIN_ELEMENTS`` elements in all the blocks are shared
    with a native worker.

    Returns ``NotImplemented``, touching nothing, unless every p is a NumPy array that ``sgd_update`` would
    take, all of one dtype.

        >>> p, g = np.ones(3), np.full(3, 0.5)
        >>> sgd_update_many([p], [g], [None], 0.1, 0, 0, 0, False, False, [True]); p
        array([0.95, 0.95, 0.95])
    """
    if not params or len({len(params), len(grads), len(bufs), len(firsts)}) != 1:
        return NotImplemented
    dtype = params[0].dtype
    for p, g, b in zip(params, grads, bufs):
        if not (type(p) is np.ndarray and type(g) is np.ndarray and (b is None or type(b) is np.ndarray)
                and p.dtype == dtype and sgd_arrays_fit(p, g, b, momentum, _NATIVE)):
            return NotImplemented
    grads = [np.ascontiguousarray(g) for g in grads]  # held until the update is done
    table = np.empty((len(params), 5), np.int64)
    for i, (p, g, b, first) in enumerate(zip(params, grads, bufs, firsts)):
        table[i] = (native.address(p), native.address(g), native.address(p if b is None else b), p.size, bool(first))
    ends = np.cumsum(table[:, _SIZE])
    hyper = np.array([lr, momentum, 1 - dampening, weight_decay], np.float64)
    flags = np.array([bool(maximize), bool(nesterov), dtype == np.float64], np.int64)
    total = int(ends[-1])
    per_block = max(-(-total // _BLOCKS), 1)
    blocks = -(-total // per_block) if total else 0
    counter = np.zeros(1, np.int64)

    def own():
        _drain(counter, table, ends, hyper, flags, per_block, blocks)

    def fill(task, threads):
        task[:9] = (SERVED, native.address(counter), native.address(table), len(params), native.address(ends),
                    native.address(hyper), native.address(flags), per_block, blocks)

    if total < _SHARE_MIN_ELEMENTS or not native.share(SERVED, blocks, own, fill):
        own()
    return None
