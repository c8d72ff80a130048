"""Normalisation layers, as ``torch.nn``: ``BatchNorm1d/2d/3d``, ``GroupNorm``,
``LayerNorm``, ``InstanceNorm1d/2d/3d``; and ``norm_layer``, the one place a
model turns a name ('batch', 'group', 'instance', 'layer') into a layer.

Each holds its affine parameters (and running statistics) and calls the op of
the same name in ``scratchseg.functional``, where the forward and backward
passes are written. Initialisation, as torch: weight 1, bias 0, running_mean
0, running_var 1, num_batches_tracked 0.
"""

from __future__ import annotations

import warnings

import numpy

from .. import backend
from .. import functional as F
from ..args import positive_int
from . import init
from .module import Module
from .parameter import Parameter

__all__ = [
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "LayerNorm",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d", "NORMS", "group_count", "norm_layer",
]


class _BatchNorm(Module):
    _expected_dims = (4,)

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, *, bias=True):
        super().__init__()
        num_features = positive_int(num_features, "num_features", type(self).__name__)
        if momentum is not None and not 0 <= momentum <= 1:
            raise ValueError(f"momentum must be in [0, 1] or None, got {momentum!r}")
        if eps <= 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.num_features, self.eps, self.momentum = num_features, float(eps), momentum
        self.affine, self.track_running_stats = bool(affine), bool(track_running_stats)
        self.use_bias = self.affine and bool(bias)  # torch >= 2.5: affine scale without shift
        xp, dtype = backend.xp(), backend.get_default_dtype()
        if self.affine:
            self.weight = Parameter(xp.ones(num_features, dtype=dtype))
            if self.use_bias:
                self.bias = Parameter(xp.zeros(num_features, dtype=dtype))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if self.track_running_stats:
            self.register_buffer("running_mean", xp.zeros(num_features, dtype=dtype))
            self.register_buffer("running_var", xp.ones(num_features, dtype=dtype))
            self.register_buffer("num_batches_tracked", xp.array(0, dtype=numpy.int64))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    def reset_running_stats(self):
        if self.track_running_stats:
            self.running_mean[...] = 0
            self.running_var[...] = 1
            self.num_batches_tracked[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        if self.affine:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def _check_input(self, input):
        if input.ndim not in self._expected_dims:
            want = " or ".join(f"{d}-D" for d in self._expected_dims)
            raise ValueError(f"{type(self).__name__} expects a {want} input, got shape {tuple(input.shape)}")
        if input.shape[1] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {input.shape[1]} channels "
                f"(shape {tuple(input.shape)})"
            )

    def forward(self, input):
        return self._normalize(input, F.batch_norm)

    def _followed_by(self, following):
        """This layer and ``following`` as one call, where the two fuse (a ReLU right after a batch norm,
        neither of a subclass that changes its forward: ``F.batch_norm_relu``); else None (``Sequential``)."""
        from .activation import ReLU  # (activation imports nothing from here; the import is cheap after the first)

        if type(following) is ReLU and type(self).forward is _BatchNorm.forward:
            return lambda input: self._normalize(input, F.batch_norm_relu)
        return None

    def _normalize(self, input, op):
        self._check_input(input)
        # momentum=None means a cumulative moving average: factor 1/(batches seen)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked += 1  # in place on the buffer array
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        # without running statistics, evaluation also normalises with the batch's own
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        return op(
            input,
            self.running_mean if track else None,
            self.running_var if track else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )

    def extra_repr(self):
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"bias={self.use_bias}, track_running_stats={self.track_running_stats}"
        )


class BatchNorm2d(_BatchNorm):
    """Batch normalisation over (N, H, W) per channel, with running statistics.

    training: y = (x - mean_B) / sqrt(var_B + eps) * weight + bias, then
    running = (1 - momentum) * running + momentum * batch_stat (unbiased var);
    evaluation: the running statistics replace the batch's.
    ``momentum=None`` averages all batches seen (factor 1/num_batches_tracked).

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

        >>> [tuple(a.shape) for a in BatchNorm2d(4).state_dict().values()]
        [(4,), (4,), (4,), (4,), ()]
    """

    _expected_dims = (4,)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of (N, C) or (N, C, L) inputs, per channel C.

    Shape: input (N, C) or (N, C, L) -> output of the same shape.
    """

    _expected_dims = (2, 3)


class BatchNorm3d(_BatchNorm):
    """Batch normalisation of (N, C, D, H, W) inputs, per channel C.

    Shape: input (N, C, D, H, W) -> output of the same shape.
    """

    _expected_dims = (5,)


def _affine(module, shape, affine, bias):
    """weight = 1 and bias = 0 of ``shape`` (torch's init), or None where switched off."""
    xp, dtype = backend.xp(), backend.get_default_dtype()
    module.register_parameter("weight", Parameter(xp.ones(shape, dtype=dtype)) if affine else None)
    module.register_parameter("bias", Parameter(xp.zeros(shape, dtype=dtype)) if affine and bias else None)


class GroupNorm(Module):
    """Group normalisation (Wu & He 2018): each sample's groups of ``num_channels / num_groups``
    channels standardised over their channels and positions, then a per-channel scale and shift.

    The same in training and evaluation (no running statistics), so it does
    not depend on the batch size. ``GroupNorm(1, C)`` is layer norm over
    (C, *) with a per-channel affine; ``GroupNorm(C, C)`` instance norm.

    Shape:
        input (N, C, *) -> output (N, C, *)

        >>> GroupNorm(2, 4)
        GroupNorm(2, 4, eps=1e-05, affine=True, bias=True)
        >>> GroupNorm(4, 6)
        Traceback (most recent call last):
        ...
        ValueError: GroupNorm: num_channels must be divisible by num_groups, got num_channels=6 and num_groups=4
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, *, bias=True):
        super().__init__()
        num_groups = positive_int(num_groups, "num_groups", "GroupNorm")
        num_channels = positive_int(num_channels, "num_channels", "GroupNorm")
        if num_channels % num_groups:
            raise ValueError(
                f"GroupNorm: num_channels must be divisible by num_groups, got num_channels={num_channels} "
                f"and num_groups={num_groups}"
            )
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, float(eps), bool(affine)
        _affine(self, (num_channels,), self.affine, bias)

    def reset_parameters(self):
        if self.weight is not None:
            init.ones_(self.weight)
        if self.bias is not None:
            init.zeros_(self.bias)

    def forward(self, input):
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
            f"bias={self.bias is not None}"
        )


class LayerNorm(Module):
    """Layer normalisation (Ba et al. 2016) over the trailing ``normalized_shape`` dims,
    with an element-wise scale and shift of that shape.

    Shape:
        input (*, *normalized_shape) -> output of the same shape

        >>> LayerNorm((3, 4), bias=False)
        LayerNorm((3, 4), eps=1e-05, elementwise_affine=True, bias=False)
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True):
        super().__init__()
        if isinstance(normalized_shape, int):
            normalized_shape = (normalized_shape,)
        self.normalized_shape = tuple(positive_int(d, "normalized_shape", "LayerNorm") for d in normalized_shape)
        self.eps, self.elementwise_affine = float(eps), bool(elementwise_affine)
        _affine(self, self.normalized_shape, self.elementwise_affine, bias)

    reset_parameters = GroupNorm.reset_parameters

    def forward(self, input):
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
            f"bias={self.bias is not None}"
        )


class _InstanceNorm(_BatchNorm):
    """Per (sample, channel) statistics; by default no affine and no running statistics, as torch.

    The parameters and buffers are batch norm's (same names); ``momentum=None``
    means 0, as in torch (num_batches_tracked is not counted). An unbatched
    input (C, *) is normalised as a batch of one.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=False, track_running_stats=False, *, bias=True):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, bias=bias)

    def _check_input(self, input):
        ndim = self._expected_dims[-1]
        if input.ndim not in (ndim - 1, ndim):
            raise ValueError(
                f"{type(self).__name__} expects a {ndim - 1}-D (unbatched) or {ndim}-D input, "
                f"got shape {tuple(input.shape)}"
            )
        channels = input.shape[input.ndim - ndim + 1]
        if channels != self.num_features:
            message = (f"{type(self).__name__}({self.num_features}) got an input with {channels} channels "
                       f"(shape {tuple(input.shape)})")
            if self.affine or self.track_running_stats:
                raise ValueError(message)
            warnings.warn(message + "; num_features is not used without affine or running statistics", stacklevel=3)

    def forward(self, input):
        self._check_input(input)
        if input.ndim < self._expected_dims[-1]:  # unbatched (C, *): a batch of one
            return self._instance_norm(input.reshape((1,) + tuple(input.shape))).reshape(tuple(input.shape))
        return self._instance_norm(input)

    def _instance_norm(self, input):
        return F.instance_norm(
            input,
            self.running_mean,
            self.running_var,
            self.weight,
            self.bias,
            self.training or not self.track_running_stats,  # evaluation uses running stats when tracked
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )


class InstanceNorm1d(_InstanceNorm):
    """Instance normalisation of (N, C, L) or (C, L) inputs over L, per sample and channel."""

    _expected_dims = (3,)


class InstanceNorm2d(_InstanceNorm):
    """Instance normalisation (Ulyanov et al. 2016) of (N, C, H, W) or (C, H, W) inputs over (H, W),
    per sample and channel.

    Shape:
        input (N, C, H, W) -> output (N, C, H, W)

        >>> InstanceNorm2d(3)
        InstanceNorm2d(3, eps=1e-05, momentum=0.1, affine=False, bias=False, track_running_stats=False)
    """

    _expected_dims = (4,)


class InstanceNorm3d(_InstanceNorm):
    """Instance normalisation of (N, C, D, H, W) or (C, D, H, W) inputs over (D, H, W), per sample and channel."""

    _expected_dims = (5,)


# -------------------------------------------------- a normalisation by name
NORMS = ("batch", "group", "instance", "layer")


def group_count(num_channels, max_groups=32):
    """Groups for ``GroupNorm`` over ``num_channels``: the largest divisor of C that is at
    most ``max_groups`` (Wu & He's G = 32) and leaves at least 2 channels per group (one
    channel per group would be instance norm); 1 when C < 4.

    >>> [group_count(c) for c in (1, 3, 12, 16, 24, 48, 64, 96, 256)]
    [1, 1, 6, 8, 12, 24, 32, 32, 32]
    """
    limit = max(1, min(max_groups, num_channels // 2))
    return max(g for g in range(1, limit + 1) if num_channels % g == 0)


def norm_layer(norm, num_channels, dims=2):
    """The normalisation layer ``norm`` names for ``num_channels`` channels of a ``dims``-D conv net.

    ``'batch'``: BatchNorm{dims}d; ``'group'``: GroupNorm(group_count(C), C);
    ``'instance'``: InstanceNorm{dims}d(C, affine=True) (a learned scale and
    shift, as a conv block needs; torch's default is none); ``'layer'``:
    GroupNorm(1, C), layer norm over (C, *) with a per-channel affine, as Wu &
    He define it for conv nets (``nn.LayerNorm`` would fix the spatial size);
    a callable: ``norm(C)``; None: None (no normalisation).

    >>> norm_layer("group", 48)
    GroupNorm(24, 48, eps=1e-05, affine=True, bias=True)
    >>> type(norm_layer("instance", 8, dims=3)).__name__, norm_layer("instance", 8).affine
    ('InstanceNorm3d', True)
    """
    if norm is None:
        return None
    if callable(norm) and not isinstance(norm, str):
        return norm(num_channels)
    if dims not in (1, 2, 3):
        raise ValueError(f"norm_layer: dims must be 1, 2 or 3, got {dims!r}")
    if norm == "batch":
        return (BatchNorm1d, BatchNorm2d, BatchNorm3d)[dims - 1](num_channels)
    if norm == "group":
        return GroupNorm(group_count(num_channels), num_channels)
    if norm == "instance":
        return (InstanceNorm1d, InstanceNorm2d, InstanceNorm3d)[dims - 1](num_channels, affine=True)
    if norm == "layer":
        return GroupNorm(1, num_channels)
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}, None, or a callable num_channels -> Module")
