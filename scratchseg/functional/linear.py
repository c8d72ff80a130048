"""The fully connected layer: ``out = x W^T + b``.

Before FCN, a classifier ended in fully connected layers; FCN's insight was
that such a layer *is* a 1x1 convolution over a 1x1 map, so it can slide over
a larger image and give a map of scores. Here it is in its plain form, over
the last dimension of any input, as ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from ..autograd import Function
from ..backend import get_array_module

__all__ = ["linear"]


class Linear(Function):
    """out = x W^T + b over the last dimension, every leading dimension a batch.

    Shape: x (*, in), W (out, in), b (out,) -> (*, out).
    """

    @staticmethod
    def forward(ctx, x, weight, bias=None):
        xp = get_array_module(x, weight)
        ctx.x, ctx.weight, ctx.has_bias = x, weight, bias is not None
        out = xp.matmul(x, weight.T)  # (*, out)
        if bias is not None:
            out = out + bias
        return out

    # Gradient, with the batch dimensions flattened to rows (M = prod(*)):
    #   dx = dout W            (*, in)
    #   dW = dout^T x          (out, M) @ (M, in) -> (out, in)
    #   db = sum_rows dout     (out,)
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        x, weight = ctx.x, ctx.weight
        needs = ctx.needs_input_grad
        dx = xp.matmul(dout, weight) if needs[0] else None  # (*, in)
        rows = dout.reshape(-1, weight.shape[0])  # (M, out)
        dw = xp.matmul(rows.T, x.reshape(-1, weight.shape[1])) if needs[1] else None  # (out, in)
        if not ctx.has_bias:
            return dx, dw
        db = rows.sum(axis=0) if needs[2] else None  # (out,)
        return dx, dw, db


def linear(input, weight, bias=None):
    """``out = input @ weight.T + bias``, as ``torch.nn.functional.linear``.

    Shape:
        input (*, in_features), weight (out_features, in_features),
        bias (out_features,) -> output (*, out_features); ``*`` is any
        number of leading dimensions, none included.

        >>> import numpy as np
        >>> linear(np.ones((2, 5, 3)), np.ones((4, 3)), np.zeros(4)).shape
        (2, 5, 4)
        >>> linear(np.ones(3), np.ones((4, 3))).numpy()
        array([3., 3., 3., 3.])
    """
    if weight.ndim != 2:
        raise ValueError(f"linear(): weight must be 2-D (out_features, in_features), got shape {tuple(weight.shape)}")
    if input.ndim < 1 or input.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"linear(): input's last dimension must be in_features = {weight.shape[1]} (weight shape "
            f"{tuple(weight.shape)}), got input shape {tuple(input.shape)}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(
            f"linear(): bias must have shape ({weight.shape[0]},) = (out_features,), got {tuple(bias.shape)}"
        )
    if bias is None:
        return Linear.apply(input, weight)
    return Linear.apply(input, weight, bias)
