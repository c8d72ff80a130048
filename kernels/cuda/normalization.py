"""Batch norm in training mode on CuPy arrays (kernels in ``normalization.cu``).

One block per channel sums the channel's values in float64 and writes its
outputs in the same launch, so forward and backward are one launch each,
where the reference spends 5-20 array operations.
"""

from __future__ import annotations

import numpy

from .runtime import _CTYPES, _ROWS_THREADS, _as_float32, _check_index_range, _ints, _kernel, _launch


def _channels_view(a):
    """``a`` (N, C, *) as a C-contiguous (N, C, L) array."""
    import cupy

    a = cupy.ascontiguousarray(a)
    return a.reshape(a.shape[0], a.shape[1], -1)


def batch_norm_train_forward(x, weight, bias, eps, relu=False):
    """Batch norm in training mode, one launch: one block per channel sums, normalises and writes.

    mean_c = sum x / M, var_c = sum (x - mean_c)^2 / M (biased, both summed in float64),
    xhat = (x - mean_c) / sqrt(var_c + eps), out = weight_c * xhat + bias_c, M = N * prod(spatial);
    ``relu``: max(out, 0), one more element-wise launch.

    Shape:
        x (N, C, *) -> out, xhat (N, C, *), mean, var, inv_std (C,), all of x's dtype;
        weight, bias (C,) or None.
    """
    import cupy

    given = numpy.dtype(x.dtype)
    if given not in _CTYPES:
        res = batch_norm_train_forward(*_as_float32((x, weight, bias)), eps, relu)
        return tuple(a.astype(given) for a in res)
    x3 = _channels_view(x)  # (N, C, L)
    N, C, L = (int(s) for s in x3.shape)
    _check_index_range(L)
    out, xhat = cupy.empty_like(x3), cupy.empty_like(x3)
    stats = cupy.empty((3, C), dtype=given)  # mean, var, inv_std
    gamma = x3 if weight is None else cupy.ascontiguousarray(weight, dtype=given)  # x3: an unread stand-in
    beta = x3 if bias is None else cupy.ascontiguousarray(bias, dtype=given)
    _kernel("bn_forward", given)(
        (C,), (_ROWS_THREADS,),
        (x3, gamma, beta, out, xhat, stats[0], stats[1], stats[2]) + _ints(N, C, L)
        + (numpy.float64(eps),) + _ints(weight is not None, bias is not None))
    if relu:
        cupy.maximum(out, 0, out=out)  # NaN passes, as relu_forward
    return out.reshape(x.shape), xhat.reshape(x.shape), stats[0], stats[1], stats[2]


def batch_norm_update_running(running_mean, running_var, mean, var, M, momentum):
    """Move the running statistics towards the batch's, in place, in one launch.

    running_mean = (1 - momentum) * running_mean + momentum * mean;
    running_var likewise with the unbiased variance var * M / (M - 1).

    Returns ``NotImplemented``, touching nothing, when the buffers don't suit the kernel
    (not C-contiguous arrays of one float dtype): the reference then runs.

    Shape:
        running_mean, running_var (C,) or None; mean, var (C,).
    """
    import cupy

    buffers = [a for a in (running_mean, running_var) if a is not None]
    if not buffers:
        return None
    dtype = numpy.dtype(buffers[0].dtype)
    if dtype not in _CTYPES or any(a.dtype != dtype or not a.flags.c_contiguous for a in buffers):
        return NotImplemented
    C = int(mean.shape[0])
    mean = cupy.ascontiguousarray(mean, dtype=dtype)
    var = cupy.ascontiguousarray(var, dtype=dtype)
    rm = mean if running_mean is None else running_mean  # mean, var: unwritten stand-ins
    rv = var if running_var is None else running_var
    T = dtype.type
    _launch(_kernel("bn_running", dtype), C,
            (rm, rv, mean, var, numpy.int32(C), T(momentum), T(M / (M - 1)))
            + _ints(running_mean is not None, running_var is not None))
    return None


def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True, relu_out=None, shift=None):
    """Batch norm backward, one launch: one block per channel takes both sums, then writes dx.

    ``relu_out`` (the output of a ReLU fused after the batch norm, or None): dout is 0 wherever
    relu_out <= 0, one more element-wise launch first (``shift``, which lets the CPU kernel recompute
    relu_out, is not needed here).

    dbeta = sum dout, dgamma = sum dout * xhat (summed in float64), and with
    scale = gamma * inv_std: training: dx = scale * (dout - sum dout / M - xhat * sum(dout * xhat) / M);
    eval: dx = scale * dout.

    Shape:
        dout, xhat (N, C, *); inv_std, weight (C,) (weight may be None) ->
        dx (N, C, *) or None, sum_dout (C,), sum_dout_xhat (C,).
    """
    import cupy

    if relu_out is not None:
        dout = cupy.where(relu_out > 0, dout, dout.dtype.type(0))  # relu_backward's rule
    given = numpy.dtype(dout.dtype)
    dtype = numpy.dtype(numpy.result_type(given, xhat.dtype))
    if dtype not in _CTYPES:
        dtype = numpy.dtype(numpy.float32)
    d3 = _channels_view(dout.astype(dtype, copy=False))  # (N, C, L)
    x3 = _channels_view(xhat.astype(dtype, copy=False))
    N, C, L = (int(s) for s in d3.shape)
    _check_index_range(L)
    inv = cupy.ascontiguousarray(inv_std, dtype=dtype)
    gamma = inv if weight is None else cupy.ascontiguousarray(weight, dtype=dtype)
    dx = cupy.empty_like(d3) if need_dx else d3  # d3: never written when need_dx is false
    sums = cupy.empty((2, C), dtype=dtype)
    _kernel("bn_backward", dtype)(
        (C,), (_ROWS_THREADS,),
        (d3, x3, inv, gamma, dx, sums[0], sums[1]) + _ints(N, C, L, weight is not None, bool(training), bool(need_dx)))
    dx = dx.reshape(dout.shape).astype(given, copy=False) if need_dx else None
    return dx, sums[0].astype(given, copy=False), sums[1].astype(given, copy=False)
