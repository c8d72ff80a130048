"""Batch normalisation layers, as ``torch.nn.BatchNorm1d/2d/3d``.

Each holds its affine parameters and running statistics and calls
``scratchseg.functional.batch_norm``, where the forward and backward passes
are written. Initialisation, as torch: weight 1, bias 0, running_mean 0,
running_var 1, num_batches_tracked 0.
"""

from __future__ import annotations

import numpy

from .. import backend
from .. import functional as F
from ..args import positive_int
from . import init
from .module import Module
from .parameter import Parameter

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d"]


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
        return F.batch_norm(
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
