"""Batch norm in training mode, forward and backward, fused into few passes over the activations.

``batch_norm_train_forward`` and ``batch_norm_backward`` compute what the
reference in ``scratchseg.functional.normalization`` computes, with the same
numbers.

Why it is fast: the reference makes about six passes over the activations in
forward and five in backward (mean, centre, variance, scale, shift; two sums,
then dx). These kernels make three and two, one channel per ``prange`` task,
sums in float64; small inputs run the serial twin (``runtime._launch``), and
float32 from 32K elements on shares its channels with a native worker
(``native.py``). A ReLU after the batch norm (``relu=True``, ``relu_out``)
runs inside the same passes: none of its own.
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import carray, njit, prange

from . import native
from ._common import _working_dtype
from .runtime import _launch, _parallel_njit

__all__ = ["batch_norm_train_forward", "batch_norm_backward"]


@njit(cache=True, nogil=True, fastmath={"reassoc"}, inline="always")
def _forward_channel(x, gamma, beta, eps, relu, out, xhat, mean, var, inv_std, c):
    # channel c of x, out, xhat: (N, C, L); mean, var, inv_std: (C,). The sums in float64, row by
    # row (contiguous); the output in x's dtype, from the mean and inv_std as stored (float64
    # arithmetic over every element would cost twice the time of the pass); relu: max(out, 0) as
    # relu_forward takes it (NaN passes)
    N, C, L = x.shape
    M = N * L
    s = 0.0
    for n in range(N):
        r = x[n, c]
        for k in range(L):
            s += r[k]
    mu = s / M
    ss = 0.0
    for n in range(N):
        r = x[n, c]
        for k in range(L):
            d = r[k] - mu
            ss += d * d
    v = ss / M
    mean[c] = mu
    var[c] = v
    inv_std[c] = 1.0 / np.sqrt(v + eps)
    m, inv, g, b = mean[c], inv_std[c], gamma[c], beta[c]  # x's dtype
    for n in range(N):
        r, h, o = x[n, c], xhat[n, c], out[n, c]
        if relu:
            for k in range(L):
                e = (r[k] - m) * inv
                h[k] = e
                y = e * g + b
                o[k] = y if y > 0 or y != y else 0
        else:
            for k in range(L):
                e = (r[k] - m) * inv
                h[k] = e
                o[k] = e * g + b


@njit(cache=True, nogil=True, fastmath={"reassoc"}, inline="always")
def _backward_channel(dout, xhat, scale, training, need_dx, relu_out, affine, zero, dx, sum_dout, sum_dout_xhat,
                      c):
    # channel c of dout, xhat, dx: (N, C, L); scale = gamma * inv_std: (C,). The sums in float64, row
    # by row (contiguous); dx in dout's dtype (float64 arithmetic over every element costs twice the
    # time). A ReLU fused after the batch norm: dout counts only where its output was > 0
    # (relu_backward's rule), zero[0] (of dout's dtype) elsewhere; that output recomputed as
    # xhat * affine[0] + affine[1] (as the forward computed it) where ``affine`` (2, C) is not empty,
    # else read from relu_out (N, C, L) where that is not empty (one more array to read, twice)
    N, C, L = dout.shape
    M = N * L
    mode = 2 if affine.size > 0 else (1 if relu_out.size > 0 else 0)
    z = zero[0]
    gm = affine[0, c] if mode == 2 else z
    bt = affine[1, c] if mode == 2 else z
    s1 = 0.0
    s2 = 0.0
    for n in range(N):
        d, h = dout[n, c], xhat[n, c]
        if mode == 2:
            for k in range(L):
                hk, dk = h[k], d[k]
                e = np.float64(dk if hk * gm + bt > 0 else z)
                s1 += e
                s2 += e * hk
        elif mode == 1:
            ro = relu_out[n, c]
            for k in range(L):
                e = np.float64(d[k] if ro[k] > 0 else z)
                s1 += e
                s2 += e * h[k]
        else:
            for k in range(L):
                e = np.float64(d[k])
                s1 += e
                s2 += e * h[k]
    if need_dx and training:  # the means in dout's dtype: stored, read back, then the sums stored
        sum_dout[c] = s1 / M
        sum_dout_xhat[c] = s2 / M
        a, b = sum_dout[c], sum_dout_xhat[c]
    else:
        a, b = z, z
    sum_dout[c] = s1
    sum_dout_xhat[c] = s2
    if not need_dx:
        return
    sc = scale[c]
    for n in range(N):
        d, h, o = dout[n, c], xhat[n, c], dx[n, c]
        if mode == 2 and training:
            for k in range(L):
                hk, dk = h[k], d[k]
                o[k] = ((dk if hk * gm + bt > 0 else z) - a - hk * b) * sc
        elif mode == 2:
            for k in range(L):
                hk, dk = h[k], d[k]
                o[k] = (dk if hk * gm + bt > 0 else z) * sc
        elif mode == 1 and training:
            ro = relu_out[n, c]
            for k in range(L):
                o[k] = ((d[k] if ro[k] > 0 else z) - a - h[k] * b) * sc
        elif mode == 1:
            ro = relu_out[n, c]
            for k in range(L):
                o[k] = (d[k] if ro[k] > 0 else z) * sc
        elif training:
            for k in range(L):
                o[k] = (d[k] - a - h[k] * b) * sc
        else:
            for k in range(L):
                o[k] = d[k] * sc


@_parallel_njit(fastmath={"reassoc"})
def _bn_train_forward(x, gamma, beta, eps, relu, out, xhat, mean, var, inv_std):
    for c in prange(x.shape[1]):
        _forward_channel(x, gamma, beta, eps, relu, out, xhat, mean, var, inv_std, c)


@_parallel_njit(fastmath={"reassoc"})
def _bn_backward(dout, xhat, scale, training, need_dx, relu_out, affine, zero, dx, sum_dout, sum_dout_xhat):
    for c in prange(dout.shape[1]):
        _backward_channel(dout, xhat, scale, training, need_dx, relu_out, affine, zero, dx, sum_dout, sum_dout_xhat,
                          c)


# ------------------------------------------------- float32 on the native workers (native.py)
# Blocks of channels handed out to the caller and a native worker (no launch of
# Numba's thread pool, no wait for a worker that wakes late), from this many
# elements on.
_NATIVE_MIN_WORK = 1 << 15
_BLOCKS = 8
_FORWARD, _BACKWARD = 1, 2
SERVED = 2  # this module's tasks, to the native workers' loop (serve.py)


@njit(cache=True, nogil=True, fastmath={"reassoc"})  # the channel loops are inlined here: their flags
def _drain_forward(x, gamma, beta, eps, relu, out, xhat, mean, var, inv_std, counter, per_block, blocks):
    C = x.shape[1]
    while True:
        b = native._take(counter.ctypes.data)
        if b >= blocks:
            return
        for c in range(b * per_block, min((b + 1) * per_block, C)):
            _forward_channel(x, gamma, beta, eps[0], relu, out, xhat, mean, var, inv_std, c)


@njit(cache=True, nogil=True, fastmath={"reassoc"})
def _drain_backward(dout, xhat, scale, training, need_dx, relu_out, affine, zero, dx, sum_dout, sum_dout_xhat,
                    counter, per_block, blocks):
    C = dout.shape[1]
    while True:
        b = native._take(counter.ctypes.data)
        if b >= blocks:
            return
        for c in range(b * per_block, min((b + 1) * per_block, C)):
            _backward_channel(dout, xhat, scale, training, need_dx, relu_out, affine, zero, dx, sum_dout,
                              sum_dout_xhat, c)


@njit(cache=True, nogil=True)
def _run_task(t):
    """A worker's share of the task row ``t`` (see ``_share_forward`` and ``_share_backward``)."""
    f32, i64 = native._f32, native._i64
    counter = carray(i64(t[1]), (1,))
    N, C, L = t[3], t[4], t[5]
    if t[0] == _FORWARD:
        eps = carray(native._f64(t[8]), (1,))
        _drain_forward(carray(f32(t[2]), (N, C, L)), carray(f32(t[6]), (C,)), carray(f32(t[7]), (C,)), eps,
                       t[16] != 0, carray(f32(t[9]), (N, C, L)), carray(f32(t[10]), (N, C, L)),
                       carray(f32(t[11]), (C,)), carray(f32(t[12]), (C,)), carray(f32(t[13]), (C,)), counter, t[14],
                       t[15])
    elif t[0] == _BACKWARD:
        shape = (N, C, L) if t[9] else (0, 0, 0)
        masked = (N, C, L) if t[15] else (0, 0, 0)
        affine = (2, C) if t[18] else (0, 0)
        _drain_backward(carray(f32(t[2]), (N, C, L)), carray(f32(t[6]), (N, C, L)), carray(f32(t[7]), (C,)),
                        t[8] != 0, t[9] != 0, carray(f32(t[16]), masked), carray(f32(t[19]), affine),
                        carray(f32(t[17]), (1,)), carray(f32(t[10]), shape), carray(f32(t[11]), (C,)),
                        carray(f32(t[12]), (C,)), counter, t[13], t[14])


def _plan(a3):
    """(per_block, blocks) where a kernel over a3 (N, C, L) runs on the native workers, else None."""
    C = a3.shape[1]
    if a3.dtype != np.float32 or a3.size < _NATIVE_MIN_WORK or C < 2 or not native.available():
        return None
    per_block = -(-C // min(_BLOCKS, C))
    return per_block, -(-C // per_block)


def _share_forward(x3, gamma, beta, eps, relu, out, xhat, mean, var, inv_std):
    """The forward on the native workers; False where it does not run there."""
    plan = _plan(x3)
    if plan is None:
        return False
    per_block, blocks = plan
    counter, e = np.zeros(1, np.int64), np.array([eps], np.float64)
    N, C, L = x3.shape

    def own():
        _drain_forward(x3, gamma, beta, e, relu, out, xhat, mean, var, inv_std, counter, per_block, blocks)

    def fill(task, threads):
        at = native.address
        task[:17] = (_FORWARD, at(counter), at(x3), N, C, L, at(gamma), at(beta), at(e), at(out), at(xhat), at(mean),
                     at(var), at(inv_std), per_block, blocks, relu)

    return native.share(SERVED, blocks, own, fill)


def _share_backward(d3, x3, scale, training, need_dx, relu_out, affine, zero, dx, s1, s2):
    """The backward on the native workers; False where it does not run there."""
    plan = _plan(d3)
    if plan is None:
        return False
    per_block, blocks = plan
    counter = np.zeros(1, np.int64)
    N, C, L = d3.shape

    def own():
        _drain_backward(d3, x3, scale, training, need_dx, relu_out, affine, zero, dx, s1, s2, counter, per_block,
                        blocks)

    def fill(task, threads):
        at = native.address
        task[:20] = (_BACKWARD, at(counter), at(d3), N, C, L, at(x3), at(scale), training, need_dx, at(dx), at(s1),
                     at(s2), per_block, blocks, relu_out.size > 0, at(relu_out), at(zero), affine.size > 0, at(affine))

    return native.share(SERVED, blocks, own, fill)


def batch_norm_train_forward(x, weight, bias, eps, relu=False):
    """Batch norm in training mode, fused: the batch statistics and the output in three passes.

    mean_c = sum x / M, var_c = sum (x - mean_c)^2 / M (biased), xhat = (x - mean_c) / sqrt(var_c + eps),
    out = weight_c * xhat + bias_c, with M = N * prod(spatial) values per channel; ``relu``: max(out, 0)
    instead, in the same pass.

    Shape:
        x (N, C, *) -> out, xhat (N, C, *), mean, var, inv_std (C,), all of x's dtype;
        weight, bias (C,) or None.

        >>> out, xhat, mean, var, inv_std = batch_norm_train_forward(np.arange(8.0).reshape(2, 2, 2), None, None, 0.0)
        >>> mean, var
        (array([2.5, 4.5]), array([4.25, 4.25]))
    """
    x = np.ascontiguousarray(x)
    N, C = x.shape[0], x.shape[1]
    x3 = x.reshape(N, C, -1)  # (N, C, L)
    dtype = _working_dtype(x.dtype)
    if dtype != x.dtype:
        x3 = x3.astype(dtype)
    gamma = np.ones(C, dtype) if weight is None else np.ascontiguousarray(weight, dtype=dtype)
    beta = np.zeros(C, dtype) if bias is None else np.ascontiguousarray(bias, dtype=dtype)
    out, xhat = np.empty_like(x3), np.empty_like(x3)
    mean, var, inv_std = np.empty(C, dtype), np.empty(C, dtype), np.empty(C, dtype)
    relu = bool(relu)
    if not _share_forward(x3, gamma, beta, eps, relu, out, xhat, mean, var, inv_std):
        _launch(_bn_train_forward, x3.size, x3, gamma, beta, eps, relu, out, xhat, mean, var, inv_std)
    shape = x.shape
    res = [out.reshape(shape), xhat.reshape(shape), mean, var, inv_std]
    return tuple(a.astype(x.dtype) if a.dtype != x.dtype else a for a in res)


def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True, relu_out=None, shift=None):
    """Batch norm backward, fused: the two per-channel sums in one pass, dx in a second.

    dbeta = sum dout, dgamma = sum dout * xhat, and with scale = gamma * inv_std:
    training: dx = scale * (dout - sum dout / M - xhat * sum(dout * xhat) / M); eval: dx = scale * dout.
    ``relu_out`` (the output of a ReLU fused after the batch norm, or None): dout taken as 0 wherever
    relu_out <= 0 (relu_backward's rule), in the same passes. ``shift``: a one-element tuple, (bias,),
    the shift the forward added to xhat * weight (bias None: none); then, where xhat, weight and bias
    are of the working dtype (float32 or float64: the very values the forward computed with), that
    output is recomputed as xhat * weight + bias rather than read.

    Shape:
        dout, xhat (N, C, *); inv_std, weight (C,) (weight may be None); relu_out as dout or None;
        shift None or (bias,), bias (C,) or None -> dx (N, C, *) or None, sum_dout (C,), sum_dout_xhat (C,).
    """
    dout = np.ascontiguousarray(dout)
    N, C = dout.shape[0], dout.shape[1]
    dtype = _working_dtype(np.result_type(dout.dtype, xhat.dtype))
    d3 = np.ascontiguousarray(dout.reshape(N, C, -1), dtype=dtype)  # (N, C, L)
    x3 = np.ascontiguousarray(xhat.reshape(N, C, -1), dtype=dtype)
    r3, affine = np.empty((0, 0, 0), dtype), np.empty((0, 0), dtype)
    if relu_out is not None and relu_out.shape != dout.shape:
        raise ValueError(f"batch_norm_backward: relu_out has shape {relu_out.shape}, expected {dout.shape}")
    if relu_out is not None:
        bias = None if shift is None else shift[0]
        if shift is not None and xhat.dtype == dtype and all(p is None or p.dtype == dtype for p in (weight, bias)):
            affine = np.empty((2, C), dtype)
            affine[0] = 1 if weight is None else weight
            affine[1] = 0 if bias is None else bias
        else:
            r3 = np.ascontiguousarray(relu_out.reshape(N, C, -1), dtype=dtype)
    scale = np.ascontiguousarray(inv_std if weight is None else weight * inv_std, dtype=dtype)
    dx = np.empty_like(d3) if need_dx else np.empty((0, 0, 0), dtype)
    s1, s2, zero = np.empty(C, dtype), np.empty(C, dtype), np.zeros(1, dtype)
    args = (d3, x3, scale, bool(training), bool(need_dx), r3, affine, zero, dx, s1, s2)
    if not _share_backward(*args):
        _launch(_bn_backward, d3.size, *args)
    given = dout.dtype
    dx = dx.reshape(dout.shape).astype(given, copy=False) if need_dx else None
    return dx, s1.astype(given, copy=False), s2.astype(given, copy=False)
