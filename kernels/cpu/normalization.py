"""Batch norm in training mode, forward and backward, fused into few passes over the activations.

``batch_norm_train_forward`` and ``batch_norm_backward`` compute what the
reference in ``scratchseg.functional.normalization`` computes, with the same
numbers.

Why it is fast: the reference makes about six passes over the activations in
forward and five in backward (mean, centre, variance, scale, shift; two sums,
then dx). These kernels make three and two, one channel per ``prange`` task,
sums in float64; small inputs run the serial twin (``runtime._launch``).
"""

from __future__ import annotations

import numpy as np  # host-only module: these kernels only ever see NumPy arrays
from numba import prange

from ._common import _working_dtype
from .runtime import _launch, _parallel_njit

__all__ = ["batch_norm_train_forward", "batch_norm_backward"]


@_parallel_njit(fastmath={"reassoc"})
def _bn_train_forward(x, gamma, beta, eps, out, xhat, mean, var, inv_std):
    # x, out, xhat: (N, C, L); mean, var, inv_std: (C,)
    N, C, L = x.shape
    M = N * L
    for c in prange(C):
        s = 0.0
        for n in range(N):
            for k in range(L):
                s += x[n, c, k]
        mu = s / M
        ss = 0.0
        for n in range(N):
            for k in range(L):
                d = x[n, c, k] - mu
                ss += d * d
        v = ss / M
        inv = 1.0 / np.sqrt(v + eps)
        g = gamma[c]
        b = beta[c]
        for n in range(N):
            for k in range(L):
                h = (x[n, c, k] - mu) * inv
                xhat[n, c, k] = h
                out[n, c, k] = h * g + b
        mean[c] = mu
        var[c] = v
        inv_std[c] = inv


@_parallel_njit(fastmath={"reassoc"})
def _bn_backward(dout, xhat, scale, training, need_dx, dx, sum_dout, sum_dout_xhat):
    # dout, xhat, dx: (N, C, L); scale = gamma * inv_std: (C,)
    N, C, L = dout.shape
    M = N * L
    for c in prange(C):
        s1 = 0.0
        s2 = 0.0
        for n in range(N):
            for k in range(L):
                d = dout[n, c, k]
                s1 += d
                s2 += d * xhat[n, c, k]
        sum_dout[c] = s1
        sum_dout_xhat[c] = s2
        if need_dx:
            sc = scale[c]
            if training:
                a = s1 / M
                b = s2 / M
                for n in range(N):
                    for k in range(L):
                        dx[n, c, k] = (dout[n, c, k] - a - xhat[n, c, k] * b) * sc
            else:
                for n in range(N):
                    for k in range(L):
                        dx[n, c, k] = dout[n, c, k] * sc


def batch_norm_train_forward(x, weight, bias, eps):
    """Batch norm in training mode, fused: the batch statistics and the output in three passes.

    mean_c = sum x / M, var_c = sum (x - mean_c)^2 / M (biased), xhat = (x - mean_c) / sqrt(var_c + eps),
    out = weight_c * xhat + bias_c, with M = N * prod(spatial) values per channel.

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
    _launch(_bn_train_forward, x3.size, x3, gamma, beta, eps, out, xhat, mean, var, inv_std)
    shape = x.shape
    res = [out.reshape(shape), xhat.reshape(shape), mean, var, inv_std]
    return tuple(a.astype(x.dtype) if a.dtype != x.dtype else a for a in res)


def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True):
    """Batch norm backward, fused: the two per-channel sums in one pass, dx in a second.

    dbeta = sum dout, dgamma = sum dout * xhat, and with scale = gamma * inv_std:
    training: dx = scale * (dout - sum dout / M - xhat * sum(dout * xhat) / M); eval: dx = scale * dout.

    Shape:
        dout, xhat (N, C, *); inv_std, weight (C,) (weight may be None) ->
        dx (N, C, *) or None, sum_dout (C,), sum_dout_xhat (C,).
    """
    dout = np.ascontiguousarray(dout)
    N, C = dout.shape[0], dout.shape[1]
    dtype = _working_dtype(np.result_type(dout.dtype, xhat.dtype))
    d3 = np.ascontiguousarray(dout.reshape(N, C, -1), dtype=dtype)  # (N, C, L)
    x3 = np.ascontiguousarray(xhat.reshape(N, C, -1), dtype=dtype)
    scale = np.asarray(inv_std, dtype=dtype) if weight is None else np.asarray(weight * inv_std, dtype=dtype)
    dx = np.empty_like(d3) if need_dx else np.empty((0, 0, 0), dtype)
    s1, s2 = np.empty(C, dtype), np.empty(C, dtype)
    _launch(_bn_backward, d3.size, d3, x3, scale, bool(training), bool(need_dx), dx, s1, s2)
    given = dout.dtype
    dx = dx.reshape(dout.shape).astype(given, copy=False) if need_dx else None
    return dx, s1.astype(given, copy=False), s2.astype(given, copy=False)
