"""Activations: relu, leaky_relu, hardtanh, elu, tanh, sigmoid, softmax, log_softmax.

Element-wise except the softmaxes, which normalise along ``dim``. All keep
the input's shape. Each backward writes its derivative in one line of math.

``inplace=True`` (where torch offers it) overwrites the input's array and
returns a Tensor sharing it; as in torch, a leaf Tensor that requires grad
cannot be modified in place.
"""

from __future__ import annotations

from numbers import Number

import numpy

from ..autograd import Function, Tensor
from ..backend import get_array_module, replaceable

__all__ = ["relu", "leaky_relu", "hardtanh", "relu6", "elu", "tanh", "sigmoid", "softmax", "log_softmax"]


def _check_input(input, fn):
    if not (hasattr(input, "shape") and hasattr(input, "dtype")):
        raise TypeError(f"{fn}(): input must be a Tensor or an array, got {type(input).__name__}")


def _check_inplace(input, inplace, fn):
    if inplace and isinstance(input, Tensor) and input.requires_grad and input.is_leaf:
        raise RuntimeError(f"{fn}(): a leaf Tensor that requires grad cannot be modified in place")


def _check_number(value, name, fn):
    if isinstance(value, bool) or not isinstance(value, Number):
        raise TypeError(f"{fn}(): {name} must be a number, got {value!r}")


# -------------------------------------------------------------------- relu
@replaceable
def relu_forward(x):
    """out = max(x, 0), a new array of x's shape."""
    return get_array_module(x).maximum(x, 0)


# Gradient: dx = dout * [out > 0]  (0 at the kink x = 0, as torch).
@replaceable
def relu_backward(dout, out):
    """dout, out (any shape) -> dx = dout where out > 0, else 0."""
    return dout * (out > 0)


class ReLU(Function):
    """out = max(x, 0).  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, inplace):
        if inplace:
            out = get_array_module(x).maximum(x, 0, out=x)
            ctx.positive = out > 0  # x's memory may be overwritten later: keep a boolean mask
        else:
            out = relu_forward(x)
            ctx.positive = None
            ctx.out = out  # no copy: the output itself tells where x > 0
        return out

    @staticmethod
    def backward(ctx, dout):
        if ctx.positive is None:
            return relu_backward(dout, ctx.out), None
        return dout * ctx.positive, None


def relu(input, inplace=False):
    """Rectified linear unit ``max(x, 0)``, as ``torch.nn.functional.relu``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> relu(np.array([-1.0, 0.5])).numpy()
        array([0. , 0.5])
    """
    _check_input(input, "relu")
    _check_inplace(input, inplace, "relu")
    return ReLU.apply(input, bool(inplace))


class LeakyReLU(Function):
    """out = x if x > 0 else negative_slope * x.  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, negative_slope, inplace):
        xp = get_array_module(x)
        positive = x > 0
        slope = xp.asarray(negative_slope, dtype=x.dtype)
        if inplace:
            xp.copyto(x, x * slope, where=~positive)
            out = x
        else:
            out = xp.where(positive, x, x * slope)
        ctx.positive, ctx.negative_slope = positive, negative_slope
        return out

    # Gradient: dx = dout if x > 0 else negative_slope * dout.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        return xp.where(ctx.positive, dout, dout * ctx.negative_slope), None, None


def leaky_relu(input, negative_slope=0.01, inplace=False):
    """``x`` where ``x > 0``, else ``negative_slope * x``, as ``torch.nn.functional.leaky_relu``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> leaky_relu(np.array([-2.0, 3.0]), 0.1).numpy()
        array([-0.2,  3. ])
    """
    _check_input(input, "leaky_relu")
    _check_number(negative_slope, "negative_slope", "leaky_relu")
    _check_inplace(input, inplace, "leaky_relu")
    return LeakyReLU.apply(input, float(negative_slope), bool(inplace))


class Hardtanh(Function):
    """out = clip(x, min_val, max_val).  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, min_val, max_val, inplace):
        xp = get_array_module(x)
        ctx.inside = (x > min_val) & (x < max_val)
        return xp.clip(x, min_val, max_val, out=x if inplace else None)

    # Gradient: dx = dout where min_val < x < max_val, else 0 (torch's convention at the edges).
    @staticmethod
    def backward(ctx, dout):
        return dout * ctx.inside, None, None, None


def hardtanh(input, min_val=-1.0, max_val=1.0, inplace=False):
    """Clip to ``[min_val, max_val]``, as ``torch.nn.functional.hardtanh``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> hardtanh(np.array([-3.0, 0.5, 2.0])).numpy()
        array([-1. ,  0.5,  1. ])
    """
    _check_input(input, "hardtanh")
    _check_number(min_val, "min_val", "hardtanh")
    _check_number(max_val, "max_val", "hardtanh")
    if min_val > max_val:
        raise ValueError(f"hardtanh(): min_val ({min_val}) cannot be greater than max_val ({max_val})")
    _check_inplace(input, inplace, "hardtanh")
    return Hardtanh.apply(input, min_val, max_val, bool(inplace))


def relu6(input, inplace=False):
    """``min(max(x, 0), 6)``, as ``torch.nn.functional.relu6`` (a ``hardtanh(x, 0, 6)``).

    Shape:
        input of any shape -> output of the same shape.
    """
    return hardtanh(input, 0.0, 6.0, inplace)


class ELU(Function):
    """out = x if x > 0 else alpha * (exp(x) - 1).  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, alpha, inplace):
        xp = get_array_module(x)
        positive = x > 0
        negative_part = alpha * xp.expm1(xp.minimum(x, 0))  # alpha*(e^x - 1), no overflow for x > 0
        ctx.positive, ctx.alpha = positive, alpha
        ctx.exp_neg = negative_part + alpha  # alpha * e^x on the negative side (what backward needs)
        if inplace:
            xp.copyto(x, negative_part, where=~positive)
            return x
        return xp.where(positive, x, negative_part)

    # Gradient: dx = dout if x > 0 else dout * alpha * e^x.
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        return xp.where(ctx.positive, dout, dout * ctx.exp_neg), None, None


def elu(input, alpha=1.0, inplace=False):
    """Exponential linear unit, as ``torch.nn.functional.elu``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> elu(np.array([0.0, 2.0])).numpy()
        array([0., 2.])
    """
    _check_input(input, "elu")
    _check_number(alpha, "alpha", "elu")
    _check_inplace(input, inplace, "elu")
    return ELU.apply(input, float(alpha), bool(inplace))


# ------------------------------------------------------- tanh and sigmoid
class Tanh(Function):
    """out = tanh(x).  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x):
        xp = get_array_module(x)
        ctx.out = xp.tanh(x)
        return ctx.out

    # Gradient: dx = dout * (1 - out^2).
    @staticmethod
    def backward(ctx, dout):
        return dout * (1 - ctx.out * ctx.out)


def tanh(input):
    """Hyperbolic tangent, as ``torch.nn.functional.tanh``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> tanh(np.zeros(2)).numpy()
        array([0., 0.])
    """
    _check_input(input, "tanh")
    return Tanh.apply(input)


class Sigmoid(Function):
    """out = 1 / (1 + e^-x), computed from e^-|x| so it never overflows.  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x):
        xp = get_array_module(x)
        e = xp.exp(-xp.abs(x))  # in (0, 1]
        ctx.out = xp.where(x >= 0, 1 / (1 + e), e / (1 + e))
        return ctx.out

    # Gradient: dx = dout * out * (1 - out).
    @staticmethod
    def backward(ctx, dout):
        return dout * ctx.out * (1 - ctx.out)


def sigmoid(input):
    """Logistic sigmoid ``1 / (1 + exp(-x))``, as ``torch.nn.functional.sigmoid``.

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> sigmoid(np.zeros(2)).numpy()
        array([0.5, 0.5])
    """
    _check_input(input, "sigmoid")
    return Sigmoid.apply(input)


# ---------------------------------------------------------------- softmax
class Softmax(Function):
    """out = e^(x - max) / sum_dim e^(x - max) along ``dim``.  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, dim, dtype):
        xp = get_array_module(x)
        ctx.in_dtype = x.dtype
        if dtype is not None:
            x = x.astype(dtype, copy=False)
        e = xp.exp(x - x.max(axis=dim, keepdims=True))  # subtracting the max: no overflow
        out = e / e.sum(axis=dim, keepdims=True)
        ctx.out, ctx.dim = out, dim
        return out

    # Gradient: dx = out * (dout - sum_dim(dout * out)).
    @staticmethod
    def backward(ctx, dout):
        out = ctx.out
        dx = out * (dout - (dout * out).sum(axis=ctx.dim, keepdims=True))
        return dx.astype(ctx.in_dtype, copy=False), None, None


class LogSoftmax(Function):
    """out = x - max - log(sum_dim e^(x - max)) along ``dim``.  Shape: any -> same."""

    @staticmethod
    def forward(ctx, x, dim, dtype):
        xp = get_array_module(x)
        ctx.in_dtype = x.dtype
        if dtype is not None:
            x = x.astype(dtype, copy=False)
        shifted = x - x.max(axis=dim, keepdims=True)
        out = shifted - xp.log(xp.exp(shifted).sum(axis=dim, keepdims=True))
        ctx.out, ctx.dim = out, dim
        return out

    # Gradient: dx = dout - e^out * sum_dim(dout)   (e^out is the softmax).
    @staticmethod
    def backward(ctx, dout):
        xp = get_array_module(dout)
        dx = dout - xp.exp(ctx.out) * dout.sum(axis=ctx.dim, keepdims=True)
        return dx.astype(ctx.in_dtype, copy=False), None, None


def _softmax_args(fn, input, dim, dtype):
    _check_input(input, fn)
    if dim is None:
        raise ValueError(
            f"{fn}(): dim is required (e.g. dim=1 for class scores of shape (N, K, H, W)); "
            "torch's implicit choice of dim is deprecated and scratchseg does not guess"
        )
    if isinstance(dim, bool) or not isinstance(dim, (int, numpy.integer)):
        raise TypeError(f"{fn}(): dim must be an int, got {dim!r}")
    ndim = max(input.ndim, 1)
    if not -ndim <= dim < ndim:
        raise IndexError(
            f"{fn}(): dim {dim} is out of range for a {input.ndim}-D input (expected [{-ndim}, {ndim - 1}])"
        )
    if dtype is not None:
        dtype = numpy.dtype(dtype)
        if dtype.kind != "f":
            raise TypeError(f"{fn}(): dtype must be a floating dtype, got {dtype}")
    elif numpy.dtype(input.dtype).kind != "f":
        raise TypeError(f"{fn}(): input must have a floating dtype (or pass dtype=), got {input.dtype}")
    return int(dim) % ndim if input.ndim else None, dtype


def softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Softmax along ``dim``, as ``torch.nn.functional.softmax``; ``dim`` is required.

    ``dtype`` casts the input first (the gradient comes back in the input's dtype).

    Shape:
        input of any shape -> output of the same shape, summing to 1 along ``dim``.

        >>> import numpy as np
        >>> softmax(np.zeros((2, 4)), dim=1).numpy()
        array([[0.25, 0.25, 0.25, 0.25],
               [0.25, 0.25, 0.25, 0.25]])
    """
    dim, dtype = _softmax_args("softmax", input, dim, dtype)
    return Softmax.apply(input, dim, dtype)


def log_softmax(input, dim=None, _stacklevel=3, dtype=None):
    """Logarithm of the softmax along ``dim``, as ``torch.nn.functional.log_softmax``.

    Computed as ``x - max - log(sum exp(x - max))`` (stable for large scores).

    Shape:
        input of any shape -> output of the same shape.

        >>> import numpy as np
        >>> log_softmax(np.zeros((1, 2)), dim=1).numpy()
        array([[-0.69314718, -0.69314718]])
    """
    dim, dtype = _softmax_args("log_softmax", input, dim, dtype)
    return LogSoftmax.apply(input, dim, dtype)
