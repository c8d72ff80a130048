"""Normalization: standardise over some axes, then a learned scale and shift.

All four ops compute the same thing over different axes. ``normalize`` takes
the statistics over the given axes of (a view of) the input,

    xhat = (x - mean) / sqrt(var + eps)          (var biased: divided by M)

and ``normalize_backward`` undoes it; then ``gamma * xhat + beta`` with the
parameters broadcast along the axes they do not cover:

    op               statistics over (per ...)                    gamma, beta
    batch_norm       N and spatial          (per channel)         (C,)
    instance_norm    spatial                (per sample, channel) (C,)
    group_norm       C/G channels, spatial  (per sample, group)   (C,)
    layer_norm       the trailing dims      (per leading index)   normalized_shape

Batch and instance norm may track running statistics and, in evaluation, use
them instead of the input's own.
"""

from __future__ import annotations

import math
from numbers import Number

import numpy

from ..args import is_array
from ..autograd import Function
from ..backend import get_array_module, replaceable
from .activation import relu_backward, relu_forward

__all__ = ["batch_norm", "batch_norm_relu", "group_norm", "layer_norm", "instance_norm"]


# ---------------------------------------------------------------- the shared core
def normalize(x, axes, eps):
    """Standardise ``x`` over ``axes``: -> xhat (x's shape) and mean, biased var, inv_std
    (x's shape with 1 on ``axes``, so they broadcast back)."""
    xp = get_array_module(x)
    mean = x.mean(axis=axes, keepdims=True)
    centered = x - mean
    var = (centered * centered).mean(axis=axes, keepdims=True)  # biased: used to normalise
    inv_std = 1.0 / xp.sqrt(var + eps)
    return centered * inv_std, mean, var, inv_std


# Gradient, with means over the M values of ``axes`` (each output depends on
# every input of its set through mean and var):
#   dx = inv_std * (dxhat - mean(dxhat) - xhat * mean(dxhat * xhat))
def normalize_backward(dxhat, xhat, inv_std, axes):
    """dxhat, xhat (same shape), inv_std (1 on ``axes``) -> dx."""
    dx = dxhat - dxhat.mean(axis=axes, keepdims=True) - xhat * (dxhat * xhat).mean(axis=axes, keepdims=True)
    dx *= inv_std
    return dx


def _channel_shape(ndim, C):
    """Broadcast shape of a per-channel vector: ``(1, C, 1, ..., 1)``."""
    return (1, C) + (1,) * (ndim - 2)


def _all_but_channels(ndim):
    """The axes a per-channel parameter is broadcast along: ``(0, 2, 3, ...)``."""
    return (0,) + tuple(range(2, ndim))


def _scale_shift(xhat, weight, bias, shape=None):
    """gamma * xhat + beta, either of them optional, the parameters reshaped to ``shape``
    (None: per channel, ``(1, C, 1, ..., 1)``)."""
    shape = _channel_shape(xhat.ndim, xhat.shape[1]) if shape is None else shape
    out = xhat
    if weight is not None:
        out = out * weight.reshape(shape)
    if bias is not None:
        out = out + bias.reshape(shape)
    return out


# Gradient of out = gamma * xhat + beta, the parameters broadcast along ``axes``:
#   dbeta = sum dout,   dgamma = sum dout * xhat,   dxhat = gamma * dout
def scale_shift_backward(dout, xhat, weight, shape, axes, need):
    """-> dxhat, dgamma, dbeta (summed over ``axes``: the parameters' shape), each None where
    ``need`` (for x, gamma, beta) is False."""
    dxhat = (dout if weight is None else dout * weight.reshape(shape)) if need[0] else None
    dgamma = (dout * xhat).sum(axis=axes).astype(weight.dtype, copy=False) if need[1] else None
    dbeta = dout.sum(axis=axes) if need[2] else None
    return dxhat, dgamma, dbeta


# ------------------------------------------------------------ argument checks
def _check_input(op, input, min_ndim=2, max_ndim=None):
    if not is_array(input):
        raise TypeError(f"{op}(): input must be a Tensor or an array, got {type(input).__name__}")
    if input.ndim < min_ndim or (max_ndim is not None and input.ndim > max_ndim):
        ranks = [f"{d}-D" for d in range(min_ndim, max_ndim + 1)] if max_ndim else [f"at least {min_ndim}-D"]
        ranks = ", ".join(ranks[:-1]) + " or " + ranks[-1] if len(ranks) > 1 else ranks[0]
        raise ValueError(f"{op}(): expected {ranks} input (N, C, *), got shape {tuple(input.shape)}")
    if numpy.dtype(input.dtype).kind != "f":
        raise TypeError(f"{op}(): input must have a floating dtype, got {input.dtype}")


def _check_params(op, params, shape, what):
    """Each of ``params`` (name, value) is None or an array of ``shape``; ``what`` says why that shape."""
    for name, value in params:
        if value is None:
            continue
        if not is_array(value):
            raise TypeError(f"{op}(): {name} must be a Tensor, an array or None, got {type(value).__name__}")
        if tuple(value.shape) != tuple(shape):
            raise ValueError(f"{op}(): {name} has shape {tuple(value.shape)}, expected {tuple(shape)} {what}")


def _check_eps(op, eps):
    if isinstance(eps, bool) or not isinstance(eps, Number) or eps < 0:
        raise ValueError(f"{op}(): eps must be a non-negative number, got {eps!r}")


def _check_momentum(op, momentum):
    if isinstance(momentum, bool) or not isinstance(momentum, Number):
        raise TypeError(
            f"{op}(): momentum must be a float, got {momentum!r}; for a cumulative average "
            "pass momentum=1/num_batches_tracked (nn.BatchNorm does this when its momentum is None)"
        )


# ------------------------------------------------------------------ batch norm
@replaceable
def batch_norm_train_forward(x, weight, bias, eps, relu=False):
    """Normalise ``x`` with its own statistics.

    x (N, C, *) -> out, xhat (N, C, *) and the batch's mean, biased var and
    inv_std = 1 / sqrt(var + eps), each (C,). ``relu``: out = relu(out) (a
    kernel may do it in the same pass).
    """
    C = x.shape[1]
    xhat, mean, var, inv_std = normalize(x, _all_but_channels(x.ndim), eps)  # stats (1, C, 1, ..., 1)
    out = _scale_shift(xhat, weight, bias, _channel_shape(x.ndim, C))
    if relu:
        out = relu_forward(out)
    return out, xhat, mean.reshape(C), var.reshape(C), inv_std.reshape(C)


def batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps):
    """Normalise ``x`` with the running statistics: x (N, C, *) -> out, xhat (N, C, *), inv_std (C,)."""
    xp = get_array_module(x)
    shape = _channel_shape(x.ndim, x.shape[1])
    mean = running_mean.astype(x.dtype, copy=False)
    var = running_var.astype(x.dtype, copy=False)
    inv_std = 1.0 / xp.sqrt(var + eps)  # (C,)
    xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)  # (N, C, *)
    return _scale_shift(xhat, weight, bias, shape), xhat, inv_std


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
#   training: dx = normalize_backward(dxhat), gamma folded into inv_std (it is constant over each channel)
#   eval (mean, var are constants): dx = inv_std * dxhat
@replaceable
def batch_norm_backward(dout, xhat, inv_std, weight, training, need_dx=True, relu_out=None, shift=None):
    """dout, xhat (N, C, *), inv_std, weight (C,) -> dx (N, C, *) or None, sum dout, sum dout*xhat (C,).

    ``relu_out``: the output of a ReLU applied to the batch norm's output (``batch_norm_relu``), or None;
    dout is first taken through that ReLU's gradient (a kernel may do it in the same passes). ``shift``,
    (bias,) with the batch norm's bias (or None), lets a kernel recompute that output from xhat, weight
    and bias rather than read it.
    """
    if relu_out is not None:
        if relu_out.shape != dout.shape:
            raise ValueError(f"batch_norm_backward: relu_out has shape {relu_out.shape}, expected {dout.shape}")
        dout = relu_backward(dout, relu_out)
    axes = _all_but_channels(xhat.ndim)
    shape = _channel_shape(xhat.ndim, xhat.shape[1])
    sum_dout = dout.sum(axis=axes)  # (C,)
    sum_dout_xhat = (dout * xhat).sum(axis=axes)  # (C,)
    dx = None
    if need_dx:
        scale = (inv_std if weight is None else weight * inv_std).reshape(shape)  # gamma / std
        dx = normalize_backward(dout, xhat, scale, axes) if training else dout * scale
    return dx, sum_dout, sum_dout_xhat


class BatchNorm(Function):
    """out = gamma * (x - mu) / sqrt(var + eps) + beta, per channel (axis 1).

    Shape: input (N, C, *) -> output (N, C, *); running stats, gamma, beta (C,).
    Saves ``xhat`` (input-sized), ``inv_std`` and ``gamma`` (per channel).
    With ``relu``: out = relu(...) as one op (``batch_norm_relu``), which also
    keeps its output (as a ReLU does) for the gradient's mask.
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps, relu):
        if training:
            out, xhat, mean, var, inv_std = batch_norm_train_forward(x, weight, bias, eps, relu)
            M = x.size // x.shape[1]  # values per channel
            batch_norm_update_running(running_mean, running_var, mean, var, M, momentum)
        else:
            out, xhat, inv_std = batch_norm_eval_forward(x, running_mean, running_var, weight, bias, eps)
            if relu:
                out = relu_forward(out)
        ctx.xhat, ctx.inv_std, ctx.gamma, ctx.beta, ctx.training = xhat, inv_std, weight, bias, training
        ctx.relu_out = out if relu else None
        return out

    @staticmethod
    def backward(ctx, dout):
        need = ctx.needs_input_grad
        dx, sum_dout, sum_dout_xhat = batch_norm_backward(
            dout, ctx.xhat, ctx.inv_std, ctx.gamma, ctx.training, need_dx=need[0], relu_out=ctx.relu_out,
            shift=(ctx.beta,),
        )
        dgamma = sum_dout_xhat.astype(ctx.gamma.dtype, copy=False) if need[3] else None
        dbeta = sum_dout if need[4] else None
        return dx, None, None, dgamma, dbeta, None, None, None, None


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
    return _batch_norm("batch_norm", input, running_mean, running_var, weight, bias, training, momentum, eps, False)


def batch_norm_relu(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1,
                    eps=1e-05):
    """``relu(batch_norm(...))`` as one op, the same numbers: the ReLU runs inside the batch norm's passes,
    forward and backward (``nn.Sequential`` takes it for a ``BatchNorm`` followed by a ``ReLU``).

    Arguments as ``batch_norm``.

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((4, 3, 5, 5))
        >>> float(batch_norm_relu(x, np.zeros(3), np.ones(3), training=True).numpy().min())
        0.0
    """
    return _batch_norm("batch_norm_relu", input, running_mean, running_var, weight, bias, training, momentum, eps,
                       True)


def _batch_norm(op, input, running_mean, running_var, weight, bias, training, momentum, eps, relu):
    _check_input(op, input, 2, 5)
    C = input.shape[1]
    per_channel = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    _check_params(op, per_channel, (C,), f"for input with {C} channels")
    _check_momentum(op, momentum)
    _check_eps(op, eps)
    if training:
        size = tuple(input.shape)
        if size[0] * math.prod(size[2:]) == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {size}")
    elif running_mean is None or running_var is None:
        missing = "running_mean" if running_mean is None else "running_var"
        raise ValueError(f"{op}(): {missing} must be given in evaluation mode (training=False)")
    return BatchNorm.apply(input, running_mean, running_var, weight, bias, bool(training), float(momentum), float(eps),
                           relu)


# ------------------------------------------------------------------ group norm
class GroupNorm(Function):
    """out = gamma_c * xhat + beta_c, xhat standardised over each sample's group of C/G channels and positions.

    Shape: input (N, C, *) -> output (N, C, *), viewed as (N, G, C/G * prod(*)) for the
    statistics; gamma, beta (C,). Saves ``xhat`` (input-sized) and ``inv_std`` (N, G, 1).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, num_groups, eps):
        N, C = x.shape[:2]
        xhat, _, _, inv_std = normalize(x.reshape(N, num_groups, -1), (2,), eps)  # (N, G, C/G * prod(*))
        ctx.xhat, ctx.inv_std, ctx.gamma = xhat.reshape(x.shape), inv_std, weight
        return _scale_shift(ctx.xhat, weight, bias, _channel_shape(x.ndim, C))

    @staticmethod
    def backward(ctx, dout):
        xhat, (N, C), G = ctx.xhat, ctx.xhat.shape[:2], ctx.inv_std.shape[1]
        dxhat, dgamma, dbeta = scale_shift_backward(
            dout, xhat, ctx.gamma, _channel_shape(xhat.ndim, C), _all_but_channels(xhat.ndim), ctx.needs_input_grad
        )
        dx = None
        if dxhat is not None:  # gamma varies inside a group, so dxhat = gamma * dout first
            dx = normalize_backward(dxhat.reshape(N, G, -1), xhat.reshape(N, G, -1), ctx.inv_std, (2,))
            dx = dx.reshape(xhat.shape)  # (N, C, *)
        return dx, dgamma, dbeta, None, None


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-05):
    """Group normalization (Wu & He 2018), as ``torch.nn.functional.group_norm``.

    The C channels are split into ``num_groups`` groups of C/G consecutive
    channels; each sample's group is standardised over its channels and
    positions (M = C/G * prod(spatial) values), then
    ``out = weight_c * xhat + bias_c`` per channel. No running statistics:
    training and evaluation compute the same thing, whatever the batch size.
    G = 1 is layer norm over (C, *) with a per-channel affine; G = C is
    instance norm.

    Shape:
        input (N, C, *) -> output (N, C, *), C divisible by num_groups; weight, bias: (C,).

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((2, 6, 4, 4, 4))
        >>> out = group_norm(x, 3)
        >>> out.shape, bool(np.allclose(out.numpy().reshape(2, 3, -1).mean(axis=2), 0))
        ((2, 6, 4, 4, 4), True)
    """
    _check_input("group_norm", input)
    C = input.shape[1]
    if isinstance(num_groups, bool) or not isinstance(num_groups, Number) or int(num_groups) != num_groups:
        raise TypeError(f"group_norm(): num_groups must be an int, got {num_groups!r}")
    if num_groups < 1 or C % num_groups:
        raise ValueError(
            f"group_norm(): expected the number of channels to be divisible by num_groups, but got input "
            f"of shape {tuple(input.shape)} ({C} channels) and num_groups={num_groups}"
        )
    _check_params("group_norm", (("weight", weight), ("bias", bias)), (C,), f"for input with {C} channels")
    size = tuple(input.shape)
    if size[0] * (C // num_groups) * math.prod(size[2:]) == 1:  # torch's check (the batch counts, oddly)
        raise ValueError(f"Expected more than 1 value per group when training, got input size {size}")
    _check_eps("group_norm", eps)
    return GroupNorm.apply(input, weight, bias, int(num_groups), float(eps))


# ------------------------------------------------------------------ layer norm
class LayerNorm(Function):
    """out = gamma * xhat + beta, xhat standardised over the trailing ``len(normalized_shape)`` dims.

    Shape: input (*, *normalized_shape) -> output of the same shape; gamma, beta
    ``normalized_shape``. Saves ``xhat`` (input-sized) and ``inv_std`` (*, 1, ..., 1).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        lead = x.ndim - len(normalized_shape)  # the dims that index separate sets
        xhat, _, _, inv_std = normalize(x, tuple(range(lead, x.ndim)), eps)
        ctx.xhat, ctx.inv_std, ctx.gamma, ctx.lead = xhat, inv_std, weight, lead
        return _scale_shift(xhat, weight, bias, (1,) * lead + tuple(normalized_shape))

    @staticmethod
    def backward(ctx, dout):
        xhat, lead = ctx.xhat, ctx.lead
        shape = (1,) * lead + xhat.shape[lead:]  # the parameters broadcast along the leading dims
        dxhat, dgamma, dbeta = scale_shift_backward(
            dout, xhat, ctx.gamma, shape, tuple(range(lead)), ctx.needs_input_grad
        )
        dx = None if dxhat is None else normalize_backward(dxhat, xhat, ctx.inv_std, tuple(range(lead, xhat.ndim)))
        return dx, dgamma, dbeta, None, None


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-05):
    """Layer normalization (Ba et al. 2016), as ``torch.nn.functional.layer_norm``.

    Every index of the leading dims is standardised over the trailing dims
    given by ``normalized_shape`` (an int or a tuple), then
    ``out = weight * xhat + bias`` element-wise, weight and bias of shape
    ``normalized_shape``. For (N, C, H, W) with ``normalized_shape=(C, H, W)``
    each sample is normalised as a whole; with ``(W,)`` each row.

    Shape:
        input (*, normalized_shape[0], ..., normalized_shape[-1]) -> output of the same shape.

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 5))
        >>> out = layer_norm(x, (4, 5), np.ones((4, 5)), np.zeros((4, 5)))
        >>> out.shape, bool(np.allclose(out.numpy().var(axis=(2, 3)), 1, atol=1e-4))
        ((2, 3, 4, 5), True)
    """
    if isinstance(normalized_shape, Number) and not isinstance(normalized_shape, bool):
        normalized_shape = (normalized_shape,)
    try:
        normalized_shape = tuple(int(d) for d in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"layer_norm(): normalized_shape must be an int or a tuple of ints, got {normalized_shape!r}")
    _check_input("layer_norm", input, min_ndim=max(len(normalized_shape), 1))
    k = len(normalized_shape)
    if k == 0 or tuple(input.shape[input.ndim - k :]) != normalized_shape:
        raise ValueError(
            f"layer_norm(): given normalized_shape={normalized_shape}, expected an input of shape "
            f"(*, {', '.join(map(str, normalized_shape))}), but got input of shape {tuple(input.shape)}"
        )
    _check_params("layer_norm", (("weight", weight), ("bias", bias)), normalized_shape, "(normalized_shape)")
    _check_eps("layer_norm", eps)
    return LayerNorm.apply(input, weight, bias, normalized_shape, float(eps))


# --------------------------------------------------------------- instance norm
class InstanceNorm(Function):
    """out = gamma_c * xhat + beta_c, xhat standardised over the positions of each (sample, channel).

    Shape: input (N, C, *) -> output (N, C, *); running stats, gamma, beta (C,).
    Saves ``xhat`` (input-sized) and ``inv_std`` (N, C, 1, ..., 1).
    """

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, momentum, eps):
        N, C = x.shape[:2]
        xhat, mean, var, inv_std = normalize(x, tuple(range(2, x.ndim)), eps)  # stats (N, C, 1, ..., 1)
        # torch's running statistics: the batch average of the instances' mean and unbiased var
        M = x.size // (N * C)  # positions per instance
        batch_norm_update_running(running_mean, running_var, mean.mean(axis=0).reshape(C),
                                  var.mean(axis=0).reshape(C), M, momentum)
        ctx.xhat, ctx.inv_std, ctx.gamma = xhat, inv_std, weight
        return _scale_shift(xhat, weight, bias, _channel_shape(x.ndim, C))

    @staticmethod
    def backward(ctx, dout):
        xhat = ctx.xhat
        need = ctx.needs_input_grad
        dxhat, dgamma, dbeta = scale_shift_backward(
            dout, xhat, ctx.gamma, _channel_shape(xhat.ndim, xhat.shape[1]), _all_but_channels(xhat.ndim),
            (need[0], need[3], need[4]),
        )
        dx = None if dxhat is None else normalize_backward(dxhat, xhat, ctx.inv_std, tuple(range(2, xhat.ndim)))
        return dx, None, None, dgamma, dbeta, None, None


def instance_norm(input, running_mean=None, running_var=None, weight=None, bias=None, use_input_stats=True,
                  momentum=0.1, eps=1e-05):
    """Instance normalization (Ulyanov et al. 2016), as ``torch.nn.functional.instance_norm``.

    ``use_input_stats=True``: each (sample, channel) is standardised over its
    positions (M = prod(spatial) values), then ``out = weight_c * xhat + bias_c``;
    running statistics, when given, are updated IN PLACE with the batch
    average of the instances' mean and unbiased variance (as torch does).
    ``use_input_stats=False``: the running statistics normalise, exactly as
    ``batch_norm`` in evaluation mode (which it calls).

    Shape:
        input (N, C, *) with at least one spatial dim -> output (N, C, *);
        running_mean, running_var, weight, bias: (C,).

        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((2, 3, 4, 4, 4))
        >>> out = instance_norm(x)
        >>> out.shape, bool(np.allclose(out.numpy().mean(axis=(2, 3, 4)), 0))
        ((2, 3, 4, 4, 4), True)
    """
    _check_input("instance_norm", input)
    C = input.shape[1]
    per_channel = (("running_mean", running_mean), ("running_var", running_var), ("weight", weight), ("bias", bias))
    _check_params("instance_norm", per_channel, (C,), f"for input with {C} channels")
    _check_momentum("instance_norm", momentum)
    _check_eps("instance_norm", eps)
    if not use_input_stats:
        if running_mean is None or running_var is None:
            raise ValueError("instance_norm(): running_mean and running_var must be given when use_input_stats=False")
        return batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if math.prod(input.shape[2:]) == 1:
        raise ValueError(f"Expected more than 1 spatial element when training, got input size {tuple(input.shape)}")
    return InstanceNorm.apply(input, running_mean, running_var, weight, bias, float(momentum), float(eps))
