"""Synchronised batch norm: every process normalises with the statistics of the whole global batch.

Plain batch norm under data parallelism normalises each process's slice with
that slice's own mean and variance (Horovod's and DDP's default): a run on R
processes with batch b then trains a different model from one process with
batch R*b. ``SyncBatchNorm`` makes the two the same. Per channel, with the
sums taken over every process's values (``M`` in all):

    forward   mean, var from  sum(x - s), sum((x - s)^2), M    (one allreduce of 2C + 1 numbers)
    backward  dx = (1/M) * inv_std * gamma * (M*dout - sum dout - xhat * sum(dout * xhat))
              with  sum dout, sum dout*xhat                       (one allreduce of 2C numbers)

The shift ``s`` is the running mean, which every process holds identically:
subtracting it keeps the sums small, so E[(x-s)^2] - E[x-s]^2 does not cancel
away the variance as E[x^2] - E[x]^2 can. dgamma and dbeta are this process's
own sums; the gradient exchange after backward averages them with the
others', as it does every parameter's gradient.
"""

from __future__ import annotations

from ..autograd import Function
from ..backend import get_array_module
from ..functional.normalization import _channel_shape, _scale_shift, batch_norm_backward, batch_norm_update_running
from ..nn.normalization import _BatchNorm
from .comm import all_reduce_sum, world_size

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm"]


class SyncBatchNormFunction(Function):
    """Batch norm in training with global statistics. Shape: (N, C, *) -> (N, C, *)."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, momentum, eps):
        xp = get_array_module(x)
        C = x.shape[1]
        axes = (0,) + tuple(range(2, x.ndim))  # every axis but the channels
        shape = _channel_shape(x.ndim, C)  # (1, C, 1, ..., 1)
        shift = running_mean.astype(x.dtype) if running_mean is not None else xp.zeros(C, dtype=x.dtype)
        d = x - shift.reshape(shape)  # (N, C, *)
        count = xp.full(1, x.size // C, dtype=x.dtype)
        sums = xp.concatenate([d.sum(axis=axes), (d * d).sum(axis=axes), count])  # (2C + 1,)
        all_reduce_sum(sums)  # the forward's one exchange: sums over the global batch
        M = float(sums[2 * C])
        mean_d = sums[:C] / M  # (C,) mean of x - shift
        var = sums[C:2 * C] / M - mean_d * mean_d  # (C,) biased
        mean = shift + mean_d
        inv_std = 1.0 / xp.sqrt(var + eps)
        xhat = (x - mean.reshape(shape)) * inv_std.reshape(shape)  # (N, C, *)
        batch_norm_update_running(running_mean, running_var, mean, var, M, momentum)
        ctx.xhat, ctx.inv_std, ctx.gamma, ctx.M = xhat, inv_std, weight, M
        return _scale_shift(xhat, weight, bias)

    # dx = (1/M) * inv_std * gamma * (M*dout - S1 - xhat * S2), S1 = sum dout, S2 = sum dout*xhat over all processes
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        xhat, M = ctx.xhat, ctx.M
        C = xhat.shape[1]
        shape = _channel_shape(xhat.ndim, C)
        _, sum_dout, sum_dout_xhat = batch_norm_backward(dout, xhat, ctx.inv_std, ctx.gamma, True, need_dx=False)
        sums = xp.concatenate([sum_dout, sum_dout_xhat])  # (2C,) this process's
        all_reduce_sum(sums)  # the backward's one exchange
        scale = ctx.inv_std if ctx.gamma is None else ctx.gamma * ctx.inv_std  # (C,)
        dx = dout - (sums[:C] / M).reshape(shape) - xhat * (sums[C:] / M).reshape(shape)
        dx *= scale.reshape(shape)
        need = ctx.needs_input_grad
        dgamma = sum_dout_xhat.astype(ctx.gamma.dtype, copy=False) if need[3] else None
        dbeta = sum_dout if need[4] else None
        return dx if need[0] else None, None, None, dgamma, dbeta, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch norm over the global batch of all processes (any of (N, C), (N, C, L), (N, C, H, W), (N, C, D, H, W)).

    Same parameters, buffers and state-dict names as ``nn.BatchNorm2d``, so a
    checkpoint loads into either. In evaluation, and without running
    statistics in evaluation, it is plain batch norm.
    """

    _expected_dims = (2, 3, 4, 5)

    def forward(self, input):
        if not self.training:
            return super().forward(input)
        self._check_input(input)
        factor = 0.0 if self.momentum is None else self.momentum
        if self.track_running_stats:
            self.num_batches_tracked += 1
            if self.momentum is None:
                factor = 1.0 / float(self.num_batches_tracked)
        track = self.track_running_stats
        return SyncBatchNormFunction.apply(input, self.running_mean if track else None,
                                           self.running_var if track else None, self.weight, self.bias,
                                           float(factor), float(self.eps))

    def extra_repr(self):
        return super().extra_repr() + f", world_size={world_size()}"


def convert_sync_batchnorm(model):
    """Replace every batch norm of ``model`` by a ``SyncBatchNorm`` holding the same parameters and buffers.

    Do it before building the optimizer (it must see the same Parameter objects;
    they are kept, so it would). Returns the model (a new module if ``model``
    itself is a batch norm).
    """
    if isinstance(model, _BatchNorm) and not isinstance(model, SyncBatchNorm):
        return _to_sync(model)
    for module in list(model.modules()):
        for name, child in list(module._modules.items()):
            if isinstance(child, _BatchNorm) and not isinstance(child, SyncBatchNorm):
                module._modules[name] = _to_sync(child)
    return model


def _to_sync(bn):
    sync = SyncBatchNorm(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                         track_running_stats=bn.track_running_stats, bias=bn.use_bias)
    for name in ("weight", "bias"):
        sync._parameters[name] = bn._parameters.get(name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        sync._buffers[name] = bn._buffers.get(name)
    sync.train(bn.training)
    return sync
