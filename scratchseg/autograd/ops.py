"""The differentiable operations of a Tensor: each a ``Function``, and the Tensor method that calls it.

``x + y``, ``x * 2``, ``x @ w``, ``x ** 2``, ``x.exp()``, ``x.sum(dim)``,
``x.reshape(...)``, ``x.permute(...)``, ``x[index]`` all run one of the
Functions below. The methods are written in ``_TensorMethods`` at the end and
copied onto ``Tensor`` when this module is imported (the package's
``__init__`` imports it, so every Tensor has them): ``_tensor.py`` needs
nothing from here, and the imports run one way, ops -> function -> _tensor.

    >>> import numpy as np
    >>> from scratchseg.autograd import Tensor
    >>> x = Tensor(np.array([[1.0, 2.0], [3.0, 4.0]]), requires_grad=True)
    >>> y = (x * x).sum(dim=1)           # y_i = sum_j x_ij^2
    >>> y.backward(np.ones(2))
    >>> x.grad                            # dy/dx = 2 x
    array([[2., 4.],
           [6., 8.]])
"""

from __future__ import annotations

from numbers import Number

import numpy

from .. import backend
from .function import Function
from .indexing import GetItem, index_array
from ._tensor import Tensor, _as_array

__all__ = ["unbroadcast"]


def unbroadcast(grad, shape):
    """Sum ``grad`` over the axes that broadcasting added or stretched, to ``shape``."""
    shape = tuple(shape)
    if grad.shape == shape:
        return grad
    extra = grad.ndim - len(shape)
    if extra > 0:
        grad = grad.sum(axis=tuple(range(extra)))
    stretched = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if stretched:
        grad = grad.sum(axis=stretched, keepdims=True)
    return grad.reshape(shape)


def _shape_of(a):
    return a.shape if hasattr(a, "shape") else ()


# ------------------------------------------------------ elementary functions
class Add(Function):
    """out = a + b (broadcasting); da = dout, db = dout, summed back to shape."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a_shape, ctx.b_shape = _shape_of(a), _shape_of(b)
        return a + b

    @staticmethod
    def backward(ctx, dout):
        da = unbroadcast(dout, ctx.a_shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(dout, ctx.b_shape) if ctx.needs_input_grad[1] else None
        return da, db


class Sub(Function):
    """out = a - b; da = dout, db = -dout."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a_shape, ctx.b_shape = _shape_of(a), _shape_of(b)
        return a - b

    @staticmethod
    def backward(ctx, dout):
        da = unbroadcast(dout, ctx.a_shape) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-dout, ctx.b_shape) if ctx.needs_input_grad[1] else None
        return da, db


class Mul(Function):
    """out = a * b; da = dout * b, db = dout * a."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a * b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        da = unbroadcast(dout * b, _shape_of(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(dout * a, _shape_of(b)) if ctx.needs_input_grad[1] else None
        return da, db


class Div(Function):
    """out = a / b; da = dout / b, db = -dout * a / b^2."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a / b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        da = unbroadcast(dout / b, _shape_of(a)) if ctx.needs_input_grad[0] else None
        db = unbroadcast(-dout * a / (b * b), _shape_of(b)) if ctx.needs_input_grad[1] else None
        return da, db


class Neg(Function):
    """out = -x; dx = -dout."""

    @staticmethod
    def forward(ctx, x):
        return -x

    @staticmethod
    def backward(ctx, dout):
        return (-dout,)


class Pow(Function):
    """out = x ** p for a constant exponent p; dx = p x^(p-1) dout."""

    @staticmethod
    def forward(ctx, x, p):
        ctx.x, ctx.p = x, p
        return x**p

    @staticmethod
    def backward(ctx, dout):
        x, p = ctx.x, ctx.p
        return dout * p * x ** (p - 1), None


class Exp(Function):
    """out = e^x; dx = out * dout."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.get_array_module(x)
        ctx.out = xp.exp(x)
        return ctx.out

    @staticmethod
    def backward(ctx, dout):
        return (dout * ctx.out,)


class Log(Function):
    """out = ln x; dx = dout / x."""

    @staticmethod
    def forward(ctx, x):
        xp = backend.get_array_module(x)
        ctx.x = x
        return xp.log(x)

    @staticmethod
    def backward(ctx, dout):
        return (dout / ctx.x,)


class MatMul(Function):
    """out = a @ b (1-D, 2-D or batched); da = dout @ b^T, db = a^T @ dout.

    A 1-D ``a`` is read as a row (1, n) and a 1-D ``b`` as a column (n, 1), as
    matmul does; the gradient puts the dropped dimension back on ``dout`` first.
    """

    @staticmethod
    def forward(ctx, a, b):
        ctx.a, ctx.b = a, b
        return a @ b

    @staticmethod
    def backward(ctx, dout):
        a, b = ctx.a, ctx.b
        a2 = a.reshape(1, -1) if a.ndim == 1 else a  # (..., m, n)
        b2 = b.reshape(-1, 1) if b.ndim == 1 else b  # (..., n, p)
        if a.ndim == 1 and b.ndim == 1:
            d = dout.reshape(1, 1)  # (1, 1)
        elif a.ndim == 1:
            d = dout[..., None, :]  # (..., 1, p)
        elif b.ndim == 1:
            d = dout[..., None]  # (..., m, 1)
        else:
            d = dout  # (..., m, p)
        da = db = None
        if ctx.needs_input_grad[0]:
            da = unbroadcast(d @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if ctx.needs_input_grad[1]:
            db = unbroadcast(a2.swapaxes(-1, -2) @ d, b2.shape).reshape(b.shape)
        return da, db


# ---------------------------------------------------------------- reductions
def _normalise_axes(dim, ndim):
    dims = (dim,) if isinstance(dim, (int, numpy.integer)) else tuple(dim) if dim is not None else ()
    if not dims:  # None, () and [] all mean every dimension, as in torch
        return tuple(range(ndim))
    span = max(ndim, 1)  # a 0-d tensor takes dim 0 or -1, as in torch, and reduces nothing
    for d in dims:
        if not -span <= d < span:
            raise IndexError(f"dimension {d} is out of range for a tensor of {ndim} dimensions")
    axes = [int(d) % span for d in dims]
    if len(set(axes)) != len(axes):
        raise ValueError(f"dim {tuple(dims)} names a dimension more than once")
    return tuple(axes) if ndim else ()


class Sum(Function):
    """out = sum of x over ``dim``; dx = dout broadcast back over the summed axes."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape = x.shape
        ctx.axes = _normalise_axes(dim, x.ndim)
        return x.sum(axis=ctx.axes, keepdims=keepdim)

    @staticmethod
    def backward(ctx, dout):
        xp = backend.get_array_module(dout)
        kept = list(ctx.shape)
        for a in ctx.axes:
            kept[a] = 1
        return (xp.broadcast_to(dout.reshape(kept), ctx.shape),)


class Mean(Function):
    """out = mean of x over ``dim``; dx = dout / (number of averaged elements)."""

    @staticmethod
    def forward(ctx, x, dim=None, keepdim=False):
        ctx.shape = x.shape
        ctx.axes = _normalise_axes(dim, x.ndim)
        ctx.count = int(numpy.prod([x.shape[a] for a in ctx.axes])) if ctx.axes else 1
        return x.mean(axis=ctx.axes, keepdims=keepdim)

    @staticmethod
    def backward(ctx, dout):
        xp = backend.get_array_module(dout)
        kept = list(ctx.shape)
        for a in ctx.axes:
            kept[a] = 1
        return (xp.broadcast_to(dout.reshape(kept) / ctx.count, ctx.shape),)


# -------------------------------------------------------------------- shapes
class Reshape(Function):
    """out = x viewed with a new shape; dx = dout reshaped back."""

    @staticmethod
    def forward(ctx, x, shape):
        ctx.shape = x.shape
        return x.reshape(shape)

    @staticmethod
    def backward(ctx, dout):
        return dout.reshape(ctx.shape), None


class Permute(Function):
    """out = x with its axes reordered; dx = dout with the inverse order."""

    @staticmethod
    def forward(ctx, x, dims):
        ctx.inverse = tuple(numpy.argsort(dims))
        return x.transpose(dims)

    @staticmethod
    def backward(ctx, dout):
        return dout.transpose(ctx.inverse), None


# ---------------------------------------------------------- Tensor's methods
def _operand(other):
    """The other side of a binary operator: Tensors and numbers as they are, arrays and lists as arrays."""
    if isinstance(other, (Tensor, Number)):
        return other
    return _as_array(other)


class _TensorMethods:
    """Tensor's methods that compute (and so may record a graph); copied onto ``Tensor`` below."""

    def __add__(self, other):
        return Add.apply(self, _operand(other))

    def __radd__(self, other):
        return Add.apply(_operand(other), self)

    def __sub__(self, other):
        return Sub.apply(self, _operand(other))

    def __rsub__(self, other):
        return Sub.apply(_operand(other), self)

    def __mul__(self, other):
        return Mul.apply(self, _operand(other))

    def __rmul__(self, other):
        return Mul.apply(_operand(other), self)

    def __truediv__(self, other):
        return Div.apply(self, _operand(other))

    def __rtruediv__(self, other):
        return Div.apply(_operand(other), self)

    def __matmul__(self, other):
        return MatMul.apply(self, _operand(other))

    def __rmatmul__(self, other):
        return MatMul.apply(_operand(other), self)

    def __neg__(self):
        return Neg.apply(self)

    def __pow__(self, p):
        if not isinstance(p, Number):
            raise TypeError(f"only a constant exponent is supported, got {type(p).__name__}")
        return Pow.apply(self, p)

    def exp(self):
        return Exp.apply(self)

    def sqrt(self):
        return self**0.5

    def clone(self):
        return Tensor(self.data.copy()) if not self.requires_grad else self + 0

    def contiguous(self):
        return self

    def log(self):
        return Log.apply(self)

    # --------------------------------------------------------- reductions
    def sum(self, dim=None, keepdim=False):
        return Sum.apply(self, dim=dim, keepdim=keepdim)

    def mean(self, dim=None, keepdim=False):
        return Mean.apply(self, dim=dim, keepdim=keepdim)

    # ------------------------------------------------------------ shapes
    def reshape(self, *shape):
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return Reshape.apply(self, tuple(int(s) for s in shape))

    view = reshape

    def flatten(self, start_dim=0, end_dim=-1):
        shape = self.shape
        start, end = start_dim % max(len(shape), 1), end_dim % max(len(shape), 1)
        new = shape[:start] + (int(numpy.prod(shape[start : end + 1])),) + shape[end + 1 :]
        return self.reshape(new)

    def permute(self, *dims):
        if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
            dims = tuple(dims[0])
        return Permute.apply(self, tuple(int(d) % self.ndim for d in dims))

    def transpose(self, dim0, dim1):
        dims = list(range(self.ndim))
        dims[dim0], dims[dim1] = dims[dim1], dims[dim0]
        return Permute.apply(self, tuple(dims))

    @property
    def T(self):
        return self.permute(tuple(reversed(range(self.ndim))))

    def unsqueeze(self, dim):
        dim = dim % (self.ndim + 1)
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim=None):
        if dim is None:
            return self.reshape(tuple(s for s in self.shape if s != 1))
        dim = dim % self.ndim
        if self.shape[dim] != 1:
            return self
        return self.reshape(self.shape[:dim] + self.shape[dim + 1 :])

    def __getitem__(self, index):
        return GetItem.apply(self, index_array(index))


for _name, _method in vars(_TensorMethods).items():
    if callable(_method) or isinstance(_method, property):
        if callable(_method) and _method.__qualname__.startswith("_TensorMethods."):  # (view is reshape: named once)
            _method.__qualname__ = f"Tensor.{_name}"
        setattr(Tensor, _name, _method)
del _name, _method
