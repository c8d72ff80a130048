"""Batch normalization: per-channel standardisation with a learned scale and shift.

For each channel ``c`` the statistics are taken over every axis except the
channel axis (batch and spatial positions, ``M = N * prod(spatial)`` values):

    xhat = (x - mean_c) / sqrt(var_c + eps)
    out  = gamma_c * xhat + beta_c

Training uses the batch's mean and (biased) variance and moves the running
statistics towards them; evaluation uses the running statistics.
"""

from __future__ import annotations

import math
from numbers import Number

import numpy

from ..args import is_array
from ..autograd import Function
from ..backend import get_array_module, replaceable

__all__ = ["batch_norm"]


def _channel_shape(ndim, C):
    """Broadcast shape of a per-channel vector: ``(1, C, 1, ..., 1)``."""
    return (1, C) + (1,) * (ndim - 2)


def _scale_shift(xhat, weight, bias):
    """gamma * xhat + beta, either of them optional."""
    shape = _channel_shape(xhat.ndim, xhat.shape[1])  # (1, C, 1, ..., 1)
    out = xhat
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


@replaceable
def batch_norm_train_forward(x, weight, bias, eps):
    """Normalise ``x`` with its own statistics.

    x (N, C, *) -> out, xhat (N, C, *) and the batch's mean, biased var and
    inv_std = 1 / sqrt(var + eps), each (C,).
    """
    xp = get_array_module(x)
    axes = (0,) + tuple(range(2, x.ndim))  # every axis but the channels
    shape = _channel_shape(x.ndim, x.shape[1])  # (1, C, 1, ..., 1)
    mean = x.mean(axis=axes)  # (C,)
    centered = x - mean.reshape(shape)  # (N, C, *)
    var = (centered * centered).mean(axis=axes)  # (C,) biased, used to normalise
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    xhat = centered * inv_std.reshape(shape)  # (N, C, *)
    return _scale_shift(xhat, weight, bias), xhat, mean, var, inv_std


def batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps):
    """Normalise ``x`` with the running statistics: x (N, C, *) -> out, xhat (N, C, *), inv_std (C,)."""
    xp = get_array_module(x)
    shape = _channel_shape(x.ndim, x.shape[1])
    mean = running_mean.astype(x.dtype, copy=False)
    var = running_var.astype(x.dtype, copy=False)
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)  # (N, C, *)
    return _scale_shift(xhat, weight, bias), xhat, inv_std


@replaceable
def batch_norm_update_running(running_mean, running_var, mean, var, M, momentum):
    """Move the running statistics towards the batch's, in place (a module's buffer sees it).

    running = (1 - momentum) * running + momentum * batch, with the unbiased
    variance var * M / (M - 1) for ``running_var``, as torch tracks it.
    """
    if running_mean is not None:
        running_mean *= 1 - momentum
        running_mean += (momentum * mean).astype(running_mean.dtype, copy=False)
    if running_var is not None:
        unbiased = var * (M / (M - 1))
        running_var *= 1 - momentum
        running_var += (momentum * unbiased).astype(running_var.dtype, copy=False)


# Gradient, with sums over the M values of each channel and dxhat = gamma * dout:
#   dbeta  = sum dout,   dgamma = sum dout * xhat
#   training: dx = (1/M) * inv_std * (M*dxhat - sum dxhat - xhat * sum(dxhat * xhat))
#   eval (mean, var are constants): dx = inv_std * dxhat
@replaceable
def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True):
    """dout, xhat (N, C, *), inv_std, weight (C,) -> dx (N, C, *) or None, sum dout, sum dout*xhat (C,)."""
    C = xhat.shape[1]
    axes = (0,) + tuple(range(2, xhat.ndim))
    shape = _channel_shape(xhat.ndim, C)
    sum_dout = dout.sum(axis=axes)  # (C,)
    sum_dout_xhat = (dout * xhat).sum(axis=axes)  # (C,)
    dx = None
    if need_dx:
        scale = inv_std if weight is None else weight * inv_std  # (C,) gamma / std
        if training:
            # dxhat = gamma * dout: gamma is per channel, so it folds into `scale`
            # and the sums of dxhat are gamma times the sums of dout
            M = xhat.size // C
            dx = dout - (sum_dout / M).reshape(shape) - xhat * (sum_dout_xhat / M).reshape(shape)
            dx *= scale.reshape(shape)
        else:
            dx = dout * scale.reshape(shape)
    return dx, sum_dout, sum_dout_xhat


class BatchNorm(Function):
    """out = gamma * (x - mu) / sqrt(var + eps) + beta, per channel (axis 1).

    Shape: input (N, C, *) -> output (N, C, *); running stats, gamma, beta (C,).
    Saves ``xhat`` (input-sized), ``inv_std`` and ``gamma`` (per channel).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        if training:
            out, xhat, mean, var, inv_std = batch_norm_train_forward(x, weight, bias, eps)
            M = x.size // x.shape[1]  # values per channel
            batch_norm_update_running(running_mean, running_var, mean, var, M, momentum)
        else:
            out, xhat, inv_std = batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
        ctx.xhat, ctx.inv_std, ctx.gamma, ctx.training = xhat, inv_std, weight, training
        return out

    @staticmethod
    def backward(ctx, dout):
        need = ctx.needs_input_grad
        dx, sum_dout, sum_dout_xhat = batch_norm_backward(
            dout, ctx.xhat, ctx.inv_std, ctx.gamma, ctx.training, need_dx=need[0]
        )
        dgamma = sum_dout_xhat.astype(ctx.gamma.dtype, copy=False) if need[3] else None
        dbeta = sum_dout if need[4] else None
        return dx, None, None, dgamma, dbeta, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-05):
    """Batch normalization over the channel axis, as ``torch.nn.functional.batch_norm``.

    ``out = weight * (x - mean) / sqrt(var + eps) + bias`` per channel. In
    training the batch statistics are used (biased variance) and, when given,
    the running statistics are updated IN PLACE:
    ``running_mean = (1 - momentum) * running_mean + momentum * mean`` and
    ``running_var = (1 - momentum) * running_var + momentum * var * M / (M - 1)``
    (the unbiased variance, ``M = N * prod(spatial)``). In evaluation the
    running statistics are used. ``momentum`` must be a number, as in torch
    (``nn.BatchNorm`` turns ``momentum=None`` into ``1 / num_batches_tracked``).

    Shape:
        input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W) -> output of the same shape;
        running_mean, running_var, weight, bias: (C,).

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5))
        >>> batch_norm(x, np.zeros(3), np.ones(3), training=True).shape
        (4, 3, 5, 5)
    """
    if not is_array(input):
        raise TypeError(f"batch_norm(): input must be a Tensor or an array, got {type(input).__name__}")
    if not 2 <= input.ndim <= 5:
        raise ValueError(
            f"batch_norm(): expected 2-D, 3-D, 4-D or 5-D input (N, C, *), got shape {tuple(input.shape)}"
        )
    if numpy.dtype(input.dtype).kind != "f":
        raise TypeError(f"batch_norm(): input must have a floating dtype, got {input.dtype}")
    C = input.shape[1]
    per_channel = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    for name, value in per_channel:
        if value is None:
            continue
        if not is_array(value):
            raise TypeError(f"batch_norm(): {name} must be a Tensor, an array or None, got {type(value).__name__}")
        if tuple(value.shape) != (C,):
            raise ValueError(
                f"batch_norm(): {name} has shape {tuple(value.shape)}, expected ({C},) for input with {C} channels"
            )
    if isinstance(momentum, bool) or not isinstance(momentum, Number):
        raise TypeError(
            f"batch_norm(): momentum must be a float, got {momentum!r}; for a cumulative average "
            "pass momentum=1/num_batches_tracked (nn.BatchNorm does this when its momentum is None)"
        )
    if isinstance(eps, bool) or not isinstance(eps, Number) or eps < 0:
        raise ValueError(f"batch_norm(): eps must be a non-negative number, got {eps!r}")
    if training:
        size = tuple(input.shape)
        if size[0] * math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    elif running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise ValueError(f"batch_norm(): {missing} must be given in evaluation mode (training=False)")
    return BatchNorm.apply(input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps))
