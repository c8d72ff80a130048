"""The unfolded-columns products of ``conv.py`` on the native workers: each thread's share without the interpreter.

``conv.py`` splits a product over unfolded columns (im2col, then a GEMM per
block) by samples between threads through ``runtime._split``: a hand-over
through the interpreter, and the native worker of the products around it
(``native.py``) parked for it. In a training step on small images a dozen
such products sit between the shifted and batch-norm products that the
native worker serves. Here the same shares run as a native task:

* **The shares** are the split's contiguous sample ranges, one per thread,
  handed out by an atomic counter: the caller takes the first at once, the
  worker the next as soon as it is awake, and whoever finishes first takes
  what is left (a worker still waking up takes nothing, and nobody waits for
  it). Inside a share, the blocks of ``conv._blocks``, as the split runs them.
* **The same numbers** as the split: the forward's blocks are unfolded and
  multiplied by the same GEMM tiles (``gemm._gemm``), merged and biased in
  the same order. The input gradient (the forward of a transposed
  convolution) multiplies on the own GEMM too, then folds each block back
  (``im2col._col2im_block``) into its own samples' planes; its numbers are
  the own GEMM's, whichever thread runs a share.

Float32, one group, the own GEMM on this CPU, and (input gradient) blocks of
whole samples; elsewhere ``conv.py`` splits as before.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit

from . import gemm, native, runtime
from .im2col import _col2im_block, _im2col_block

__all__ = ["share_forward", "share_input_grad"]

SERVED = 4  # this module's tasks, to the native workers' loop (serve.py)
_FORWARD, _INPUT_GRAD = 1, 2


@njit(cache=True, nogil=True)
def _forward_share(x, w2, bias, has_bias, y, table, t0, t1, geometry, merge_below, cols, merge):
    """Blocks [t0, t1) of ``table`` (rows n0, n1, ho0, ho1) of y = conv(x, w2) (+ bias), as conv2d_forward's
    split runs them: unfold into ``cols`` (R, stride), multiply, merge through ``merge`` (K, width)."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    C = x.shape[1]
    y3 = y.reshape(y.shape[0], y.shape[1], y.shape[2] * y.shape[3])
    A = w2[None]  # (1, K, R)
    for t in range(t0, t1):
        n0, n1, ho0, ho1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        nb, P = n1 - n0, (ho1 - ho0) * Wo
        _im2col_block(x, 0, C, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, cols)
        if nb > 1 and P < merge_below:  # one wide GEMM, then each sample's columns copied out
            m = merge[:, :nb * P]
            gemm._gemm(A, cols[None, :, :nb * P], m[None], False)
            for i in range(nb):
                y3[n0 + i, :, ho0 * Wo:ho1 * Wo] = m[:, i * P:(i + 1) * P]
        else:  # one GEMM per sample, written straight into y
            for i in range(nb):
                gemm._gemm(A, cols[None, :, i * P:(i + 1) * P], y3[n0 + i:n0 + i + 1, :, ho0 * Wo:ho1 * Wo], False)
        if has_bias:
            for n in range(n0, n1):
                for k in range(y3.shape[1]):
                    y3[n, k, ho0 * Wo:ho1 * Wo] += bias[k]


@njit(cache=True, nogil=True)
def _input_grad_share(dout, w2, dx, table, t0, t1, geometry, merge_below, dcols, wide):
    """Blocks [t0, t1) (whole samples) of dx = conv2d_input_grad(dout, w2): dcols = w2^T @ dout per block
    (samples side by side in ``wide`` where thin), folded into dx, whose planes of these samples start zeroed."""
    kh, kw, sh, sw, ph, pw, dh, dw, Wo = geometry
    C = dx.shape[1]
    d3 = dout.reshape(dout.shape[0], dout.shape[1], dout.shape[2] * dout.shape[3])
    K, R = w2.shape
    A = w2.T[None]  # (1, R, K)
    if t1 > t0:
        dx[table[t0, 0]:table[t1 - 1, 1]] = 0.0
    for t in range(t0, t1):
        n0, n1, ho0, ho1 = table[t, 0], table[t, 1], table[t, 2], table[t, 3]
        nb, P = n1 - n0, (ho1 - ho0) * Wo
        c = dcols[:, :nb * P]
        if nb > 1 and P < merge_below:
            b = wide[:, :nb * P]
            for i in range(nb):
                b[:, i * P:(i + 1) * P] = d3[n0 + i, :, ho0 * Wo:ho1 * Wo]
            gemm._gemm(A, b[None], c[None], False)
        else:
            for i in range(nb):
                gemm._gemm(A, d3[n0 + i:n0 + i + 1, :, ho0 * Wo:ho1 * Wo], c[None, :, i * P:(i + 1) * P], False)
        _col2im_block(c, 0, C, n0, n1, ho0, ho1, kh, kw, sh, sw, ph, pw, dh, dw, Wo, dx, True, True)


@njit(cache=True, nogil=True)
def _drain(kind, a, w2, bias, has_bias, out, table, shares, counter, geometry, merge_below, first, second):
    """Shares (rows of ``shares``: first and last block) until none is left (counter[0])."""
    while True:
        s = native._take(counter.ctypes.data)
        if s >= shares.shape[0]:
            return
        if kind == _FORWARD:
            _forward_share(a, w2, bias, has_bias, out, table, shares[s, 0], shares[s, 1], geometry, merge_below,
                           first, second)
        else:
            _input_grad_share(a, w2, out, table, shares[s, 0], shares[s, 1], geometry, merge_below, first, second)


@njit(cache=True, nogil=True)
def _run_task(t, index):
    """Worker ``index``'s share of the task row ``t`` (see ``_share``)."""
    f32, i64 = native._f32, native._i64
    a = carray(f32(t[2]), (t[3], t[4], t[5], t[6]))
    K, R = t[7], t[8]
    w2 = carray(f32(t[9]), (K, R))
    out = carray(f32(t[11]), (t[3], t[12], t[13], t[14]))
    table = carray(i64(t[15]), (t[16], 4))
    shares = carray(i64(t[17]), (t[18], 2))
    geometry = carray(i64(t[19]), (9,))
    rows, width, rows2, width2 = t[22], t[23], t[24], t[25]
    first = carray(f32(t[26] + 4 * (index - 1) * rows * width), (rows, width))
    second = carray(f32(t[27] + 4 * (index - 1) * rows2 * width2), (rows2, width2))
    _drain(t[1], a, w2, carray(f32(t[10]), (max(K, 1),)), t[20] != 0, out, table, shares,
           carray(i64(t[21]), (1,)), geometry, t[28], first, second)


def _share(kind, a, w2, bias, out, table, shares, geometry, merge_below, first_shape, second_shape):
    """Run ``kind``'s shares on the caller and the native worker; False where native workers do not run."""
    from .runtime import workspace

    counter = np.zeros(1, np.int64)
    has_bias = bias is not None
    b = np.ascontiguousarray(bias, dtype=np.float32) if has_bias else np.zeros(max(w2.shape[0], 1), np.float32)
    geo = np.asarray(geometry, np.int64)

    def own():
        first = workspace(first_shape[0] * first_shape[1], np.float32).reshape(first_shape)
        second = workspace(second_shape[0] * second_shape[1], np.float32, 1).reshape(second_shape)
        _drain(kind, a, w2, b, has_bias, out, table, shares, counter, geo, merge_below, first, second)

    def fill(task, threads):
        n = threads - 1  # the workers' buffers: slots 10 and 11 of the caller, one slice each
        first = workspace(n * first_shape[0] * first_shape[1], np.float32, 10)
        second = workspace(n * second_shape[0] * second_shape[1], np.float32, 11)
        task[:29] = (SERVED, kind, a.ctypes.data, *a.shape, *w2.shape, w2.ctypes.data, b.ctypes.data,
                     out.ctypes.data, *out.shape[1:], table.ctypes.data, table.shape[0], shares.ctypes.data,
                     shares.shape[0], geo.ctypes.data, has_bias, counter.ctypes.data, *first_shape, *second_shape,
                     first.ctypes.data, second.ctypes.data, merge_below)

    return native.share(SERVED, shares.shape[0], own, fill)


def _tables(blocks_of, N, threads):
    """The blocks of every thread's share of [0, N) (``blocks_of(n_lo, n_hi)``, as conv's ``part`` runs them),
    as a table (rows n0, n1, ho0, ho1) and the shares' first and last rows."""
    rows, shares = [], []
    for t in range(threads):
        lo, hi = N * t // threads, N * (t + 1) // threads
        start = len(rows)
        rows.extend(blocks_of(lo, hi))
        shares.append((start, len(rows)))
    return np.array(rows, np.int64).reshape(-1, 4), np.array(shares, np.int64)


def _suits(*arrays):
    return (gemm.enabled() and native.available() and not runtime._inline[0]
            and all(a.dtype == np.float32 and a.flags.c_contiguous for a in arrays))


def share_forward(x, w2, bias, y, blocks_of, geometry, row_stride, merge_below):
    """conv2d_forward's product (one group) on the native workers: y (N, K, Ho, Wo) = conv(x, w2 (K, R)) + bias.
    False (nothing run) where it does not run there."""
    N, K = x.shape[0], w2.shape[0]
    threads = runtime._workers(N)
    if threads < 2 or not _suits(x, w2, y):
        return False
    table, shares = _tables(blocks_of, N, threads)
    Wo = geometry[-1]
    widest = int(((table[:, 1] - table[:, 0]) * (table[:, 3] - table[:, 2])).max()) * Wo
    return _share(_FORWARD, x, w2, bias, y, table, shares, geometry, merge_below, (w2.shape[1], row_stride(widest)),
                  (K, widest))


def share_input_grad(dout, w2, dx, blocks_of, geometry, merge_below):
    """conv2d_input_grad's product (one group) on the native workers: dx (N, C, H, W) from dout (N, K, Ho, Wo)
    and w2 (K, R). False (nothing run) where it does not run there or a block is part of a sample."""
    N, K = dout.shape[0], w2.shape[0]
    threads = runtime._workers(N)
    if threads < 2 or not _suits(dout, w2, dx):
        return False
    table, shares = _tables(blocks_of, N, threads)
    Ho, Wo = dout.shape[2], geometry[-1]
    if not ((table[:, 2] == 0) & (table[:, 3] == Ho)).all():  # folded blocks of one sample would overlap
        return False
    widest = int((table[:, 1] - table[:, 0]).max()) * Ho * Wo
    return _share(_INPUT_GRAD, dout, w2, None, dx, table, shares, geometry, merge_below, (w2.shape[1], widest),
                  (K, widest))
